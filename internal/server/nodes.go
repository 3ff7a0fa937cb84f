package server

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"strings"
	"time"

	"github.com/berth-dev/berth/api"
	"github.com/berth-dev/berth/internal/store"
)

// nodeLease is stored at keyNodeLeases+name, attached to the node's lease:
// the key disappears when the lease lapses.
type nodeLease struct {
	Lease int64 `json:"lease"`
}

func (s *Server) listNodes(w http.ResponseWriter, r *http.Request) error {
	return s.serveList(w, r, keyNodes, api.KindNode, nil)
}

func (s *Server) getNode(w http.ResponseWriter, r *http.Request) error {
	name := r.PathValue("name")
	kv, err := s.st.GetKV(r.Context(), keyNodes+name)
	if errors.Is(err, store.ErrNotFound) {
		return apiError(http.StatusNotFound, api.CodeNotFound, "node %q not found", name)
	}
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, s.decorate(api.KindNode, kv.Key, kv.Value, kv.ModRevision))
	return nil
}

func (s *Server) noteHeartbeat(name string, t time.Time) {
	s.hbMu.Lock()
	s.heartbeats[name] = t
	s.hbMu.Unlock()
}

func (s *Server) lastHeartbeat(name string) (time.Time, bool) {
	s.hbMu.Lock()
	defer s.hbMu.Unlock()
	t, ok := s.heartbeats[name]
	return t, ok
}

// registerNode stores (or refreshes) a node and gives it a live lease.
func (s *Server) registerNode(w http.ResponseWriter, r *http.Request) error {
	name := r.PathValue("name")
	var reg api.NodeRegistration
	if err := decode(r, &reg, "node", ""); err != nil {
		return err
	}
	if reg.TTL == 0 {
		reg.TTL = api.Duration(s.opts.DefaultNodeTTL)
	}
	if err := validated("node", reg.Validate(name)); err != nil {
		return err
	}
	ctx := r.Context()
	for {
		var old api.Node
		rev, err := s.st.Get(ctx, keyNodes+name, &old)
		if err != nil && !errors.Is(err, store.ErrNotFound) {
			return err
		}
		lease, stale, err := s.ensureLease(ctx, name, reg.TTL.D())
		if err != nil {
			return err
		}
		now := time.Now().UTC()
		n := api.Node{Name: name, NodeRegistration: reg,
			Status: api.NodeStatus{State: api.NodeReady, LastHeartbeat: now}}
		n.CreatedAt, n.UpdatedAt = now, now
		if rev != 0 {
			n.CreatedAt = old.CreatedAt
		}
		newRev, err := s.st.Txn(ctx,
			store.Write{Key: keyNodes + name, Value: n, Expect: rev},
			store.Write{Key: keyNodeLeases + name, Value: nodeLease{Lease: lease}, Lease: lease, Expect: -1})
		if errors.Is(err, store.ErrConflict) || errors.Is(err, store.ErrExists) || errors.Is(err, store.ErrNotFound) {
			continue // raced with another write of this node: read again
		}
		if err != nil {
			return err
		}
		if stale != 0 {
			_ = s.st.Revoke(ctx, stale)
		}
		s.noteHeartbeat(name, now)
		s.log.Info("node registered", "node", name, "address", reg.Address, "cpu", reg.Allocatable.CPU, "memory", reg.Allocatable.Memory)
		n.Revision = newRev
		writeJSON(w, http.StatusOK, n)
		return nil
	}
}

// ensureLease returns the node's live lease, renewed, or a new one of ttl.
// A live lease of another TTL is replaced: the caller revokes the old one
// (returned as stale) once the lease key hangs on the new one.
func (s *Server) ensureLease(ctx context.Context, name string, ttl time.Duration) (lease, stale int64, err error) {
	var nl nodeLease
	if _, err := s.st.Get(ctx, keyNodeLeases+name, &nl); err == nil {
		granted, err := s.st.LeaseTTL(ctx, nl.Lease)
		switch {
		case errors.Is(err, store.ErrNoLease):
		case err != nil:
			return 0, 0, err
		case granted == store.TTLSeconds(ttl):
			if err := s.st.KeepAlive(ctx, nl.Lease); err == nil {
				return nl.Lease, 0, nil
			} else if !errors.Is(err, store.ErrNoLease) {
				return 0, 0, err
			}
		default:
			stale = nl.Lease
		}
	} else if !errors.Is(err, store.ErrNotFound) {
		return 0, 0, err
	}
	lease, err = s.st.Grant(ctx, ttl)
	return lease, stale, err
}

// heartbeat renews a node's lease; a node whose lease had lapsed is ready again.
func (s *Server) heartbeat(w http.ResponseWriter, r *http.Request) error {
	name := r.PathValue("name")
	ctx := r.Context()
	for {
		var n api.Node
		rev, err := s.st.Get(ctx, keyNodes+name, &n)
		if errors.Is(err, store.ErrNotFound) {
			writeJSON(w, http.StatusOK, api.HeartbeatResponse{Registered: false})
			return nil
		}
		if err != nil {
			return err
		}
		now := time.Now().UTC()
		var nl nodeLease
		if _, err := s.st.Get(ctx, keyNodeLeases+name, &nl); err == nil {
			if err := s.st.KeepAlive(ctx, nl.Lease); err == nil {
				s.noteHeartbeat(name, now)
				if n.Status.State == api.NodeReady {
					writeJSON(w, http.StatusOK, api.HeartbeatResponse{Registered: true, TTL: n.TTL})
					return nil
				}
			} else if !errors.Is(err, store.ErrNoLease) {
				return err
			}
		} else if !errors.Is(err, store.ErrNotFound) {
			return err
		}
		// The lease lapsed (or the node was marked down): bring it back.
		lease, stale, err := s.ensureLease(ctx, name, n.TTL.D())
		if err != nil {
			return err
		}
		n.Status = api.NodeStatus{State: api.NodeReady, LastHeartbeat: now}
		n.UpdatedAt = now
		_, err = s.st.Txn(ctx,
			store.Write{Key: keyNodes + name, Value: n, Expect: rev},
			store.Write{Key: keyNodeLeases + name, Value: nodeLease{Lease: lease}, Lease: lease, Expect: -1})
		if errors.Is(err, store.ErrConflict) {
			// The node changed meanwhile (the liveness controller marking
			// it down after the lapse, a registration): read it again. A
			// lease granted for this attempt holds no key and lapses alone.
			continue
		}
		if err != nil {
			return err
		}
		if stale != 0 {
			_ = s.st.Revoke(context.WithoutCancel(ctx), stale)
		}
		s.noteHeartbeat(name, now)
		s.log.Info("node is back", "node", name)
		writeJSON(w, http.StatusOK, api.HeartbeatResponse{Registered: true, TTL: n.TTL})
		return nil
	}
}

// releaseNode ends a node's lease at once (its agent is stopping) and marks
// it down. The down state and the removal of the lease key are one
// transaction, so the liveness controller never reports this as a lapse.
func (s *Server) releaseNode(w http.ResponseWriter, r *http.Request) error {
	name := r.PathValue("name")
	ctx := r.Context()
	for {
		var n api.Node
		rev, err := s.st.Get(ctx, keyNodes+name, &n)
		if errors.Is(err, store.ErrNotFound) {
			return notFound("node", name)
		}
		if err != nil {
			return err
		}
		var nl nodeLease
		lrev, err := s.st.Get(ctx, keyNodeLeases+name, &nl)
		if err != nil && !errors.Is(err, store.ErrNotFound) {
			return err
		}
		now := time.Now().UTC()
		n.Status.State, n.Status.Message = api.NodeDown, "agent stopped"
		if t, ok := s.lastHeartbeat(name); ok && t.After(n.Status.LastHeartbeat) {
			n.Status.LastHeartbeat = t
		}
		n.UpdatedAt = now
		writes := []store.Write{{Key: keyNodes + name, Value: n, Expect: rev}}
		if lrev != 0 {
			writes = append(writes, store.Write{Key: keyNodeLeases + name, Expect: lrev})
		}
		if _, err := s.st.Txn(ctx, writes...); errors.Is(err, store.ErrConflict) {
			continue
		} else if err != nil {
			return err
		}
		if nl.Lease != 0 {
			_ = s.st.Revoke(ctx, nl.Lease)
		}
		s.log.Info("node down", "node", name, "reason", "agent stopped")
		w.WriteHeader(http.StatusNoContent)
		return nil
	}
}

func (s *Server) deleteNode(w http.ResponseWriter, r *http.Request) error {
	name := r.PathValue("name")
	ctx := r.Context()
	for {
		var n api.Node
		rev, err := s.st.Get(ctx, keyNodes+name, &n)
		if errors.Is(err, store.ErrNotFound) {
			return apiError(http.StatusNotFound, api.CodeNotFound, "node %q not found", name)
		}
		if err != nil {
			return err
		}
		if n.Status.State == api.NodeReady && !boolParam(r, "force") {
			return apiError(http.StatusConflict, api.CodeConflict, "node %q is ready: stop its agent first, or delete with force", name)
		}
		var nl nodeLease
		if _, err := s.st.Get(ctx, keyNodeLeases+name, &nl); err != nil && !errors.Is(err, store.ErrNotFound) {
			return err
		}
		_, err = s.st.Txn(ctx,
			store.Write{Key: keyNodes + name, Expect: rev},
			store.Write{Key: keyNodeLeases + name, Expect: -1})
		if errors.Is(err, store.ErrConflict) {
			continue // changed meanwhile (a heartbeat, the liveness controller): check again
		}
		if err != nil {
			return err
		}
		if nl.Lease != 0 {
			_ = s.st.Revoke(ctx, nl.Lease)
		}
		s.hbMu.Lock()
		delete(s.heartbeats, name)
		s.hbMu.Unlock()
		w.WriteHeader(http.StatusNoContent)
		return nil
	}
}

// markDown records that a node has no live lease, unless it has one again.
func (s *Server) markDown(ctx context.Context, name, why string) error {
	for {
		var n api.Node
		rev, err := s.st.Get(ctx, keyNodes+name, &n)
		if errors.Is(err, store.ErrNotFound) {
			return nil
		}
		if err != nil {
			return err
		}
		if n.Status.State == api.NodeDown {
			return nil
		}
		n.Status.State = api.NodeDown
		n.Status.Message = why
		if t, ok := s.lastHeartbeat(name); ok && t.After(n.Status.LastHeartbeat) {
			n.Status.LastHeartbeat = t
		}
		n.UpdatedAt = time.Now().UTC()
		// Only if the node still has no lease: a heartbeat may have revived it.
		_, err = s.st.Txn(ctx,
			store.Write{Key: keyNodes + name, Value: n, Expect: rev},
			store.Write{Key: keyNodeLeases + name, Expect: 0, Check: true})
		if errors.Is(err, store.ErrConflict) || errors.Is(err, store.ErrNotFound) {
			if c, _ := s.st.Count(ctx, keyNodeLeases+name); c > 0 {
				return nil
			}
			continue
		}
		if err == nil {
			s.log.Warn("node down", "node", name, "reason", why)
		}
		return err
	}
}

// runNodeLiveness marks down every node whose lease lapses. It reconciles
// at start and every few seconds, and reacts at once to lease expiry events.
func (s *Server) runNodeLiveness(ctx context.Context) {
	reconcile := func() int64 {
		kvs, rev, err := s.st.List(ctx, keyNodes)
		if err != nil {
			s.log.Warn("node liveness: list nodes", "err", err)
			return 0
		}
		for _, kv := range kvs {
			var n api.Node
			if json.Unmarshal(kv.Value, &n) != nil || n.Status.State != api.NodeReady {
				continue
			}
			if c, err := s.st.Count(ctx, keyNodeLeases+n.Name); err == nil && c == 0 {
				if err := s.markDown(ctx, n.Name, "node lease expired: no heartbeat"); err != nil && ctx.Err() == nil {
					s.log.Warn("node liveness: mark down", "node", n.Name, "err", err)
				}
			}
		}
		return rev
	}
	cursor := reconcile()
	tick := time.NewTicker(5 * time.Second)
	defer tick.Stop()
	for ctx.Err() == nil {
		evs, cur, wait, err := s.cache.Since(cursor, keyNodeLeases)
		if err != nil {
			cursor = reconcile()
			continue
		}
		for _, ev := range evs {
			if ev.Delete {
				name := strings.TrimPrefix(ev.Key, keyNodeLeases)
				if err := s.markDown(ctx, name, "node lease expired: no heartbeat"); err != nil && ctx.Err() == nil {
					s.log.Warn("node liveness: mark down", "node", name, "err", err)
				}
			}
		}
		cursor = cur
		select {
		case <-ctx.Done():
		case <-wait:
		case <-tick.C:
			reconcile()
		}
	}
}
