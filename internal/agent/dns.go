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
}

// apiSource answers the DNS server from the server's discovery API, keeping
// each service's answer for a second.
type apiSource struct {
	c *client.Client

	mu    sync.Mutex
	cache map[string]sourceEntry
}

type sourceEntry struct {
	eps   []api.Endpoint
	known bool
	at    time.Time
}

// sourceTTL is how long an answer from the API is reused.
const sourceTTL = time.Second

func (s *apiSource) Endpoints(service string) ([]api.Endpoint, bool) {
	s.mu.Lock()
	e, ok := s.cache[service]
	s.mu.Unlock()
	if ok && time.Since(e.at) < sourceTTL {
		return e.eps, e.known
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	l, err := s.c.Discover(ctx, service, client.DiscoverOptions{})
	if err != nil {
		return nil, false
	}
	e = sourceEntry{eps: l.Items, known: len(l.Items) > 0, at: time.Now()}
	if !e.known {
		_, err := s.c.GetService(ctx, service)
		e.known = err == nil
	}
	s.mu.Lock()
	s.cache[service] = e
	s.mu.Unlock()
	return e.eps, e.known
}
