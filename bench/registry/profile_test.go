package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	goruntime "runtime"
	"runtime/pprof"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/berth-dev/berth/internal/daemon"
	"github.com/berth-dev/berth/internal/store"
)

// TestProfile runs berth's server (API, watch cache, embedded etcd, DNS; no
// agent) in this process on free loopback ports and profiles it under the
// benchmark's registry loads: a CPU profile per load and a heap profile
// with the registrations in place, written to $BERTH_REGBENCH_PROFILE.
// The profiles include the load generators, which run in the same process.
//
//	BERTH_REGBENCH_PROFILE=/tmp/prof go test ./bench/registry -run TestProfile -v -timeout 10m
//	go tool pprof -top /tmp/prof/dns.cpu
func TestProfile(t *testing.T) {
	dir := os.Getenv("BERTH_REGBENCH_PROFILE")
	if dir == "" {
		t.Skip("set BERTH_REGBENCH_PROFILE=DIR to profile berth's server under the registry loads")
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	const instances, services, clients = 10000, 100, 32

	ctx, cancel := context.WithCancel(context.Background())
	pr, pw := io.Pipe()
	done := make(chan error, 1)
	go func() {
		err := daemon.RunServer(ctx, daemon.ServerConfig{DataDir: t.TempDir(), APIAddr: "127.0.0.1:0", DNSAddr: "127.0.0.1:0"},
			pw, slog.New(slog.NewTextHandler(io.Discard, nil)))
		pw.CloseWithError(err)
		done <- err
	}()
	defer func() {
		cancel()
		if err := <-done; err != nil {
			t.Error(err)
		}
	}()
	sc := bufio.NewScanner(pr)
	for sc.Scan() {
		line := sc.Text()
		if a, ok := strings.CutPrefix(line, "berth server: API listening on http://"); ok {
			apiAddr = a
		}
		if a, ok := strings.CutPrefix(line, "berth server: DNS for svc.berth on "); ok {
			dnsAddr = a
		}
		if strings.Contains(line, "ready in") {
			break
		}
	}
	go func() { _, _ = io.Copy(io.Discard, pr) }()
	t.Logf("server on %s, DNS on %s", apiAddr, dnsAddr)

	cpu := func(name string, f func() string) {
		t.Helper()
		out, err := os.Create(filepath.Join(dir, name+".cpu"))
		if err != nil {
			t.Fatal(err)
		}
		defer out.Close()
		if err := pprof.StartCPUProfile(out); err != nil {
			t.Fatal(err)
		}
		msg := f()
		pprof.StopCPUProfile()
		t.Logf("%s: %s", name, msg)
	}

	regs := registrations("p", instances, services)
	cpu("register", func() string {
		r, err := each(ctx, regs, clients, register)
		if err != nil || r.errs > 0 {
			t.Fatalf("register: %v %v", err, r.first)
		}
		return rate(r.n, r.took)
	})
	time.Sleep(time.Second)
	heapProfile(t, filepath.Join(dir, "registered.heap"), fmt.Sprintf("with %d registrations", instances))

	cpu("discovery", func() string {
		r := discoveryLoad(ctx, services, clients, 5*time.Second)
		return fmt.Sprintf("%s, %s", rate(len(r.lat), r.elapsed), p50p99(r.lat))
	})
	cpu("dns", func() string {
		r, err := dnsLoad(ctx, services, clients, 5*time.Second, true)
		if err != nil {
			t.Fatal(err)
		}
		return fmt.Sprintf("%s, %s", rate(len(r.lat), r.elapsed), p50p99(r.lat))
	})
	heapProfile(t, filepath.Join(dir, "loaded.heap"), "after the discovery and DNS loads")
	cpu("watch", func() string {
		r, err := watchPropagation(ctx, serviceName(0), 1000, 30, 30*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		return fmt.Sprintf("%d changes to 1000 watchers: %s", r.changes, p50p99(r.delays))
	})
	cpu("deregister", func() string {
		r, err := each(ctx, regs, clients, deregister)
		if err != nil || r.errs > 0 {
			t.Fatalf("deregister: %v %v", err, r.first)
		}
		return rate(r.n, r.took)
	})
}

// heapProfile logs the process's memory (RSS before a GC, the heap after
// one) and writes a heap profile to path.
func heapProfile(t *testing.T, path, when string) {
	t.Helper()
	m, _ := memoryOf(os.Getpid())
	goruntime.GC()
	var ms goruntime.MemStats
	goruntime.ReadMemStats(&ms)
	t.Logf("%s: VmRSS %s; after a GC: heap in use %s (%d objects), from the OS %s",
		when, mib(m.rss), mib(int64(ms.HeapInuse)), ms.HeapObjects, mib(int64(ms.Sys)))
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := pprof.Lookup("heap").WriteTo(f, 0); err != nil {
		t.Fatal(err)
	}
}

// TestStoreOps times, against the embedded etcd alone (store.Open, as the
// server uses it), each store call a registration makes (PUT
// /v1/registry/...: GetKV, Grant, PutLease), a plain Put for comparison,
// and the whole sequence, with 1 and 32 goroutines: where the time of a
// registration goes below the HTTP layer.
//
//	BERTH_REGBENCH_PROFILE=/tmp/prof go test ./bench/registry -run TestStoreOps -v
func TestStoreOps(t *testing.T) {
	if os.Getenv("BERTH_REGBENCH_PROFILE") == "" {
		t.Skip("set BERTH_REGBENCH_PROFILE=DIR to time the store calls of a registration")
	}
	ctx := context.Background()
	st, err := store.Open(ctx, store.Config{DataDir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	const n = 4000
	val := map[string]any{"service": "svc-000", "id": "x", "address": "10.1.2.3", "port": 8080, "ttl": "10m0s"}
	var seq atomic.Int64
	shared, err := st.Grant(ctx, 10*time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	ops := []struct {
		name string
		op   func(i int64) error
	}{
		{"Put (no lease)", func(i int64) error {
			_, err := st.Put(ctx, fmt.Sprintf("/berth/bench/put/%d", i), val, -1)
			return err
		}},
		{"Grant", func(int64) error { _, err := st.Grant(ctx, 10*time.Minute); return err }},
		{"GetKV (absent key)", func(i int64) error {
			_, err := st.GetKV(ctx, fmt.Sprintf("/berth/bench/none/%d", i))
			if errors.Is(err, store.ErrNotFound) {
				return nil
			}
			return err
		}},
		{"PutLease (one shared lease)", func(i int64) error {
			_, err := st.PutLease(ctx, fmt.Sprintf("/berth/bench/shared/%d", i), val, shared)
			return err
		}},
		{"Grant+PutLease", func(i int64) error {
			l, err := st.Grant(ctx, 10*time.Minute)
			if err != nil {
				return err
			}
			_, err = st.PutLease(ctx, fmt.Sprintf("/berth/bench/gp/%d", i), val, l)
			return err
		}},
		{"GetKV+Grant+PutLease", func(i int64) error {
			key := fmt.Sprintf("/berth/bench/reg/%d", i)
			if _, err := st.GetKV(ctx, key); err != nil && !errors.Is(err, store.ErrNotFound) {
				return err
			}
			l, err := st.Grant(ctx, 10*time.Minute)
			if err != nil {
				return err
			}
			_, err = st.PutLease(ctx, key, val, l)
			return err
		}},
	}
	for _, workers := range []int{1, 32} {
		for _, o := range ops {
			var (
				mu  sync.Mutex
				lat []time.Duration
				wg  sync.WaitGroup
				bad atomic.Int64
			)
			left := atomic.Int64{}
			left.Store(n)
			start := time.Now()
			for range workers {
				wg.Go(func() {
					var mine []time.Duration
					for left.Add(-1) >= 0 {
						t0 := time.Now()
						if err := o.op(seq.Add(1)); err != nil {
							bad.Add(1)
							continue
						}
						mine = append(mine, time.Since(t0))
					}
					mu.Lock()
					lat = append(lat, mine...)
					mu.Unlock()
				})
			}
			wg.Wait()
			took := time.Since(start)
			t.Logf("%2d goroutines  %-22s %8s  %s  (%d errors)", workers, o.name, rate(len(lat), took), p50p99(lat), bad.Load())
		}
	}
}
