package client

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"sort"
	"strconv"
	"sync"
	"time"

	"github.com/berth-dev/berth/api"
)

// ErrNoEndpoints is returned (wrapped) by Pick and Do when a service has no
// endpoint to use: none healthy, or every one ejected.
var ErrNoEndpoints = errors.New("no endpoint available")

// DiscovererOptions configure a Discoverer. The zero value is round-robin
// over Endpoint.Port, ejecting an endpoint for 10s after 3 failures in a row.
type DiscovererOptions struct {
	// Balancer picks among the endpoints; RoundRobin by default.
	Balancer Balancer
	// EjectAfter is how many failures in a row through Do eject an endpoint
	// (passive outlier detection): 3 when 0, never when negative.
	EjectAfter int
	// EjectFor is how long an ejected endpoint is skipped: 10s when 0.
	EjectFor time.Duration
	// Port is the named port (a key of Endpoint.Ports) to call. When set,
	// endpoints without it are skipped; when empty, Endpoint.Port is used.
	Port string
}

// Discoverer is a local cache of one service's healthy endpoints, kept
// current by a discovery watch, with client-side load balancing and
// passive failover. It is safe for concurrent use.
type Discoverer struct {
	c       *Client
	service string
	path    string
	o       DiscovererOptions
	now     func() time.Time

	mu  sync.Mutex
	eps map[string]*epState // by endpoint key, id@network
	rr  uint64

	cancel    context.CancelFunc
	done      chan struct{}
	closeOnce sync.Once
}

// epState is one endpoint and what the Discoverer has seen of it.
type epState struct {
	key          string
	ep           api.Endpoint
	inflight     int       // calls through Do under way
	fails        int       // failures in a row
	ejectedUntil time.Time // skipped until then
}

func endpointKey(ep api.Endpoint) string { return ep.ID + "@" + ep.Network }

// Watch reconnection backoff.
const (
	watchBackoffMin = 100 * time.Millisecond
	watchBackoffMax = 10 * time.Second
)

// NewDiscoverer lists the healthy endpoints of service once, then follows
// the discovery watch in a goroutine it owns until Close, reconnecting with
// backoff when the stream breaks and listing again when the server no longer
// holds the watch's revision (410). ctx bounds only the first list, whose
// failure NewDiscoverer returns.
func (c *Client) NewDiscoverer(ctx context.Context, service string, o DiscovererOptions) (*Discoverer, error) {
	if o.EjectAfter == 0 {
		o.EjectAfter = 3
	}
	if o.EjectFor <= 0 {
		o.EjectFor = 10 * time.Second
	}
	d := &Discoverer{
		c: c, service: service, o: o, now: time.Now,
		path: DiscoveryPath(service, DiscoverOptions{Healthy: true}),
		eps:  map[string]*epState{},
		done: make(chan struct{}),
	}
	l, err := c.Discover(ctx, service, DiscoverOptions{Healthy: true})
	if err != nil {
		return nil, fmt.Errorf("discover %s: %w", service, err)
	}
	d.replace(endpointMap(l.Items))
	wctx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	d.cancel = cancel
	go d.run(wctx, l.Revision)
	return d, nil
}

func endpointMap(eps []api.Endpoint) map[string]api.Endpoint {
	m := make(map[string]api.Endpoint, len(eps))
	for _, ep := range eps {
		m[endpointKey(ep)] = ep
	}
	return m
}

// run follows the watch until ctx ends.
func (d *Discoverer) run(ctx context.Context, rev int64) {
	defer close(d.done)
	backoff := watchBackoffMin
	for {
		synced, err := d.follow(ctx, &rev)
		if ctx.Err() != nil {
			return
		}
		if synced {
			backoff = watchBackoffMin
		}
		if IsGone(err) {
			l, lerr := d.c.Discover(ctx, d.service, DiscoverOptions{Healthy: true})
			if lerr == nil {
				d.replace(endpointMap(l.Items))
				rev = l.Revision
			} else {
				rev = 0 // a fresh watch starts with the whole view
			}
		}
		// Full jitter, so that many clients do not come back at once.
		wait := backoff/2 + rand.N(backoff/2+1)
		backoff = min(2*backoff, watchBackoffMax)
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			return
		case <-t.C:
		}
	}
}

// follow opens one watch from *rev and applies its events until it breaks,
// leaving in *rev the last revision delivered. The server starts every watch
// with the whole view as puts up to a bookmark; that first batch replaces the
// cache, so endpoints deleted while no watch was open go too. synced reports
// whether that first batch arrived.
func (d *Discoverer) follow(ctx context.Context, rev *int64) (synced bool, err error) {
	st, err := d.c.Watch(ctx, d.path, *rev)
	if err != nil {
		return false, err
	}
	defer st.Close()
	defer func() { *rev = max(*rev, st.Revision()) }()
	snap := map[string]api.Endpoint{}
	for {
		ev, err := st.Next()
		if err != nil {
			return synced, err
		}
		switch ev.Type {
		case api.EventPut, api.EventDelete:
			var ep api.Endpoint
			if err := json.Unmarshal(ev.Object, &ep); err != nil {
				continue
			}
			key := ev.Name
			if key == "" {
				key = endpointKey(ep)
			}
			put := ev.Type == api.EventPut && ep.Health != api.HealthCritical
			switch {
			case !synced && put:
				snap[key] = ep
			case !synced:
				delete(snap, key)
			case put:
				d.put(key, ep)
			default:
				d.remove(key)
			}
		case api.EventBookmark:
			if !synced {
				d.replace(snap)
				synced, snap = true, nil
			}
		}
	}
}

// replace makes m the cache, keeping what was seen of endpoints still there.
func (d *Discoverer) replace(m map[string]api.Endpoint) {
	d.mu.Lock()
	defer d.mu.Unlock()
	eps := make(map[string]*epState, len(m))
	for k, ep := range m {
		if ep.Health == api.HealthCritical {
			continue
		}
		s := d.eps[k]
		if s == nil {
			s = &epState{key: k}
		}
		s.ep = ep
		eps[k] = s
	}
	d.eps = eps
}

func (d *Discoverer) put(key string, ep api.Endpoint) {
	d.mu.Lock()
	defer d.mu.Unlock()
	s := d.eps[key]
	if s == nil {
		s = &epState{key: key}
		d.eps[key] = s
	}
	s.ep = ep
}

func (d *Discoverer) remove(key string) {
	d.mu.Lock()
	defer d.mu.Unlock()
	delete(d.eps, key)
}

// candidates are the usable endpoints in key order, but skip; d.mu held.
func (d *Discoverer) candidates(now time.Time, skip *epState) []*epState {
	out := make([]*epState, 0, len(d.eps))
	for _, s := range d.eps {
		if s == skip || now.Before(s.ejectedUntil) {
			continue
		}
		if d.o.Port != "" {
			if _, ok := s.ep.Ports[d.o.Port]; !ok {
				continue
			}
		}
		out = append(out, s)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].key < out[j].key })
	return out
}

// Endpoints are the service's current healthy endpoints, less the ejected
// ones (and, with a named Port, those without it), in key order.
func (d *Discoverer) Endpoints() []api.Endpoint {
	d.mu.Lock()
	defer d.mu.Unlock()
	cands := d.candidates(d.now(), nil)
	out := make([]api.Endpoint, len(cands))
	for i, s := range cands {
		out[i] = s.ep
	}
	return out
}

// Pick chooses an endpoint by the balancer, skipping ejected ones; it fails
// with ErrNoEndpoints when there is none. Calls made outside Do are not
// counted for LeastOutstanding nor for ejection.
func (d *Discoverer) Pick() (api.Endpoint, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	s := d.pickLocked(nil)
	if s == nil {
		return api.Endpoint{}, d.errNone()
	}
	return s.ep, nil
}

func (d *Discoverer) errNone() error {
	return fmt.Errorf("service %s: %w", d.service, ErrNoEndpoints)
}

// pickLocked picks among the candidates but skip, or nil; d.mu held.
func (d *Discoverer) pickLocked(skip *epState) *epState {
	cands := d.candidates(d.now(), skip)
	if len(cands) == 0 {
		return nil
	}
	return d.o.Balancer.pick(cands, &d.rr)
}

// Do picks an endpoint and calls fn with it. When fn fails it is called once
// more with a different endpoint (if there is one) and that answer is
// returned. Each call counts as in flight for LeastOutstanding while it runs,
// and its outcome feeds outlier detection: EjectAfter failures in a row eject
// the endpoint for EjectFor, after which it is picked again with a clean
// slate. A call that fails after ctx ended is neither retried nor held
// against its endpoint.
func (d *Discoverer) Do(ctx context.Context, fn func(ctx context.Context, ep api.Endpoint) error) error {
	d.mu.Lock()
	first := d.pickLocked(nil)
	if first == nil {
		d.mu.Unlock()
		return d.errNone()
	}
	first.inflight++
	d.mu.Unlock()

	err := d.call(ctx, first, fn)
	if err == nil || ctx.Err() != nil {
		return err
	}

	d.mu.Lock()
	second := d.pickLocked(first)
	if second == nil {
		d.mu.Unlock()
		return err
	}
	second.inflight++
	d.mu.Unlock()
	return d.call(ctx, second, fn)
}

// call runs fn on s (whose inflight the caller raised) and records how it went.
func (d *Discoverer) call(ctx context.Context, s *epState, fn func(context.Context, api.Endpoint) error) error {
	d.mu.Lock()
	ep := s.ep
	d.mu.Unlock()
	err := fn(ctx, ep)
	d.mu.Lock()
	defer d.mu.Unlock()
	s.inflight--
	switch {
	case err == nil:
		s.fails = 0
	case ctx.Err() != nil:
		// The caller gave up; the endpoint may be fine.
	case d.o.EjectAfter > 0:
		s.fails++
		if s.fails >= d.o.EjectAfter {
			s.fails = 0
			s.ejectedUntil = d.now().Add(d.o.EjectFor)
		}
	}
	return err
}

// Addr is the endpoint's "address:port" (bracketed for IPv6), with the named
// Port when the options give one and the endpoint has it, else Endpoint.Port.
func (d *Discoverer) Addr(ep api.Endpoint) string {
	port := ep.Port
	if p, ok := ep.Ports[d.o.Port]; ok && d.o.Port != "" {
		port = p
	}
	return net.JoinHostPort(ep.Address, strconv.Itoa(port))
}

// Close stops the watch and waits for its goroutine. The cache keeps its
// last endpoints; Pick and Do go on using them.
func (d *Discoverer) Close() error {
	d.closeOnce.Do(func() {
		d.cancel()
		<-d.done
	})
	return nil
}
