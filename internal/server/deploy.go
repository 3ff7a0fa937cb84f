package server

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"reflect"
	"sort"
	"time"

	"github.com/berth-dev/berth/api"
	"github.com/berth-dev/berth/internal/scheduler"
	"github.com/berth-dev/berth/internal/store"
)

// How often services waiting on time (a rollout's health deadline, a node's
// down grace) are looked at again, and how often everything is.
const (
	recheckEvery = time.Second
	resyncEvery  = 30 * time.Second
)

// runDeployments keeps each service's instances as its spec says: the
// replica count, the spec's generation, and a node for each. It keeps a
// decoded copy of the cluster current from the cache's events and, after
// each batch of events, reconciles only the services they touched; services
// waiting on time are looked at again every second and all of them every
// half minute as a safety net. Placement is the scheduler's, over a
// snapshot adjusted by every change; the pass's writes are batched.
func (s *Server) runDeployments(ctx context.Context) {
	st := newDeployState()
	snap, cursor := s.cache.Snapshot(store.Prefix)
	st.load(snap)
	waiting := map[string]struct{}{}
	tick := time.NewTicker(recheckEvery)
	defer tick.Stop()
	lastResync := time.Now()
	for ctx.Err() == nil {
		evs, cur, wait, err := s.cache.Since(cursor, store.Prefix)
		if err != nil {
			s.log.Info("deployments: fell behind the cache's events; reloading", "err", err)
			snap, cursor = s.cache.Snapshot(store.Prefix)
			st.load(snap)
		} else {
			cursor = cur
			for _, ev := range evs {
				st.apply(ev)
			}
		}
		if len(st.dirty) > 0 || st.nodesChanged || st.netsChanged {
			rev := s.reconcile(ctx, st, waiting)
			if rev > 0 {
				// Let the cache catch up with the pass's own writes, so the
				// next pass never acts on a state older than them.
				wctx, cancel := context.WithTimeout(ctx, 5*time.Second)
				_ = s.cache.WaitFor(wctx, rev)
				cancel()
				continue
			}
		}
		select {
		case <-ctx.Done():
		case <-wait:
		case <-tick.C:
			if time.Since(lastResync) >= resyncEvery {
				lastResync = time.Now()
				st.markAll()
				st.nodesChanged = false // no need to rebuild the snapshot
			}
			for name := range waiting {
				st.dirty[name] = struct{}{}
			}
		}
	}
}

// deployPass is one reconciliation of the dirty services.
type deployPass struct {
	st   *deployState
	b    *writeBatch
	wait bool // the service just reconciled waits on time: look again soon
}

// reconcile reconciles the dirty services and returns the highest revision
// it wrote (0: none).
func (s *Server) reconcile(ctx context.Context, st *deployState, waiting map[string]struct{}) int64 {
	if st.nodesChanged {
		s.log.Debug("deployments: nodes changed; rebuilding the placement snapshot", "nodes", len(st.nodes), "instances", len(st.instances))
		st.rebuild()
		st.markAll()
	}
	if st.nodesChanged || st.netsChanged {
		s.reconcileOverlays(ctx, st.networkList(), st.nodeList())
	}
	st.nodesChanged, st.netsChanged = false, false
	p := &deployPass{st: st, b: newWriteBatch(s.st)}
	dirty := st.dirty
	st.dirty = map[string]struct{}{}
	for name := range dirty {
		delete(waiting, name)
		svc, ok := st.services[name]
		if !ok {
			for _, in := range st.instancesOf(name) {
				p.deleteInstance(in)
			}
			continue
		}
		p.wait = false
		if err := s.reconcileService(ctx, p, svc, st.instancesOf(name)); err != nil && ctx.Err() == nil {
			s.log.Warn("deployments: reconcile", "service", svc.Name, "err", err)
			p.wait = true
		}
		if p.wait {
			waiting[name] = struct{}{}
		}
	}
	rev, err := p.b.flush(ctx)
	if err != nil && ctx.Err() == nil {
		s.log.Warn("deployments: write", "err", err)
	}
	return rev
}

// deleteInstance removes an instance and gives back what it holds; if the
// delete does not land, what the instance holds is counted again.
func (p *deployPass) deleteInstance(in api.Instance) {
	p.st.unreserve(in.ID)
	p.b.del(keyInstances+in.ID, in.Revision, func() {
		if cur, ok := p.st.instances[in.ID]; ok {
			p.st.account(cur)
		}
	})
}

// put writes an instance (placed on node with req, when node is set).
func (p *deployPass) put(in api.Instance, expect int64, node string, req scheduler.Request) {
	if node != "" {
		p.st.placed(in.ID, node, req)
	}
	p.b.put(keyInstances+in.ID, in, expect, func() {
		p.st.unreserve(in.ID)
		if cur, ok := p.st.instances[in.ID]; ok {
			p.st.account(cur)
		}
	})
}

// inPlace reports whether two specs differ only in what running instances
// take without a restart: replicas, resources (cgroup limits updated in
// place), and the update and restart policies.
func inPlace(a, b api.ServiceSpec) bool {
	a.Replicas, b.Replicas = nil, nil
	a.Resources, b.Resources = api.ResourceSpec{}, api.ResourceSpec{}
	a.Update, b.Update = api.UpdatePolicy{}, api.UpdatePolicy{}
	a.Restart, b.Restart = api.RestartPolicy{}, api.RestartPolicy{}
	return reflect.DeepEqual(a, b)
}

// nodeLost reports whether an instance's node has been down longer than
// the grace: its instances are replaced elsewhere.
func (s *Server) nodeLost(n api.Node, ok bool) bool {
	if !ok {
		return true // the node was removed
	}
	return n.Status.State == api.NodeDown && time.Since(n.UpdatedAt) > s.opts.NodeDownGrace
}

// fitsAfterResize reports whether an instance's node still has room for it
// with new resources (what it holds now given back first).
func (p *deployPass) fitsAfterResize(in api.Instance, res api.Resources) bool {
	used, alloc, ok := p.st.snap.Usage(in.Node)
	if !ok {
		return false
	}
	if r, had := p.st.acct[in.ID]; had {
		used.CPU -= r.req.Resources.CPU
		used.Memory -= r.req.Resources.Memory
	}
	return used.CPU+res.CPU <= alloc.CPU && used.Memory+res.Memory <= alloc.Memory
}

func (s *Server) reconcileService(ctx context.Context, p *deployPass, svc api.Service, list []api.Instance) error {
	nodes := p.st.nodes
	snap := p.st.snap
	want := 1
	if svc.Spec.Replicas != nil {
		want = *svc.Spec.Replicas
	}
	req, err := scheduler.RequestFor(svc.Spec)
	if err != nil {
		return err
	}
	var live, old []api.Instance
	for _, in := range list {
		if in.DesiredState != api.DesiredRunning {
			continue // stopped on request: kept for inspection, not counted
		}
		if in.Node != "" {
			n, ok := nodes[in.Node]
			if s.nodeLost(n, ok) {
				// Replaced elsewhere; when the node comes back its agent
				// no longer sees the instance and removes its container.
				s.log.Warn("deployments: node lost; replacing its instance", "instance", in.ID, "node", in.Node)
				p.deleteInstance(in)
				continue
			}
			if n.Status.State == api.NodeDown {
				p.wait = true // replaced when the grace runs out
			}
		}
		if in.Generation != svc.Generation {
			// An older generation: take in place what can be, replace otherwise.
			prev, ok := svc.SpecOf(in.Generation)
			newRes := api.Resources{CPU: svc.Spec.Resources.CPU, Memory: svc.Spec.Resources.Memory}
			if ok && inPlace(prev, svc.Spec) && (in.Node == "" || p.fitsAfterResize(in, newRes)) {
				rev := in.Revision
				in.Generation = svc.Generation
				in.Resources = svc.Spec.Resources
				in.UpdatedAt = time.Now().UTC()
				in.Revision = 0
				if in.Node != "" {
					// Hold the new resources at once.
					p.st.unreserve(in.ID)
					r := req
					r.Resources = newRes
					if snap.Reserve(in.Node, r) {
						p.put(in, rev, in.Node, r)
					} else {
						p.put(in, rev, "", r)
					}
				} else {
					p.put(in, rev, "", req)
				}
				live = append(live, in)
				continue
			}
			// Replaced step by step by the rollout: a new spec, or new
			// resources its node has no room for (the instance moves).
			old = append(old, in)
			continue
		}
		live = append(live, in)
	}
	if len(old) > 0 || (svc.Status.Rollout == api.RolloutProgressing && len(live) <= want) {
		done, err := s.rollout(ctx, p, svc, old, live, want, req)
		if err != nil || !done {
			p.wait = true
			return err
		}
	}
	// Scale down: the unhealthiest, then the newest, go first.
	sort.SliceStable(live, func(i, j int) bool {
		hi, hj := healthy(live[i]), healthy(live[j])
		if hi != hj {
			return hi
		}
		return live[i].CreatedAt.Before(live[j].CreatedAt)
	})
	for len(live) > want {
		in := live[len(live)-1]
		live = live[:len(live)-1]
		p.deleteInstance(in)
	}
	// Place pending instances, then create the missing ones.
	for _, in := range live {
		if in.Node != "" {
			continue
		}
		res, why := snap.Place(req)
		rev := in.Revision
		in.Revision = 0
		if res.Node == "" {
			if in.Status.Message != why.String() {
				in.Status.Reason, in.Status.Message = api.ReasonUnschedulable, why.String()
				p.put(in, rev, "", req)
			}
			continue
		}
		in.Node = res.Node
		in.Status = api.InstanceStatus{State: api.InstancePending}
		p.put(in, rev, res.Node, req)
	}
	s.updateServiceStatus(ctx, svc, live, func(st *api.ServiceStatus) {
		ready := 0
		for _, in := range live {
			if healthy(in) {
				ready++
			}
		}
		st.Updated = ready
		if ready >= want && len(live) == want {
			// Every instance is of this generation and healthy. A rollback
			// stays reported as such until the next apply.
			st.StableGeneration = svc.Generation
			if st.Rollout != api.RolloutRolledBack {
				st.Rollout, st.Message = api.RolloutComplete, ""
			}
		}
	})
	if n := want - len(live); n > 0 {
		p.createInstances(svc, req, n)
	}
	return nil
}

// createInstances places and stores n new instances of the service's
// current generation (pending with an explanation when nothing fits).
func (p *deployPass) createInstances(svc api.Service, req scheduler.Request, n int) {
	results, why := p.st.snap.PlaceN(req, n)
	now := time.Now().UTC()
	for i := range n {
		in := api.Instance{ID: svc.Name + "-" + randomSuffix(), Service: svc.Name, Generation: svc.Generation,
			DesiredState: api.DesiredRunning, Resources: svc.Spec.Resources, StopGrace: api.Duration(api.DefaultStopGrace),
			Status: api.InstanceStatus{State: api.InstancePending}}
		in.CreatedAt, in.UpdatedAt = now, now
		node := ""
		if i < len(results) {
			node = results[i].Node
		}
		if node != "" {
			in.Node = node
		} else {
			in.Status.Reason, in.Status.Message = api.ReasonUnschedulable, why.String()
		}
		p.put(in, 0, node, req)
	}
}

// healthy: running and not failing its check.
func healthy(in api.Instance) bool {
	return in.Status.State == api.InstanceRunning && in.Status.Health != api.HealthCritical
}

// rollout replaces old-generation instances by new ones in steps: at most
// maxParallel new instances starting at a time, at most replicas+maxSurge
// instances in all, an old one removed for each new one that is healthy.
// A new instance that fails, or is not healthy within the health deadline,
// fails the rollout; with autoRollback the last stable spec is applied
// again. It returns done when no rollout work is left.
func (s *Server) rollout(ctx context.Context, p *deployPass, svc api.Service, old, cur []api.Instance, want int,
	req scheduler.Request) (bool, error) {
	u := svc.Spec.Update
	surge := 1
	if u.MaxSurge != nil {
		surge = *u.MaxSurge
	}
	parallel := max(1, u.MaxParallel)
	var ready, starting []api.Instance
	for _, in := range cur {
		switch {
		case healthy(in) && time.Since(in.Status.StartedAt) >= u.MinHealthyTime.D():
			ready = append(ready, in)
		case in.Status.State == api.InstanceFailed || in.Status.State == api.InstanceExited ||
			time.Since(in.CreatedAt) > u.HealthDeadline.D():
			why := fmt.Sprintf("instance %s of generation %d is not healthy (%s %s)", in.ID, svc.Generation, in.Status.State, in.Status.Message)
			return false, s.failRollout(ctx, svc, why)
		default:
			starting = append(starting, in)
		}
	}
	if len(old) == 0 && len(ready) >= want {
		s.updateServiceStatus(ctx, svc, cur, func(st *api.ServiceStatus) {
			st.StableGeneration = svc.Generation
			if st.Rollout != api.RolloutRolledBack {
				st.Rollout, st.Message = api.RolloutComplete, ""
			}
		})
		return true, nil
	}
	// Remove old instances that healthy new ones replace.
	sort.Slice(old, func(i, j int) bool { return old[i].CreatedAt.Before(old[j].CreatedAt) })
	excess := len(old) + len(ready) - want
	if surge == 0 && len(starting) == 0 && len(ready) < want {
		excess = max(excess, min(parallel, len(old))) // no room to surge: make room
	}
	for i := 0; i < excess && len(old) > 0; i++ {
		p.deleteInstance(old[0])
		old = old[1:]
	}
	// Start new ones within the surge and parallelism bounds.
	total := len(old) + len(cur)
	create := 0
	for n := len(starting); n < parallel && len(cur) < want && total < want+surge; n++ {
		create++
		total++
		cur = append(cur, api.Instance{})
	}
	p.createInstances(svc, req, create)
	s.updateServiceStatus(ctx, svc, append(append([]api.Instance{}, old...), ready...), func(st *api.ServiceStatus) {
		st.Updated = len(ready)
		if st.Rollout != api.RolloutRolledBack { // a rollback clearing up stays reported as one
			st.Rollout = api.RolloutProgressing
			st.Message = fmt.Sprintf("%d of %d updated to generation %d, %d old left", len(ready), want, svc.Generation, len(old))
		}
	})
	return false, nil
}

// failRollout rolls back to the stable generation, or stops the rollout.
func (s *Server) failRollout(ctx context.Context, svc api.Service, why string) error {
	prev, ok := svc.SpecOf(svc.Status.StableGeneration)
	if !svc.Spec.Update.AutoRollback || !ok || svc.Status.StableGeneration == svc.Generation {
		if svc.Status.Rollout != api.RolloutFailed {
			s.log.Warn("deployments: rollout failed", "service", svc.Name, "why", why)
			s.updateServiceStatus(ctx, svc, nil, func(st *api.ServiceStatus) { st.Rollout, st.Message = api.RolloutFailed, why })
		}
		return nil
	}
	s.log.Warn("deployments: rollout failed; rolling back", "service", svc.Name, "to", svc.Status.StableGeneration, "why", why)
	rev := svc.Revision
	svc.History = append(svc.History, api.SpecRevision{Generation: svc.Generation, Spec: svc.Spec, AppliedAt: svc.UpdatedAt})
	if len(svc.History) > api.MaxHistory {
		svc.History = svc.History[len(svc.History)-api.MaxHistory:]
	}
	stable := svc.Status.StableGeneration
	svc.Spec = prev
	svc.Generation++
	svc.UpdatedAt = time.Now().UTC()
	svc.Status.Rollout = api.RolloutRolledBack
	svc.Status.Message = fmt.Sprintf("rolled back to the spec of generation %d: %s", stable, why)
	svc.Revision = 0
	if _, err := s.st.Put(ctx, keyServices+svc.Name, svc, rev); err != nil && !errors.Is(err, store.ErrConflict) {
		return err
	}
	return nil
}

// updateServiceStatus records how many instances run and are healthy,
// writing only when the counts change.
func (s *Server) updateServiceStatus(ctx context.Context, svc api.Service, live []api.Instance, mutate func(*api.ServiceStatus)) {
	st := svc.Status
	if live != nil {
		st.Running, st.Healthy = 0, 0
		for _, in := range live {
			if in.Status.State == api.InstanceRunning {
				st.Running++
				if in.Status.Health != api.HealthCritical {
					st.Healthy++
				}
			}
		}
	}
	if mutate != nil {
		mutate(&st)
	}
	if st == svc.Status {
		return
	}
	svc.Status = st
	rev := svc.Revision
	svc.Revision = 0
	if _, err := s.st.Put(ctx, keyServices+svc.Name, svc, rev); err != nil && !errors.Is(err, store.ErrConflict) {
		s.log.Warn("deployments: service status", "service", svc.Name, "err", err)
	}
}

func randomSuffix() string {
	const chars = "abcdefghijklmnopqrstuvwxyz0123456789"
	b := make([]byte, 5)
	_, _ = rand.Read(b)
	for i := range b {
		b[i] = chars[int(b[i])%len(chars)]
	}
	return string(b)
}
