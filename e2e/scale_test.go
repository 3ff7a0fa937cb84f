package e2e

import (
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/berth-dev/berth/api"
	"github.com/berth-dev/berth/client"
	"github.com/berth-dev/berth/e2e/testhost"
)

// TestControllersFailOverBetweenServers: two servers share one etcd; one
// leads the controllers through an etcd election. kill -9 of the leader:
// the other takes over and keeps reconciling (a scale-up through it is
// carried out). The nodes are simulated (`berth agent --simulate`).
func TestControllersFailOverBetweenServers(t *testing.T) {
	testhost.SkipIfUnsupported(t)
	h := testhost.New(t)
	etcd := h.Start(t, etcdBin, "--data-dir", t.TempDir(),
		"--listen-client", "http://127.0.0.1:23790", "--listen-peer", "http://127.0.0.1:23800")
	if _, ok := etcd.WaitOutput("etcd member ready", 30*time.Second); !ok {
		t.Fatalf("etcd member did not start: %s", etcd.Stderr())
	}
	addrA, addrB := "127.0.0.1:7480", "127.0.0.1:7481"
	a := startBerth(t, h, "server", "--data-dir", t.TempDir(), "--api-addr", addrA,
		"--etcd-endpoints", "http://127.0.0.1:23790")
	if !waitStderr(a.proc, "leading the controllers", 15*time.Second) {
		t.Fatalf("the first server does not lead: %s", a.proc.Stderr())
	}
	b := startBerth(t, h, "server", "--data-dir", t.TempDir(), "--api-addr", addrB,
		"--etcd-endpoints", "http://127.0.0.1:23790")
	sim := h.Start(t, berthBin, "agent", "--simulate", "3", "--server", "http://"+addrB)
	if _, ok := sim.WaitOutput("3 simulated nodes ready", 30*time.Second); !ok {
		t.Fatalf("simulated nodes: %s", sim.Stderr())
	}
	c := b.client()
	ctx := ctxT(t)
	running := func(n int) func() (bool, string) {
		return func() (bool, string) {
			l, err := c.ListInstances(ctx, client.InstanceFilter{Service: "sim"})
			if err != nil {
				return false, err.Error()
			}
			ok, nodes := 0, map[string]bool{}
			for _, in := range l.Items {
				if in.Status.State == api.InstanceRunning && strings.HasPrefix(in.Node, "sim-") {
					ok++
					nodes[in.Node] = true
				}
			}
			return ok == n && len(l.Items) == n, fmt.Sprintf("%d of %d running on %d nodes", ok, len(l.Items), len(nodes))
		}
	}
	if _, err := c.ApplyServiceJSON(ctx, []byte(`{"name":"sim","image":"bench.local/app:1","replicas":4,"resources":{"cpu":"100m","memory":"64Mi"}}`)); err != nil {
		t.Fatal(err)
	}
	eventually(t, 15*time.Second, "4 instances running on simulated nodes", running(4))
	if strings.Contains(b.proc.Stderr(), "leading the controllers") {
		t.Fatal("both servers lead")
	}

	killed := time.Now()
	a.proc.Kill()
	if !waitStderr(b.proc, "leading the controllers", 20*time.Second) {
		t.Fatalf("the second server did not take over: %s", b.proc.Stderr())
	}
	t.Logf("second server leads %v after kill -9 of the first", time.Since(killed).Round(10*time.Millisecond))
	if _, err := c.ApplyServiceJSON(ctx, []byte(`{"name":"sim","image":"bench.local/app:1","replicas":6,"resources":{"cpu":"100m","memory":"64Mi"}}`)); err != nil {
		t.Fatal(err)
	}
	eventually(t, 15*time.Second, "6 instances running after the scale-up through the new leader", running(6))
}

// waitStderr polls a process's stderr (its log) until it contains substr.
func waitStderr(p *testhost.Process, substr string, timeout time.Duration) bool {
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		if strings.Contains(p.Stderr(), substr) {
			return true
		}
		time.Sleep(20 * time.Millisecond)
	}
	return false
}
