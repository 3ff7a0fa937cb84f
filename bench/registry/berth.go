package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/berth-dev/berth/client"
)

// Where berth listens: the namespace's own loopback. (Variables for the
// profiling test, which runs a server in-process on free ports.)
var (
	apiAddr = "127.0.0.1:7480"
	dnsAddr = "127.0.0.1:5353"
)

// berthDev is a running `berth dev`.
type berthDev struct {
	l      layout
	bin    string
	proc   *exec.Cmd
	exited chan struct{}
	c      *client.Client // for calls that are not measured
}

// startBerth starts `berth dev` with DNS and waits until it is ready. A
// non-nil berthDev is returned even on error, to be closed.
func startBerth(ctx context.Context, l layout, bin string, timeout time.Duration) (*berthDev, error) {
	b := &berthDev{l: l, bin: bin, exited: make(chan struct{})}
	logf, err := os.Create(l.log)
	if err != nil {
		return nil, fmt.Errorf("berth's log: %w", err)
	}
	cmd := exec.Command(bin, "dev", "--data-dir", l.berthData, "--api-addr", apiAddr, "--dns-addr", dnsAddr, "--node-name", "node1")
	cmd.Stderr = logf
	// Its own process group: a terminal's Ctrl-C is for this command,
	// which stops berth itself.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	out, err := cmd.StdoutPipe()
	if err != nil {
		logf.Close()
		return nil, fmt.Errorf("berth's stdout: %w", err)
	}
	if err := cmd.Start(); err != nil {
		logf.Close()
		return nil, fmt.Errorf("start berth dev: %w", err)
	}
	b.proc = cmd
	ready := make(chan struct{})
	// Owned by the process: it ends when berth closes its stdout.
	go func() {
		defer close(b.exited)
		defer logf.Close()
		sc := bufio.NewScanner(out)
		once := false
		for sc.Scan() {
			fmt.Fprintln(logf, sc.Text())
			if !once && strings.Contains(sc.Text(), "ready in") {
				once = true
				fmt.Fprintln(os.Stderr, "bench:", sc.Text())
				close(ready)
			}
		}
		_ = cmd.Wait()
	}()
	select {
	case <-ready:
	case <-b.exited:
		return b, fmt.Errorf("berth dev exited before it was ready; its log:\n%s", tail(l.log))
	case <-time.After(timeout):
		return b, fmt.Errorf("berth dev not ready after %v; its log:\n%s", timeout, tail(l.log))
	case <-ctx.Done():
		return b, ctx.Err()
	}
	b.c, err = newClient(64, timeout)
	if err != nil {
		return b, err
	}
	// berth is ready before its node's runtime may be: import until the
	// runtime takes the image.
	ictx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	for {
		_, err := b.c.ImportImage(ictx, l.archive, "")
		if err == nil {
			break
		}
		if ictx.Err() != nil {
			return b, fmt.Errorf("berth: import the test image: %w", err)
		}
		time.Sleep(100 * time.Millisecond)
	}
	return b, nil
}

// newClient returns an API client with its own connection pool of conns
// idle connections, and a timeout per call.
func newClient(conns int, timeout time.Duration) (*client.Client, error) {
	hc := &http.Client{Timeout: timeout, Transport: newTransport(conns)}
	c, err := client.New(apiAddr, client.WithHTTPClient(hc))
	if err != nil {
		return nil, fmt.Errorf("berth client: %w", err)
	}
	return c, nil
}

func newTransport(conns int) *http.Transport {
	return &http.Transport{
		Proxy:               nil,
		DialContext:         (&net.Dialer{Timeout: 5 * time.Second}).DialContext,
		MaxIdleConns:        conns,
		MaxIdleConnsPerHost: conns,
		IdleConnTimeout:     time.Minute,
	}
}

func tail(path string) string {
	b, _ := os.ReadFile(path)
	lines := strings.Split(strings.TrimSpace(string(b)), "\n")
	return strings.Join(lines[max(0, len(lines)-20):], "\n")
}

// pid is berth dev's process id.
func (b *berthDev) pid() int { return b.proc.Process.Pid }

// alive says whether berth dev still runs.
func (b *berthDev) alive() bool {
	select {
	case <-b.exited:
		return false
	default:
		return true
	}
}

// memory is a process's resident set size now and its peak, and the
// anonymous and file-backed parts of the RSS (the embedded etcd's bbolt
// database is a file mapping), from /proc/PID/status, in bytes.
type memory struct{ rss, hwm, anon, file int64 }

func memoryOf(pid int) (memory, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return memory{}, fmt.Errorf("memory of process %d: %w", pid, err)
	}
	var m memory
	for _, line := range strings.Split(string(b), "\n") {
		k, v, ok := strings.Cut(line, ":")
		if !ok {
			continue
		}
		f := strings.Fields(v)
		if len(f) != 2 || f[1] != "kB" {
			continue
		}
		n, err := strconv.ParseInt(f[0], 10, 64)
		if err != nil {
			continue
		}
		switch k {
		case "VmRSS":
			m.rss = n << 10
		case "VmHWM":
			m.hwm = n << 10
		case "RssAnon":
			m.anon = n << 10
		case "RssFile":
			m.file = n << 10
		}
	}
	if m.rss == 0 {
		return m, fmt.Errorf("memory of process %d: no VmRSS in its status", pid)
	}
	return m, nil
}

// containerdPid finds berth's containerd: the process named containerd
// whose command line names berth's data dir (it runs detached from berth).
func (b *berthDev) containerdPid() int {
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		comm, err := os.ReadFile(fmt.Sprintf("/proc/%d/comm", pid))
		if err != nil || strings.TrimSpace(string(comm)) != "containerd" {
			continue
		}
		cmdline, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
		if err == nil && strings.Contains(string(cmdline), b.l.berthData) {
			return pid
		}
	}
	return 0
}

// Close stops berth dev (SIGTERM) and then, with `berth agent cleanup`,
// its containerd, shims and containers.
func (b *berthDev) Close(ctx context.Context) error {
	var errs []error
	if b.proc != nil {
		select {
		case <-b.exited:
		default:
			_ = b.proc.Process.Signal(syscall.SIGTERM)
			select {
			case <-b.exited:
			case <-time.After(20 * time.Second):
				errs = append(errs, errors.New("berth dev did not stop on SIGTERM; killed"))
				_ = b.proc.Process.Kill()
				<-b.exited
			}
		}
	}
	cctx, cancel := context.WithTimeout(ctx, 90*time.Second)
	defer cancel()
	cmd := exec.CommandContext(cctx, b.bin, "agent", "cleanup", "--data-dir", b.l.berthData)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if out, err := cmd.CombinedOutput(); err != nil {
		errs = append(errs, fmt.Errorf("berth agent cleanup: %v: %s", err, strings.TrimSpace(string(out))))
	}
	return errors.Join(errs...)
}

// etcdDB is the size of the embedded etcd's database file.
func (b *berthDev) etcdDB() int64 {
	fi, err := os.Stat(filepath.Join(b.l.berthData, "etcd", "member", "snap", "db"))
	if err != nil {
		return 0
	}
	return fi.Size()
}
