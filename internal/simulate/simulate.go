// Package simulate runs simulated nodes, for scale tests and benchmarks
// only: many fake agents in one process, registered with a berth server
// like real ones, heartbeating their leases, whose "runtime" reports an
// instance running the moment it is placed on them and stopped the moment
// it is stopped. Nothing is started, isolated or checked: never use it to
// run anything.
//
// One watch of all instances feeds every simulated node, and statuses go
// back in batches (PUT /v1/instances/status), so that one machine can stand
// in for thousands of nodes without becoming the bottleneck itself.
package simulate

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"sync"
	"time"

	"github.com/berth-dev/berth/api"
	"github.com/berth-dev/berth/client"
)

// Config describes the simulated nodes.
type Config struct {
	// Nodes is how many nodes to simulate.
	Nodes int
	// Prefix starts every node's name: PREFIX0001, PREFIX0002…
	Prefix string
	// TTL is each node's lease; heartbeats go every third of it.
	TTL time.Duration
	// Seed fixes the mix of node sizes and labels.
	Seed uint64
	// Labels are added to every node's generated ones (rack, zone, size).
	Labels map[string]string
}

// Flush bounds of status reports.
const (
	flushEvery    = 20 * time.Millisecond
	flushParallel = 4
)

// Sim is a running set of simulated nodes.
type Sim struct {
	c     *client.Client
	cfg   Config
	log   *slog.Logger
	nodes map[string]api.NodeRegistration

	mu      sync.Mutex
	pending map[string]api.InstanceStatus // instance → status to report
	kick    chan struct{}
}

// New prepares cfg.Nodes simulated nodes of mixed sizes: 2, 4, 8 or 16
// cores (30, 35, 25, 10%) with 2 or 4 GiB per core, 100m and 512Mi kept
// back, labelled with a rack (r00–r39), a zone (z0–z2), ssd (30%), gpu
// (5%) and simulated=true.
func New(c *client.Client, cfg Config, log *slog.Logger) (*Sim, error) {
	if cfg.Nodes <= 0 {
		return nil, fmt.Errorf("simulate: nodes must be > 0, got %d", cfg.Nodes)
	}
	if cfg.Prefix == "" {
		cfg.Prefix = "sim-"
	}
	if cfg.TTL <= 0 {
		cfg.TTL = 30 * time.Second
	}
	rng := rand.New(rand.NewPCG(cfg.Seed, 7))
	s := &Sim{c: c, cfg: cfg, log: log, nodes: map[string]api.NodeRegistration{},
		pending: map[string]api.InstanceStatus{}, kick: make(chan struct{}, 1)}
	width := len(fmt.Sprint(cfg.Nodes))
	for i := range cfg.Nodes {
		cores := int64(2)
		switch x := rng.IntN(100); {
		case x >= 90:
			cores = 16
		case x >= 65:
			cores = 8
		case x >= 30:
			cores = 4
		}
		perCore := int64(2) << 30
		if rng.IntN(2) == 1 {
			perCore = 4 << 30
		}
		capacity := api.Resources{CPU: api.CPU(cores * 1000), Memory: api.Bytes(cores * perCore)}
		alloc := api.Resources{CPU: capacity.CPU - 100, Memory: capacity.Memory - 512<<20}
		labels := map[string]string{"rack": fmt.Sprintf("r%02d", rng.IntN(40)), "zone": fmt.Sprintf("z%d", rng.IntN(3)),
			"simulated": "true"}
		if rng.IntN(100) < 30 {
			labels["ssd"] = "true"
		}
		if rng.IntN(100) < 5 {
			labels["gpu"] = "true"
		}
		for k, v := range cfg.Labels {
			labels[k] = v
		}
		name := fmt.Sprintf("%s%0*d", cfg.Prefix, width, i+1)
		s.nodes[name] = api.NodeRegistration{Address: "127.0.0.1", Labels: labels, Capacity: capacity, Allocatable: alloc,
			TTL: api.Duration(cfg.TTL), AgentVersion: "simulated"}
	}
	return s, nil
}

// Names lists the simulated nodes' names.
func (s *Sim) Names() []string {
	out := make([]string, 0, len(s.nodes))
	for n := range s.nodes {
		out = append(out, n)
	}
	return out
}

// Run registers the nodes, then heartbeats them and plays their runtime
// until ctx ends; it then releases their leases (the nodes go down) and
// returns.
func (s *Sim) Run(ctx context.Context, ready func()) error {
	if err := s.each(ctx, 32, func(name string, reg api.NodeRegistration) error {
		_, err := s.c.RegisterNode(ctx, name, reg)
		return err
	}); err != nil {
		return fmt.Errorf("simulate: register nodes: %w", err)
	}
	s.log.Info("simulate: nodes registered", "nodes", len(s.nodes))
	var wg sync.WaitGroup
	wg.Go(func() { s.heartbeats(ctx) })
	wg.Go(func() { s.watch(ctx) })
	wg.Go(func() { s.flusher(ctx) })
	if ready != nil {
		ready()
	}
	wg.Wait()
	// Release the leases so the nodes go down at once rather than lapse.
	rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
	defer cancel()
	_ = s.each(rctx, 32, func(name string, _ api.NodeRegistration) error { return s.c.ReleaseNode(rctx, name) })
	return nil
}

// each calls fn for every node with n workers and returns the first error.
func (s *Sim) each(ctx context.Context, n int, fn func(string, api.NodeRegistration) error) error {
	names := make(chan string)
	var (
		wg    sync.WaitGroup
		mu    sync.Mutex
		first error
	)
	for range n {
		wg.Go(func() {
			for name := range names {
				if err := fn(name, s.nodes[name]); err != nil && ctx.Err() == nil {
					mu.Lock()
					if first == nil {
						first = fmt.Errorf("node %s: %w", name, err)
					}
					mu.Unlock()
				}
			}
		})
	}
	for name := range s.nodes {
		select {
		case names <- name:
		case <-ctx.Done():
		}
	}
	close(names)
	wg.Wait()
	if first == nil {
		first = ctx.Err()
	}
	return first
}

// heartbeats renews every node's lease every third of its TTL, spread
// evenly over that time; a node the server forgot registers again.
func (s *Sim) heartbeats(ctx context.Context) {
	period := s.cfg.TTL / 3
	for {
		start := time.Now()
		err := s.each(ctx, 8, func(name string, reg api.NodeRegistration) error {
			hb, err := s.c.Heartbeat(ctx, name)
			if err == nil && !hb.Registered {
				_, err = s.c.RegisterNode(ctx, name, reg)
			}
			if err != nil && ctx.Err() == nil {
				s.log.Warn("simulate: heartbeat", "node", name, "err", err)
			}
			return nil
		})
		if err != nil && ctx.Err() != nil {
			return
		}
		t := time.NewTimer(max(0, period-time.Since(start)))
		select {
		case <-ctx.Done():
			t.Stop()
			return
		case <-t.C:
		}
	}
}

// liteInstance is the part of an instance the simulation reads.
type liteInstance struct {
	ID           string `json:"id"`
	Node         string `json:"node"`
	DesiredState string `json:"desiredState"`
	Status       struct {
		State string `json:"state"`
	} `json:"status"`
}

// watch follows every instance and queues the status each simulated node's
// runtime would report.
func (s *Sim) watch(ctx context.Context) {
	var from int64
	for ctx.Err() == nil {
		st, err := s.c.Watch(ctx, client.WatchInstances, from)
		if err != nil {
			from = 0
			sleep(ctx, 200*time.Millisecond)
			continue
		}
		for {
			ev, err := st.Next()
			if err != nil {
				if client.IsGone(err) {
					from = 0 // fell behind: start again from the current objects
				} else {
					from = st.Revision()
				}
				break
			}
			s.observe(ev)
		}
		st.Close()
	}
}

func (s *Sim) observe(ev api.Event) {
	if ev.Type != api.EventPut && ev.Type != api.EventDelete {
		return
	}
	var in liteInstance
	if ev.Type == api.EventDelete {
		s.mu.Lock()
		delete(s.pending, ev.Name)
		s.mu.Unlock()
		return
	}
	if json.Unmarshal(ev.Object, &in) != nil {
		return
	}
	if _, ok := s.nodes[in.Node]; !ok {
		return
	}
	now := time.Now().UTC()
	var st api.InstanceStatus
	switch {
	case in.DesiredState == api.DesiredRunning && in.Status.State != api.InstanceRunning:
		st = api.InstanceStatus{State: api.InstanceRunning, StartedAt: now, Health: api.HealthPassing}
	case in.DesiredState != api.DesiredRunning && in.Status.State != api.InstanceStopped:
		zero := 0
		st = api.InstanceStatus{State: api.InstanceStopped, ExitCode: &zero, FinishedAt: now}
	default:
		return
	}
	s.mu.Lock()
	s.pending[in.ID] = st
	n := len(s.pending)
	s.mu.Unlock()
	if n >= api.MaxStatusBatch {
		select {
		case s.kick <- struct{}{}:
		default:
		}
	}
}

// flusher sends the queued statuses in batches.
func (s *Sim) flusher(ctx context.Context) {
	t := time.NewTicker(flushEvery)
	defer t.Stop()
	sem := make(chan struct{}, flushParallel)
	var wg sync.WaitGroup
	defer wg.Wait()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		case <-s.kick:
		}
		s.mu.Lock()
		items := make([]api.InstanceStatusUpdate, 0, len(s.pending))
		for id, st := range s.pending {
			items = append(items, api.InstanceStatusUpdate{ID: id, Status: st})
		}
		clear(s.pending)
		s.mu.Unlock()
		for len(items) > 0 {
			n := min(len(items), api.MaxStatusBatch)
			batch := items[:n]
			items = items[n:]
			select {
			case sem <- struct{}{}:
			case <-ctx.Done():
				return
			}
			wg.Go(func() {
				defer func() { <-sem }()
				if _, err := s.c.PutInstanceStatuses(ctx, batch); err != nil && ctx.Err() == nil {
					s.log.Warn("simulate: report statuses; will retry", "items", len(batch), "err", err)
					s.requeue(batch)
				}
			})
		}
	}
}

// requeue puts back statuses whose report failed, unless newer ones came.
func (s *Sim) requeue(items []api.InstanceStatusUpdate) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, it := range items {
		if _, ok := s.pending[it.ID]; !ok {
			s.pending[it.ID] = it.Status
		}
	}
}

func sleep(ctx context.Context, d time.Duration) {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
	case <-t.C:
	}
}
