package main

import (
	"context"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/berth-dev/berth/bench/internal/benchhost"
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
	*benchhost.Dev
	l layout
	c *client.Client // for calls that are not measured
}

// startBerth starts `berth dev` with DNS and waits until it is ready. A
// non-nil berthDev is returned even on error, to be closed.
func startBerth(ctx context.Context, l layout, bin string, timeout time.Duration) (*berthDev, error) {
	d := &benchhost.Dev{
		Bin: bin, Data: l.berthData, API: apiAddr, Args: []string{"--dns-addr", dnsAddr, "--node-name", "node1"},
		Log: l.log, Archive: l.archive, Timeout: timeout,
	}
	err := d.Start(ctx)
	return &berthDev{Dev: d, l: l, c: d.Client}, err
}

// newTransport returns an HTTP transport with its own pool of conns idle
// connections.
func newTransport(conns int) *http.Transport { return benchhost.Transport(conns) }

// tail is the end of the file at path.
func tail(path string) string { return benchhost.Tail(path) }

// pid is berth dev's process id.
func (b *berthDev) pid() int { return b.Pid() }

// alive says whether berth dev still runs.
func (b *berthDev) alive() bool { return b.Alive() }

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

// etcdDB is the size of the embedded etcd's database file.
func (b *berthDev) etcdDB() int64 {
	fi, err := os.Stat(filepath.Join(b.l.berthData, "etcd", "member", "snap", "db"))
	if err != nil {
		return 0
	}
	return fi.Size()
}
