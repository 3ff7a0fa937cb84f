package agent

import (
	"context"
	"net"
	"sync"
	"time"

	"github.com/berth-dev/berth/api"
	"github.com/berth-dev/berth/client"
	"github.com/berth-dev/berth/internal/dns"
)

// gatewayDNS serves NAME.svc.berth to containers on each network's gateway
// address on this node (where their resolv.conf points).
type gatewayDNS struct {
	a   *Agent
	src *apiSource

	mu      sync.Mutex
	servers map[string]*dns.Server // by gateway address
}

// ensure starts the DNS server of a gateway once.
func (g *gatewayDNS) ensure(ctx context.Context, gateway string) {
	if gateway == "" {
		return
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.servers[gateway] != nil {
		return
	}
	s, err := dns.Start(ctx, dns.Config{Addr: net.JoinHostPort(gateway, "53")}, g.src)
	if err != nil {
		g.a.log.Warn("agent: DNS on a network gateway", "gateway", gateway, "err", err)
		return
	}
	g.servers[gateway] = s
}

func (g *gatewayDNS) closeAll() {
	g.mu.Lock()
	defer g.mu.Unlock()
	for k, s := range g.servers {
		_ = s.Close()
		delete(g.servers, k)
	}
	g.src.close()
}

// apiSource answers the DNS server from the server's discovery API: the
// first query of a service lists its healthy endpoints and opens a watch of
// them (a client.Discoverer), which keeps the answer current from then on,
// so an instance that dies leaves the containers' DNS as soon as the server
// knows, without a cache to expire. Services not queried for a while have
// their watch closed. Whether a service with no endpoints exists at all
// (NXDOMAIN or an empty answer) is asked at most once a second.
type apiSource struct {
	c *client.Client

	mu     sync.Mutex
	cache  map[string]sourceEntry
	ctx    context.Context // owns the watches; ended by close
	cancel context.CancelFunc
	wg     sync.WaitGroup
}

type sourceEntry struct {
	d        *client.Discoverer // nil: the last attempt to open it failed
	used     time.Time          // last query
	known    bool               // the service exists (asked when it has no endpoints)
	knownAt  time.Time
	failedAt time.Time
}

const (
	// sourceKnownTTL is how long "does this service exist" is reused.
	sourceKnownTTL = time.Second
	// sourceIdle is how long a service's watch stays open without queries.
	sourceIdle = 5 * time.Minute
)

func (s *apiSource) start() {
	if s.ctx == nil {
		s.ctx, s.cancel = context.WithCancel(context.Background())
		s.wg.Go(s.janitor)
	}
}

// close ends every watch.
func (s *apiSource) close() {
	s.mu.Lock()
	if s.cancel != nil {
		s.cancel()
	}
	entries := s.cache
	s.cache = map[string]sourceEntry{}
	s.mu.Unlock()
	for _, e := range entries {
		if e.d != nil {
			_ = e.d.Close()
		}
	}
	s.wg.Wait()
}

// janitor closes the watches of services nobody asked for lately.
func (s *apiSource) janitor() {
	t := time.NewTicker(sourceIdle / 5)
	defer t.Stop()
	for {
		select {
		case <-s.ctx.Done():
			return
		case <-t.C:
		}
		var idle []*client.Discoverer
		s.mu.Lock()
		for name, e := range s.cache {
			if time.Since(e.used) > sourceIdle {
				if e.d != nil {
					idle = append(idle, e.d)
				}
				delete(s.cache, name)
			}
		}
		s.mu.Unlock()
		for _, d := range idle {
			_ = d.Close()
		}
	}
}

func (s *apiSource) Endpoints(service string) ([]api.Endpoint, bool) {
	now := time.Now()
	s.mu.Lock()
	s.start()
	e, ok := s.cache[service]
	s.mu.Unlock()
	if !ok || (e.d == nil && now.Sub(e.failedAt) > sourceKnownTTL) {
		ctx, cancel := context.WithTimeout(s.ctx, 2*time.Second)
		d, err := s.c.NewDiscoverer(ctx, service, client.DiscovererOptions{})
		cancel()
		e = sourceEntry{d: d}
		if err != nil {
			e.failedAt = now
		}
		s.mu.Lock()
		if cur, ok := s.cache[service]; ok && cur.d != nil {
			// Another query opened it meanwhile: keep that one.
			if d != nil {
				_ = d.Close()
			}
			e = cur
		}
		s.mu.Unlock()
	}
	var eps []api.Endpoint
	if e.d != nil {
		eps = e.d.Endpoints()
	}
	e.used = now
	if len(eps) > 0 {
		e.known = true
	} else if now.Sub(e.knownAt) > sourceKnownTTL {
		ctx, cancel := context.WithTimeout(s.ctx, 2*time.Second)
		_, err := s.c.GetService(ctx, service)
		cancel()
		e.known, e.knownAt = err == nil, now
		if err != nil && !client.IsNotFound(err) {
			e.known = len(eps) > 0 // the server did not answer: say nothing exists rather than guess
		}
	}
	s.mu.Lock()
	if s.ctx.Err() == nil {
		s.cache[service] = e
	} else if e.d != nil {
		_ = e.d.Close()
	}
	s.mu.Unlock()
	return eps, e.known
}
