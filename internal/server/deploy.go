package server

import (
	"context"
	"crypto/rand"
	"encoding/json"
	"errors"
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
	tick := time.NewTicker(3 * time.Second)
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
	var live []api.Instance
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
			old, ok := svc.SpecOf(in.Generation)
			if ok && inPlace(old, svc.Spec) {
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
			s.deleteInstance(ctx, in)
			release(in)
			continue
		}
		live = append(live, in)
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
	s.updateServiceStatus(ctx, svc, live)
	for i := len(live); i < want; i++ {
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
	}
	return nil
}

// updateServiceStatus records how many instances run and are healthy,
// writing only when the counts change.
func (s *Server) updateServiceStatus(ctx context.Context, svc api.Service, live []api.Instance) {
	running, healthy := 0, 0
	for _, in := range live {
		if in.Status.State == api.InstanceRunning {
			running++
			if in.Status.Health != api.HealthCritical {
				healthy++
			}
		}
	}
	if svc.Status.Running == running && svc.Status.Healthy == healthy {
		return
	}
	svc.Status.Running, svc.Status.Healthy = running, healthy
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
