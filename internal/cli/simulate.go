package cli

import (
	"fmt"
	"net/http"
	"time"

	"github.com/berth-dev/berth/client"
	"github.com/berth-dev/berth/internal/simulate"
)

// runSimulated runs `berth agent --simulate N`: N fake nodes for scale tests
// and benchmarks (see package simulate).
func runSimulated(g *globals, server string, n int, prefix string, af agentFlags) error {
	labels, err := parseKV("label", af.labels)
	if err != nil {
		return err
	}
	ttl := af.ttl
	if ttl < 30*time.Second {
		ttl = 30 * time.Second // thousands of nodes: keep the heartbeat load low
	}
	hc := &http.Client{Timeout: time.Minute, Transport: &http.Transport{MaxIdleConnsPerHost: 64}}
	c, err := client.New(server, client.WithHTTPClient(hc))
	if err != nil {
		return err
	}
	log := g.logger()
	log.Warn("SIMULATED NODES: for tests and benchmarks only; nothing is run", "nodes", n)
	sim, err := simulate.New(c, simulate.Config{Nodes: n, Prefix: prefix, TTL: ttl, Labels: labels}, log)
	if err != nil {
		return err
	}
	ctx, stop := signalContext()
	defer stop()
	return sim.Run(ctx, func() { fmt.Fprintf(g.stdout, "%d simulated nodes ready\n", n) })
}
