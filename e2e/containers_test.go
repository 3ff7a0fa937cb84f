package e2e

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/berth-dev/berth/api"
	"github.com/berth-dev/berth/client"
	"github.com/berth-dev/berth/e2e/testhost"
	"github.com/berth-dev/berth/internal/testimage"
)

// testImage is the image every container test runs.
const testImage = testimage.DefaultRef

// startDevRuntime starts berth dev (which, like every node a test starts,
// has its runtime stopped with all it ran on cleanup).
func startDevRuntime(t *testing.T, h *testhost.Host, dir string, args ...string) *berth {
	t.Helper()
	return startDev(t, h, dir, args...)
}

// registerRuntimeCleanup stops a node's runtime with everything it ran
// (containerd is detached by design, so the test must stop it) and checks
// that nothing is left.
func registerRuntimeCleanup(t *testing.T, h *testhost.Host, dir string) {
	t.Cleanup(func() {
		ctx := ctxT(t)
		out, err := h.Run(ctx, berthBin, "agent", "cleanup", "--data-dir", dir)
		if err != nil {
			t.Errorf("berth agent cleanup: %v\n%s", err, out)
		}
		mounts, _ := os.ReadFile("/proc/self/mountinfo")
		for _, line := range strings.Split(string(mounts), "\n") {
			if strings.Contains(line, dir) {
				t.Errorf("a mount is left under %s: %s", dir, line)
			}
		}
	})
}

// importTestImage writes the test image and imports it through the CLI.
func importTestImage(t *testing.T, b *berth) {
	t.Helper()
	importImage(t, b, testImage, testimage.Options{Files: map[string]string{"/www/index.html": "hello from berth\n"}})
}

// importImage builds an image as o says and imports it into b as ref.
func importImage(t *testing.T, b *berth, ref string, o testimage.Options) {
	t.Helper()
	img, err := testimage.Build(o)
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "image.tar")
	if err := testimage.WriteOCIArchive(img, ref, path); err != nil {
		t.Fatal(err)
	}
	b.mustCLI("image", "import", path)
}

func (b *berth) instances(service string) []api.Instance {
	b.t.Helper()
	l, err := b.client().ListInstances(ctxT(b.t), client.InstanceFilter{Service: service})
	if err != nil {
		b.t.Fatal(err)
	}
	return l.Items
}

// waitInstances waits until the service has n instances that satisfy cond.
func (b *berth) waitInstances(service string, n int, timeout time.Duration, what string, cond func(api.Instance) bool) []api.Instance {
	b.t.Helper()
	var got []api.Instance
	eventually(b.t, timeout, what, func() (bool, string) {
		got = got[:0]
		all := b.instances(service)
		for _, in := range all {
			if cond(in) {
				got = append(got, in)
			}
		}
		js, _ := json.Marshal(all)
		return len(got) == n, string(js)
	})
	return got
}

func running(in api.Instance) bool {
	return in.DesiredState == api.DesiredRunning && in.Status.State == api.InstanceRunning
}

// TestContainerLifecycle: import an image, run a service of real
// containers, and use ps, logs, exec, stop, rm and image rm on them.
func TestContainerLifecycle(t *testing.T) {
	testhost.SkipIfUnsupported(t)
	h := testhost.New(t)
	dir := t.TempDir()
	b := startDevRuntime(t, h, dir)
	importTestImage(t, b)
	if out := b.mustCLI("image", "ls"); !strings.Contains(out, testImage) {
		t.Fatalf("image ls:\n%s", out)
	}

	out := b.mustCLI("run", "web", "--image", testImage, "--replicas", "2", "--memory", "64Mi",
		"--", "sh", "-c", "echo hello out; echo hello err >&2; exec httpd -f -p 8080 -h /www")
	if !strings.Contains(out, "service web created") || strings.Count(out, "running") != 2 {
		t.Fatalf("run:\n%s", out)
	}
	var list []api.Instance
	if err := json.Unmarshal([]byte(b.mustCLI("ps", "-o", "json")), &list); err != nil || len(list) != 2 {
		t.Fatalf("ps -o json: %v %+v", err, list)
	}
	for _, in := range list {
		if in.Status.State != api.InstanceRunning || in.Node != "node1" || in.Status.Restarts != 0 || in.Status.StartedAt.IsZero() {
			t.Fatalf("instance %+v", in)
		}
	}
	if table := b.mustCLI("ps"); !strings.Contains(table, "RESTARTS") || !strings.Contains(table, list[0].ID) {
		t.Fatalf("ps:\n%s", table)
	}
	id := list[0].ID

	eventually(t, 5*time.Second, "logs", func() (bool, string) {
		out, errOut, _ := b.cli("logs", id)
		return strings.Contains(out, "hello out") && strings.Contains(errOut, "hello err"), out + "|" + errOut
	})
	if out, _, _ := b.cli("logs", "--tail", "1", id); strings.Count(out, "\n") > 1 {
		t.Fatalf("logs --tail 1: %q", out)
	}

	// logs -f follows new output as it comes.
	b.mustCLI("run", "ticker", "--image", testImage, "--", "sh", "-c", "i=0; while true; do echo tick $i; i=$((i+1)); sleep 0.2; done")
	tid := b.instances("ticker")[0].ID
	follow := h.Start(t, berthBin, "--addr", b.addr, "logs", "-f", "--tail", "0", tid)
	if out, ok := follow.WaitOutput("tick", 10*time.Second); !ok {
		t.Fatalf("logs -f printed nothing new: %q %s", out, follow.Stderr())
	}
	time.Sleep(time.Second)
	if n := strings.Count(follow.Stdout(), "tick"); n < 3 {
		t.Fatalf("logs -f: %d lines in a second of a 5/s ticker", n)
	}
	follow.Kill()
	b.mustCLI("service", "rm", "ticker")

	if out := b.mustCLI("exec", id, "--", "hostname"); strings.TrimSpace(out) != id {
		t.Fatalf("exec hostname: %q", out)
	}
	if out := b.mustCLI("exec", id, "--", "wget", "-q", "-O", "-", "http://127.0.0.1:8080/index.html"); !strings.Contains(out, "hello from berth") {
		t.Fatalf("exec wget: %q", out)
	}
	if _, _, err := b.cli("exec", id, "--", "sh", "-c", "exit 3"); exitCodeOf(err) != 3 {
		t.Fatalf("exec exit code: %v", err)
	}

	// The image is in use: it cannot be removed.
	if _, errOut, err := b.cli("image", "rm", testImage); err == nil || !strings.Contains(errOut, "in use") {
		t.Fatalf("image rm of an image in use: %v %q", err, errOut)
	}

	// stop: SIGTERM; the service gets a replacement to keep 2 running.
	if out := b.mustCLI("stop", "--grace", "5s", id); !strings.Contains(out, "stopped") {
		t.Fatalf("stop: %q", out)
	}
	in, err := b.client().GetInstance(ctxT(t), id)
	if err != nil || in.Status.State != api.InstanceStopped || in.Status.ExitCode == nil {
		t.Fatalf("stopped instance: %v %+v", err, in.Status)
	}
	b.waitInstances("web", 2, 20*time.Second, "a replacement", running)
	if _, errOut, err := b.cli("rm", list[1].ID); err == nil || !strings.Contains(errOut, "running") {
		t.Fatalf("rm of a running instance without -f: %v %q", err, errOut)
	}
	b.mustCLI("rm", id)
	if _, err := b.client().GetInstance(ctxT(t), id); !client.IsNotFound(err) {
		t.Fatalf("removed instance still there: %v", err)
	}

	// Removing the service removes its containers.
	b.mustCLI("service", "rm", "web")
	eventually(t, 20*time.Second, "web's instances gone", func() (bool, string) {
		n := len(b.instances("web"))
		return n == 0, fmt.Sprint(n)
	})
	eventually(t, 20*time.Second, "web's containers gone", func() (bool, string) {
		out, _ := h.Run(ctxT(t), "sh", "-c", "ls "+filepath.Join(dir, "instances")+" 2>/dev/null | wc -l")
		return strings.TrimSpace(out) == "0", out
	})
	b.mustCLI("image", "rm", testImage)
}

func exitCodeOf(err error) int {
	type coder interface{ ExitCode() int }
	if c, ok := err.(coder); ok {
		return c.ExitCode()
	}
	if err == nil {
		return 0
	}
	return -1
}
