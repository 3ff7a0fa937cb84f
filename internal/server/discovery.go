package server

import (
	"encoding/json"
	"fmt"
	"maps"
	"net/http"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/berth-dev/berth/api"
	"github.com/berth-dev/berth/internal/cache"
	"github.com/berth-dev/berth/internal/store"
)

// instanceEndpoints are an orchestrated instance's endpoints: one per
// network it has an address on.
func instanceEndpoints(in api.Instance, spec *api.ServiceSpec) []api.Endpoint {
	health := api.HealthCritical
	if in.Status.State == api.InstanceRunning && in.DesiredState == api.DesiredRunning {
		health = in.Status.Health
		if health == "" {
			health = api.HealthPassing
		}
	}
	ports := map[string]int{}
	first := 0
	for i, p := range in.Status.Ports {
		ports[p.Name] = p.Port
		if i == 0 {
			first = p.Port
		}
	}
	var out []api.Endpoint
	for _, v := range in.Status.VNICs {
		if v.IP == "" {
			continue
		}
		meta := map[string]string{"service": in.Service, "generation": strconv.FormatInt(in.Generation, 10),
			"node": in.Node, "network": v.Network}
		if spec != nil {
			for k, val := range spec.Meta {
				meta[k] = val
			}
		}
		ep := api.Endpoint{Service: in.Service, ID: in.ID, Address: v.IP, Port: first, Network: v.Network,
			Node: in.Node, Health: health, Meta: meta}
		if len(ports) > 0 {
			ep.Ports = ports
		}
		out = append(out, ep)
	}
	return out
}

func registrationEndpoint(r api.Registration) api.Endpoint {
	ep := api.Endpoint{Service: r.Service, ID: r.ID, Address: r.Address, Port: r.Port, Health: r.Health,
		Meta: r.RegistrationSpec.Meta, External: true}
	if len(r.Ports) > 0 {
		ep.Ports = r.Ports
	}
	return ep
}

// discoveryFilter is what a discovery request asks for.
type discoveryFilter struct {
	healthy bool
	network string
	meta    map[string]string
}

func parseDiscoveryFilter(r *http.Request) (discoveryFilter, error) {
	q := r.URL.Query()
	f := discoveryFilter{healthy: boolParam(r, "healthy"), network: q.Get("network"), meta: map[string]string{}}
	for _, m := range q["meta"] {
		k, v, ok := strings.Cut(m, ":")
		if !ok || k == "" {
			return f, invalid("discovery", api.FieldErrors{{Field: "meta", Reason: fmt.Sprintf("%q: expected key:value", m)}})
		}
		f.meta[k] = v
	}
	return f, nil
}

func (f discoveryFilter) keep(ep api.Endpoint) bool {
	if f.healthy && ep.Health == api.HealthCritical {
		return false
	}
	if f.network != "" && !ep.External && ep.Network != f.network {
		return false
	}
	for k, v := range f.meta {
		if ep.Meta[k] != v {
			return false
		}
	}
	return true
}

// endpointKey identifies an endpoint within a service's view.
func endpointKey(ep api.Endpoint) string { return ep.ID + "@" + ep.Network }

// view is a service's endpoints that f keeps, keyed, and the revision of
// the cache they are current at.
func (s *Server) view(service string, f discoveryFilter) (map[string]api.Endpoint, int64) {
	eps, _, _, rev := s.index().lookup(s.cache, service)
	return f.apply(eps), rev
}

// list is a service's endpoints that f keeps, sorted by key, and the
// revision of the cache they are current at.
func (s *Server) list(service string, f discoveryFilter) ([]api.Endpoint, int64) {
	eps, _, _, rev := s.index().lookup(s.cache, service)
	out := make([]api.Endpoint, 0, len(eps))
	for _, ep := range eps {
		if f.keep(ep) {
			out = append(out, ep)
		}
	}
	return out, rev
}

// apply keeps the endpoints f wants, keyed.
func (f discoveryFilter) apply(eps []api.Endpoint) map[string]api.Endpoint {
	out := make(map[string]api.Endpoint, len(eps))
	for _, ep := range eps {
		if f.keep(ep) {
			out[endpointKey(ep)] = ep
		}
	}
	return out
}

func sortedEndpoints(m map[string]api.Endpoint) []api.Endpoint {
	out := make([]api.Endpoint, 0, len(m))
	for _, ep := range m {
		out = append(out, ep)
	}
	sort.Slice(out, func(i, j int) bool { return endpointKey(out[i]) < endpointKey(out[j]) })
	return out
}

// discover answers GET /v1/discovery/{name}: the service's endpoints, or
// with ?watch=1 a stream of the view's changes (put for an endpoint added
// or changed, delete for one gone), resumable by revision.
func (s *Server) discover(w http.ResponseWriter, r *http.Request) error {
	name := r.PathValue("name")
	if why := api.ValidName(name); why != "" {
		return invalid("discovery", api.FieldErrors{{Field: "service", Reason: why}})
	}
	f, err := parseDiscoveryFilter(r)
	if err != nil {
		return err
	}
	select {
	case <-s.cache.Ready():
	case <-r.Context().Done():
		return r.Context().Err()
	}
	if !boolParam(r, "watch") {
		eps, rev := s.list(name, f)
		writeJSON(w, http.StatusOK, api.List[api.Endpoint]{Items: eps, Revision: rev})
		return nil
	}
	return s.watchDiscovery(w, r, name, f)
}

func (s *Server) watchDiscovery(w http.ResponseWriter, r *http.Request, name string, f discoveryFilter) error {
	ctx := r.Context()
	flusher, _ := w.(http.Flusher)
	if v := r.URL.Query().Get("revision"); v != "" {
		from, err := strconv.ParseInt(v, 10, 64)
		if err != nil || from < 0 {
			return invalid("watch", api.FieldErrors{{Field: "revision", Reason: "must be a non-negative integer"}})
		}
		// A client resuming holds the view as of its revision: the first
		// diff is against an empty view, so it gets every endpoint again
		// as a put and reconciles (puts are idempotent).
		if _, _, _, err := s.cache.Since(from, keyInstances); err != nil {
			return err
		}
	}
	w.Header().Set("Content-Type", "application/x-ndjson")
	w.WriteHeader(http.StatusOK)
	enc := json.NewEncoder(w)
	var prev map[string]api.Endpoint
	emit := func(cur map[string]api.Endpoint, rev int64) bool {
		for _, ep := range sortedEndpoints(cur) {
			old, ok := prev[endpointKey(ep)]
			if ok && endpointEqual(old, ep) {
				continue
			}
			b, _ := json.Marshal(ep)
			if enc.Encode(api.Event{Type: api.EventPut, Kind: "endpoint", Name: endpointKey(ep), Revision: rev, Object: b}) != nil {
				return false
			}
		}
		for k, ep := range prev {
			if _, ok := cur[k]; !ok {
				b, _ := json.Marshal(ep)
				if enc.Encode(api.Event{Type: api.EventDelete, Kind: "endpoint", Name: k, Revision: rev, Object: b}) != nil {
					return false
				}
			}
		}
		prev = cur
		if enc.Encode(api.Event{Type: api.EventBookmark, Revision: rev}) != nil {
			return false
		}
		if flusher != nil {
			flusher.Flush()
		}
		return true
	}
	idx := s.index()
	tick := time.NewTicker(bookmarkEvery)
	defer tick.Stop()
	first, seen := true, int64(0)
	for {
		// The channel first, then the view: a change in between wakes the
		// loop at once rather than being missed.
		wait := cacheChanged(s.cache)
		eps, _, changed, rev := idx.lookup(s.cache, name)
		if first || changed != seen {
			if !emit(f.apply(eps), rev) {
				return nil
			}
			first, seen = false, changed
		}
		select {
		case <-ctx.Done():
			return nil
		case <-wait:
		case <-tick.C:
			if enc.Encode(api.Event{Type: api.EventBookmark, Revision: rev}) != nil {
				return nil
			}
			if flusher != nil {
				flusher.Flush()
			}
		}
	}
}

func endpointEqual(a, b api.Endpoint) bool {
	ja, _ := json.Marshal(a)
	jb, _ := json.Marshal(b)
	return string(ja) == string(jb)
}

// Endpoints is the DNS server's source: every endpoint of a service, sorted
// by key (the DNS handler keeps the healthy ones), and whether the service
// exists. It costs O(endpoints of the service), and answers from the cache
// as it is when called. The slice is shared: callers must not modify it.
func (s *Server) Endpoints(service string) ([]api.Endpoint, bool) {
	eps, known, _, _ := s.index().lookup(s.cache, service)
	return eps, known
}

// registryIndex indexes the cache for discovery: per service, its spec, its
// instances and its registrations, decoded, and its endpoints, computed once
// per change of the service. Every lookup first brings it up to the cache's
// revision by applying the events since its own (O(changes)); when the cache
// no longer holds them (it listed again, or its ring moved past them) it is
// rebuilt from a snapshot. A lookup thus costs O(endpoints of the service)
// and sees every change the cache had applied when it began.
type registryIndex struct {
	mu       sync.RWMutex
	built    bool
	rev      int64 // cache revision the index is current to
	rebuilt  int64 // revision of its last rebuild
	services map[string]*serviceIndex
	owner    map[string]string // instance id → its service, for deletes
}

// serviceIndex is what the index holds of one service name.
type serviceIndex struct {
	exists    bool             // a service object of that name is stored
	spec      *api.ServiceSpec // its spec, when it exists
	instances map[string]api.Instance
	instEps   map[string][]api.Endpoint // each instance's endpoints
	regs      map[string]api.Registration
	changed   int64          // revision of the last change of any of the above
	eps       []api.Endpoint // every endpoint, sorted by key; nil when stale
	stale     bool
}

func (e *serviceIndex) empty() bool { return !e.exists && len(e.instances) == 0 && len(e.regs) == 0 }

// endpoints computes the service's endpoints, sorted by key.
func (e *serviceIndex) endpoints() []api.Endpoint {
	n := len(e.regs)
	for _, eps := range e.instEps {
		n += len(eps)
	}
	out := make([]api.Endpoint, 0, n)
	for _, eps := range e.instEps {
		out = append(out, eps...)
	}
	for _, r := range e.regs {
		out = append(out, registrationEndpoint(r))
	}
	sort.Slice(out, func(i, j int) bool { return endpointKey(out[i]) < endpointKey(out[j]) })
	return out
}

// index returns the server's registry index.
func (s *Server) index() *registryIndex { return s.regIndex }

// cacheChanged returns a channel closed on the cache's next change.
func cacheChanged(c *cache.Cache) <-chan struct{} {
	for {
		// From the cache's own revision the ring has nothing to return;
		// ErrGone only if the cache listed again in between: ask again.
		if _, _, wait, err := c.Since(c.Revision(), keyServices); err == nil {
			return wait
		}
	}
}

// lookup returns a service's endpoints (shared: not to be modified), whether
// the service is known (stored, or with any endpoint), the revision of its
// last change as far as the index can tell (equal revisions mean the same
// endpoints) and the revision the answer is current at.
func (x *registryIndex) lookup(c *cache.Cache, service string) (eps []api.Endpoint, known bool, changed, rev int64) {
	x.sync(c)
	x.mu.RLock()
	if e := x.services[service]; e == nil || !e.stale {
		defer x.mu.RUnlock()
		return x.answer(e)
	}
	x.mu.RUnlock()
	x.mu.Lock()
	defer x.mu.Unlock()
	e := x.services[service]
	if e != nil && e.stale {
		e.eps, e.stale = e.endpoints(), false
	}
	return x.answer(e)
}

// answer is lookup's answer from a fresh entry (or none); the caller holds x.mu.
func (x *registryIndex) answer(e *serviceIndex) (eps []api.Endpoint, known bool, changed, rev int64) {
	if e == nil {
		return nil, false, x.rebuilt, x.rev
	}
	return e.eps, e.exists || len(e.eps) > 0, max(e.changed, x.rebuilt), x.rev
}

// serviceNames lists the names of services with anything indexed, sorted.
func (x *registryIndex) serviceNames(c *cache.Cache) []string {
	x.sync(c)
	x.mu.RLock()
	defer x.mu.RUnlock()
	out := make([]string, 0, len(x.services))
	for name := range x.services {
		out = append(out, name)
	}
	sort.Strings(out)
	return out
}

// sync brings the index up to the cache's current revision.
func (x *registryIndex) sync(c *cache.Cache) {
	cur := c.Revision()
	x.mu.RLock()
	current := x.built && x.rev >= cur
	x.mu.RUnlock()
	if current {
		return
	}
	x.mu.Lock()
	defer x.mu.Unlock()
	if x.built && x.rev >= cur {
		return // another lookup caught up meanwhile
	}
	if x.built {
		if evs, next, _, err := c.Since(x.rev, store.Prefix); err == nil {
			for _, ev := range evs {
				x.apply(ev)
			}
			x.rev = next
			return
		}
	}
	x.rebuild(c)
}

// rebuild indexes a snapshot of the cache; the caller holds x.mu.
func (x *registryIndex) rebuild(c *cache.Cache) {
	x.services, x.owner = map[string]*serviceIndex{}, map[string]string{}
	evs, rev := c.Snapshot(store.Prefix)
	for _, ev := range evs {
		x.apply(ev)
	}
	// What changed in between is not known: to watchers, every service
	// (even one now gone) changed here.
	x.rev, x.rebuilt, x.built = rev, rev, true
}

// entry returns the service's index entry, making it; the caller holds x.mu.
func (x *registryIndex) entry(service string) *serviceIndex {
	e := x.services[service]
	if e == nil {
		e = &serviceIndex{instances: map[string]api.Instance{}, instEps: map[string][]api.Endpoint{}, regs: map[string]api.Registration{}}
		x.services[service] = e
	}
	return e
}

// touch marks a service changed at rev, dropping its entry once nothing
// is left of it; the caller holds x.mu.
func (x *registryIndex) touch(e *serviceIndex, service string, rev int64) {
	e.changed, e.stale, e.eps = rev, true, nil
	if e.empty() {
		delete(x.services, service)
	}
}

// apply folds one cache event into the index; the caller holds x.mu.
func (x *registryIndex) apply(ev cache.Event) {
	switch {
	case strings.HasPrefix(ev.Key, keyServices):
		name := strings.TrimPrefix(ev.Key, keyServices)
		e := x.entry(name)
		var meta map[string]string
		if e.spec != nil {
			meta = e.spec.Meta
		}
		e.exists, e.spec = false, nil
		if !ev.Delete {
			var svc api.Service
			if json.Unmarshal(ev.Value, &svc) == nil {
				e.exists, e.spec = true, &svc.Spec
			}
		}
		// The spec's metadata labels every instance endpoint (and only
		// it: a status write changes none of them).
		if e.spec == nil || !maps.Equal(meta, e.spec.Meta) {
			for id, in := range e.instances {
				e.instEps[id] = instanceEndpoints(in, e.spec)
			}
		}
		x.touch(e, name, ev.Revision)
	case strings.HasPrefix(ev.Key, keyInstances):
		id := strings.TrimPrefix(ev.Key, keyInstances)
		if svc, ok := x.owner[id]; ok {
			// Out of its old entry first: a put may move it (in theory)
			// to another service.
			delete(x.owner, id)
			if e := x.services[svc]; e != nil {
				delete(e.instances, id)
				delete(e.instEps, id)
				x.touch(e, svc, ev.Revision)
			}
		}
		// An instance is its service's when it names it and its id is
		// the service's name and a suffix, as the controller makes them.
		var in api.Instance
		if ev.Delete || json.Unmarshal(ev.Value, &in) != nil || in.Service == "" || !strings.HasPrefix(id, in.Service+"-") {
			return
		}
		in.Revision = ev.Revision
		e := x.entry(in.Service)
		e.instances[id] = in
		e.instEps[id] = instanceEndpoints(in, e.spec)
		x.owner[id] = in.Service
		x.touch(e, in.Service, ev.Revision)
	case strings.HasPrefix(ev.Key, keyRegistrations):
		svc, id, ok := strings.Cut(strings.TrimPrefix(ev.Key, keyRegistrations), "/")
		if !ok {
			return
		}
		e := x.entry(svc)
		delete(e.regs, id)
		var r api.Registration
		if !ev.Delete && json.Unmarshal(ev.Value, &r) == nil {
			e.regs[id] = r
		}
		x.touch(e, svc, ev.Revision)
	}
}
