// Package testhost owns the isolated Linux network namespaces that berth's
// end-to-end tests run in, and the processes the tests start inside them.
//
// Every "host" is a fresh network namespace created by the test itself, named
// "berthe2e-<pid>-<seq>" (the pid is the test binary's), with no route out of
// the machine: New gives a namespace with only an up loopback, NewCluster joins
// several namespaces through veth pairs to a bridge that lives in a further
// namespace of its own, on 198.18.0.0/24 (RFC 2544), with no default route.
// Nothing is ever created in the root network namespace.
//
// Everything is removed again through testing.TB.Cleanup: processes started
// with Host.Start are stopped (SIGTERM, then SIGKILL), any other process still
// inside a host's namespace is killed by PID, and the namespaces are deleted.
// Sweep, meant to be called from TestMain, removes namespaces left behind by a
// test binary that died without cleaning up.
//
// The package needs root, iproute2's `ip` and util-linux's `nsenter`; call
// SkipIfUnsupported at the top of a test to skip when they are missing.
package testhost

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

const (
	// NamePrefix starts the name of every namespace this package creates.
	NamePrefix = "berthe2e-"
	// netnsDir is where `ip netns` keeps its namespace bind mounts.
	netnsDir = "/run/netns"

	// The underlay network cluster hosts are attached to: 198.18.0.0/24.
	underlayPrefixLen = 24
	underlayNet       = "198.18.0."
	underlayFirstHost = 10
	// maxClusterHosts keeps the last host address at 198.18.0.254.
	maxClusterHosts = 254 - underlayFirstHost + 1

	bridgeName = "br0"
	hostIfName = "eth0"
)

// stopGrace is how long a process gets between SIGTERM and SIGKILL when it
// is stopped by cleanup. Tests of this package shorten it.
var stopGrace = 10 * time.Second

var seq atomic.Uint64

// newName returns a namespace name unique within this process and, through
// the pid, among concurrently running test binaries.
func newName(suffix string) string {
	return fmt.Sprintf("%s%d-%d%s", NamePrefix, os.Getpid(), seq.Add(1), suffix)
}

// Host is one isolated network namespace.
type Host struct {
	Name      string // namespace name, e.g. "berthe2e-<pid>-<seq>"
	NetnsPath string // /run/netns/<Name>
	Addr      string // underlay IPv4 address (no prefix) for cluster hosts, "" for New

	underlay string // name of the bridge namespace, for cluster hosts

	mu    sync.Mutex
	procs []*Process
}

// SkipIfUnsupported skips the test unless it runs as root with `ip` and
// `nsenter` available.
func SkipIfUnsupported(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("testhost: needs root to create network namespaces")
	}
	for _, bin := range []string{"ip", "nsenter"} {
		if _, err := exec.LookPath(bin); err != nil {
			t.Skipf("testhost: %s not found: %v", bin, err)
		}
	}
}

// New makes one isolated host: a fresh network namespace with only `lo`
// (up), no other interface and no routes. A cleanup registered on t stops the
// processes started in it and deletes the namespace.
//
// Like t.Fatal, New must be called from the test's goroutine.
func New(t testing.TB) *Host {
	t.Helper()
	return newHost(t)
}

func newHost(t testing.TB) *Host {
	t.Helper()
	name := newName("")
	h := &Host{Name: name, NetnsPath: filepath.Join(netnsDir, name)}
	addNetns(t, name)
	// Registered right after the namespace exists, so that it runs even if
	// the rest of the setup fails, and after the cleanups of processes
	// started later on t.
	t.Cleanup(func() { h.cleanup(t) })
	ip(t, "-n", name, "link", "set", "lo", "up")
	return h
}

// NewCluster makes n hosts joined by veth pairs to one test underlay bridge.
// The bridge lives in its own extra namespace, never in the root namespace.
// Host i gets interface "eth0" with address 198.18.0.(10+i)/24, link up, lo
// up, and no default route. Cleanup removes everything.
//
// Like t.Fatal, NewCluster must be called from the test's goroutine.
func NewCluster(t testing.TB, n int) []*Host {
	t.Helper()
	if n < 1 || n > maxClusterHosts {
		t.Fatalf("testhost: NewCluster: n = %d, want 1..%d", n, maxClusterHosts)
	}

	// The bridge namespace's cleanup is registered first, so it runs last,
	// after every host (and the veth ends in it) is gone.
	underlay := newName("-ul")
	addNetns(t, underlay)
	t.Cleanup(func() { deleteNetns(t, underlay) })
	ip(t, "-n", underlay, "link", "set", "lo", "up")
	ip(t, "-n", underlay, "link", "add", bridgeName, "type", "bridge")
	ip(t, "-n", underlay, "link", "set", bridgeName, "up")

	hosts := make([]*Host, n)
	for i := range hosts {
		h := newHost(t)
		h.underlay = underlay
		h.Addr = underlayNet + strconv.Itoa(underlayFirstHost+i)
		port := "h" + strconv.Itoa(i) // bridge-side veth end, <= 15 chars

		// Created inside the host namespace with its peer placed straight
		// into the bridge namespace: never touches the root namespace.
		ip(t, "-n", h.Name, "link", "add", hostIfName, "type", "veth",
			"peer", "name", port, "netns", underlay)
		ip(t, "-n", underlay, "link", "set", port, "master", bridgeName)
		ip(t, "-n", underlay, "link", "set", port, "up")
		ip(t, "-n", h.Name, "addr", "add",
			h.Addr+"/"+strconv.Itoa(underlayPrefixLen), "dev", hostIfName)
		ip(t, "-n", h.Name, "link", "set", hostIfName, "up")
		hosts[i] = h
	}
	return hosts
}

// Command returns an exec.Cmd that runs name with args inside the host's
// network namespace, as `nsenter --net=<NetnsPath> -- name args...`. Unlike
// `ip netns exec` this does not remount /sys, so cgroups stay visible (runc
// needs them). nsenter execs name without forking, so the Cmd's PID is the
// PID of name itself.
//
// The command gets SIGKILL if the test binary dies (SysProcAttr.Pdeathsig).
// It is not tracked by the host, but the host's cleanup kills any process
// still inside its namespace.
func (h *Host) Command(ctx context.Context, name string, args ...string) *exec.Cmd {
	argv := append([]string{"--net=" + h.NetnsPath, "--", name}, args...)
	cmd := exec.CommandContext(ctx, "nsenter", argv...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	return cmd
}

// Run runs a command to completion inside the host and returns its combined
// output.
func (h *Host) Run(ctx context.Context, name string, args ...string) (string, error) {
	cmd := h.Command(ctx, name, args...)
	// Don't hang forever on a background child that keeps the output pipe.
	cmd.WaitDelay = 10 * time.Second
	out, err := cmd.CombinedOutput()
	if err != nil {
		err = fmt.Errorf("%s: %s %s: %w", h.Name, name, strings.Join(args, " "), err)
	}
	return string(out), err
}

// Process is a long-running process started in a host with Start.
type Process struct {
	Cmd *exec.Cmd

	host       *Host
	stdoutPath string
	stderrPath string
	grace      time.Duration

	done    chan struct{} // closed once Cmd.Wait has returned
	waitErr error         // from Cmd.Wait; read only after done is closed

	stopOnce sync.Once
}

// Start starts a long-running process inside the host. Its stdout and stderr
// go to files under t.TempDir(), so large output never blocks it. A cleanup
// registered on t (running before the host's namespace is deleted, when t is
// the host's test or a subtest of it) stops it if it is still running:
// SIGTERM, up to 10s to exit, then SIGKILL — by PID only. The host's own
// cleanup does the same for every process started in it.
//
// Like t.Fatal, Start must be called from the test's goroutine.
func (h *Host) Start(t testing.TB, name string, args ...string) *Process {
	t.Helper()
	return h.StartCmd(t, h.Command(context.Background(), name, args...))
}

// StartCmd is Start for a command prepared with h.Command, for instance to set
// its Env or Dir. Its Stdout and Stderr must be left nil.
func (h *Host) StartCmd(t testing.TB, cmd *exec.Cmd) *Process {
	t.Helper()
	if cmd.Stdout != nil || cmd.Stderr != nil {
		t.Fatalf("testhost: StartCmd: %s: Stdout and Stderr must be nil", cmd)
	}
	// TempDir registers its removal on first use; calling it before
	// registering our cleanup makes the removal run after the process is
	// stopped.
	dir, err := os.MkdirTemp(t.TempDir(), "proc-")
	if err != nil {
		t.Fatalf("testhost: %v", err)
	}
	p := &Process{
		Cmd:        cmd,
		host:       h,
		stdoutPath: filepath.Join(dir, "stdout"),
		stderrPath: filepath.Join(dir, "stderr"),
		grace:      stopGrace,
		done:       make(chan struct{}),
	}
	stdout, err := os.Create(p.stdoutPath)
	if err != nil {
		t.Fatalf("testhost: %v", err)
	}
	defer stdout.Close()
	stderr, err := os.Create(p.stderrPath)
	if err != nil {
		t.Fatalf("testhost: %v", err)
	}
	defer stderr.Close()
	// *os.File outputs are handed to the child directly: no copying
	// goroutine, nothing to block on.
	cmd.Stdout, cmd.Stderr = stdout, stderr

	if err := cmd.Start(); err != nil {
		t.Fatalf("testhost: %s: start %s: %v", h.Name, cmd, err)
	}
	go func() {
		p.waitErr = cmd.Wait()
		close(p.done)
	}()
	h.mu.Lock()
	h.procs = append(h.procs, p)
	h.mu.Unlock()
	t.Cleanup(func() { p.stop(t) })
	return p
}

// Pid returns the process ID.
func (p *Process) Pid() int { return p.Cmd.Process.Pid }

// Stdout returns what the process has written to stdout so far.
func (p *Process) Stdout() string { return readFile(p.stdoutPath) }

// Stderr returns what the process has written to stderr so far.
func (p *Process) Stderr() string { return readFile(p.stderrPath) }

func readFile(path string) string {
	b, _ := os.ReadFile(path)
	return string(b)
}

// Exited reports whether the process has exited (and been reaped).
func (p *Process) Exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// Signal sends sig to the process. It returns os.ErrProcessDone once the
// process has exited.
func (p *Process) Signal(sig os.Signal) error {
	if p.Exited() {
		return os.ErrProcessDone
	}
	return p.Cmd.Process.Signal(sig)
}

// Wait waits up to timeout (forever if timeout <= 0) for the process to exit
// and returns its exit code, which is -1 if it was killed by a signal. A
// non-zero exit is not an error: err is non-nil only if the timeout expired
// (exitCode is then -1) or the wait itself failed. Wait may be called any
// number of times, from any goroutine, also after cleanup.
func (p *Process) Wait(timeout time.Duration) (exitCode int, err error) {
	if timeout > 0 {
		timer := time.NewTimer(timeout)
		defer timer.Stop()
		select {
		case <-p.done:
		case <-timer.C:
			return -1, fmt.Errorf("testhost: %s: pid %d still running after %v", p.host.Name, p.Pid(), timeout)
		}
	} else {
		<-p.done
	}
	if ps := p.Cmd.ProcessState; ps != nil {
		return ps.ExitCode(), nil
	}
	return -1, p.waitErr
}

// Kill sends SIGKILL and waits for the process to exit.
func (p *Process) Kill() {
	_ = p.Signal(syscall.SIGKILL)
	_, _ = p.Wait(0)
}

// WaitOutput polls stdout until it contains substr, the process exits, or
// timeout expires, and returns the full stdout and whether substr was found.
func (p *Process) WaitOutput(substr string, timeout time.Duration) (string, bool) {
	deadline := time.Now().Add(timeout)
	for {
		exited := p.Exited() // before reading, so no output is missed
		out := p.Stdout()
		if strings.Contains(out, substr) {
			return out, true
		}
		if exited || time.Now().After(deadline) {
			return out, false
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// stop is the cleanup of a process: SIGTERM, grace period, SIGKILL. Only the
// first call does anything; both the Start cleanup and the host's call it.
func (p *Process) stop(t testing.TB) {
	p.stopOnce.Do(func() { p.doStop(t) })
}

func (p *Process) doStop(t testing.TB) {
	if t.Failed() {
		t.Logf("testhost: %s: %s (pid %d) stdout:\n%s", p.host.Name, p.Cmd, p.Pid(), tail(p.Stdout()))
		t.Logf("testhost: %s: %s (pid %d) stderr:\n%s", p.host.Name, p.Cmd, p.Pid(), tail(p.Stderr()))
	}
	if p.Exited() {
		return
	}
	if err := p.Signal(syscall.SIGTERM); err == nil {
		if _, err := p.Wait(p.grace); err == nil {
			return
		}
		t.Logf("testhost: %s: pid %d did not exit %v after SIGTERM, sending SIGKILL", p.host.Name, p.Pid(), p.grace)
	}
	_ = p.Signal(syscall.SIGKILL)
	if _, err := p.Wait(30 * time.Second); err != nil {
		t.Errorf("testhost: after SIGKILL: %v", err)
	}
}

func tail(s string) string {
	const max = 4096
	if len(s) > max {
		return "..." + s[len(s)-max:]
	}
	return s
}

// cleanup stops the host's processes, kills anything else left in its
// namespace, and deletes the namespace.
func (h *Host) cleanup(t testing.TB) {
	h.mu.Lock()
	procs := h.procs
	h.mu.Unlock()
	for _, p := range procs {
		p.stop(t)
	}
	for _, pid := range killNetnsProcs(h.NetnsPath) {
		t.Logf("testhost: %s: killed leftover pid %d", h.Name, pid)
	}
	deleteNetns(t, h.Name)
}

// ip runs `ip args...` and fails the test on error.
func ip(t testing.TB, args ...string) {
	t.Helper()
	if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
		t.Fatalf("testhost: ip %s: %v\n%s", strings.Join(args, " "), err, out)
	}
}

func addNetns(t testing.TB, name string) {
	t.Helper()
	ip(t, "netns", "add", name)
}

func deleteNetns(t testing.TB, name string) {
	t.Helper()
	if out, err := exec.Command("ip", "netns", "delete", name).CombinedOutput(); err != nil {
		t.Errorf("testhost: ip netns delete %s: %v\n%s", name, err, out)
	}
}

// nsID identifies a namespace by the device and inode of its nsfs file.
type nsID struct{ dev, ino uint64 }

func statNS(path string) (nsID, bool) {
	var st syscall.Stat_t
	if err := syscall.Stat(path, &st); err != nil {
		return nsID{}, false
	}
	return nsID{uint64(st.Dev), st.Ino}, true
}

// netnsProcs lists the processes whose network namespace is the one bind
// mounted at path (what `ip netns pids` does). Zombies are not listed.
func netnsProcs(id nsID) []int {
	entries, err := os.ReadDir("/proc")
	if err != nil {
		return nil
	}
	var pids []int
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == os.Getpid() {
			continue
		}
		if got, ok := statNS(fmt.Sprintf("/proc/%d/ns/net", pid)); ok && got == id {
			pids = append(pids, pid)
		}
	}
	return pids
}

// killNetnsProcs SIGKILLs every process in the network namespace at path,
// waits up to 5s for them to leave it, and returns the PIDs it signalled.
// Each one is checked to be in the namespace again after a pidfd has been
// taken on it, so a recycled PID is never signalled.
func killNetnsProcs(path string) []int {
	id, ok := statNS(path)
	if !ok {
		return nil
	}
	var killed []int
	for _, pid := range netnsProcs(id) {
		proc, err := os.FindProcess(pid) // a pidfd on Linux
		if err != nil {
			continue
		}
		if got, ok := statNS(fmt.Sprintf("/proc/%d/ns/net", pid)); ok && got == id {
			if proc.Signal(syscall.SIGKILL) == nil {
				killed = append(killed, pid)
			}
		}
		proc.Release()
	}
	for deadline := time.Now().Add(5 * time.Second); len(killed) > 0 && time.Now().Before(deadline); {
		if len(netnsProcs(id)) == 0 {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	return killed
}

// Sweep deletes namespaces named "berthe2e-<pid>-..." that were left behind
// by a test binary that is no longer running (its pid is not alive), after
// killing any process still inside them. Namespaces of live test binaries,
// including this one, are left alone. Call it from TestMain before m.Run.
// It reports what it removed on stderr.
func Sweep() {
	entries, err := os.ReadDir(netnsDir)
	if err != nil {
		return
	}
	for _, e := range entries {
		name := e.Name()
		pid, ok := ownerPid(name)
		if !ok || pid == os.Getpid() || pidAlive(pid) {
			continue
		}
		path := filepath.Join(netnsDir, name)
		for _, p := range killNetnsProcs(path) {
			fmt.Fprintf(os.Stderr, "testhost: sweep: killed pid %d left in %s\n", p, name)
		}
		out, err := exec.Command("ip", "netns", "delete", name).CombinedOutput()
		if err != nil {
			fmt.Fprintf(os.Stderr, "testhost: sweep: ip netns delete %s: %v\n%s", name, err, bytes.TrimSpace(out))
			continue
		}
		fmt.Fprintf(os.Stderr, "testhost: sweep: deleted stale namespace %s\n", name)
	}
}

// ownerPid extracts the pid from "berthe2e-<pid>-<seq>[-suffix]".
func ownerPid(name string) (int, bool) {
	rest, ok := strings.CutPrefix(name, NamePrefix)
	if !ok {
		return 0, false
	}
	pidStr, _, ok := strings.Cut(rest, "-")
	if !ok {
		return 0, false
	}
	pid, err := strconv.Atoi(pidStr)
	if err != nil || pid <= 0 {
		return 0, false
	}
	return pid, true
}

// pidAlive reports whether pid is a running process. A zombie (exited, not yet
// reaped, as happens when a killed test binary is reparented to a slow init)
// counts as dead.
func pidAlive(pid int) bool {
	if err := syscall.Kill(pid, 0); err != nil && !errors.Is(err, syscall.EPERM) {
		return false
	}
	stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return !errors.Is(err, os.ErrNotExist)
	}
	// The state follows the parenthesised command name, which may itself
	// contain parentheses.
	if i := bytes.LastIndexByte(stat, ')'); i >= 0 && i+2 < len(stat) {
		return stat[i+2] != 'Z' && stat[i+2] != 'X'
	}
	return true
}
