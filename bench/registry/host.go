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

// netnsPrefix starts the name of the run's namespace: "berthreg-<pid>".
const netnsPrefix = "berthreg-"

// layout is where one run keeps its files, under the temporary directory.
type layout struct {
	work      string
	berthBin  string
	berthData string // berth dev's data dir (its containerd lives under it)
	archive   string // the test image as an OCI archive
	log       string // berth dev's output
	prefix    string // starts the failover service's name, so its containers and cgroups
}

func layoutFor(work, netns string) layout {
	return layout{
		work:      work,
		berthBin:  filepath.Join(work, "berth"),
		berthData: filepath.Join(work, "berth-data"),
		archive:   filepath.Join(work, "image.tar"),
		log:       filepath.Join(work, "berth-dev.log"),
		// Short enough for a service name (a DNS label) with a suffix,
		// unique among concurrent runs.
		prefix: "rg" + strings.TrimPrefix(netns, netnsPrefix),
	}
}

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
	work, err := os.MkdirTemp("", "berthreg-")
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

	// berth's containerd, if it still runs: remove its containers, stop it
	// and its shims, unmount.
	var runDirs []string
	if p, err := runtime.PathsFor(l.berthData); err == nil {
		runDirs = append(runDirs, filepath.Dir(p.Socket))
		if hostclean.Exists(filepath.Dir(p.Socket)) {
			if err := runtime.Shutdown(ctx, p, log); err != nil {
				fmt.Fprintf(os.Stderr, "bench: sweep: shutdown of berth's containerd: %v\n", err)
			}
		}
	}
	// Processes: whatever is still in the namespace (berth, containerd,
	// shims, loggers, containers: only this run starts processes there)
	// and whatever is in a cgroup of this run's containers.
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
