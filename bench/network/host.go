package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"time"

	"github.com/berth-dev/berth/bench/internal/hostclean"
	"github.com/berth-dev/berth/internal/runtime"
)

// layout is where one run keeps its files, and how it names what it makes.
type layout struct {
	prefix    string // every namespace of the run: "berthnet-<pid>-"
	svcPrefix string // every service, container and cgroup name: "nx<pid>"
	work      string
	berthBin  string
	dataA     string // berth dev's data dir (node a)
	dataB     string // berth agent's data dir (node b)
	setupData string // the setup benchmark's network.Manager data dir
	setupRun  string // and its run dir (instance namespaces)
	archive   string // the test image as an OCI archive
	logs      string
}

const netnsPrefix = "berthnet-"

func layoutFor(prefix, work string) layout {
	pid := strings.TrimSuffix(strings.TrimPrefix(prefix, netnsPrefix), "-")
	return layout{
		prefix:    prefix,
		svcPrefix: "nx" + pid,
		work:      work,
		berthBin:  filepath.Join(work, "berth"),
		dataA:     filepath.Join(work, "node-a"),
		dataB:     filepath.Join(work, "node-b"),
		setupData: filepath.Join(work, "setup-data"),
		setupRun:  filepath.Join(work, "setup-run"),
		archive:   filepath.Join(work, "image.tar"),
		logs:      filepath.Join(work, "logs"),
	}
}

// ns is the name of one of the run's namespaces; nsPath its bind mount.
func (l layout) ns(suffix string) string     { return l.prefix + suffix }
func (l layout) nsPath(suffix string) string { return "/run/netns/" + l.ns(suffix) }

// runDirs are the volatile directories of both berth nodes' runtimes
// (/run/berth-<hash>), where their instances' namespaces are mounted.
func (l layout) runDirs() []string {
	var out []string
	for _, d := range []string{l.dataA, l.dataB} {
		if p, err := runtime.PathsFor(d); err == nil {
			out = append(out, filepath.Dir(p.Socket))
		}
	}
	return out
}

// parent builds berth, makes the first namespace (node a's), runs itself
// inside it, and sweeps up after it whatever happens.
func parent(o options) int {
	if os.Geteuid() != 0 {
		fmt.Fprintln(os.Stderr, "bench: needs root (network namespaces, containerd, runc)")
		return 1
	}
	for _, bin := range []string{"ip", "nsenter", "iperf3", "runc", "containerd", "containerd-shim-runc-v2"} {
		if _, err := exec.LookPath(bin); err != nil {
			fmt.Fprintf(os.Stderr, "bench: %s not found: %v\n", bin, err)
			return 1
		}
	}
	exe, err := os.Executable()
	if err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		return 1
	}
	work, err := os.MkdirTemp("", "berthnet-")
	if err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		return 1
	}
	l := layoutFor(fmt.Sprintf("%s%d-", netnsPrefix, os.Getpid()), work)
	rootLinks := linkNames()

	sigs := make(chan os.Signal, 4)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM)
	defer signal.Stop(sigs)

	code := func() int {
		berthBin := o.berth
		if berthBin == "" {
			start := time.Now()
			fmt.Fprintln(os.Stderr, "bench: building berth (go build ./cmd/berth)")
			out, err := exec.Command("go", "build", "-o", l.berthBin, "github.com/berth-dev/berth/cmd/berth").CombinedOutput()
			if err != nil {
				fmt.Fprintf(os.Stderr, "bench: build berth (run from the module): %v\n%s", err, out)
				return 1
			}
			fmt.Fprintf(os.Stderr, "bench: built berth in %v\n", time.Since(start).Round(time.Millisecond))
			berthBin = l.berthBin
		} else if berthBin, err = filepath.Abs(berthBin); err != nil {
			fmt.Fprintln(os.Stderr, "bench:", err)
			return 1
		}
		select {
		case s := <-sigs:
			fmt.Fprintf(os.Stderr, "bench: %v before the run started\n", s)
			return 130
		default:
		}
		if err := addNetns(l.ns("a")); err != nil {
			fmt.Fprintln(os.Stderr, "bench:", err)
			return 1
		}
		args := append([]string{"--net=" + l.nsPath("a"), "--", exe}, os.Args[1:]...)
		args = append(args, "-berth", berthBin)
		cmd := exec.Command("nsenter", args...)
		cmd.Stdin, cmd.Stdout, cmd.Stderr = nil, os.Stdout, os.Stderr
		cmd.Env = append(os.Environ(), envPrefix+"="+l.prefix, envWork+"="+work)
		// Should this process be killed, the child cleans up and sweeps.
		cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGTERM}
		if err := cmd.Start(); err != nil {
			fmt.Fprintln(os.Stderr, "bench: start the run in the namespace:", err)
			return 1
		}
		done := make(chan error, 1)
		go func() { done <- cmd.Wait() }()
		var deadline <-chan time.Time
		for {
			select {
			case err := <-done:
				var ee *exec.ExitError
				if errors.As(err, &ee) {
					if ee.ExitCode() < 0 {
						fmt.Fprintf(os.Stderr, "bench: the run ended: %v\n", err)
						return 1
					}
					return ee.ExitCode()
				}
				if err != nil {
					fmt.Fprintln(os.Stderr, "bench:", err)
					return 1
				}
				return 0
			case s := <-sigs:
				// A terminal's Ctrl-C reaches the child too; a kill of this
				// process alone is passed on. The child cleans up and exits.
				_ = cmd.Process.Signal(s)
				if deadline == nil {
					deadline = time.After(2 * time.Minute)
				}
			case <-deadline:
				fmt.Fprintln(os.Stderr, "bench: the run did not end after the signal; killing it")
				_ = cmd.Process.Kill()
				deadline = nil
			}
		}
	}()

	if problems := sweep(l, rootLinks); len(problems) > 0 {
		fmt.Fprintln(os.Stderr, "bench: cleanup check FAILED:")
		for _, p := range problems {
			fmt.Fprintln(os.Stderr, "  -", p)
		}
		if code == 0 {
			code = 1
		}
	} else {
		fmt.Fprintf(os.Stderr, "bench: cleanup check ok: no namespace %s*, no new link in the root namespace, no process, mount, cgroup or file of the run left\n", l.prefix)
	}
	return code
}

// addNetns makes a namespace with an up loopback and nothing else.
func addNetns(name string) error {
	if out, err := exec.Command("ip", "netns", "add", name).CombinedOutput(); err != nil {
		return fmt.Errorf("ip netns add %s: %v: %s", name, err, strings.TrimSpace(string(out)))
	}
	if out, err := exec.Command("ip", "-n", name, "link", "set", "lo", "up").CombinedOutput(); err != nil {
		return fmt.Errorf("ip -n %s link set lo up: %v: %s", name, err, strings.TrimSpace(string(out)))
	}
	return nil
}

// runNamespaces lists the run's namespaces that exist.
func runNamespaces(prefix string) []string {
	ents, _ := os.ReadDir("/run/netns")
	var out []string
	for _, e := range ents {
		if strings.HasPrefix(e.Name(), prefix) {
			out = append(out, e.Name())
		}
	}
	sort.Strings(out)
	return out
}

// instanceNamespaces lists the namespace files mounted for instances under
// dirs (berth's run dirs and the setup benchmark's).
func instanceNamespaces(dirs []string) []string {
	var out []string
	for _, d := range dirs {
		ents, _ := os.ReadDir(filepath.Join(d, "netns"))
		for _, e := range ents {
			out = append(out, filepath.Join(d, "netns", e.Name()))
		}
	}
	return out
}

// killInNamespaces kills, by PID, every process in one of the namespaces at
// paths, and returns how many there were.
func killInNamespaces(paths []string) int {
	n := 0
	for _, p := range paths {
		id, ok := hostclean.Inode(p)
		if !ok {
			continue
		}
		for _, pid := range hostclean.NetnsProcs(id) {
			_ = syscall.Kill(pid, syscall.SIGKILL)
			n++
		}
	}
	return n
}

// sweep removes whatever the child left (normally nothing: it cleans up
// itself), deletes the namespaces and the temporary directory, and returns
// what is still there afterwards. rootLinks are the links of the root
// namespace before the run (nil: not checked).
func sweep(l layout, rootLinks map[string]bool) []string {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	runDirs := l.runDirs()
	nsDirs := append(append([]string(nil), runDirs...), l.setupRun)

	// berth's containerds that still run: remove their containers, stop
	// them and their shims, unmount.
	for _, d := range []string{l.dataA, l.dataB} {
		p, err := runtime.PathsFor(d)
		if err != nil || !hostclean.Exists(filepath.Dir(p.Socket)) {
			continue
		}
		if err := runtime.Shutdown(ctx, p, log); err != nil {
			fmt.Fprintf(os.Stderr, "bench: sweep: shutdown of the containerd of %s: %v\n", d, err)
		}
	}
	// Processes: whatever is still in one of the run's namespaces (only
	// this run starts processes there) or in a cgroup of its containers.
	var paths []string
	for _, n := range runNamespaces(l.prefix) {
		paths = append(paths, "/run/netns/"+n)
	}
	paths = append(paths, instanceNamespaces(nsDirs)...)
	killInNamespaces(paths)
	for _, pid := range hostclean.CgroupProcs(l.svcPrefix) {
		_ = syscall.Kill(pid, syscall.SIGKILL)
	}
	hostclean.WaitGone(func() bool {
		for _, p := range paths {
			if id, ok := hostclean.Inode(p); ok && len(hostclean.NetnsProcs(id)) > 0 {
				return false
			}
		}
		return len(hostclean.CgroupProcs(l.svcPrefix)) == 0
	}, 10*time.Second)
	for _, d := range append([]string{l.work}, runDirs...) {
		if err := hostclean.UnmountUnder(d); err != nil {
			fmt.Fprintf(os.Stderr, "bench: sweep: %v\n", err)
		}
	}
	hostclean.RemoveCgroups(l.svcPrefix)

	var problems []string
	for _, n := range runNamespaces(l.prefix) {
		if id, ok := hostclean.Inode("/run/netns/" + n); ok {
			if pids := hostclean.NetnsProcs(id); len(pids) > 0 {
				problems = append(problems, fmt.Sprintf("processes still in namespace %s: %v", n, pids))
			}
		}
		if out, err := exec.Command("ip", "netns", "delete", n).CombinedOutput(); err != nil {
			problems = append(problems, fmt.Sprintf("ip netns delete %s: %v %s", n, err, strings.TrimSpace(string(out))))
		}
	}
	if left := runNamespaces(l.prefix); len(left) > 0 {
		problems = append(problems, fmt.Sprintf("namespaces left: %v", left))
	}
	if out, _ := exec.Command("ip", "netns", "list").Output(); strings.Contains(string(out), l.prefix) {
		problems = append(problems, "namespaces still listed by ip netns list: "+strings.TrimSpace(string(out)))
	}
	var added []string
	for n := range linkNames() {
		if rootLinks == nil {
			break // not run from the root namespace: nothing to compare
		}
		if !rootLinks[n] {
			added = append(added, n)
		}
	}
	if len(added) > 0 {
		sort.Strings(added)
		problems = append(problems, fmt.Sprintf("links in the root namespace that were not there before: %v", added))
	}
	if pids := hostclean.CgroupProcs(l.svcPrefix); len(pids) > 0 {
		problems = append(problems, fmt.Sprintf("container processes left: %v", pids))
	}
	if dirs := hostclean.CgroupDirs(l.svcPrefix); len(dirs) > 0 {
		problems = append(problems, fmt.Sprintf("cgroups left: %v", dirs))
	}
	markers := append([]string{l.work}, runDirs...)
	if pids := hostclean.ProcsMentioning(markers); len(pids) > 0 {
		problems = append(problems, fmt.Sprintf("processes of the run left: %v", pids))
	}
	if m := hostclean.MountsUnder(markers); len(m) > 0 {
		problems = append(problems, fmt.Sprintf("mounts left: %v", m))
	}
	for _, d := range append([]string{l.work}, runDirs...) {
		if err := os.RemoveAll(d); err != nil {
			problems = append(problems, fmt.Sprintf("remove %s: %v", d, err))
		}
	}
	return problems
}

// linkNames lists the links of the calling process's network namespace.
func linkNames() map[string]bool {
	out, _ := exec.Command("ip", "-o", "link", "show").Output()
	names := map[string]bool{}
	for _, line := range strings.Split(string(out), "\n") {
		f := strings.Fields(line)
		if len(f) < 2 {
			continue
		}
		name, _, _ := strings.Cut(strings.TrimSuffix(f[1], ":"), "@")
		names[name] = true
	}
	return names
}
