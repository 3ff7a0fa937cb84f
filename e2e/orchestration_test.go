package e2e

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/berth-dev/berth/api"
	"github.com/berth-dev/berth/client"
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

// TestRollingUpdateAndRollback: an update replaces instances one at a time
// without ever dropping below the replica count; an update whose new
// instances fail rolls back by itself to the last stable spec.
func TestRollingUpdateAndRollback(t *testing.T) {
	testhost.SkipIfUnsupported(t)
	h := testhost.New(t)
	b := startDevRuntime(t, h, t.TempDir())
	importTestImage(t, b)
	apply := func(version, cmd string) {
		t.Helper()
		f := filepath.Join(t.TempDir(), "web.json")
		os.WriteFile(f, []byte(fmt.Sprintf(`{"name":"web","image":%q,"replicas":3,"env":{"VERSION":%q},
			"command":["sh","-c",%q],
			"update":{"maxParallel":1,"maxSurge":1,"healthDeadline":"10s","autoRollback":true}}`, testImage, version, cmd)), 0o644)
		b.mustCLI("apply", "-f", f)
	}
	good := "trap 'exit 0' TERM; sleep 100000 & wait"
	apply("v1", good)
	b.mustCLI("rollout", "status", "web", "--timeout", "60s")

	// Watch the number of running instances through the updates.
	minRunning := 3
	stop := make(chan struct{})
	done := make(chan struct{})
	defer func() {
		select {
		case <-stop:
		default:
			close(stop)
		}
		<-done
	}()
	go func() {
		defer close(done)
		for {
			select {
			case <-stop:
				return
			case <-time.After(50 * time.Millisecond):
			}
			l, err := b.client().ListInstances(ctxT(t), client.InstanceFilter{Service: "web"})
			if err != nil {
				continue
			}
			n := 0
			for _, in := range l.Items {
				if in.Status.State == api.InstanceRunning {
					n++
				}
			}
			minRunning = min(minRunning, n)
		}
	}()

	apply("v2", good)
	out := b.mustCLI("rollout", "status", "web", "--timeout", "60s")
	if !strings.Contains(out, "updated to generation 2") || !strings.Contains(out, "complete") {
		t.Fatalf("rollout status should show progress:\n%s", out)
	}
	for _, in := range b.instances("web") {
		if in.Generation != 2 {
			t.Fatalf("after the rollout: %+v", in)
		}
		if env := b.mustCLI("exec", in.ID, "--", "sh", "-c", "echo $VERSION"); strings.TrimSpace(env) != "v2" {
			t.Fatalf("%s runs %q", in.ID, env)
		}
	}

	// v3 crashes at once: the rollout fails and rolls back to v2's spec.
	apply("v3", "echo broken; exit 1")
	if _, _, err := b.cli("rollout", "status", "web", "--timeout", "60s"); err == nil {
		t.Fatal("rollout status should fail for a broken update")
	}
	eventually(t, 60*time.Second, "rolled back and complete", func() (bool, string) {
		svc, err := b.client().GetService(ctxT(t), "web")
		ins := b.instances("web")
		ok := err == nil && svc.Generation == 4 && svc.Spec.Env["VERSION"] == "v2" && len(ins) == 3
		for _, in := range ins {
			ok = ok && in.Status.State == api.InstanceRunning
		}
		return ok, fmt.Sprintf("%+v %v", svc.Status, err)
	})
	close(stop)
	<-done
	if minRunning < 3 {
		t.Fatalf("running instances dropped to %d during the updates", minRunning)
	}
	svc, _ := b.client().GetService(ctxT(t), "web")
	if !strings.Contains(svc.Status.Message, "rolled back to the spec of generation 2") {
		t.Fatalf("status: %+v", svc.Status)
	}
	if hist := b.mustCLI("rollout", "history", "web"); strings.Count(hist, "\n") != 5 {
		t.Fatalf("rollout history:\n%s", hist)
	}
}
