package server

import (
	"encoding/json"
	"errors"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/berth-dev/berth/api"
	"github.com/berth-dev/berth/internal/cache"
	"github.com/berth-dev/berth/internal/store"
)

// bookmarkEvery is how often an idle watch stream reports its revision.
const bookmarkEvery = 5 * time.Second

// serveList answers a list endpoint from the store, or with ?watch=1 streams
// its changes. keep, when set, filters the objects by their stored JSON.
func (s *Server) serveList(w http.ResponseWriter, r *http.Request, prefix, kind string, keep func([]byte) bool) error {
	if boolParam(r, "watch") {
		return s.serveWatch(w, r, prefix, kind, keep)
	}
	kvs, rev, err := s.st.List(r.Context(), prefix)
	if err != nil {
		return err
	}
	items := make([]json.RawMessage, 0, len(kvs))
	for _, kv := range kvs {
		if keep != nil && !keep(kv.Value) {
			continue
		}
		items = append(items, s.decorate(kind, kv.Key, kv.Value, kv.ModRevision))
	}
	writeJSON(w, http.StatusOK, api.List[json.RawMessage]{Items: items, Revision: rev})
	return nil
}

// decorate adds server-side fields to a stored object as served.
func (s *Server) decorate(kind, key string, raw []byte, rev int64) json.RawMessage {
	if kind == api.KindNode {
		if t, ok := s.lastHeartbeat(store.Name(key)); ok {
			var n api.Node
			if json.Unmarshal(raw, &n) == nil && t.After(n.Status.LastHeartbeat) {
				n.Status.LastHeartbeat = t
				if b, err := json.Marshal(n); err == nil {
					raw = b
				}
			}
		}
	}
	return withRevision(raw, rev)
}

// serveWatch streams changes under prefix as JSON lines. Without ?revision
// it starts with the current objects; with ?revision=R it sends every change
// after R, or 410 Gone when R is older than the cache holds.
func (s *Server) serveWatch(w http.ResponseWriter, r *http.Request, prefix, kind string, keep func([]byte) bool) error {
	ctx := r.Context()
	select {
	case <-s.cache.Ready():
	case <-ctx.Done():
		return ctx.Err()
	}
	flusher, _ := w.(http.Flusher)
	var cursor int64
	var initial []cache.Event
	if v := r.URL.Query().Get("revision"); v != "" {
		rev, err := strconv.ParseInt(v, 10, 64)
		if err != nil || rev < 0 {
			return invalid("watch", api.FieldErrors{{Field: "revision", Reason: "must be a non-negative integer"}})
		}
		if _, _, _, err := s.cache.Since(rev, prefix); err != nil {
			return err
		}
		cursor = rev
	} else {
		initial, cursor = s.cache.Snapshot(prefix)
	}
	w.Header().Set("Content-Type", "application/x-ndjson")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(http.StatusOK)
	enc := json.NewEncoder(w)
	send := func(ev api.Event) bool {
		if err := enc.Encode(ev); err != nil {
			return false
		}
		return true
	}
	emit := func(evs []cache.Event) bool {
		for _, e := range evs {
			if keep != nil && !keep(e.Value) {
				continue
			}
			ev := api.Event{Type: api.EventPut, Kind: kind, Name: eventName(prefix, e.Key), Revision: e.Revision,
				Object: s.decorate(kind, e.Key, e.Value, e.Revision)}
			if e.Delete {
				ev.Type = api.EventDelete
			}
			if !send(ev) {
				return false
			}
		}
		return true
	}
	if !emit(initial) {
		return nil
	}
	// A bookmark right away tells the client the revision it is current to.
	if !send(api.Event{Type: api.EventBookmark, Revision: cursor}) {
		return nil
	}
	if flusher != nil {
		flusher.Flush()
	}
	tick := time.NewTicker(bookmarkEvery)
	defer tick.Stop()
	for {
		evs, cur, wait, err := s.cache.Since(cursor, prefix)
		if err != nil {
			ae := apiError(http.StatusGone, api.CodeGone, "%v", err)
			if !errors.Is(err, cache.ErrGone) {
				ae = apiError(http.StatusInternalServerError, api.CodeInternal, "%v", err)
			}
			send(api.Event{Type: api.EventError, Revision: cursor, Error: ae})
			return nil
		}
		if len(evs) > 0 {
			if !emit(evs) {
				return nil
			}
			if flusher != nil {
				flusher.Flush()
			}
		}
		cursor = cur
		select {
		case <-ctx.Done():
			return nil
		case <-wait:
		case <-tick.C:
			if !send(api.Event{Type: api.EventBookmark, Revision: cursor}) {
				return nil
			}
			if flusher != nil {
				flusher.Flush()
			}
		}
	}
}

// eventName is the object's name under its prefix ("web/i-1" for a
// registration keyed by service and id).
func eventName(prefix, key string) string {
	name := strings.TrimPrefix(key, prefix)
	if strings.HasPrefix(prefix, keyRegistrations) {
		return strings.TrimPrefix(key, keyRegistrations)
	}
	return name
}
