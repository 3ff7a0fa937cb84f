// Package e2e holds berth's end-to-end tests: they build and start the real
// berth binary inside network namespaces that each test makes for itself
// (see e2e/testhost), with no route out of the machine.
package e2e

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/berth-dev/berth/client"
	"github.com/berth-dev/berth/e2e/testhost"
)

var (
	berthBin string // the berth binary under test
	etcdBin  string // a real etcd member for external-etcd tests
)

func TestMain(m *testing.M) {
	if mode := os.Getenv("BERTH_E2E_NET_HELPER"); mode != "" {
		ipamHelper(mode) // re-executed inside a test host by TestIPAMNoLeak
	}
	if os.Geteuid() != 0 {
		fmt.Println("e2e: skipped, needs root")
		os.Exit(m.Run())
	}
	testhost.Sweep()
	dir, err := os.MkdirTemp("", "berth-e2e-bin-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	berthBin = os.Getenv("BERTH_BIN")
	if berthBin == "" {
		berthBin = filepath.Join(dir, "berth")
		if out, err := exec.Command("go", "build", "-o", berthBin, "../cmd/berth").CombinedOutput(); err != nil {
			fmt.Fprintf(os.Stderr, "build berth: %v\n%s", err, out)
			os.Exit(1)
		}
	}
	etcdBin = filepath.Join(dir, "etcdmember")
	if out, err := exec.Command("go", "build", "-o", etcdBin, "./etcdmember").CombinedOutput(); err != nil {
		fmt.Fprintf(os.Stderr, "build etcdmember: %v\n%s", err, out)
		os.Exit(1)
	}
	sweepStaleNodes()
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// apiAddr is where a berth inside an isolated host listens: the host's own
// loopback, so a fixed port never collides between tests.
const apiAddr = "127.0.0.1:7480"

// berth is one berth process in a host.
type berth struct {
	t    *testing.T
	h    *testhost.Host
	proc *testhost.Process
	addr string
}

// startBerth starts `berth MODE args...` in h and waits for its ready line.
func startBerth(t *testing.T, h *testhost.Host, mode string, args ...string) *berth {
	t.Helper()
	if mode == "dev" || mode == "agent" {
		// Whatever runs a node gets its own data dir (never /var/lib/berth)
		// and, on cleanup, its runtime stopped with all it ran.
		dir := ""
		for i, a := range args {
			if a == "--data-dir" && i+1 < len(args) {
				dir = args[i+1]
			}
		}
		if dir == "" {
			dir = t.TempDir()
			args = append(args, "--data-dir", dir)
		}
		registerRuntimeCleanup(t, h, dir)
	}
	full := append([]string{mode}, args...)
	p := h.Start(t, berthBin, full...)
	want := "ready in"
	if mode == "agent" {
		want = "registered with"
	}
	if _, ok := p.WaitOutput(want, 30*time.Second); !ok {
		t.Fatalf("berth %s not ready:\nstdout: %s\nstderr: %s", mode, p.Stdout(), p.Stderr())
	}
	addr := apiAddr
	for i, a := range args {
		if a == "--api-addr" && i+1 < len(args) {
			addr = args[i+1]
		}
	}
	return &berth{t: t, h: h, proc: p, addr: addr}
}

// startDev starts `berth dev` with its data in dir.
func startDev(t *testing.T, h *testhost.Host, dir string, args ...string) *berth {
	t.Helper()
	return startBerth(t, h, "dev", append([]string{"--data-dir", dir, "--api-addr", apiAddr, "--node-name", "node1"}, args...)...)
}

// client returns a Go API client whose connections are made inside the host.
func (b *berth) client() *client.Client {
	c, err := client.New(b.addr, client.WithHTTPClient(b.h.HTTPClient()))
	if err != nil {
		b.t.Fatal(err)
	}
	return c
}

// cli runs the berth CLI inside the host against this berth.
func (b *berth) cli(args ...string) (stdout, stderr string, err error) {
	return runCLI(b.h, b.addr, args...)
}

// mustCLI runs the CLI and fails the test on a non-zero exit.
func (b *berth) mustCLI(args ...string) string {
	b.t.Helper()
	out, errOut, err := b.cli(args...)
	if err != nil {
		b.t.Fatalf("berth %s: %v\nstdout: %s\nstderr: %s", strings.Join(args, " "), err, out, errOut)
	}
	return out
}

func runCLI(h *testhost.Host, addr string, args ...string) (string, string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cmd := h.Command(ctx, berthBin, append([]string{"--addr", addr}, args...)...)
	var out, errOut strings.Builder
	cmd.Stdout, cmd.Stderr = &out, &errOut
	err := cmd.Run()
	return out.String(), errOut.String(), err
}

// stop sends SIGTERM and returns the exit code.
func (b *berth) stop() int {
	b.t.Helper()
	if err := b.proc.Signal(syscallTERM); err != nil {
		b.t.Fatalf("SIGTERM: %v", err)
	}
	code, err := b.proc.Wait(20 * time.Second)
	if err != nil {
		b.t.Fatalf("berth did not stop after SIGTERM: %v\nstderr: %s", err, b.proc.Stderr())
	}
	return code
}

// eventually polls cond until it holds or timeout passes.
func eventually(t *testing.T, timeout time.Duration, what string, cond func() (bool, string)) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	last := ""
	for time.Now().Before(deadline) {
		ok, state := cond()
		if ok {
			return
		}
		last = state
		time.Sleep(50 * time.Millisecond)
	}
	t.Fatalf("timed out after %v waiting for %s; last state: %s", timeout, what, last)
}

func ctxT(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	t.Cleanup(cancel)
	return ctx
}
