package server

import (
	"context"
	"errors"
	"net/http"
	"net/url"
	"time"

	"github.com/berth-dev/berth/api"
	"github.com/berth-dev/berth/internal/cache"
	"github.com/berth-dev/berth/internal/store"
)

// checkStateWait bounds how long an accepted update waits for the new
// state to reach the instance's status, so that the caller's next read
// (discovery, DNS) sees it.
const checkStateWait = 3 * time.Second

// putInstanceCheck answers PUT /v1/instances/{id}/check: it feeds the TTL
// check of a running instance (the spec's check: {ttl: ...}) through the
// agent of its node, which runs the check, and answers with the instance
// once its status carries the new state (or after checkStateWait).
func (s *Server) putInstanceCheck(w http.ResponseWriter, r *http.Request) error {
	id := r.PathValue("id")
	var u api.CheckUpdate
	if err := decode(r, &u, "check update", ""); err != nil {
		return err
	}
	if err := validated("check update", u.Validate()); err != nil {
		return err
	}
	ctx := r.Context()
	var in api.Instance
	rev, err := s.st.Get(ctx, keyInstances+id, &in)
	if errors.Is(err, store.ErrNotFound) {
		return notFound("instance", id)
	} else if err != nil {
		return err
	}
	in.Revision = rev
	if err := s.checkIsTTL(ctx, in); err != nil {
		return err
	}
	if in.DesiredState != api.DesiredRunning || in.Status.State != api.InstanceRunning || in.Node == "" {
		state := in.Status.State
		switch {
		case in.DesiredState != api.DesiredRunning:
			state = "desired " + in.DesiredState
		case state == "":
			state = "not started"
		}
		return apiError(http.StatusConflict, api.CodeConflict,
			"instance %s is not running (%s): its check runs only while it does", id, state)
	}
	base, err := s.agentURL(ctx, in.Node)
	if err != nil {
		return err
	}
	actx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if err := callAgentJSON(actx, http.MethodPut, base+"/v1/agent/instances/"+url.PathEscape(id)+"/check", u, nil); err != nil {
		var ae *api.Error
		if errors.As(err, &ae) && ae.Status == http.StatusNotFound {
			return apiError(http.StatusConflict, api.CodeConflict, "instance %s is not running on node %s: %s", id, in.Node, ae.Message)
		}
		return err
	}
	writeJSON(w, http.StatusOK, s.awaitHealth(ctx, id, u.State, in, rev))
	return nil
}

// checkIsTTL refuses an instance whose spec has no TTL check.
func (s *Server) checkIsTTL(ctx context.Context, in api.Instance) error {
	var svc api.Service
	if _, err := s.st.Get(ctx, keyServices+in.Service, &svc); errors.Is(err, store.ErrNotFound) {
		return apiError(http.StatusConflict, api.CodeConflict, "instance %s has no check: its service %s is gone", in.ID, in.Service)
	} else if err != nil {
		return err
	}
	spec, ok := svc.SpecOf(in.Generation)
	if !ok {
		return apiError(http.StatusConflict, api.CodeConflict, "instance %s has no check: service %s no longer has its generation %d", in.ID, in.Service, in.Generation)
	}
	switch c := spec.Check; {
	case c == nil:
		return apiError(http.StatusConflict, api.CodeConflict,
			"instance %s has no health check: service %s sets none (a TTL check is check: {ttl: 30s})", in.ID, in.Service)
	case c.TTL <= 0:
		return apiError(http.StatusConflict, api.CodeConflict,
			"the check of instance %s is a %s check, not a TTL check: its state comes from its probes", in.ID, probeKind(*c))
	}
	return nil
}

func probeKind(c api.CheckSpec) string {
	switch {
	case c.HTTP != nil:
		return "http"
	case c.TCP != nil:
		return "tcp"
	case c.Exec != nil:
		return "exec"
	}
	return "probed"
}

// awaitHealth waits until the cache holds the instance (read at revision
// rev) with health state, or no longer running, or gone, at most
// checkStateWait, and returns the instance as last seen.
func (s *Server) awaitHealth(ctx context.Context, id, state string, last api.Instance, rev int64) api.Instance {
	wctx, cancel := context.WithTimeout(ctx, checkStateWait)
	defer cancel()
	if s.cache.WaitFor(wctx, rev) != nil {
		return last
	}
	idx := s.index()
	for {
		wait := cacheChanged(s.cache)
		in, ok := idx.instance(s.cache, id)
		if !ok {
			return last // removed meanwhile
		}
		last = in
		if in.Status.Health == state || in.Status.State != api.InstanceRunning {
			return in
		}
		select {
		case <-wait:
		case <-wctx.Done():
			return last
		}
	}
}

// instance returns an instance as the index holds it.
func (x *registryIndex) instance(c *cache.Cache, id string) (api.Instance, bool) {
	x.sync(c)
	x.mu.RLock()
	defer x.mu.RUnlock()
	e := x.services[x.owner[id]]
	if e == nil {
		return api.Instance{}, false
	}
	in, ok := e.instances[id]
	return in, ok
}
