package server

import (
	"encoding/json"
	"maps"
	"math"
	"reflect"
	"slices"
	"sort"
	"strings"
	"sync"
	"sync/atomic"

	"github.com/berth-dev/berth/api"
	"github.com/berth-dev/berth/internal/cache"
	"github.com/berth-dev/berth/internal/store"
)

// registryIndex indexes the cache for discovery: per service, its spec, its
// instances and its registrations' endpoints, and, once per change of the
// service and only when someone asks, a snapshot of its endpoints (see
// snapshot). Every lookup first brings it up to the cache's revision by
// applying the events since its own (O(changes)); when the cache no longer
// holds them (it listed again, or its ring moved past them) it is rebuilt
// from a snapshot of the cache. A lookup thus costs O(endpoints of the
// service) at most once per change of it, and sees every change the cache
// had applied when it began.
//
// Watch streams wait on their service's own channel, closed when the
// service changes; while any stream waits, a follower goroutine keeps the
// index current with the cache (lookups do it otherwise).
type registryIndex struct {
	mu       sync.RWMutex
	built    bool
	rev      int64 // cache revision the index is current to
	rebuilt  int64 // revision of its last rebuild
	services map[string]*serviceIndex
	owner    map[string]string // instance id → its service, for deletes
	none     *snapshot         // of every service not indexed, since the last rebuild

	// Registrations' ports and metadata, shared between equal ones.
	ports interner[int]
	meta  interner[string]

	watched  map[string]*watchedService // services with watch streams
	watchers int                        // streams in all
	stop     chan struct{}              // ends the follower; nil when none runs
	stopped  chan struct{}              // closed when it ended
}

// serviceIndex is what the index holds of one service name.
type serviceIndex struct {
	name      string
	exists    bool             // a service object of that name is stored
	spec      *api.ServiceSpec // its spec, when it exists
	instances map[string]api.Instance
	instEps   map[string][]api.Endpoint // each instance's endpoints
	regs      map[string]regEntry       // each registration, by id
	changed   int64                     // revision of the last change of any of the above

	snap atomic.Pointer[snapshot] // of the current state, made by the first reader after a change
	last *view                    // the view last built, until the next: its encodings are reused
}

// regEntry is what the index keeps of a registration: what its endpoint
// has of its own (the service and the id are the index's keys).
type regEntry struct {
	address string
	port    int
	health  string
	ports   *interned[int]
	meta    *interned[string]
}

// endpoint is the registration's endpoint.
func (r *regEntry) endpoint(service, id string) api.Endpoint {
	return api.Endpoint{Service: service, ID: id, Address: r.address, Port: r.port, Health: r.health,
		Ports: r.ports.value(), Meta: r.meta.value(), External: true}
}

// watchedService is a service with watch streams: the channel its next
// change closes.
type watchedService struct {
	streams int
	ch      chan struct{}
}

func (e *serviceIndex) empty() bool { return !e.exists && len(e.instances) == 0 && len(e.regs) == 0 }

// index returns the server's registry index.
func (s *Server) index() *registryIndex { return s.regIndex }

// cacheChanged returns a channel closed on the cache's next change.
func cacheChanged(c *cache.Cache) <-chan struct{} {
	// No event is later than the largest revision: Since returns none,
	// and the channel of the cache's next change, under one lock.
	_, _, wait, _ := c.Since(math.MaxInt64, keyServices)
	return wait
}

// lookup returns a service's endpoints, sorted by key (shared: not to be
// modified), whether the service is known (stored, or with any endpoint),
// the revision of its last change as far as the index can tell (equal
// revisions mean the same endpoints) and the revision the answer is
// current at.
func (x *registryIndex) lookup(c *cache.Cache, service string) (eps []api.Endpoint, known bool, changed, rev int64) {
	x.sync(c)
	x.mu.RLock()
	defer x.mu.RUnlock()
	snap, rev := x.current(service)
	return snap.all().eps, snap.known(), snap.changed, rev
}

// current returns the service's snapshot, built, and the index's revision;
// the caller holds x.mu (read or write).
func (x *registryIndex) current(service string) (*snapshot, int64) {
	e := x.services[service]
	if e == nil {
		if x.none == nil || x.none.changed != x.rebuilt {
			return &snapshot{changed: x.rebuilt, built: doneOnce(emptyView)}, x.rev
		}
		return x.none, x.rev
	}
	s := e.snap.Load()
	if s == nil {
		ns := &snapshot{changed: max(e.changed, x.rebuilt), exists: e.exists, built: newOnce[*view]()}
		if e.snap.CompareAndSwap(nil, ns) {
			s = ns
		} else {
			s = e.snap.Load()
		}
	}
	// Built here, under x.mu: the entry does not change meanwhile.
	s.built.get(e.buildView)
	return s, x.rev
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

// attachments lists the VNICs that instances have on a network, sorted by
// instance: O(instances) in memory, where a read of the store would decode
// every instance.
func (x *registryIndex) attachments(c *cache.Cache, network string) []api.Attachment {
	x.sync(c)
	x.mu.RLock()
	defer x.mu.RUnlock()
	var out []api.Attachment
	for _, e := range x.services {
		for _, in := range e.instances {
			for _, v := range in.Status.VNICs {
				if v.Network == network {
					out = append(out, api.Attachment{Instance: in.ID, Node: in.Node, MAC: v.MAC, IP: v.IP})
				}
			}
		}
	}
	slices.SortFunc(out, func(a, b api.Attachment) int { return strings.Compare(a.Instance, b.Instance) })
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
	x.ports, x.meta = interner[int]{}, interner[string]{}
	evs, rev := c.Snapshot(store.Prefix)
	for _, ev := range evs {
		x.apply(ev)
	}
	// What changed in between is not known: to watchers, every service
	// (even one now gone) changed here.
	x.rev, x.rebuilt, x.built = rev, rev, true
	x.none = &snapshot{changed: rev, built: doneOnce(emptyView)}
	for _, w := range x.watched {
		close(w.ch)
		w.ch = make(chan struct{})
	}
}

// entry returns the service's index entry, making it; the caller holds x.mu.
func (x *registryIndex) entry(service string) *serviceIndex {
	e := x.services[service]
	if e == nil {
		e = &serviceIndex{name: service, instances: map[string]api.Instance{}, instEps: map[string][]api.Endpoint{}, regs: map[string]regEntry{}}
		x.services[service] = e
	}
	return e
}

// touch marks a service changed at rev, dropping its entry once nothing
// is left of it, and wakes its watch streams; the caller holds x.mu.
func (x *registryIndex) touch(e *serviceIndex, service string, rev int64) {
	if s := e.snap.Load(); s != nil {
		if v, ok := s.built.peek(); ok {
			e.last = v
		}
	}
	e.changed = rev
	e.snap.Store(nil)
	if e.empty() {
		delete(x.services, service)
	}
	if w := x.watched[service]; w != nil {
		close(w.ch)
		w.ch = make(chan struct{})
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
		if old, ok := e.regs[id]; ok {
			x.ports.release(old.ports)
			x.meta.release(old.meta)
			delete(e.regs, id)
		}
		if !ev.Delete {
			if r, ok := x.registration(ev.Value); ok {
				e.regs[id] = r
			}
		}
		x.touch(e, svc, ev.Revision)
	}
}

// storedRegistration is what discovery reads of a stored registration;
// its maps are decoded only when no equal one is interned.
type storedRegistration struct {
	Address string          `json:"address"`
	Port    int             `json:"port"`
	Ports   json.RawMessage `json:"ports"`
	Meta    json.RawMessage `json:"meta"`
	Health  string          `json:"health"`
}

// registration decodes a stored registration; the caller holds x.mu.
func (x *registryIndex) registration(raw []byte) (regEntry, bool) {
	var r storedRegistration
	if json.Unmarshal(raw, &r) != nil {
		return regEntry{}, false
	}
	return regEntry{address: r.Address, port: r.Port, health: internHealth(r.Health),
		ports: x.ports.get(r.Ports), meta: x.meta.get(r.Meta)}, true
}

// internHealth returns the constant equal to h, so that endpoints share it.
func internHealth(h string) string {
	for _, c := range []string{api.HealthPassing, api.HealthWarning, api.HealthCritical} {
		if h == c {
			return c
		}
	}
	return h
}

// interner shares equal maps between registrations (registrations of a
// service mostly carry the same ports and metadata), keyed by their JSON
// as stored, and counts their users. The maps are read-only.
type interner[V any] map[string]*interned[V]

// interned is a shared map, its key and how many registrations use it.
type interned[V any] struct {
	m    map[string]V
	key  string
	refs int
}

// value is the map (nil for none).
func (in *interned[V]) value() map[string]V {
	if in == nil {
		return nil
	}
	return in.m
}

// get returns the map encoded by raw (nil for none, or when raw is not
// one), counting a new user.
func (t *interner[V]) get(raw json.RawMessage) *interned[V] {
	if len(raw) == 0 || string(raw) == "null" || string(raw) == "{}" {
		return nil
	}
	if *t == nil {
		*t = interner[V]{}
	}
	if in, ok := (*t)[string(raw)]; ok {
		in.refs++
		return in
	}
	var m map[string]V
	if json.Unmarshal(raw, &m) != nil || len(m) == 0 {
		return nil
	}
	in := &interned[V]{m: m, key: string(raw), refs: 1}
	(*t)[in.key] = in
	return in
}

// release drops a user of in.
func (t interner[V]) release(in *interned[V]) {
	if in == nil {
		return
	}
	if in.refs--; in.refs <= 0 && t[in.key] == in {
		delete(t, in.key)
	}
}

// buildView makes the view of every endpoint of the service, sorted by key,
// with their JSON, reusing the encodings of the last view built for those
// that did not change. The caller holds x.mu for reading, and is the only
// one building a view of e (see snapshot), so it may drop e.last.
func (e *serviceIndex) buildView() *view {
	n := len(e.regs)
	for _, eps := range e.instEps {
		n += len(eps)
	}
	last := e.last
	e.last = nil
	if n == 0 {
		return emptyView
	}
	all := make([]api.Endpoint, 0, n)
	for _, eps := range e.instEps {
		all = append(all, eps...)
	}
	for id, r := range e.regs {
		all = append(all, r.endpoint(e.name, id))
	}
	order := make([]int32, n)
	for i := range order {
		order[i] = int32(i)
	}
	slices.SortFunc(order, func(a, b int32) int { return compareKeys(&all[a], &all[b]) })
	v := newView(n)
	j := 0
	for i, k := range order {
		v.eps[i] = all[k]
		ep := &v.eps[i]
		if last != nil {
			for j < len(last.eps) && compareKeys(&last.eps[j], ep) < 0 {
				j++
			}
			if j < len(last.eps) && endpointEqual(last.eps[j], *ep) {
				v.enc[i] = last.enc[j]
				continue
			}
		}
		v.enc[i] = encodeEndpoint(*ep)
	}
	return v
}

// encodeEndpoint is an endpoint's JSON as discovery serves it.
func encodeEndpoint(ep api.Endpoint) []byte {
	b, err := json.Marshal(ep)
	if err != nil {
		return []byte("{}") // an Endpoint always encodes
	}
	return b
}

// endpointEqual reports whether a and b encode alike.
func endpointEqual(a, b api.Endpoint) bool {
	return a.Service == b.Service && a.ID == b.ID && a.Address == b.Address && a.Port == b.Port &&
		a.Network == b.Network && a.Node == b.Node && a.Health == b.Health && a.External == b.External &&
		mapsEqual(a.Ports, b.Ports) && mapsEqual(a.Meta, b.Meta)
}

// mapsEqual is maps.Equal, at once for a map and itself (interned maps).
func mapsEqual[V comparable](a, b map[string]V) bool {
	if len(a) != len(b) {
		return false
	}
	if len(a) == 0 || reflect.ValueOf(a).UnsafePointer() == reflect.ValueOf(b).UnsafePointer() {
		return true
	}
	return maps.Equal(a, b)
}

// watch registers a watch stream of service: it returns the function that
// ends the registration. While any stream is registered, a follower keeps
// the index current with c, so that each change of a watched service
// closes its channel (see changes).
func (x *registryIndex) watch(c *cache.Cache, service string) (release func()) {
	x.mu.Lock()
	if x.watched == nil {
		x.watched = map[string]*watchedService{}
	}
	w := x.watched[service]
	if w == nil {
		w = &watchedService{ch: make(chan struct{})}
		x.watched[service] = w
	}
	w.streams++
	x.watchers++
	if x.watchers == 1 {
		x.stop, x.stopped = make(chan struct{}), make(chan struct{})
		go x.follow(c, x.stop, x.stopped)
	}
	x.mu.Unlock()
	return func() {
		x.mu.Lock()
		if w.streams--; w.streams == 0 {
			delete(x.watched, service)
		}
		x.watchers--
		var stop, stopped chan struct{}
		if x.watchers == 0 {
			stop, stopped, x.stop, x.stopped = x.stop, x.stopped, nil, nil
		}
		x.mu.Unlock()
		if stop != nil {
			close(stop)
			<-stopped
		}
	}
}

// follow syncs the index with c on every change of c until stop is closed.
func (x *registryIndex) follow(c *cache.Cache, stop <-chan struct{}, stopped chan<- struct{}) {
	defer close(stopped)
	for {
		wait := cacheChanged(c)
		x.sync(c)
		select {
		case <-wait:
		case <-stop:
			return
		}
	}
}

// changes returns the channel the next change of a watched service closes,
// its snapshot and the index's revision.
func (x *registryIndex) changes(service string) (<-chan struct{}, *snapshot, int64) {
	x.mu.RLock()
	defer x.mu.RUnlock()
	var ch chan struct{}
	if w := x.watched[service]; w != nil {
		ch = w.ch
	}
	s, rev := x.current(service)
	return ch, s, rev
}

// revision is the revision the index is current to.
func (x *registryIndex) revision() int64 {
	x.mu.RLock()
	defer x.mu.RUnlock()
	return x.rev
}
