package e2e

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/berth-dev/berth/api"
	"github.com/berth-dev/berth/e2e/testhost"
)

// TestSchedulingScaleAndNodeLoss, on three isolated nodes: replicas are
// spread over nodes, scale 1→5→2, an instance that fits nowhere stays
// pending with the scheduler's explanation, and a killed node's instances
// are replaced on the others; when it comes back its stale copy goes.
func TestSchedulingScaleAndNodeLoss(t *testing.T) {
	testhost.SkipIfUnsupported(t)
	hosts := testhost.NewCluster(t, 3)
	srvAddr := hosts[0].Addr + ":7480"
	b := startBerth(t, hosts[0], "dev", "--api-addr", srvAddr, "--node-name", "node0", "--node-address", hosts[0].Addr,
		"--node-down-grace", "2s", "--label", "rack=a")
	agentArgs := func(i int, dir string) []string {
		return []string{"--server", "http://" + srvAddr, "--node-name", fmt.Sprintf("node%d", i),
			"--node-address", hosts[i].Addr, "--node-ttl", "2s", "--label", fmt.Sprintf("rack=%c", 'a'+i), "--data-dir", dir}
	}
	dir2 := t.TempDir()
	startBerth(t, hosts[1], "agent", agentArgs(1, t.TempDir())...)
	agent2 := startBerth(t, hosts[2], "agent", agentArgs(2, dir2)...)
	importTestImage(t, b)

	// Scale 1 → 5 → 2; binpack spreads replicas of one service over nodes.
	b.mustCLI("run", "web", "--image", testImage, "--", "sleep", "100000")
	b.mustCLI("scale", "web", "5")
	five := b.waitInstances("web", 5, 60*time.Second, "5 running", running)
	per := map[string]int{}
	for _, in := range five {
		per[in.Node]++
	}
	if len(per) != 3 {
		t.Fatalf("5 replicas not spread over the 3 nodes: %v", per)
	}
	b.mustCLI("scale", "web", "2")
	b.waitInstances("web", 2, 30*time.Second, "2 left", func(api.Instance) bool { return true })
	if svc, _ := b.client().GetService(ctxT(t), "web"); svc.Generation != 3 {
		t.Fatalf("generation %d", svc.Generation)
	}
	for _, in := range b.instances("web") {
		if in.Generation != 3 || in.Status.State != api.InstanceRunning || in.Status.Restarts != 0 {
			t.Fatalf("scaling must not restart instances: %+v", in)
		}
	}

	// Fits nowhere: pending, with the scheduler's explanation.
	spec := filepath.Join(t.TempDir(), "big.json")
	os.WriteFile(spec, []byte(fmt.Sprintf(`{"name":"big","image":%q,"command":["true"],"resources":{"memory":"900Gi"}}`, testImage)), 0o644)
	b.mustCLI("apply", "-f", spec)
	os.WriteFile(spec, []byte(fmt.Sprintf(`{"name":"picky","image":%q,"command":["true"],"placement":{"constraints":["rack == z"]}}`, testImage)), 0o644)
	b.mustCLI("apply", "-f", spec)
	for svc, want := range map[string]string{"big": "0/3 nodes: 3 insufficient memory", "picky": "0/3 nodes: 3 constraint rack == z unmet"} {
		in := b.waitInstances(svc, 1, 10*time.Second, svc+" pending", func(in api.Instance) bool {
			return in.Status.Reason == api.ReasonUnschedulable
		})[0]
		if in.Node != "" || in.Status.Message != want {
			t.Fatalf("%s: %+v, want message %q", svc, in.Status, want)
		}
		if out := b.mustCLI("inspect", in.ID); !strings.Contains(out, want) {
			t.Fatalf("inspect %s does not explain:\n%s", svc, out)
		}
	}
	b.mustCLI("service", "rm", "big")
	b.mustCLI("service", "rm", "picky")

	// Kill node2's agent: after the lease lapses and the grace passes, its
	// instances are replaced on node0 and node1.
	b.mustCLI("scale", "web", "3")
	three := b.waitInstances("web", 3, 60*time.Second, "3 running", running)
	var lost api.Instance
	for _, in := range three {
		if in.Node == "node2" {
			lost = in
		}
	}
	if lost.ID == "" {
		t.Fatalf("no replica on node2: %+v", three)
	}
	agent2.proc.Kill()
	killed := time.Now()
	b.waitInstances("web", 3, 30*time.Second, "3 running off node2", func(in api.Instance) bool {
		return running(in) && in.Node != "node2"
	})
	t.Logf("node2's instance replaced %v after its agent was killed (ttl 2s, grace 2s)", time.Since(killed).Round(10*time.Millisecond))

	// node2 comes back: its stale copy is stopped and removed.
	cgroup := filepath.Join("/sys/fs/cgroup/pids/berth", lost.ID)
	if _, err := os.Stat(cgroup); err != nil {
		t.Fatalf("the killed agent's container should still run until node2 is back: %v", err)
	}
	startBerth(t, hosts[2], "agent", agentArgs(2, dir2)...)
	eventually(t, 20*time.Second, "the stale copy on node2 removed", func() (bool, string) {
		_, err := os.Stat(cgroup)
		return os.IsNotExist(err), fmt.Sprint(err)
	})
	if n := len(b.instances("web")); n != 3 {
		t.Fatalf("%d instances after node2 came back", n)
	}
}
