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
	"github.com/berth-dev/berth/internal/store"
)

// runDeployments keeps each service's instances as its spec says: the
// replica count, the spec's generation, and a node for each. It reacts to
// every change of services, instances and nodes, and reconciles every few
// seconds as a safety net. (The scheduler issue replaces the placement.)
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
	load := map[string]int{}
	for _, list := range byService {
		for _, in := range list {
			if in.Node != "" && in.DesiredState == api.DesiredRunning {
				load[in.Node]++
			}
		}
	}
	for name, list := range byService {
		if _, ok := services[name]; !ok {
			for _, in := range list {
				s.deleteInstance(ctx, in)
			}
		}
	}
	for _, svc := range services {
		if err := s.reconcileService(ctx, svc, byService[svc.Name], nodes, load); err != nil && ctx.Err() == nil {
			s.log.Warn("deployments: reconcile", "service", svc.Name, "err", err)
		}
	}
}

func (s *Server) deleteInstance(ctx context.Context, in api.Instance) {
	if _, err := s.st.Delete(ctx, keyInstances+in.ID, in.Revision); err != nil && !errors.Is(err, store.ErrConflict) && !errors.Is(err, store.ErrNotFound) {
		s.log.Warn("deployments: delete instance", "instance", in.ID, "err", err)
	}
}

// onlyResourcesDiffer reports whether two specs differ in resources alone,
// which running containers take in place.
func onlyResourcesDiffer(a, b api.ServiceSpec) bool {
	a.Resources, b.Resources = api.ResourceSpec{}, api.ResourceSpec{}
	return reflect.DeepEqual(a, b)
}

func (s *Server) reconcileService(ctx context.Context, svc api.Service, list []api.Instance, nodes []api.Node, load map[string]int) error {
	want := 1
	if svc.Spec.Replicas != nil {
		want = *svc.Spec.Replicas
	}
	var live []api.Instance
	for _, in := range list {
		if in.DesiredState != api.DesiredRunning {
			continue // stopped on request: kept for inspection, not counted
		}
		if in.Generation != svc.Generation {
			// An older generation: take resources in place, replace otherwise.
			old, ok := svc.SpecOf(in.Generation)
			if ok && onlyResourcesDiffer(old, svc.Spec) {
				in.Generation = svc.Generation
				in.Resources = svc.Spec.Resources
				in.UpdatedAt = time.Now().UTC()
				if _, err := s.st.Put(ctx, keyInstances+in.ID, in, in.Revision); err != nil && !errors.Is(err, store.ErrConflict) {
					return err
				}
				live = append(live, in)
				continue
			}
			s.deleteInstance(ctx, in)
			if in.Node != "" {
				load[in.Node]--
			}
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
		if in.Node != "" {
			load[in.Node]--
		}
	}
	// Place pending instances, then create the missing ones.
	for _, in := range live {
		if in.Node == "" {
			if node := pickNode(nodes, load); node != "" {
				in.Node = node
				in.Status = api.InstanceStatus{State: api.InstancePending}
				if _, err := s.st.Put(ctx, keyInstances+in.ID, in, in.Revision); err == nil {
					load[node]++
				}
			}
		}
	}
	s.updateServiceStatus(ctx, svc, live)
	for i := len(live); i < want; i++ {
		now := time.Now().UTC()
		in := api.Instance{ID: svc.Name + "-" + randomSuffix(), Service: svc.Name, Generation: svc.Generation,
			DesiredState: api.DesiredRunning, Resources: svc.Spec.Resources, StopGrace: api.Duration(api.DefaultStopGrace),
			Status: api.InstanceStatus{State: api.InstancePending}}
		in.CreatedAt, in.UpdatedAt = now, now
		if node := pickNode(nodes, load); node != "" {
			in.Node = node
			load[node]++
		} else {
			in.Status.Reason = api.ReasonUnschedulable
			in.Status.Message = "no ready node"
		}
		if _, err := s.st.Put(ctx, keyInstances+in.ID, in, 0); err != nil {
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

// pickNode chooses the ready node with the fewest running instances.
func pickNode(nodes []api.Node, load map[string]int) string {
	best, bestLoad := "", 0
	for _, n := range nodes {
		if n.Status.State != api.NodeReady {
			continue
		}
		if l := load[n.Name]; best == "" || l < bestLoad || (l == bestLoad && n.Name < best) {
			best, bestLoad = n.Name, l
		}
	}
	return best
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
