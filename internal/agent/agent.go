// Package agent is berth's per-machine half: it registers its node with the
// server through the API (never etcd), keeps the node's lease alive with
// heartbeats, and releases it on a graceful stop. Later it also runs the
// node's containers, networks and health checks.
package agent

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	goruntime "runtime"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/berth-dev/berth/api"
	"github.com/berth-dev/berth/client"
	"github.com/berth-dev/berth/internal/dns"
	"github.com/berth-dev/berth/internal/network"
	"github.com/berth-dev/berth/internal/runtime"
)

// Config describes the node an agent runs on.
type Config struct {
	Name    string
	Address string
	Labels  map[string]string
	// Reserved is kept back from the machine's capacity for the system.
	Reserved api.Resources
	// TTL is how long the node stays ready without a heartbeat.
	TTL     time.Duration
	Version string
	// DataDir holds the runtime's state, logs and per-instance files; with
	// none, the agent only keeps its node registered (no containers).
	DataDir string
	// Listen is where the agent serves logs, exec and images to the server
	// (default: the node address, port 7481).
	Listen string
	// KeepBridgeNetfilter leaves net.bridge.bridge-nf-call-* as they are
	// (network.Options).
	KeepBridgeNetfilter bool
}

// Agent keeps one node registered.
type Agent struct {
	c         *client.Client
	cfg       Config
	log       *slog.Logger
	ready     chan struct{}
	rt        *runtime.Containerd
	net       *network.Manager
	dns       *gatewayDNS
	agentAddr string
	checks    ttlChecks // instances' health monitors, for TTL updates (check.go)
}

// New returns an agent; missing name, address and TTL are filled from the machine.
func New(c *client.Client, cfg Config, log *slog.Logger) (*Agent, error) {
	if cfg.Name == "" {
		h, err := os.Hostname()
		if err != nil {
			return nil, fmt.Errorf("agent: node name: %w", err)
		}
		cfg.Name = strings.ToLower(h)
	}
	if why := api.ValidNodeName(cfg.Name); why != "" {
		return nil, fmt.Errorf("agent: node name: %s", why)
	}
	if cfg.Address == "" {
		cfg.Address = DetectAddress()
	}
	if cfg.TTL == 0 {
		cfg.TTL = 10 * time.Second
	}
	return &Agent{c: c, cfg: cfg, log: log.With("node", cfg.Name), ready: make(chan struct{})}, nil
}

// Ready is closed once the node is first registered.
func (a *Agent) Ready() <-chan struct{} { return a.ready }

// Name is the node's name.
func (a *Agent) Name() string { return a.cfg.Name }

// Registration is what the agent tells the server about its node.
func (a *Agent) Registration() (api.NodeRegistration, error) {
	capa, err := Capacity()
	if err != nil {
		return api.NodeRegistration{}, err
	}
	alloc := api.Resources{CPU: max(0, capa.CPU-a.cfg.Reserved.CPU), Memory: max(0, capa.Memory-a.cfg.Reserved.Memory)}
	return api.NodeRegistration{Address: a.cfg.Address, Labels: a.cfg.Labels, Capacity: capa,
		Allocatable: alloc, TTL: api.Duration(a.cfg.TTL), AgentVersion: a.cfg.Version, AgentAddr: a.agentAddr}, nil
}

// Register registers the node once.
func (a *Agent) Register(ctx context.Context) (api.Node, error) {
	reg, err := a.Registration()
	if err != nil {
		return api.Node{}, err
	}
	n, err := a.c.RegisterNode(ctx, a.cfg.Name, reg)
	if err != nil {
		return api.Node{}, fmt.Errorf("register node %s: %w", a.cfg.Name, err)
	}
	return n, nil
}

// Run starts the runtime and the agent's endpoints (with a data dir),
// registers the node, runs its instances and heartbeats until ctx ends,
// then releases the node's lease so that it is down at once. Containers and
// the runtime go on running: a restarted agent takes them back.
func (a *Agent) Run(ctx context.Context) error {
	if a.cfg.DataDir != "" {
		stop, err := a.startRuntime(ctx)
		if err != nil {
			return err
		}
		defer stop()
	}
	return a.runNode(ctx)
}

// startRuntime serves the agent endpoints at once and connects the runtime
// in the background (starting containerd can take a moment), so that the
// node registers without waiting; the instance reconciler starts once both
// the node and the runtime are ready, and endpoint calls wait for it.
func (a *Agent) startRuntime(ctx context.Context) (func(), error) {
	listen := a.cfg.Listen
	if listen == "" {
		listen = net.JoinHostPort(a.cfg.Address, "7481")
	}
	ln, err := net.Listen("tcp", listen)
	if err != nil {
		return nil, fmt.Errorf("agent: listen on %s: %w", listen, err)
	}
	a.agentAddr = ln.Addr().String()
	a.dns = &gatewayDNS{a: a, src: &apiSource{c: a.c, cache: map[string]sourceEntry{}}, servers: map[string]*dns.Server{}}
	rtReady := make(chan struct{})
	h := a.handler()
	srv := &http.Server{ReadHeaderTimeout: 10 * time.Second,
		BaseContext: func(net.Listener) context.Context { return ctx },
		Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			t := time.NewTimer(30 * time.Second)
			defer t.Stop()
			select {
			case <-rtReady:
				h.ServeHTTP(w, r)
			case <-t.C:
				agentError(w, http.StatusServiceUnavailable, api.CodeInternal, "the node's runtime is not ready (see the agent's log)")
			case <-r.Context().Done():
			}
		})}
	var wg sync.WaitGroup
	wg.Add(3)
	go func() {
		defer wg.Done()
		if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			a.log.Error("agent: endpoints stopped", "err", err)
		}
	}()
	go func() {
		defer wg.Done()
		backoff := 500 * time.Millisecond
		for {
			rt, err := runtime.New(ctx, a.cfg.DataDir, a.log)
			if err == nil {
				nm, nerr := network.New(a.cfg.DataDir, rt.RunDir(), a.log, network.Options{KeepBridgeNetfilter: a.cfg.KeepBridgeNetfilter})
				if nerr == nil {
					a.rt, a.net = rt, nm
					close(rtReady)
					return
				}
				_ = rt.Close()
				err = nerr
			}
			if ctx.Err() != nil {
				return
			}
			a.log.Error("agent: runtime unavailable; containers cannot run here yet", "err", err)
			if !sleep(ctx, backoff) {
				return
			}
			backoff = min(2*backoff, 10*time.Second)
		}
	}()
	go func() {
		defer wg.Done()
		for _, ch := range []<-chan struct{}{a.ready, rtReady} {
			select {
			case <-ch:
			case <-ctx.Done():
				return
			}
		}
		go a.watchNetworks(ctx)
		m := &instances{a: a, rt: a.rt, workers: map[string]*worker{}}
		m.run(ctx)
	}()
	return func() {
		sctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
		defer cancel()
		_ = srv.Shutdown(sctx)
		wg.Wait()
		a.dns.closeAll()
		select {
		case <-rtReady:
			_ = a.rt.Close()
		default:
		}
	}, nil
}

func (a *Agent) runNode(ctx context.Context) error {
	backoff := 100 * time.Millisecond
	for {
		_, err := a.Register(ctx)
		if err == nil {
			break
		}
		var ae *api.Error
		if errors.As(err, &ae) && ae.Status == 400 {
			return err // the server refuses this node: retrying cannot help
		}
		a.log.Warn("agent: cannot register yet", "err", err)
		if !sleep(ctx, backoff) {
			return nil
		}
		backoff = min(2*backoff, 5*time.Second)
	}
	a.log.Info("agent: node registered", "address", a.cfg.Address, "ttl", a.cfg.TTL)
	close(a.ready)
	interval := a.cfg.TTL / 3
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 3*time.Second)
			defer cancel()
			if err := a.c.ReleaseNode(rctx, a.cfg.Name); err != nil {
				a.log.Warn("agent: release lease", "err", err)
			} else {
				a.log.Info("agent: node lease released")
			}
			return nil
		case <-t.C:
		}
		hctx, cancel := context.WithTimeout(ctx, interval)
		hb, err := a.c.Heartbeat(hctx, a.cfg.Name)
		cancel()
		switch {
		case err != nil:
			if ctx.Err() == nil {
				a.log.Warn("agent: heartbeat failed", "err", err)
			}
		case !hb.Registered:
			a.log.Warn("agent: the server forgot this node; registering again")
			if _, err := a.Register(ctx); err != nil {
				a.log.Warn("agent: register", "err", err)
			}
		}
	}
}

func sleep(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-ctx.Done():
		return false
	}
}

// Capacity reads the machine's CPUs and memory.
func Capacity() (api.Resources, error) {
	mem, err := memTotal("/proc/meminfo")
	if err != nil {
		return api.Resources{}, err
	}
	return api.Resources{CPU: api.CPU(goruntime.NumCPU() * 1000), Memory: mem}, nil
}

func memTotal(path string) (api.Bytes, error) {
	f, err := os.Open(path)
	if err != nil {
		return 0, fmt.Errorf("read memory size: %w", err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) >= 2 && fields[0] == "MemTotal:" {
			kb, err := strconv.ParseInt(fields[1], 10, 64)
			if err != nil {
				return 0, fmt.Errorf("parse MemTotal: %w", err)
			}
			return api.Bytes(kb * 1024), nil
		}
	}
	return 0, fmt.Errorf("no MemTotal in %s", path)
}

// DetectAddress picks the node's address: the first global unicast IPv4
// address of an interface that is up, else loopback.
func DetectAddress() string {
	ifaces, err := net.Interfaces()
	if err != nil {
		return "127.0.0.1"
	}
	for _, ifc := range ifaces {
		if ifc.Flags&net.FlagUp == 0 || ifc.Flags&net.FlagLoopback != 0 {
			continue
		}
		addrs, _ := ifc.Addrs()
		for _, a := range addrs {
			if ipn, ok := a.(*net.IPNet); ok && ipn.IP.To4() != nil && ipn.IP.IsGlobalUnicast() {
				return ipn.IP.String()
			}
		}
	}
	return "127.0.0.1"
}

// watch follows a list path, calling fn for every event, until ctx ends.
func (a *Agent) watch(ctx context.Context, path string, fn func(api.Event)) {
	var from int64
	for ctx.Err() == nil {
		s, err := a.c.Watch(ctx, path, from)
		if err != nil {
			from = 0
			sleep(ctx, time.Second)
			continue
		}
		for {
			ev, err := s.Next()
			if err != nil {
				break
			}
			fn(ev)
		}
		from = s.Revision()
		s.Close()
	}
}

// watchNetworks removes a deleted network's bridge and VXLAN device from
// this node, and keeps overlay networks programmed as nodes come and go.
func (a *Agent) watchNetworks(ctx context.Context) {
	poke := make(chan struct{}, 1)
	kick := func() {
		select {
		case poke <- struct{}{}:
		default:
		}
	}
	go a.watch(ctx, client.WatchNetworks, func(ev api.Event) {
		if ev.Type == api.EventDelete {
			if err := a.net.RemoveNetwork(ev.Name); err != nil {
				a.log.Warn("agent: remove network", "network", ev.Name, "err", err)
			}
		}
		kick()
	})
	go a.watch(ctx, client.WatchNodes, func(api.Event) { kick() })
	tick := time.NewTicker(10 * time.Second)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-poke:
		case <-tick.C:
		}
		a.reconcileOverlays(ctx)
	}
}

// reconcileOverlays programs every overlay network this node has a slice of.
func (a *Agent) reconcileOverlays(ctx context.Context) {
	nets, err := a.c.ListNetworks(ctx)
	if err != nil {
		return
	}
	var nodes []api.Node
	for _, n := range nets.Items {
		if n.Driver != api.DriverOverlay || n.Status.NodeSubnets[a.cfg.Name] == "" {
			continue
		}
		if nodes == nil {
			l, err := a.c.ListNodes(ctx)
			if err != nil {
				return
			}
			nodes = l.Items
		}
		mine, err := netip.ParsePrefix(n.Status.NodeSubnets[a.cfg.Name])
		if err != nil {
			continue
		}
		var peers []network.Peer
		for _, node := range nodes {
			sl, err := netip.ParsePrefix(n.Status.NodeSubnets[node.Name])
			addr := net.ParseIP(node.Address)
			if node.Name == a.cfg.Name || node.Status.State != api.NodeReady || err != nil || addr == nil {
				continue
			}
			peers = append(peers, network.Peer{Node: node.Name, Address: addr, Slice: sl})
		}
		if err := a.net.Overlay(n, a.cfg.Name, net.ParseIP(a.cfg.Address), mine, peers); err != nil {
			a.log.Warn("agent: overlay", "network", n.Name, "err", err)
		}
	}
}
