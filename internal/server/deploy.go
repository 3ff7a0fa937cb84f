package server

import (
	"context"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"reflect"
	"sort"
	"strings"
	"time"

	"github.com/berth-dev/berth/api"
	"github.com/berth-dev/berth/internal/scheduler"
	"github.com/berth-dev/berth/internal/store"
)

// runDeployments keeps each service's instances as its spec says: the
// replica count, the spec's generation, and a node for each. It reacts to
// every change of services, instances and nodes, and reconciles every few
// seconds as a safety net. Placement is the scheduler's, over a snapshot of
// the cluster built once per pass.
func (s *Server) runDeployments(ctx context.Context) {
	cursor := s.cache.Revision()
	s.reconcileAll(ctx)
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	for ctx.Err() == nil {
		evs, cur, wait, err := s.cache.Since(cursor, store.Prefix)
		if err != nil {
			cursor = s.cache.Revision()
			s.reconcileAll(ctx)
			continue
		}
		cursor = cur
		if relevant(evs) {
			s.reconcileAll(ctx)
		}
		select {
		case <-ctx.Done():
		case <-wait:
		case <-tick.C:
			s.reconcileAll(ctx)
		}
	}
}

// relevant reports whether any event touches what the controller reads:
// services, nodes and instances (status reports change services' counts).
func relevant(evs []storeEvent) bool {
	for _, e := range evs {
		if strings.HasPrefix(e.Key, keyServices) || strings.HasPrefix(e.Key, keyNodes) || strings.HasPrefix(e.Key, keyInstances) ||
			strings.HasPrefix(e.Key, keyNetworks) {
			return true
		}
	}
	return false
}

type storeEvent = store.Event

func (s *Server) reconcileAll(ctx context.Context) {
	snap, _ := s.cache.Snapshot(store.Prefix)
	services := map[string]api.Service{}
	byService := map[string][]api.Instance{}
	var nodes []api.Node
	var networks []api.Network
	for _, ev := range snap {
		switch {
		case strings.HasPrefix(ev.Key, keyServices):
			var svc api.Service
			if json.Unmarshal(ev.Value, &svc) == nil {
				svc.Revision = ev.Revision
				services[svc.Name] = svc
			}
		case strings.HasPrefix(ev.Key, keyInstances):
			var in api.Instance
			if json.Unmarshal(ev.Value, &in) == nil {
				in.Revision = ev.Revision
				byService[in.Service] = append(byService[in.Service], in)
			}
		case strings.HasPrefix(ev.Key, keyNodes):
			var n api.Node
			if json.Unmarshal(ev.Value, &n) == nil {
				nodes = append(nodes, n)
			}
		case strings.HasPrefix(ev.Key, keyNetworks):
			var n api.Network
			if json.Unmarshal(ev.Value, &n) == nil {
				n.Revision = ev.Revision
				networks = append(networks, n)
			}
		}
	}
	s.reconcileOverlays(ctx, networks, nodes)
	var all []api.Instance
	for _, list := range byService {
		all = append(all, list...)
	}
	placer := scheduler.NewSnapshot(nodes, all)
	nodeByName := map[string]api.Node{}
	for _, n := range nodes {
		nodeByName[n.Name] = n
	}
	for name, list := range byService {
		if _, ok := services[name]; !ok {
			for _, in := range list {
				s.deleteInstance(ctx, in)
			}
		}
	}
	for _, svc := range services {
		if err := s.reconcileService(ctx, svc, byService[svc.Name], nodeByName, placer); err != nil && ctx.Err() == nil {
			s.log.Warn("deployments: reconcile", "service", svc.Name, "err", err)
		}
	}
}

func (s *Server) deleteInstance(ctx context.Context, in api.Instance) {
	if _, err := s.st.Delete(ctx, keyInstances+in.ID, in.Revision); err != nil && !errors.Is(err, store.ErrConflict) && !errors.Is(err, store.ErrNotFound) {
		s.log.Warn("deployments: delete instance", "instance", in.ID, "err", err)
	}
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

func (s *Server) reconcileService(ctx context.Context, svc api.Service, list []api.Instance, nodes map[string]api.Node, snap *scheduler.Snapshot) error {
	want := 1
	if svc.Spec.Replicas != nil {
		want = *svc.Spec.Replicas
	}
	req, err := scheduler.RequestFor(svc.Spec)
	if err != nil {
		return err
	}
	release := func(in api.Instance) {
		if in.Node != "" {
			r := req
			r.Resources = api.Resources{CPU: in.Resources.CPU, Memory: in.Resources.Memory}
			snap.Release(in.Node, r)
		}
	}
	var live, old []api.Instance
	for _, in := range list {
		if in.DesiredState != api.DesiredRunning {
			continue // stopped on request: kept for inspection, not counted
		}
		if in.Node != "" {
			if n, ok := nodes[in.Node]; s.nodeLost(n, ok) {
				// Replaced elsewhere; when the node comes back its agent
				// no longer sees the instance and removes its container.
				s.log.Warn("deployments: node lost; replacing its instance", "instance", in.ID, "node", in.Node)
				s.deleteInstance(ctx, in)
				release(in)
				continue
			}
		}
		if in.Generation != svc.Generation {
			// An older generation: take in place what can be, replace otherwise.
			prev, ok := svc.SpecOf(in.Generation)
			if ok && inPlace(prev, svc.Spec) {
				in.Generation = svc.Generation
				in.Resources = svc.Spec.Resources
				in.UpdatedAt = time.Now().UTC()
				rev := in.Revision
				in.Revision = 0
				if _, err := s.st.Put(ctx, keyInstances+in.ID, in, rev); err != nil && !errors.Is(err, store.ErrConflict) {
					return err
				}
				live = append(live, in)
				continue
			}
			old = append(old, in) // replaced step by step by the rollout
			continue
		}
		live = append(live, in)
	}
	if len(old) > 0 || (svc.Status.Rollout == api.RolloutProgressing && len(live) <= want) {
		done, err := s.rollout(ctx, svc, old, live, want, req, snap, release)
		if err != nil || !done {
			return err
		}
	}
	// Scale down: the newest go first.
	sort.Slice(live, func(i, j int) bool { return live[i].CreatedAt.Before(live[j].CreatedAt) })
	for len(live) > want {
		in := live[len(live)-1]
		live = live[:len(live)-1]
		s.deleteInstance(ctx, in)
		release(in)
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
				_, _ = s.st.Put(ctx, keyInstances+in.ID, in, rev)
			}
			continue
		}
		in.Node = res.Node
		in.Status = api.InstanceStatus{State: api.InstancePending}
		if _, err := s.st.Put(ctx, keyInstances+in.ID, in, rev); err != nil {
			snap.Release(res.Node, req)
		}
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
	for i := len(live); i < want; i++ {
		if err := s.createInstance(ctx, svc, req, snap); err != nil {
			return err
		}
	}
	return nil
}

// createInstance places and stores one new instance of the service's
// current generation (pending with an explanation when nothing fits).
func (s *Server) createInstance(ctx context.Context, svc api.Service, req scheduler.Request, snap *scheduler.Snapshot) error {
	now := time.Now().UTC()
	in := api.Instance{ID: svc.Name + "-" + randomSuffix(), Service: svc.Name, Generation: svc.Generation,
		DesiredState: api.DesiredRunning, Resources: svc.Spec.Resources, StopGrace: api.Duration(api.DefaultStopGrace),
		Status: api.InstanceStatus{State: api.InstancePending}}
	in.CreatedAt, in.UpdatedAt = now, now
	res, why := snap.Place(req)
	if res.Node != "" {
		in.Node = res.Node
	} else {
		in.Status.Reason, in.Status.Message = api.ReasonUnschedulable, why.String()
	}
	if _, err := s.st.Put(ctx, keyInstances+in.ID, in, 0); err != nil {
		if res.Node != "" {
			snap.Release(res.Node, req)
		}
		return err
	}
	return nil
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
func (s *Server) rollout(ctx context.Context, svc api.Service, old, cur []api.Instance, want int,
	req scheduler.Request, snap *scheduler.Snapshot, release func(api.Instance)) (bool, error) {
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
		s.deleteInstance(ctx, old[0])
		release(old[0])
		old = old[1:]
	}
	// Start new ones within the surge and parallelism bounds.
	total := len(old) + len(cur)
	for n := len(starting); n < parallel && len(cur) < want && total < want+surge; n++ {
		if err := s.createInstance(ctx, svc, req, snap); err != nil {
			return false, err
		}
		total++
		cur = append(cur, api.Instance{})
	}
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
