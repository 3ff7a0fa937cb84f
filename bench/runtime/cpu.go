package main

import (
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// cpuMeter accounts the CPU time the run's processes spend: the child
// moves itself into a cgroup of its own (<prefix>-run, in the cpuacct
// hierarchy of cgroups v1 or in the unified one), so that berth, the
// containerds, the shims, the loggers, runc and the CNI plugins it starts
// are all counted there, dead ones included; the containers themselves
// run in containerd's cgroups (/berth/<id>, every id of the run starting
// with the prefix) and are added from there. The child's own CPU (the
// benchmark driver) is left out.
type cpuMeter struct {
	dir    string // the run's cgroup; "" when accounting is not available
	root   string // the hierarchy the containers' cgroups are in
	prefix string
	v2     bool
}

// cpuSample is one reading of the meter.
type cpuSample struct {
	run, self, containers time.Duration
	procs                 map[int]procCPU
}

// procCPU is one process's CPU: its own, and that of its children it has
// reaped (runc for a shim, the CNI plugins for berth).
type procCPU struct {
	comm          string
	own, children time.Duration
}

// cpuUse is what a phase cost, in total and by part.
type cpuUse struct {
	total time.Duration
	parts map[string]time.Duration
}

// newCPUMeter makes the run's cgroup and moves this process into it; the
// parent's sweep removes the cgroup. On failure the meter measures nothing.
func newCPUMeter(prefix string) (*cpuMeter, error) {
	m := &cpuMeter{prefix: prefix}
	switch {
	case exists("/sys/fs/cgroup/cpuacct/cpuacct.usage"):
		m.root = "/sys/fs/cgroup/cpuacct"
	case exists("/sys/fs/cgroup/cgroup.controllers"):
		m.root, m.v2 = "/sys/fs/cgroup", true
	default:
		return m, fmt.Errorf("no cpuacct or unified cgroup hierarchy")
	}
	dir := filepath.Join(m.root, prefix+"-run")
	if err := os.Mkdir(dir, 0o755); err != nil && !os.IsExist(err) {
		return m, fmt.Errorf("cpu accounting: %w", err)
	}
	if err := os.WriteFile(filepath.Join(dir, "cgroup.procs"), []byte(strconv.Itoa(os.Getpid())), 0o644); err != nil {
		_ = syscall.Rmdir(dir)
		return m, fmt.Errorf("cpu accounting: %w", err)
	}
	m.dir = dir
	return m, nil
}

func exists(p string) bool {
	_, err := os.Stat(p)
	return err == nil
}

// usage reads a cgroup's total CPU time.
func (m *cpuMeter) usage(dir string) time.Duration {
	if !m.v2 {
		b, err := os.ReadFile(filepath.Join(dir, "cpuacct.usage"))
		if err != nil {
			return 0
		}
		ns, _ := strconv.ParseInt(strings.TrimSpace(string(b)), 10, 64)
		return time.Duration(ns)
	}
	b, err := os.ReadFile(filepath.Join(dir, "cpu.stat"))
	if err != nil {
		return 0
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "usage_usec "); ok {
			us, _ := strconv.ParseInt(strings.TrimSpace(v), 10, 64)
			return time.Duration(us) * time.Microsecond
		}
	}
	return 0
}

// sample reads the meter; containers says whether to add up the CPU of
// the run's containers that exist now.
func (m *cpuMeter) sample(containers bool) cpuSample {
	s := cpuSample{procs: map[int]procCPU{}}
	if m.dir == "" {
		return s
	}
	s.run = m.usage(m.dir)
	var ru syscall.Rusage
	if syscall.Getrusage(syscall.RUSAGE_SELF, &ru) == nil {
		s.self = time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
	}
	if b, err := os.ReadFile(filepath.Join(m.dir, "cgroup.procs")); err == nil {
		for _, f := range strings.Fields(string(b)) {
			pid, err := strconv.Atoi(f)
			if err != nil || pid == os.Getpid() {
				continue
			}
			if p, ok := readProcCPU(pid); ok {
				s.procs[pid] = p
			}
		}
	}
	if containers {
		dirs, _ := filepath.Glob(filepath.Join(m.root, "berth", m.prefix+"-*"))
		for _, d := range dirs {
			s.containers += m.usage(d)
		}
	}
	return s
}

// clockTick is USER_HZ, the unit of /proc/<pid>/stat's times.
const clockTick = 10 * time.Millisecond

func readProcCPU(pid int) (procCPU, bool) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return procCPU{}, false
	}
	s := string(b)
	open, closing := strings.IndexByte(s, '('), strings.LastIndexByte(s, ')')
	if open < 0 || closing < open {
		return procCPU{}, false
	}
	// Fields after the command: state is field 3; utime, stime, cutime
	// and cstime are fields 14 to 17.
	f := strings.Fields(s[closing+1:])
	if len(f) < 15 {
		return procCPU{}, false
	}
	n := func(i int) time.Duration {
		v, _ := strconv.ParseInt(f[i-3], 10, 64)
		return time.Duration(v) * clockTick
	}
	return procCPU{comm: s[open+1 : closing], own: n(14) + n(15), children: n(16) + n(17)}, true
}

// since is what happened between a and b (b later).
func (b cpuSample) since(a cpuSample) cpuUse {
	u := cpuUse{parts: map[string]time.Duration{}}
	u.total = (b.run - a.run) - (b.self - a.self) + (b.containers - a.containers)
	if u.total <= 0 {
		return cpuUse{}
	}
	var known time.Duration
	add := func(part string, d time.Duration) {
		if d > 0 {
			u.parts[part] += d
			known += d
		}
	}
	for pid, p := range b.procs {
		q := a.procs[pid] // zero for a process that started since
		if q.comm != p.comm {
			q = procCPU{} // the pid was reused, or the process exec'd since
		}
		own, ch := p.own-q.own, p.children-q.children
		switch {
		case p.comm == "berth":
			add("berth", own)
			add("CNI plugins", ch)
		case p.comm == "containerd":
			add("containerd", own)
			add("shim starts", ch)
		case strings.HasPrefix(p.comm, "containerd-shim"):
			add("shims", own)
			add("runc", ch)
		case strings.HasPrefix(p.comm, "berth-log"):
			add("loggers", own+ch)
		default:
			add("other", own+ch)
		}
	}
	add("containers", b.containers-a.containers)
	if rest := u.total - known; rest > 0 {
		u.parts["unattributed"] += rest
	}
	return u
}

// perContainer formats u spread over n containers: the total, then the
// parts, largest first.
func (u cpuUse) perContainer(n int) string {
	if u.total <= 0 || n <= 0 {
		return "n/a"
	}
	per := func(d time.Duration) string {
		return fmt.Sprintf("%.1f", float64(d)/float64(n)/float64(time.Millisecond))
	}
	names := make([]string, 0, len(u.parts))
	for k := range u.parts {
		names = append(names, k)
	}
	sort.Slice(names, func(i, j int) bool { return u.parts[names[i]] > u.parts[names[j]] })
	var parts []string
	for _, k := range names {
		parts = append(parts, k+" "+per(u.parts[k]))
	}
	return fmt.Sprintf("%s ms (%s)", per(u.total), strings.Join(parts, ", "))
}

// withoutContainers is s with the containers' CPU left out (to measure a
// removal, after which no container is left to read).
func (s cpuSample) withoutContainers() cpuSample {
	s.containers = 0
	return s
}

// plus adds two uses.
func (u cpuUse) plus(v cpuUse) cpuUse {
	out := cpuUse{total: u.total + v.total, parts: map[string]time.Duration{}}
	for k, d := range u.parts {
		out.parts[k] += d
	}
	for k, d := range v.parts {
		out.parts[k] += d
	}
	return out
}
