package testhost

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"os/signal"
	"strings"
	"syscall"
	"testing"
	"time"
)

// helperEnv selects a helper mode when the test binary is re-executed inside
// a host: "listen:ADDR" serves a greeting on TCP ADDR, "dial:ADDR" prints the
// greeting read from TCP ADDR, "ignoreterm" ignores SIGTERM and sleeps.
const helperEnv = "TESTHOST_HELPER"

func TestMain(m *testing.M) {
	if mode, ok := os.LookupEnv(helperEnv); ok {
		os.Exit(helper(mode))
	}
	Sweep()
	os.Exit(m.Run())
}

func helper(mode string) int {
	kind, addr, _ := strings.Cut(mode, ":")
	switch kind {
	case "listen":
		ln, err := net.Listen("tcp", addr)
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		fmt.Printf("listening %s\n", ln.Addr())
		for {
			c, err := ln.Accept()
			if err != nil {
				fmt.Fprintln(os.Stderr, err)
				return 1
			}
			fmt.Fprintf(c, "hello from %s to %s\n", c.LocalAddr(), c.RemoteAddr())
			c.Close()
		}
	case "dial":
		c, err := net.DialTimeout("tcp", addr, 3*time.Second)
		if err != nil {
			fmt.Println(err)
			return 1
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(3 * time.Second))
		b, err := io.ReadAll(c)
		fmt.Print(string(b))
		if err != nil {
			fmt.Println(err)
			return 1
		}
		return 0
	case "ignoreterm":
		signal.Ignore(syscall.SIGTERM)
		fmt.Println("ready")
		select {}
	}
	fmt.Fprintf(os.Stderr, "unknown helper mode %q\n", mode)
	return 2
}

func requireRoot(t *testing.T) {
	t.Helper()
	SkipIfUnsupported(t)
}

func ctx(t *testing.T) context.Context {
	c, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return c
}

func run(t *testing.T, h *Host, name string, args ...string) string {
	t.Helper()
	out, err := h.Run(ctx(t), name, args...)
	if err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	return out
}

func lines(s string) []string {
	var out []string
	for _, l := range strings.Split(s, "\n") {
		if l = strings.TrimSpace(l); l != "" {
			out = append(out, l)
		}
	}
	return out
}

func selfExe(t *testing.T) string {
	t.Helper()
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	return exe
}

// startHelper runs this test binary inside h in the given helper mode.
func startHelper(t *testing.T, h *Host, mode string) *Process {
	t.Helper()
	cmd := h.Command(context.Background(), selfExe(t))
	cmd.Env = append(os.Environ(), helperEnv+"="+mode)
	return h.StartCmd(t, cmd)
}

// dialFrom connects from inside h to addr and returns the helper's output.
func dialFrom(t *testing.T, h *Host, addr string) (string, error) {
	t.Helper()
	cmd := h.Command(ctx(t), selfExe(t))
	cmd.Env = append(os.Environ(), helperEnv+"=dial:"+addr)
	out, err := cmd.CombinedOutput()
	return string(out), err
}

func netnsList(t *testing.T) string {
	t.Helper()
	out, err := exec.Command("ip", "netns", "list").CombinedOutput()
	if err != nil {
		t.Fatalf("ip netns list: %v\n%s", err, out)
	}
	return string(out)
}

func netnsExists(t *testing.T, name string) bool {
	t.Helper()
	for _, l := range lines(netnsList(t)) {
		if strings.Fields(l)[0] == name {
			return true
		}
	}
	return false
}

// alive reports whether pid exists (a zombie counts as existing).
func alive(pid int) bool {
	return syscall.Kill(pid, 0) == nil
}

func sameNetns(t *testing.T, pid int, h *Host) bool {
	t.Helper()
	a, ok1 := statNS(fmt.Sprintf("/proc/%d/ns/net", pid))
	b, ok2 := statNS(h.NetnsPath)
	return ok1 && ok2 && a == b
}

func TestIsolatedHost(t *testing.T) {
	requireRoot(t)
	h := New(t)
	if !strings.HasPrefix(h.Name, fmt.Sprintf("%s%d-", NamePrefix, os.Getpid())) {
		t.Errorf("Name = %q", h.Name)
	}
	if h.NetnsPath != "/run/netns/"+h.Name || h.Addr != "" {
		t.Errorf("NetnsPath = %q, Addr = %q", h.NetnsPath, h.Addr)
	}

	links := lines(run(t, h, "ip", "-o", "link", "show"))
	if len(links) != 1 || !strings.Contains(links[0], ": lo:") {
		t.Errorf("links = %q, want only lo", links)
	}
	lo := run(t, h, "ip", "-o", "link", "show", "lo")
	if !strings.Contains(lo, "<LOOPBACK,UP,LOWER_UP>") {
		t.Errorf("lo not up: %s", lo)
	}
	if out := run(t, h, "ip", "route", "show"); strings.TrimSpace(out) != "" {
		t.Errorf("ip route show = %q, want empty", out)
	}
	if out := run(t, h, "ip", "-6", "route", "show"); strings.TrimSpace(out) != "" {
		t.Errorf("ip -6 route show = %q, want empty", out)
	}
	for _, fam := range []string{"-4", "-6"} {
		for _, l := range lines(run(t, h, "ip", fam, "route", "show", "table", "all")) {
			if !strings.Contains(l, " dev lo ") {
				t.Errorf("ip %s route show table all: non-loopback route %q", fam, l)
			}
		}
	}
	// A route lookup only; no packet is sent.
	if out, err := h.Run(ctx(t), "ip", "route", "get", "203.0.113.1"); err == nil ||
		!strings.Contains(out, "unreachable") {
		t.Errorf("ip route get 203.0.113.1 = %q, %v; want Network is unreachable", out, err)
	}

	// Loopback works inside, and the process really is in the namespace.
	p := startHelper(t, h, "listen:127.0.0.1:7000")
	if out, ok := p.WaitOutput("listening", 10*time.Second); !ok {
		t.Fatalf("listener did not start: %q %q", out, p.Stderr())
	}
	if !sameNetns(t, p.Pid(), h) {
		t.Errorf("pid %d is not in %s", p.Pid(), h.Name)
	}
	if out, err := dialFrom(t, h, "127.0.0.1:7000"); err != nil || !strings.Contains(out, "hello from 127.0.0.1:7000") {
		t.Errorf("dial over lo: %q, %v", out, err)
	}
	// The listener cannot be reached from another host's loopback.
	h2 := New(t)
	if out, err := dialFrom(t, h2, "127.0.0.1:7000"); err == nil {
		t.Errorf("dial from another host succeeded: %q", out)
	}
}

func TestCluster(t *testing.T) {
	requireRoot(t)
	hosts := NewCluster(t, 3)
	for i, h := range hosts {
		want := fmt.Sprintf("198.18.0.%d", 10+i)
		if h.Addr != want {
			t.Fatalf("hosts[%d].Addr = %q, want %q", i, h.Addr, want)
		}
		if h.underlay == "" || h.underlay != hosts[0].underlay {
			t.Errorf("hosts[%d].underlay = %q", i, h.underlay)
		}
		links := lines(run(t, h, "ip", "-o", "link", "show"))
		if len(links) != 2 {
			t.Errorf("%s links = %q, want lo and eth0", h.Name, links)
		}
		eth0 := run(t, h, "ip", "-o", "-4", "addr", "show", "dev", "eth0")
		if !strings.Contains(eth0, " "+want+"/24 ") {
			t.Errorf("%s eth0 = %q, want %s/24", h.Name, eth0, want)
		}
		for _, name := range []string{"lo", "eth0"} {
			if l := run(t, h, "ip", "-o", "link", "show", name); !strings.Contains(l, ",UP,LOWER_UP>") {
				t.Errorf("%s %s not up: %s", h.Name, name, l)
			}
		}
		routes := run(t, h, "ip", "-4", "route", "show")
		if strings.Contains(routes, "default") || len(lines(routes)) != 1 ||
			!strings.HasPrefix(routes, "198.18.0.0/24 dev eth0") {
			t.Errorf("%s routes = %q, want only 198.18.0.0/24", h.Name, routes)
		}
		if out, err := h.Run(ctx(t), "ip", "route", "get", "203.0.113.1"); err == nil {
			t.Errorf("%s has a route off the underlay: %s", h.Name, out)
		}
	}
	// The bridge namespace is not the root one, and holds the bridge.
	if !netnsExists(t, hosts[0].underlay) {
		t.Fatalf("underlay namespace %s missing", hosts[0].underlay)
	}
	if out, err := exec.Command("ip", "-n", hosts[0].underlay, "-o", "link", "show", "master", "br0").CombinedOutput(); err != nil ||
		len(lines(string(out))) != 3 {
		t.Errorf("bridge ports: %q, %v", out, err)
	}

	for _, h := range hosts[1:] {
		addr := h.Addr + ":7000"
		p := startHelper(t, h, "listen:"+addr)
		if out, ok := p.WaitOutput("listening", 10*time.Second); !ok {
			t.Fatalf("listener on %s did not start: %q %q", addr, out, p.Stderr())
		}
		out, err := dialFrom(t, hosts[0], addr)
		if err != nil || !strings.Contains(out, "hello from "+addr+" to "+hosts[0].Addr+":") {
			t.Errorf("host 0 -> %s: %q, %v", addr, out, err)
		}
	}
	// Host 2 reaches host 1 as well.
	if out, err := dialFrom(t, hosts[2], hosts[1].Addr+":7000"); err != nil || !strings.Contains(out, "hello from") {
		t.Errorf("host 2 -> host 1: %q, %v", out, err)
	}
}

func TestCleanup(t *testing.T) {
	requireRoot(t)
	var names []string
	var underlay string
	var tracked []*Process
	var untracked *exec.Cmd
	t.Run("inner", func(t *testing.T) {
		hosts := NewCluster(t, 2)
		underlay = hosts[0].underlay
		names = append(names, underlay)
		hosts = append(hosts, New(t))
		for _, h := range hosts {
			names = append(names, h.Name)
			p := h.Start(t, "sleep", "1000")
			tracked = append(tracked, p)
		}
		// A process started in a host without Start: the host's cleanup
		// must kill it too.
		untracked = hosts[2].Command(context.Background(), "sleep", "1001")
		if err := untracked.Start(); err != nil {
			t.Fatal(err)
		}
		for _, n := range names {
			if !netnsExists(t, n) {
				t.Fatalf("namespace %s missing", n)
			}
		}
	})
	if !strings.HasSuffix(underlay, "-ul") {
		t.Errorf("underlay name %q", underlay)
	}
	for _, n := range names {
		if netnsExists(t, n) {
			t.Errorf("namespace %s still exists after cleanup", n)
		}
	}
	for _, p := range tracked {
		if !p.Exited() || alive(p.Pid()) {
			t.Errorf("pid %d still alive after cleanup", p.Pid())
		}
		if code, err := p.Wait(time.Second); code != -1 || err != nil {
			t.Errorf("Wait after cleanup = %d, %v; want -1 (signalled), nil", code, err)
		}
	}
	err := untracked.Wait()
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.Sys().(syscall.WaitStatus).Signal() != syscall.SIGKILL {
		t.Errorf("untracked process: Wait = %v, want killed by SIGKILL", err)
	}
	if strings.Contains(netnsList(t), fmt.Sprintf("%s%d-", NamePrefix, os.Getpid())) {
		// Other tests of this binary may run in parallel; only report.
		t.Logf("ip netns list still has namespaces of this run:\n%s", netnsList(t))
	}
}

func TestStartWaitOutputKill(t *testing.T) {
	requireRoot(t)
	h := New(t)
	p := h.Start(t, "sh", "-c", "echo hello; echo oops >&2; exec sleep 1000")
	out, ok := p.WaitOutput("hello", 10*time.Second)
	if !ok || out != "hello\n" {
		t.Fatalf("WaitOutput = %q, %v", out, ok)
	}
	if _, ok := p.WaitOutput("never printed", 100*time.Millisecond); ok {
		t.Error("WaitOutput found a string that was never printed")
	}
	// stderr is written before the exec; no need to poll long.
	deadline := time.Now().Add(5 * time.Second)
	for p.Stderr() != "oops\n" && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if got := p.Stderr(); got != "oops\n" {
		t.Errorf("Stderr = %q", got)
	}
	if _, err := p.Wait(50 * time.Millisecond); err == nil {
		t.Error("Wait on a running process did not time out")
	}
	pid := p.Pid()
	if !sameNetns(t, pid, h) {
		t.Errorf("pid %d is not in %s", pid, h.Name)
	}
	if comm, _ := os.ReadFile(fmt.Sprintf("/proc/%d/comm", pid)); strings.TrimSpace(string(comm)) != "sleep" {
		t.Errorf("pid %d is %q, want sleep (nsenter must exec, not fork)", pid, comm)
	}

	p.Kill()
	if alive(pid) {
		t.Errorf("pid %d alive after Kill", pid)
	}
	for range 2 {
		if code, err := p.Wait(time.Second); code != -1 || err != nil {
			t.Errorf("Wait = %d, %v; want -1, nil", code, err)
		}
	}
	if err := p.Signal(syscall.SIGTERM); !errors.Is(err, os.ErrProcessDone) {
		t.Errorf("Signal after exit = %v, want os.ErrProcessDone", err)
	}
	p.Kill() // again: no-op
}

func TestExitCodeAndLargeOutput(t *testing.T) {
	requireRoot(t)
	h := New(t)

	p := h.Start(t, "sh", "-c", "exit 3")
	if code, err := p.Wait(10 * time.Second); code != 3 || err != nil {
		t.Errorf("Wait = %d, %v; want 3, nil", code, err)
	}
	// WaitOutput gives up as soon as the process has exited.
	start := time.Now()
	if _, ok := p.WaitOutput("x", time.Minute); ok || time.Since(start) > 5*time.Second {
		t.Errorf("WaitOutput on exited process: ok=%v after %v", ok, time.Since(start))
	}

	// 8 MiB of output that nobody reads must not block the process.
	p = h.Start(t, "sh", "-c", "head -c 8388608 /dev/zero; echo; echo done")
	out, ok := p.WaitOutput("done", 30*time.Second)
	if !ok || len(out) != 8388608+len("\ndone\n") {
		t.Errorf("large output: found=%v len=%d", ok, len(out))
	}
	if code, err := p.Wait(10 * time.Second); code != 0 || err != nil {
		t.Errorf("Wait = %d, %v", code, err)
	}

	// Run returns combined output and the exit error.
	out, err := h.Run(ctx(t), "sh", "-c", "echo out; echo err >&2; exit 4")
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.ExitCode() != 4 || !strings.Contains(out, "out") || !strings.Contains(out, "err") {
		t.Errorf("Run = %q, %v", out, err)
	}
}

func TestStopEscalatesToSIGKILL(t *testing.T) {
	requireRoot(t)
	old := stopGrace
	stopGrace = 500 * time.Millisecond
	defer func() { stopGrace = old }()

	var p *Process
	t.Run("inner", func(t *testing.T) {
		h := New(t)
		p = startHelper(t, h, "ignoreterm")
		if out, ok := p.WaitOutput("ready", 10*time.Second); !ok {
			t.Fatalf("helper not ready: %q %q", out, p.Stderr())
		}
		if err := p.Signal(syscall.SIGTERM); err != nil {
			t.Fatal(err)
		}
		if _, err := p.Wait(200 * time.Millisecond); err == nil {
			t.Fatal("helper exited on SIGTERM")
		}
	})
	if code, err := p.Wait(time.Second); code != -1 || err != nil {
		t.Errorf("Wait = %d, %v; want -1, nil", code, err)
	}
	if st := p.Cmd.ProcessState.Sys().(syscall.WaitStatus); st.Signal() != syscall.SIGKILL {
		t.Errorf("helper ended by %v, want SIGKILL", st.Signal())
	}
}

func TestParallelHostsHaveUniqueNames(t *testing.T) {
	requireRoot(t)
	names := make(chan string, 8)
	t.Run("group", func(t *testing.T) {
		for i := range 4 {
			t.Run(fmt.Sprint(i), func(t *testing.T) {
				t.Parallel()
				for _, h := range NewCluster(t, 2) {
					names <- h.Name
				}
			})
		}
	})
	close(names)
	seen := map[string]bool{}
	for n := range names {
		if seen[n] {
			t.Errorf("duplicate name %s", n)
		}
		seen[n] = true
	}
	if len(seen) != 8 {
		t.Errorf("got %d names, want 8", len(seen))
	}
}

func TestSweep(t *testing.T) {
	requireRoot(t)
	// A pid that is certainly dead: a child that has exited and been reaped.
	dead := exec.Command("true")
	if err := dead.Run(); err != nil {
		t.Fatal(err)
	}
	deadPid := dead.Process.Pid
	if alive(deadPid) {
		t.Skipf("pid %d reused already", deadPid)
	}
	stale := fmt.Sprintf("%s%d-1", NamePrefix, deadPid)
	staleUL := fmt.Sprintf("%s%d-2-ul", NamePrefix, deadPid)
	for _, n := range []string{stale, staleUL} {
		if out, err := exec.Command("ip", "netns", "add", n).CombinedOutput(); err != nil {
			t.Fatalf("ip netns add %s: %v\n%s", n, err, out)
		}
		t.Cleanup(func() {
			if netnsExists(t, n) {
				exec.Command("ip", "netns", "delete", n).Run()
			}
		})
	}
	// A process left behind in the stale namespace (our own child here).
	left := exec.Command("nsenter", "--net=/run/netns/"+stale, "--", "sleep", "1002")
	left.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := left.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { left.Process.Kill(); left.Wait() })

	live := New(t) // ours: must survive

	Sweep()

	for _, n := range []string{stale, staleUL} {
		if netnsExists(t, n) {
			t.Errorf("stale namespace %s not swept", n)
		}
	}
	if !netnsExists(t, live.Name) {
		t.Errorf("Sweep deleted %s of this live process", live.Name)
	}
	err := left.Wait()
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.Sys().(syscall.WaitStatus).Signal() != syscall.SIGKILL {
		t.Errorf("process left in stale namespace: Wait = %v, want killed", err)
	}
}

func TestOwnerPid(t *testing.T) {
	for name, want := range map[string]int{
		"berthe2e-123-4":    123,
		"berthe2e-123-4-ul": 123,
		"berthe2e-x-4":      0,
		"berthe2e-123":      0,
		"other-123-4":       0,
		"berthe2e--4":       0,
	} {
		got, ok := ownerPid(name)
		if got != want || ok != (want != 0) {
			t.Errorf("ownerPid(%q) = %d, %v; want %d", name, got, ok, want)
		}
	}
}
