package agent

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/berth-dev/berth/api"
	"github.com/berth-dev/berth/client"
	"github.com/berth-dev/berth/internal/server"
	"github.com/berth-dev/berth/internal/store"
)

type logBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *logBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *logBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// testLog is quiet: what is logged is shown only if the test fails.
func testLog(t *testing.T) *slog.Logger {
	logs := &logBuffer{}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("log:\n%s", logs)
		}
	})
	return slog.New(slog.NewTextHandler(logs, nil))
}

// startServer runs a real server over an embedded store behind an HTTP
// test server; wrap, when set, wraps its handler. Cleanup stops Run and
// waits for it, closes the HTTP server, then the store.
func startServer(t *testing.T, log *slog.Logger, wrap func(http.Handler) http.Handler) (*client.Client, *httptest.Server) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	octx, ocancel := context.WithTimeout(ctx, 30*time.Second)
	defer ocancel()
	st, err := store.Open(octx, store.Config{DataDir: t.TempDir()})
	if err != nil {
		cancel()
		t.Fatal(err)
	}
	srv := server.New(st, log, server.Options{ID: "test"})
	h := srv.Handler()
	if wrap != nil {
		h = wrap(h)
	}
	ts := httptest.NewUnstartedServer(h)
	ts.Config.BaseContext = func(net.Listener) context.Context { return ctx }
	ts.Start()
	done := make(chan struct{})
	go func() {
		defer close(done)
		_ = srv.Run(ctx)
	}()
	t.Cleanup(func() {
		cancel()
		select {
		case <-done:
		case <-time.After(15 * time.Second):
			t.Error("server Run did not return")
		}
		ts.Close()
		_ = st.Close()
	})
	select {
	case <-srv.Ready():
	case <-time.After(10 * time.Second):
		t.Fatal("server not ready")
	}
	c, err := client.New(ts.URL)
	if err != nil {
		t.Fatal(err)
	}
	return c, ts
}

// runAgent starts a.Run; the returned stop cancels it and returns Run's error.
func runAgent(t *testing.T, a *Agent) (stop func() error) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- a.Run(ctx) }()
	var once sync.Once
	var err error
	stop = func() error {
		once.Do(func() {
			cancel()
			select {
			case err = <-done:
			case <-time.After(10 * time.Second):
				err = errors.New("agent Run did not return after cancel")
			}
		})
		return err
	}
	t.Cleanup(func() { _ = stop() })
	return stop
}

func waitReady(t *testing.T, a *Agent) {
	t.Helper()
	select {
	case <-a.Ready():
	case <-time.After(10 * time.Second):
		t.Fatal("agent not ready")
	}
}

func eventually(t *testing.T, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within %v", what, timeout)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func TestCapacity(t *testing.T) {
	if _, err := os.Stat("/proc/meminfo"); err != nil {
		t.Skip("no /proc/meminfo here")
	}
	c, err := Capacity()
	if err != nil {
		t.Fatal(err)
	}
	if c.CPU <= 0 || c.Memory <= 0 {
		t.Fatalf("capacity %+v: want > 0 CPU and memory", c)
	}
	if want := api.CPU(runtime.NumCPU() * 1000); c.CPU != want {
		t.Errorf("CPU %v, want %v", c.CPU, want)
	}
	if c.Memory < 16<<20 {
		t.Errorf("memory %v is implausibly small", c.Memory)
	}
}

func TestMemTotal(t *testing.T) {
	const sample = `MemTotal:        8052136 kB
MemFree:          613852 kB
MemAvailable:    4512340 kB
Buffers:          231080 kB
`
	tests := []struct {
		name    string
		content string // "" with noFile: no file at all
		noFile  bool
		want    api.Bytes
		wantErr string
	}{
		{name: "proc sample", content: sample, want: 8052136 * 1024},
		{name: "not the first line", content: "MemFree: 1 kB\nMemTotal: 2048 kB\n", want: 2 << 20},
		{name: "tabs and no unit", content: "MemTotal:\t\t1024\n", want: 1 << 20},
		{name: "similar names only", content: "MemTotalX: 5 kB\nSwapTotal: 9 kB\n", wantErr: "no MemTotal"},
		{name: "empty", content: "", wantErr: "no MemTotal"},
		{name: "not a number", content: "MemTotal: lots kB\n", wantErr: "parse MemTotal"},
		{name: "missing file", noFile: true, wantErr: "read memory size"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "meminfo")
			if !tt.noFile {
				if err := os.WriteFile(path, []byte(tt.content), 0o600); err != nil {
					t.Fatal(err)
				}
			}
			got, err := memTotal(path)
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("memTotal = %v, %v; want an error containing %q", got, err, tt.wantErr)
				}
				return
			}
			if err != nil || got != tt.want {
				t.Fatalf("memTotal = %v, %v; want %v", got, err, tt.want)
			}
		})
	}
}

func TestNew(t *testing.T) {
	log := testLog(t)
	c, _ := client.New("127.0.0.1:1")
	a, err := New(c, Config{Name: "n1", Address: "10.0.0.5"}, log)
	if err != nil {
		t.Fatal(err)
	}
	if a.Name() != "n1" || a.cfg.TTL != 10*time.Second || a.cfg.Address != "10.0.0.5" {
		t.Fatalf("defaults: %+v", a.cfg)
	}
	if _, err := New(c, Config{Name: "Bad_Name"}, log); err == nil {
		t.Fatal("an invalid node name was accepted")
	}
	if h, err := os.Hostname(); err == nil && api.ValidNodeName(strings.ToLower(h)) == "" {
		a, err := New(c, Config{}, log)
		if err != nil || a.Name() != strings.ToLower(h) || a.cfg.Address == "" {
			t.Fatalf("name from the host: %+v %v", a, err)
		}
	}
	if ip := DetectAddress(); net.ParseIP(ip) == nil {
		t.Fatalf("DetectAddress = %q, not an IP", ip)
	}
}

func TestRegistrationSubtractsReserved(t *testing.T) {
	c, _ := client.New("127.0.0.1:1")
	a, err := New(c, Config{Name: "n1", Address: "10.0.0.5", TTL: 5 * time.Second, Version: "v9",
		Reserved: api.Resources{CPU: 250, Memory: 64 << 20}}, testLog(t))
	if err != nil {
		t.Fatal(err)
	}
	reg, err := a.Registration()
	if err != nil {
		t.Fatal(err)
	}
	if reg.Allocatable.CPU != reg.Capacity.CPU-250 || reg.Allocatable.Memory != reg.Capacity.Memory-64<<20 ||
		reg.TTL.D() != 5*time.Second || reg.AgentVersion != "v9" || reg.Address != "10.0.0.5" {
		t.Fatalf("registration: %+v", reg)
	}
	if err := reg.Validate("n1"); err != nil {
		t.Fatalf("the agent's registration does not validate: %v", err)
	}
	// Reserving more than the machine has leaves zero, never negative.
	a.cfg.Reserved = api.Resources{CPU: reg.Capacity.CPU * 2, Memory: reg.Capacity.Memory * 2}
	reg, _ = a.Registration()
	if reg.Allocatable.CPU != 0 || reg.Allocatable.Memory != 0 {
		t.Fatalf("over-reserved allocatable: %+v", reg.Allocatable)
	}
}

// TestAgentLifecycle: the agent registers (Ready closes), heartbeats, and
// on cancel releases its lease so that the node is down at once.
func TestAgentLifecycle(t *testing.T) {
	log := testLog(t)
	c, _ := startServer(t, log, nil)
	ctx := context.Background()
	a, err := New(c, Config{Name: "node-1", Address: "127.0.0.1", TTL: 2 * time.Second,
		Labels: map[string]string{"role": "test"}, Reserved: api.Resources{CPU: 100}}, log)
	if err != nil {
		t.Fatal(err)
	}
	stop := runAgent(t, a)
	waitReady(t, a)

	n, err := c.GetNode(ctx, "node-1")
	if err != nil {
		t.Fatal(err)
	}
	if n.Status.State != api.NodeReady || n.Address != "127.0.0.1" || n.TTL.D() != 2*time.Second ||
		n.Labels["role"] != "test" || n.Allocatable.CPU != n.Capacity.CPU-100 || n.Capacity.Memory <= 0 {
		t.Fatalf("registered node: %+v", n)
	}
	last := n.Status.LastHeartbeat

	// Heartbeats come every TTL/3: lastHeartbeat advances, again and again,
	// and the node stays ready.
	for i := range 2 {
		eventually(t, 3*time.Second, fmt.Sprintf("heartbeat %d", i+1), func() bool {
			n, err := c.GetNode(ctx, "node-1")
			if err != nil || !n.Status.LastHeartbeat.After(last) {
				return false
			}
			last = n.Status.LastHeartbeat
			return true
		})
	}
	if n, err := c.GetNode(ctx, "node-1"); err != nil || n.Status.State != api.NodeReady {
		t.Fatalf("heartbeating node: %+v %v", n.Status, err)
	}

	start := time.Now()
	if err := stop(); err != nil {
		t.Fatalf("Run: %v", err)
	}
	n, err = c.GetNode(ctx, "node-1")
	if err != nil || n.Status.State != api.NodeDown {
		t.Fatalf("after stop: %+v %v", n.Status, err)
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Errorf("stopping took %v", d)
	}
}

// TestAgentReregisters: when the server forgets the node (its record is
// deleted), the next heartbeat says so and the agent registers again.
func TestAgentReregisters(t *testing.T) {
	log := testLog(t)
	c, _ := startServer(t, log, nil)
	ctx := context.Background()
	a, err := New(c, Config{Name: "node-1", Address: "127.0.0.1", TTL: 2 * time.Second}, log)
	if err != nil {
		t.Fatal(err)
	}
	runAgent(t, a)
	waitReady(t, a)
	if err := c.DeleteNode(ctx, "node-1", true); err != nil {
		t.Fatal(err)
	}
	eventually(t, 3*time.Second, "the agent registers its node again", func() bool {
		n, err := c.GetNode(ctx, "node-1")
		return err == nil && n.Status.State == api.NodeReady
	})
}

// TestAgentRetriesUntilServerAnswers: registration failures that are not
// the server refusing the node are retried.
func TestAgentRetriesUntilServerAnswers(t *testing.T) {
	log := testLog(t)
	var refused atomic.Int32
	c, _ := startServer(t, log, func(h http.Handler) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if r.Method == http.MethodPut && refused.Add(1) <= 2 {
				http.Error(w, `{"status":503,"code":"internal","message":"starting"}`, http.StatusServiceUnavailable)
				return
			}
			h.ServeHTTP(w, r)
		})
	})
	a, err := New(c, Config{Name: "node-1", Address: "127.0.0.1", TTL: 3 * time.Second}, log)
	if err != nil {
		t.Fatal(err)
	}
	runAgent(t, a)
	waitReady(t, a)
	if n := refused.Load(); n < 3 {
		t.Fatalf("%d registration attempts, want 3", n)
	}
	if n, err := c.GetNode(context.Background(), "node-1"); err != nil || n.Status.State != api.NodeReady {
		t.Fatalf("node: %+v %v", n, err)
	}
}

// TestAgentRefused: a registration the server refuses (400) is not retried:
// Run returns the error and Ready never closes.
func TestAgentRefused(t *testing.T) {
	log := testLog(t)
	c, _ := startServer(t, log, nil)
	a, err := New(c, Config{Name: "node-1", Address: "not-an-address", TTL: 3 * time.Second}, log)
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- a.Run(context.Background()) }()
	select {
	case err := <-done:
		var ae *api.Error
		if !errors.As(err, &ae) || ae.Status != http.StatusBadRequest || !strings.Contains(err.Error(), "address") {
			t.Fatalf("Run: %v, want the server's 400 about the address", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Run kept retrying a refused registration")
	}
	select {
	case <-a.Ready():
		t.Fatal("Ready closed for a refused node")
	default:
	}
	if _, err := c.GetNode(context.Background(), "node-1"); !client.IsNotFound(err) {
		t.Fatalf("refused node was stored: %v", err)
	}
}

// TestAgentStopsWhileRegistering: cancelling before the first registration
// succeeds returns at once, without a release.
func TestAgentStopsWhileRegistering(t *testing.T) {
	ts := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		http.Error(w, "down", http.StatusBadGateway)
	}))
	defer ts.Close()
	c, _ := client.New(ts.URL)
	a, err := New(c, Config{Name: "node-1", Address: "127.0.0.1", TTL: 3 * time.Second}, testLog(t))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	start := time.Now()
	if err := a.Run(ctx); err != nil {
		t.Fatalf("Run: %v", err)
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Fatalf("Run returned %v after cancel", d)
	}
	select {
	case <-a.Ready():
		t.Fatal("Ready closed without a registration")
	default:
	}
}
