package server

import (
	"encoding/json"
	"errors"
	"net/http"
	"time"

	"github.com/berth-dev/berth/api"
)

// putInstanceStatuses records many instances' statuses in one request. The
// current objects come from the cache and the writes are batched, each
// guarded by the revision it was read at; an item whose guard fails (the
// cache was behind, or someone wrote it meanwhile) is retried alone against
// the store, so every item reported as recorded was.
func (s *Server) putInstanceStatuses(w http.ResponseWriter, r *http.Request) error {
	var b api.InstanceStatusBatch
	if err := decode(r, &b, "instance statuses", ""); err != nil {
		return err
	}
	if err := validated("instance statuses", b.Validate()); err != nil {
		return err
	}
	ctx := r.Context()
	res := make([]api.InstanceStatusResult, len(b.Items))
	retry := make([]bool, len(b.Items))
	batch := newWriteBatch(s.st)
	now := time.Now().UTC()
	for i, it := range b.Items {
		res[i].ID = it.ID
		ev, ok := s.cache.Get(keyInstances + it.ID)
		var in api.Instance
		if !ok || json.Unmarshal(ev.Value, &in) != nil {
			retry[i] = true
			continue
		}
		in.Status = it.Status
		in.UpdatedAt = now
		in.Revision = 0
		batch.put(keyInstances+it.ID, in, ev.Revision, func() { retry[i] = true })
	}
	if _, err := batch.flush(ctx); err != nil && !errors.Is(err, ctx.Err()) {
		s.log.Warn("instance statuses: batch write", "err", err)
	}
	for i, it := range b.Items {
		if !retry[i] {
			continue
		}
		st := it.Status
		if _, err := s.updateInstance(ctx, it.ID, func(in *api.Instance) { in.Status = st }); err != nil {
			res[i].Error = err.Error()
		}
	}
	writeJSON(w, http.StatusOK, api.InstanceStatusBatchResult{Results: res})
	return nil
}
