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
	"strings"
	"syscall"
	"time"

	"github.com/berth-dev/berth/bench/internal/hostclean"
	"github.com/berth-dev/berth/internal/runtime"
)

// layout is where one run keeps its files, under the temporary directory.
type layout struct {
	work      string
	berthBin  string
	berthData string // berth dev's data dir (its containerd lives under it)
	ctdData   string // the bare containerd's data dir
	runcRoot  string // runc --root of the runc subject
	bundle    string // the runc subject's OCI bundle
	archive   string // the test image as an OCI archive
	prefix    string // starts every service, container and cgroup name of this run
}

func layoutFor(work, netns string) layout {
	// The namespace is "berthbench-<pid>": the prefix is "bx<pid>", short
	// enough for service names (DNS labels) and unique among concurrent runs.
	prefix := "bx" + strings.TrimPrefix(netns, netnsPrefix)
	return layout{
		work:      work,
		berthBin:  filepath.Join(work, "berth"),
		berthData: filepath.Join(work, "berth-data"),
		ctdData:   filepath.Join(work, "ctd-data"),
		runcRoot:  filepath.Join(work, "runc-root"),
		bundle:    filepath.Join(work, "bundle"),
		archive:   filepath.Join(work, "image.tar"),
		prefix:    prefix,
	}
}

const netnsPrefix = "berthbench-"

// parent makes the namespace and the temporary directory, builds berth,
// runs itself inside the namespace, and cleans up after it whatever happens.
func parent(o options) int {
	if os.Geteuid() != 0 {
		fmt.Fprintln(os.Stderr, "bench: needs root (network namespaces, containerd, runc)")
		return 1
	}
	for _, bin := range []string{"ip", "nsenter", "runc", "containerd", "containerd-shim-runc-v2"} {
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
	work, err := os.MkdirTemp("", "berthbench-")
	if err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		return 1
	}
	netns := fmt.Sprintf("%s%d", netnsPrefix, os.Getpid())
	l := layoutFor(work, netns)

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
		if out, err := exec.Command("ip", "netns", "add", netns).CombinedOutput(); err != nil {
			fmt.Fprintf(os.Stderr, "bench: ip netns add %s: %v\n%s", netns, err, out)
			return 1
		}
		if out, err := exec.Command("ip", "-n", netns, "link", "set", "lo", "up").CombinedOutput(); err != nil {
			fmt.Fprintf(os.Stderr, "bench: ip -n %s link set lo up: %v\n%s", netns, err, out)
			return 1
		}
		args := append([]string{"--net=/run/netns/" + netns, "--", exe}, os.Args[1:]...)
		args = append(args, "-berth", berthBin)
		cmd := exec.Command("nsenter", args...)
		cmd.Stdin, cmd.Stdout, cmd.Stderr = nil, os.Stdout, os.Stderr
		cmd.Env = append(os.Environ(), envNetns+"="+netns, envWork+"="+work)
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
					deadline = time.After(3 * time.Minute)
				}
			case <-deadline:
				fmt.Fprintln(os.Stderr, "bench: the run did not end after the signal; killing it")
				_ = cmd.Process.Kill()
				deadline = nil
			}
		}
	}()

	if problems := sweep(l, netns); len(problems) > 0 {
		fmt.Fprintln(os.Stderr, "bench: cleanup check FAILED:")
		for _, p := range problems {
			fmt.Fprintln(os.Stderr, "  -", p)
		}
		if code == 0 {
			code = 1
		}
	} else {
		fmt.Fprintf(os.Stderr, "bench: cleanup check ok: namespace %s deleted; no process, mount, cgroup or file of the run left\n", netns)
	}
	return code
}

// sweep removes whatever the child left (normally nothing: it cleans up
// itself), deletes the namespace and the temporary directory, and returns
// what is still there afterwards.
func sweep(l layout, netns string) []string {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	nsPath := "/run/netns/" + netns
	nsIno, nsOK := hostclean.Inode(nsPath)

	// Containerds that still run: remove their containers, stop them and
	// their shims, unmount.
	var runDirs []string
	for _, d := range []string{l.berthData, l.ctdData} {
		p, err := runtime.PathsFor(d)
		if err != nil {
			continue
		}
		runDirs = append(runDirs, filepath.Dir(p.Socket))
		if hostclean.Exists(filepath.Dir(p.Socket)) {
			if err := runtime.Shutdown(ctx, p, log); err != nil {
				fmt.Fprintf(os.Stderr, "bench: sweep: shutdown of the containerd of %s: %v\n", d, err)
			}
		}
	}
	runcLeftovers(ctx, l.runcRoot)
	// Processes: whatever is still in the namespace (berth, containerd,
	// shims, loggers: only this run starts processes there) and whatever
	// is in a cgroup of this run's containers.
	if nsOK {
		for _, pid := range hostclean.NetnsProcs(nsIno) {
			_ = syscall.Kill(pid, syscall.SIGKILL)
		}
	}
	for _, pid := range hostclean.CgroupProcs(l.prefix) {
		_ = syscall.Kill(pid, syscall.SIGKILL)
	}
	hostclean.WaitGone(func() bool {
		return (!nsOK || len(hostclean.NetnsProcs(nsIno)) == 0) && len(hostclean.CgroupProcs(l.prefix)) == 0
	}, 10*time.Second)
	for _, d := range append([]string{l.work}, runDirs...) {
		if err := hostclean.UnmountUnder(d); err != nil {
			fmt.Fprintf(os.Stderr, "bench: sweep: %v\n", err)
		}
	}
	hostclean.RemoveCgroups(l.prefix)

	var problems []string
	if nsOK {
		if pids := hostclean.NetnsProcs(nsIno); len(pids) > 0 {
			problems = append(problems, fmt.Sprintf("processes still in namespace %s: %v", netns, pids))
		}
	}
	if hostclean.Exists(nsPath) {
		if out, err := exec.Command("ip", "netns", "delete", netns).CombinedOutput(); err != nil {
			problems = append(problems, fmt.Sprintf("ip netns delete %s: %v %s", netns, err, strings.TrimSpace(string(out))))
		}
	}
	if out, _ := exec.Command("ip", "netns", "list").Output(); containsWord(string(out), netns) {
		problems = append(problems, "namespace still listed by ip netns list: "+netns)
	}
	if pids := hostclean.CgroupProcs(l.prefix); len(pids) > 0 {
		problems = append(problems, fmt.Sprintf("container processes left: %v", pids))
	}
	if dirs := hostclean.CgroupDirs(l.prefix); len(dirs) > 0 {
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

func containsWord(s, w string) bool {
	for _, f := range strings.Fields(s) {
		if f == w {
			return true
		}
	}
	return false
}

// runcLeftovers force-deletes every container left in a runc root.
func runcLeftovers(ctx context.Context, root string) {
	ents, err := os.ReadDir(root)
	if err != nil {
		return
	}
	for _, e := range ents {
		if !e.IsDir() {
			continue
		}
		cctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		out, err := exec.CommandContext(cctx, "runc", "--root", root, "delete", "-f", e.Name()).CombinedOutput()
		cancel()
		if err != nil {
			fmt.Fprintf(os.Stderr, "bench: runc delete -f %s: %v %s\n", e.Name(), err, strings.TrimSpace(string(out)))
		}
	}
}
