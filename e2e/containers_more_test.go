package e2e

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/berth-dev/berth/api"
	"github.com/berth-dev/berth/e2e/testhost"
	"github.com/berth-dev/berth/e2e/testregistry"
	"github.com/berth-dev/berth/internal/testimage"
)

// TestExitsAndRestartPolicies: exit codes and reasons reach the instance
// from the runtime's events; restart policies act on them with backoff.
func TestExitsAndRestartPolicies(t *testing.T) {
	testhost.SkipIfUnsupported(t)
	h := testhost.New(t)
	b := startDevRuntime(t, h, t.TempDir())
	importTestImage(t, b)
	c := b.client()

	// never: one exit, reported with its code, never restarted.
	b.cli("run", "once", "--image", testImage, "--restart", "never", "--", "sh", "-c", "exit 0")
	in := b.waitInstances("once", 1, 15*time.Second, "once exited", func(in api.Instance) bool {
		return in.Status.State == api.InstanceExited
	})[0]
	if in.Status.ExitCode == nil || *in.Status.ExitCode != 0 || in.Status.Restarts != 0 || in.Status.Reason != api.ReasonExited {
		t.Fatalf("once: %+v", in.Status)
	}

	// on-failure with a bound: restarted twice, then left failed with its code.
	b.cli("run", "crash", "--image", testImage, "--restart", "on-failure", "--max-restarts", "2", "--", "sh", "-c", "echo crashing; exit 7")
	in = b.waitInstances("crash", 1, 30*time.Second, "crash restarted twice then failed", func(in api.Instance) bool {
		return in.Status.State == api.InstanceFailed && in.Status.Restarts == 2
	})[0]
	if in.Status.ExitCode == nil || *in.Status.ExitCode != 7 || !strings.Contains(in.Status.Message, "code 7") {
		t.Fatalf("crash: %+v", in.Status)
	}
	time.Sleep(3 * time.Second) // no further restart comes
	if got, _ := c.GetInstance(ctxT(t), in.ID); got.Status.Restarts != 2 {
		t.Fatalf("restarted beyond max-restarts: %+v", got.Status)
	}
	if out, _, _ := b.cli("logs", in.ID); strings.Count(out, "crashing") != 3 {
		t.Fatalf("logs of three runs: %q", out)
	}

	// always, with exponential backoff: 1s, 2s, 4s... between restarts.
	b.cli("run", "flap", "--image", testImage, "--restart", "always", "-d", "--", "sh", "-c", "exit 1")
	start := time.Now()
	b.waitInstances("flap", 1, 20*time.Second, "flap restarted 3 times", func(in api.Instance) bool {
		return in.Status.Restarts >= 3
	})
	// Three restarts with 1s+2s+4s of backoff cannot happen in under 7s.
	if d := time.Since(start); d < 6*time.Second {
		t.Fatalf("3 restarts in %v: no backoff", d)
	}

	// A process killed by a signal is reported as killed.
	b.cli("run", "victim", "--image", testImage, "--restart", "never", "--", "sleep", "1000")
	in = b.waitInstances("victim", 1, 15*time.Second, "victim running", running)[0]
	// From the host (init of a PID namespace ignores SIGKILL from inside).
	killContainer(t, in.ID)
	in = b.waitInstances("victim", 1, 10*time.Second, "victim killed", func(in api.Instance) bool {
		return in.Status.State == api.InstanceFailed
	})[0]
	if in.Status.Reason != api.ReasonKilled || *in.Status.ExitCode != 137 {
		t.Fatalf("killed: %+v", in.Status)
	}
}

// TestMemoryLimitOOMAndVerticalScaling: cgroups enforce the memory limit
// (a process over it is OOM-killed and reported so), and a change of
// resources reaches a running container in place.
func TestMemoryLimitOOMAndVerticalScaling(t *testing.T) {
	testhost.SkipIfUnsupported(t)
	h := testhost.New(t)
	b := startDevRuntime(t, h, t.TempDir())
	importTestImage(t, b)

	b.cli("run", "hog", "--image", testImage, "--memory", "16Mi", "--restart", "never", "--",
		"sh", "-c", `a=$(head -c 100000000 /dev/zero | tr '\0' x); echo ${#a}`)
	in := b.waitInstances("hog", 1, 20*time.Second, "hog OOM-killed", func(in api.Instance) bool {
		return in.Status.State == api.InstanceFailed
	})[0]
	if in.Status.Reason != api.ReasonOOMKilled {
		t.Fatalf("hog over its memory limit: %+v", in.Status)
	}

	spec := func(mem, cpu string) string {
		return fmt.Sprintf(`{"name":"vert","image":%q,"command":["sleep","1000"],"resources":{"memory":%q,"limits":{"cpu":%q}}}`, testImage, mem, cpu)
	}
	apply := func(js string) {
		t.Helper()
		f := filepath.Join(t.TempDir(), "spec.json")
		os.WriteFile(f, []byte(js), 0o644)
		b.mustCLI("apply", "-f", f)
	}
	apply(spec("64Mi", "500m"))
	in = b.waitInstances("vert", 1, 15*time.Second, "vert running", running)[0]
	cg := func(ctrl, file string) string {
		bs, err := os.ReadFile(filepath.Join("/sys/fs/cgroup", ctrl, "berth", in.ID, file))
		if err != nil {
			t.Fatal(err)
		}
		return strings.TrimSpace(string(bs))
	}
	if got := cg("memory", "memory.limit_in_bytes"); got != strconv.Itoa(64<<20) {
		t.Fatalf("memory limit %s", got)
	}
	if got := cg("cpu", "cpu.cfs_quota_us"); got != "50000" {
		t.Fatalf("cpu quota %s", got)
	}
	apply(spec("96Mi", "1"))
	eventually(t, 10*time.Second, "limits updated in place", func() (bool, string) {
		m, q := cg("memory", "memory.limit_in_bytes"), cg("cpu", "cpu.cfs_quota_us")
		return m == strconv.Itoa(96<<20) && q == "100000", m + " " + q
	})
	after := b.instances("vert")
	if len(after) != 1 || after[0].ID != in.ID || after[0].Status.Restarts != 0 || !after[0].Status.StartedAt.Equal(in.Status.StartedAt) {
		t.Fatalf("a resource change must not replace or restart the instance: %+v", after)
	}
}

// TestHardening: no-new-privileges, a minimal capability set, seccomp, the
// agent's resolv.conf and hosts, a read-only root and a non-root user.
func TestHardening(t *testing.T) {
	testhost.SkipIfUnsupported(t)
	h := testhost.New(t)
	b := startDevRuntime(t, h, t.TempDir())
	importTestImage(t, b)
	b.mustCLI("run", "plain", "--image", testImage, "--", "sleep", "1000")
	b.mustCLI("run", "locked", "--image", testImage, "--read-only", "--user", "1000:1000", "--", "sleep", "1000")
	plain := b.instances("plain")[0].ID
	locked := b.instances("locked")[0].ID

	status := b.mustCLI("exec", plain, "--", "cat", "/proc/1/status")
	field := func(name string) string {
		for _, l := range strings.Split(status, "\n") {
			if v, ok := strings.CutPrefix(l, name+":"); ok {
				return strings.TrimSpace(v)
			}
		}
		return ""
	}
	if field("NoNewPrivs") != "1" || field("Seccomp") != "2" {
		t.Fatalf("NoNewPrivs %q Seccomp %q", field("NoNewPrivs"), field("Seccomp"))
	}
	// CHOWN DAC_OVERRIDE FOWNER FSETID KILL SETGID SETUID SETPCAP NET_BIND_SERVICE SYS_CHROOT
	if eff := field("CapEff"); eff != "00000000000405fb" {
		t.Fatalf("CapEff %s: want the minimal set 00000000000405fb", eff)
	}
	if hosts := b.mustCLI("exec", plain, "--", "cat", "/etc/hosts"); !strings.Contains(hosts, plain) {
		t.Fatalf("/etc/hosts does not name the instance: %q", hosts)
	}
	if mounts := b.mustCLI("exec", plain, "--", "cat", "/proc/mounts"); !strings.Contains(mounts, " /etc/resolv.conf ") || !strings.Contains(mounts, " /etc/hosts ") {
		t.Fatalf("resolv.conf and hosts are not bind-mounted:\n%s", mounts)
	}
	if _, _, err := b.cli("exec", plain, "--", "mknod", "/tmp/dev", "c", "1", "3"); err == nil {
		t.Fatal("mknod worked: CAP_MKNOD should be dropped")
	}
	if out := b.mustCLI("exec", locked, "--", "id", "-u"); strings.TrimSpace(out) != "1000" {
		t.Fatalf("--user 1000: id -u = %q", out)
	}
	if _, errOut, err := b.cli("exec", locked, "--", "touch", "/x"); err == nil || !strings.Contains(errOut, "Read-only") {
		t.Fatalf("--read-only: touch /x: %v %q", err, errOut)
	}
}

// TestAgentKill9Survival: kill -9 of berth dev while 20 containers run; on
// restart all 20 are still running, unrestarted, and one that exited while
// the agent was down is reported with its exit code.
func TestAgentKill9Survival(t *testing.T) {
	testhost.SkipIfUnsupported(t)
	h := testhost.New(t)
	dir := t.TempDir()
	b := startDevRuntime(t, h, dir)
	importTestImage(t, b)
	b.mustCLI("run", "many", "--image", testImage, "--replicas", "20", "--", "sleep", "100000")
	b.mustCLI("run", "brief", "--image", testImage, "--restart", "never", "--", "sh", "-c", "sleep 3; exit 5")
	before := map[string]api.Instance{}
	for _, in := range b.waitInstances("many", 20, 60*time.Second, "20 running", running) {
		before[in.ID] = in
	}
	pids := map[string]string{}
	for id := range before {
		pids[id] = strings.TrimSpace(b.mustCLI("exec", id, "--", "sh", "-c", "cat /proc/1/stat | cut -d' ' -f22"))
	}
	b.proc.Kill()
	time.Sleep(4 * time.Second) // brief exits while nobody watches

	b2 := startDev(t, h, dir)
	after := b2.waitInstances("many", 20, 30*time.Second, "20 still running", running)
	for _, in := range after {
		old, ok := before[in.ID]
		if !ok || in.Status.Restarts != 0 || !in.Status.StartedAt.Equal(old.Status.StartedAt) {
			t.Fatalf("instance changed across the agent restart: %+v (was %+v)", in, old)
		}
		if got := strings.TrimSpace(b2.mustCLI("exec", in.ID, "--", "sh", "-c", "cat /proc/1/stat | cut -d' ' -f22")); got != pids[in.ID] {
			t.Fatalf("%s was restarted: start time %s, was %s", in.ID, got, pids[in.ID])
		}
	}
	in := b2.waitInstances("brief", 1, 15*time.Second, "brief reported exited", func(in api.Instance) bool {
		return in.Status.State == api.InstanceFailed
	})[0]
	if in.Status.ExitCode == nil || *in.Status.ExitCode != 5 {
		t.Fatalf("brief exited with 5 while the agent was down: %+v", in.Status)
	}
}

// TestRuntimeBadInput: a missing image, an archive that is not an image, a
// command missing from the image and an impossible limit each give a clear
// error, and the agent and other instances carry on.
func TestRuntimeBadInput(t *testing.T) {
	testhost.SkipIfUnsupported(t)
	h := testhost.New(t)
	b := startDevRuntime(t, h, t.TempDir())
	importTestImage(t, b)
	b.mustCLI("run", "good", "--image", testImage, "--", "sleep", "1000")
	good := b.instances("good")[0]

	junk := filepath.Join(t.TempDir(), "junk.tar")
	if err := testimage.WriteNotAnImage(junk); err != nil {
		t.Fatal(err)
	}
	if _, errOut, err := b.cli("image", "import", junk); err == nil || !strings.Contains(errOut, "not an OCI or docker-archive") {
		t.Fatalf("import of junk: %v %q", err, errOut)
	}

	cases := []struct {
		name, reason, msg string
		args              []string
	}{
		{"noimage", api.ReasonImageNotFound, "image not found", []string{"--image", "localhost/missing:1", "--", "true"}},
		{"nocmd", api.ReasonStartFailed, "no such file", []string{"--image", testImage, "--", "/bin/does-not-exist"}},
		{"tinymem", api.ReasonStartFailed, "memory", []string{"--image", testImage, "--memory", "64Ki", "--", "sleep", "1000"}},
	}
	for _, tc := range cases {
		_, errOut, err := b.cli(append([]string{"run", tc.name, "--restart", "never"}, tc.args...)...)
		if err == nil || !strings.Contains(errOut, "failed") {
			t.Fatalf("%s: run should report the failure: %v %q", tc.name, err, errOut)
		}
		in := b.waitInstances(tc.name, 1, 15*time.Second, tc.name+" failed", func(in api.Instance) bool {
			return in.Status.State == api.InstanceFailed
		})[0]
		if in.Status.Reason != tc.reason || !strings.Contains(strings.ToLower(in.Status.Message), tc.msg) {
			t.Fatalf("%s: %+v", tc.name, in.Status)
		}
		if out := b.mustCLI("inspect", in.ID); !strings.Contains(out, tc.reason) {
			t.Fatalf("%s: inspect does not show the reason:\n%s", tc.name, out)
		}
	}
	if _, _, err := b.cli("run", "bad", "--image", "Not An Image!"); err == nil {
		t.Fatal("a malformed image reference was accepted")
	}
	now, err := b.client().GetInstance(ctxT(t), good.ID)
	if err != nil || now.Status.State != api.InstanceRunning || now.Status.Restarts != 0 {
		t.Fatalf("the good instance was disturbed: %v %+v", err, now.Status)
	}
	if out := b.mustCLI("node", "ls"); !strings.Contains(out, "ready") {
		t.Fatalf("node not ready after bad input:\n%s", out)
	}
}

// TestImagePullFromRegistry: berth pulls from a real registry on loopback
// (Debian's docker-registry, started by the test) and runs the image.
func TestImagePullFromRegistry(t *testing.T) {
	testhost.SkipIfUnsupported(t)
	testregistry.SkipIfUnsupported(t)
	h := testhost.New(t)
	addr := testregistry.Start(t, h)
	img, err := testimage.Build(testimage.Options{Labels: map[string]string{"pulled": "yes"}})
	if err != nil {
		t.Fatal(err)
	}
	ref := testregistry.Push(t, h, addr, "demo/pulled:1", img)
	b := startDevRuntime(t, h, t.TempDir())
	if out := b.mustCLI("image", "pull", ref); !strings.Contains(out, ref) {
		t.Fatalf("pull: %q", out)
	}
	var imgs []api.Image
	if err := json.Unmarshal([]byte(b.mustCLI("image", "ls", "-o", "json")), &imgs); err != nil || len(imgs) != 1 || imgs[0].Ref != ref {
		t.Fatalf("image ls: %v %+v", err, imgs)
	}
	b.mustCLI("run", "pulled", "--image", ref, "--", "sleep", "1000")
	if _, errOut, err := b.cli("image", "pull", addr+"/demo/absent:1"); err == nil || !strings.Contains(errOut, "not found") {
		t.Fatalf("pull of a missing image: %v %q", err, errOut)
	}
}

// killContainer SIGKILLs every process of an instance's container from the
// host, finding them through its cgroup.
func killContainer(t *testing.T, id string) {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("/sys/fs/cgroup/pids/berth", id, "cgroup.procs"))
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range strings.Fields(string(b)) {
		pid, _ := strconv.Atoi(f)
		if pid > 0 {
			_ = syscall.Kill(pid, syscall.SIGKILL)
		}
	}
}

// TestImageImportedAgainUnderItsName: the agent resolves image names from
// memory, so an image imported again under the same name must be what the
// next container runs, and a removed image must not run at all.
func TestImageImportedAgainUnderItsName(t *testing.T) {
	testhost.SkipIfUnsupported(t)
	h := testhost.New(t)
	b := startDevRuntime(t, h, t.TempDir())
	const ref = "localhost/again:1"
	runs := func(service, want string) {
		t.Helper()
		b.mustCLI("run", service, "--image", ref, "--", "sh", "-c", "trap 'exit 0' TERM; sleep 1000 & wait")
		in := b.waitInstances(service, 1, 30*time.Second, "running", running)[0]
		if got := b.mustCLI("exec", in.ID, "--", "cat", "/version"); got != want {
			t.Fatalf("%s runs the image with /version %q, want %q", service, got, want)
		}
	}
	importImage(t, b, ref, testimage.Options{Files: map[string]string{"/version": "one\n"}})
	runs("first", "one\n")
	importImage(t, b, ref, testimage.Options{Files: map[string]string{"/version": "two\n"}})
	runs("second", "two\n")

	for _, s := range []string{"first", "second"} {
		b.mustCLI("service", "rm", s)
	}
	eventually(t, 30*time.Second, "image rm once the containers are gone", func() (bool, string) {
		_, errOut, err := b.cli("image", "rm", ref)
		return err == nil, fmt.Sprintf("%v %s", err, errOut)
	})
	if _, errOut, err := b.cli("run", "third", "--image", ref, "--", "sleep", "1000"); err == nil || !strings.Contains(errOut, "failed") {
		t.Fatalf("run of a removed image: %v %q", err, errOut)
	}
	in := b.waitInstances("third", 1, 30*time.Second, "an image error", func(in api.Instance) bool {
		return in.Status.Reason == api.ReasonImageNotFound
	})[0]
	if in.Status.State == api.InstanceRunning {
		t.Fatalf("an instance of a removed image runs: %+v", in.Status)
	}
}
