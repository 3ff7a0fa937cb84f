package server

import (
	"encoding/json"
	"slices"
	"strings"

	"github.com/berth-dev/berth/api"
	"github.com/berth-dev/berth/internal/scheduler"
	"github.com/berth-dev/berth/internal/store"
)

// deployState is the deployment controller's decoded copy of the cluster,
// kept current from the cache's events: each change is decoded once, and
// the scheduler's snapshot is adjusted by what the change frees or takes,
// so that a pass costs what changed, not the size of the cluster.
type deployState struct {
	services  map[string]api.Service
	instances map[string]api.Instance
	byService map[string]map[string]struct{} // service → instance ids
	nodes     map[string]api.Node
	networks  map[string]api.Network

	// snap holds the placement state: every placed instance's
	// reservation, as recorded in acct. It is rebuilt when nodes change.
	snap *scheduler.Snapshot
	acct map[string]reservation // instance id → what it holds in snap

	// What changed since the last pass.
	dirty        map[string]struct{} // services to reconcile
	nodesChanged bool                // node set or states changed: snapshot rebuilt, overlays reconciled
	netsChanged  bool
}

// reservation is what one instance holds on a node in the snapshot.
type reservation struct {
	node  string
	req   scheduler.Request
	ports []int
}

func (r reservation) equal(o reservation) bool {
	return r.node == o.node && r.req.Service == o.req.Service && r.req.Resources == o.req.Resources &&
		slices.Equal(r.ports, o.ports)
}

func newDeployState() *deployState {
	return &deployState{services: map[string]api.Service{}, instances: map[string]api.Instance{},
		byService: map[string]map[string]struct{}{}, nodes: map[string]api.Node{}, networks: map[string]api.Network{},
		acct: map[string]reservation{}, dirty: map[string]struct{}{}}
}

// load replaces the state with a full snapshot of the store; everything is
// then dirty.
func (d *deployState) load(snap []store.Event) {
	*d = *newDeployState()
	for _, ev := range snap {
		d.apply(ev)
	}
	d.rebuild()
	d.markAll()
}

// markAll marks every service, and every service name that still has
// instances, for reconciliation.
func (d *deployState) markAll() {
	for name := range d.services {
		d.dirty[name] = struct{}{}
	}
	for name := range d.byService {
		d.dirty[name] = struct{}{}
	}
	d.nodesChanged, d.netsChanged = true, true
}

// apply folds one event into the state and marks what it affects.
func (d *deployState) apply(ev store.Event) {
	switch {
	case strings.HasPrefix(ev.Key, keyInstances):
		id := strings.TrimPrefix(ev.Key, keyInstances)
		if ev.Delete {
			if old, ok := d.instances[id]; ok {
				d.forget(old)
				d.dirty[old.Service] = struct{}{}
			}
			return
		}
		var in api.Instance
		if json.Unmarshal(ev.Value, &in) != nil {
			return
		}
		in.Revision = ev.Revision
		if old, ok := d.instances[id]; ok && old.Service != in.Service {
			d.forget(old)
		}
		d.instances[id] = in
		ids := d.byService[in.Service]
		if ids == nil {
			ids = map[string]struct{}{}
			d.byService[in.Service] = ids
		}
		ids[id] = struct{}{}
		d.account(in)
		d.dirty[in.Service] = struct{}{}
	case strings.HasPrefix(ev.Key, keyServices):
		name := strings.TrimPrefix(ev.Key, keyServices)
		d.dirty[name] = struct{}{}
		if ev.Delete {
			delete(d.services, name)
			return
		}
		var svc api.Service
		if json.Unmarshal(ev.Value, &svc) != nil {
			return
		}
		svc.Revision = ev.Revision
		d.services[name] = svc
	case strings.HasPrefix(ev.Key, keyNodes):
		name := strings.TrimPrefix(ev.Key, keyNodes)
		d.nodesChanged = true
		if ev.Delete {
			delete(d.nodes, name)
			return
		}
		var n api.Node
		if json.Unmarshal(ev.Value, &n) == nil {
			d.nodes[name] = n
		}
	case strings.HasPrefix(ev.Key, keyNetworks):
		name := strings.TrimPrefix(ev.Key, keyNetworks)
		d.netsChanged = true
		if ev.Delete {
			delete(d.networks, name)
			return
		}
		var n api.Network
		if json.Unmarshal(ev.Value, &n) == nil {
			n.Revision = ev.Revision
			d.networks[name] = n
		}
	}
}

// forget drops an instance and what it holds.
func (d *deployState) forget(in api.Instance) {
	delete(d.instances, in.ID)
	if ids := d.byService[in.Service]; ids != nil {
		delete(ids, in.ID)
		if len(ids) == 0 {
			delete(d.byService, in.Service)
		}
	}
	d.unreserve(in.ID)
}

// reservationOf is what an instance holds: its node, resources and host
// ports (from its status once running, from its spec before), if it is
// placed and meant to run.
func (d *deployState) reservationOf(in api.Instance) (reservation, bool) {
	if in.Node == "" || in.DesiredState != api.DesiredRunning {
		return reservation{}, false
	}
	r := reservation{node: in.Node, req: scheduler.Request{Service: in.Service,
		Resources: api.Resources{CPU: in.Resources.CPU, Memory: in.Resources.Memory}}}
	for _, p := range in.Status.Ports {
		if p.HostPort != 0 {
			r.ports = append(r.ports, p.HostPort)
		}
	}
	if len(r.ports) == 0 {
		if svc, ok := d.services[in.Service]; ok {
			if spec, ok := svc.SpecOf(in.Generation); ok {
				for _, p := range spec.Ports {
					if p.HostPort != 0 {
						r.ports = append(r.ports, p.HostPort)
					}
				}
			}
		}
	}
	r.req.HostPorts = r.ports
	return r, true
}

// account brings the snapshot in line with what the instance now holds.
func (d *deployState) account(in api.Instance) {
	if d.snap == nil {
		return // rebuilt as a whole later
	}
	now, ok := d.reservationOf(in)
	old, had := d.acct[in.ID]
	if ok && had && now.equal(old) {
		return
	}
	if had {
		d.snap.Release(old.node, old.req)
		delete(d.acct, in.ID)
	}
	if ok && d.snap.Reserve(now.node, now.req) {
		d.acct[in.ID] = now
	}
}

// unreserve gives back what an instance holds in the snapshot.
func (d *deployState) unreserve(id string) {
	if old, ok := d.acct[id]; ok {
		if d.snap != nil {
			d.snap.Release(old.node, old.req)
		}
		delete(d.acct, id)
	}
}

// placed records a reservation the scheduler made for an instance being
// created or placed (Place already reserved it in the snapshot).
func (d *deployState) placed(id, node string, req scheduler.Request) {
	d.acct[id] = reservation{node: node, req: req, ports: req.HostPorts}
}

// rebuild makes a new snapshot from the nodes and instances.
func (d *deployState) rebuild() {
	nodes := make([]api.Node, 0, len(d.nodes))
	for _, n := range d.nodes {
		nodes = append(nodes, n)
	}
	d.snap = scheduler.NewSnapshot(nodes, nil)
	d.acct = make(map[string]reservation, len(d.instances))
	for _, in := range d.instances {
		d.account(in)
	}
}

// nodeList and networkList are the nodes and networks as slices.
func (d *deployState) nodeList() []api.Node {
	out := make([]api.Node, 0, len(d.nodes))
	for _, n := range d.nodes {
		out = append(out, n)
	}
	return out
}

func (d *deployState) networkList() []api.Network {
	out := make([]api.Network, 0, len(d.networks))
	for _, n := range d.networks {
		out = append(out, n)
	}
	return out
}

// instancesOf lists a service's instances.
func (d *deployState) instancesOf(service string) []api.Instance {
	ids := d.byService[service]
	out := make([]api.Instance, 0, len(ids))
	for id := range ids {
		out = append(out, d.instances[id])
	}
	return out
}
