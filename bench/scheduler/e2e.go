package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/berth-dev/berth/api"
	"github.com/berth-dev/berth/client"
)

// endToEnd runs a real `berth server` (embedded etcd, in a temporary data
// dir, API on loopback) and `berth agent --simulate N` (N fake nodes in one
// process, see internal/simulate), applies services totalling the given
// number of instances and measures the time until every instance is
// reported running, and the server's peak RSS.
func endToEnd(bin string, nNodes, nInst, nSvc int, seed uint64) error {
	if bin == "" {
		dir, err := os.MkdirTemp("", "berth-bench-bin-")
		if err != nil {
			return err
		}
		defer os.RemoveAll(dir)
		bin = filepath.Join(dir, "berth")
		fmt.Println("building berth...")
		build := exec.Command("go", "build", "-o", bin, "./cmd/berth")
		build.Stdout, build.Stderr = os.Stderr, os.Stderr
		if err := build.Run(); err != nil {
			return fmt.Errorf("build berth: %w", err)
		}
	}
	data, err := os.MkdirTemp("", "berth-bench-e2e-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(data)
	if dir := os.Getenv("BENCH_PROFILE_DIR"); dir != "" {
		defer func() {
			for _, f := range []string{"server.log", "sim.log"} {
				if b, err := os.ReadFile(filepath.Join(data, f)); err == nil {
					_ = os.WriteFile(filepath.Join(dir, f), b, 0o644)
				}
			}
		}()
	}
	addr, err := freeAddr()
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()

	server, err := start(bin, filepath.Join(data, "server.log"), "server", "--data-dir", filepath.Join(data, "server"),
		"--api-addr", addr, "--log-level", "info")
	if err != nil {
		return err
	}
	defer stop(server)
	c, err := client.New(addr, client.WithHTTPClient(&http.Client{Timeout: time.Minute,
		Transport: &http.Transport{MaxIdleConnsPerHost: 32}}))
	if err != nil {
		return err
	}
	if err := c.WaitReady(ctx, 30*time.Second); err != nil {
		return fmt.Errorf("server not ready: %w (log: %s)", err, filepath.Join(data, "server.log"))
	}
	t0 := time.Now()
	sim, err := start(bin, filepath.Join(data, "sim.log"), "agent", "--simulate", strconv.Itoa(nNodes),
		"--server", addr, "--log-level", "warn")
	if err != nil {
		return err
	}
	defer stop(sim)
	for {
		l, err := c.ListNodes(ctx)
		if err == nil {
			ready := 0
			for _, n := range l.Items {
				if n.Status.State == api.NodeReady {
					ready++
				}
			}
			if ready >= nNodes {
				break
			}
		}
		if ctx.Err() != nil {
			return fmt.Errorf("simulated nodes not ready: %w", ctx.Err())
		}
		time.Sleep(200 * time.Millisecond)
	}
	fmt.Printf("%d simulated nodes registered in %v\n", nNodes, time.Since(t0).Round(time.Millisecond))

	rng := rand.New(rand.NewPCG(seed, 42))
	svcs := makeServices(rng, nSvc, nInst)
	specs := make([]api.ServiceSpec, len(svcs))
	for i, s := range svcs {
		replicas := s.replicas
		specs[i] = api.ServiceSpec{Name: s.req.Service, Image: "bench.local/app:1", Replicas: &replicas,
			Resources: api.ResourceSpec{CPU: s.req.Resources.CPU, Memory: s.req.Resources.Memory},
			Placement: api.Placement{MaxPerNode: s.req.MaxPerNode}}
		for _, con := range s.req.Constraints {
			specs[i].Placement.Constraints = append(specs[i].Placement.Constraints, con.String())
		}
		for _, p := range s.req.HostPorts {
			specs[i].Ports = append(specs[i].Ports, api.PortSpec{Name: "http", Port: 80, HostPort: p})
		}
	}
	fmt.Printf("applying %d services with %d instances in all...\n", len(specs), nInst)
	start := time.Now()
	var wg sync.WaitGroup
	jobs := make(chan api.ServiceSpec)
	var applyErr error
	var mu sync.Mutex
	for range 8 {
		wg.Go(func() {
			for spec := range jobs {
				if _, err := c.ApplyService(ctx, spec); err != nil {
					mu.Lock()
					applyErr = errors.Join(applyErr, fmt.Errorf("apply %s: %w", spec.Name, err))
					mu.Unlock()
				}
			}
		})
	}
	for _, s := range specs {
		jobs <- s
	}
	close(jobs)
	wg.Wait()
	applied := time.Since(start)
	if applyErr != nil {
		return applyErr
	}
	var peakRSS int64
	sample := func() {
		if hwm, err := vmHWM(server.Process.Pid); err == nil {
			peakRSS = max(peakRSS, hwm)
		}
	}
	// Follow the services' running counts through a watch (cheaper for the
	// server than listing them over and over).
	ws, err := c.Watch(ctx, client.WatchServices, 0)
	if err != nil {
		return fmt.Errorf("watch services: %w", err)
	}
	defer ws.Close()
	updates := make(chan api.Service, 1024)
	watchErr := make(chan error, 1)
	go func() {
		for {
			ev, err := ws.Next()
			if err != nil {
				watchErr <- err
				return
			}
			var svc api.Service
			if ev.Type == api.EventPut && json.Unmarshal(ev.Object, &svc) == nil {
				select {
				case updates <- svc:
				case <-ctx.Done():
					return
				}
			}
		}
	}()
	counts := map[string]int{}
	running, lastRunning := 0, 0
	lastPrint, lastCount := time.Now(), time.Now()
	tick := time.NewTicker(500 * time.Millisecond)
	defer tick.Stop()
	for running < nInst {
		select {
		case svc := <-updates:
			running += svc.Status.Running - counts[svc.Name]
			counts[svc.Name] = svc.Status.Running
		case err := <-watchErr:
			return fmt.Errorf("watch services: %w", err)
		case <-tick.C:
			sample()
		}
		if running > lastRunning {
			lastRunning, lastCount = running, time.Now()
		}
		if time.Since(lastCount) > 3*time.Second {
			// Stalled: count what fits nowhere.
			lastCount = time.Now()
			if il, err := c.ListInstances(ctx, client.InstanceFilter{}); err == nil {
				unschedulable := 0
				for _, in := range il.Items {
					if in.Node == "" && in.Status.Reason == api.ReasonUnschedulable {
						unschedulable++
					}
				}
				if unschedulable > 0 && running+unschedulable >= nInst {
					fmt.Printf("  %d instances fit nowhere (pending, unschedulable); %d running\n", unschedulable, running)
					nInst = running
				}
			}
		}
		if time.Since(lastPrint) > 5*time.Second {
			lastPrint = time.Now()
			fmt.Printf("  %6.1fs: %d running\n", time.Since(start).Seconds(), running)
		}
	}
	total := time.Since(start)
	sample()
	simHWM, _ := vmHWM(sim.Process.Pid)
	fmt.Printf("\nend to end (berth server + %d simulated nodes, %d services, %d instances)\n", nNodes, len(specs), nInst)
	fmt.Printf("  applies acknowledged:  %v\n", applied.Round(time.Millisecond))
	fmt.Printf("  all running:           %v   %.0f instances/s   (goal >= 5000/s)\n", total.Round(time.Millisecond),
		float64(nInst)/total.Seconds())
	fmt.Printf("  server peak RSS:       %d MiB (embedded etcd included)\n", peakRSS>>20)
	fmt.Printf("  simulator peak RSS:    %d MiB\n", simHWM>>20)
	return nil
}

func freeAddr() (string, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", err
	}
	defer l.Close()
	return l.Addr().String(), nil
}

func start(bin, logPath string, args ...string) (*exec.Cmd, error) {
	f, err := os.Create(logPath)
	if err != nil {
		return nil, err
	}
	cmd := exec.Command(bin, args...)
	cmd.Stdout, cmd.Stderr = f, f
	if dir := os.Getenv("BENCH_PROFILE_DIR"); dir != "" {
		cmd.Env = append(os.Environ(), "BERTH_CPUPROFILE="+filepath.Join(dir, args[0]+".cpu"),
			"BERTH_HEAPPROFILE="+filepath.Join(dir, args[0]+".heap"))
	}
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		f.Close()
		return nil, fmt.Errorf("start berth %s: %w", args[0], err)
	}
	go func() { _ = cmd.Wait(); f.Close() }()
	return cmd, nil
}

// stop ends a process started here: SIGTERM, then SIGKILL after a while.
func stop(cmd *exec.Cmd) {
	_ = cmd.Process.Signal(syscall.SIGTERM)
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		if err := cmd.Process.Signal(syscall.Signal(0)); err != nil {
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
	_ = cmd.Process.Kill()
}

// vmHWM is a process's peak resident set size, in bytes.
func vmHWM(pid int) (int64, error) {
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "VmHWM:"); ok {
			kb, err := strconv.ParseInt(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")), 10, 64)
			return kb << 10, err
		}
	}
	return 0, errors.New("no VmHWM")
}
