// Package benchhost is the host side that the benchmark commands running
// berth in network namespaces of their own (bench/registry, bench/runtime,
// bench/network) share:
//
//   - the parent/child pair: the parent checks the host, makes the run's
//     temporary directory, builds berth, makes a namespace and re-executes
//     the command inside it with nsenter, passes signals on to it, and
//     sweeps after it whatever happens (Host, Parent);
//   - the sweep: stopping what a run left running (its containerds, their
//     shims and containers, every process in its namespaces or cgroups),
//     unmounting, deleting its namespaces, cgroups and directories, and
//     saying what is still there (Leftovers);
//   - a `berth dev` the child starts and stops (Dev, Stop).
//
// The primitives underneath (finding processes by namespace or cgroup,
// unmounting, removing cgroups) are in bench/internal/hostclean. Everything
// here is Linux-only and needs root.
package benchhost

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"
)

// Host names a command's runs and says how its parent hands a run to the
// child it re-executes inside the namespace.
type Host struct {
	// Prefix starts the name of the run's temporary directory and of the
	// run itself: Prefix, the parent's PID and Suffix ("berthreg-1234").
	Prefix, Suffix string
	// EnvName and EnvWork are the environment variables in which the
	// parent passes the run's name and its temporary directory.
	EnvName, EnvWork string
}

// Child returns the run's name and temporary directory when this process
// is the child the parent started; ok is false in the parent.
func (h Host) Child() (name, work string, ok bool) {
	name = os.Getenv(h.EnvName)
	return name, os.Getenv(h.EnvWork), name != ""
}

// needs are the programs every run needs on PATH.
var needs = []string{"ip", "nsenter", "runc", "containerd", "containerd-shim-runc-v2"}

// Parent is the parent side of a command: Run does it all.
type Parent struct {
	Host
	// Needs are programs the run needs on PATH besides ip, nsenter,
	// runc, containerd and containerd-shim-runc-v2.
	Needs []string
	// Berth is the berth binary the child is given with -berth; empty,
	// Run builds one into the temporary directory.
	Berth string
	// Netns is the name of the namespace the parent makes and runs the
	// child in, given the run's name; nil: the run's name itself.
	Netns func(name string) string
	// DeathSignal has the child sent SIGTERM should the parent die, so
	// that it cleans up (and sweeps) itself.
	DeathSignal bool
	// Grace is how long the child has to end once a signal was passed on
	// to it before it is killed; zero: 3 minutes.
	Grace time.Duration
	// Sweep removes what the run left once the child has ended, and
	// returns what is still there.
	Sweep func(name, work string) (problems []string)
	// Checked says what a sweep that found nothing left checked, after
	// "bench: cleanup check ok: "; nil: that the namespace is deleted
	// and no process, mount, cgroup or file of the run is left.
	Checked func(name string) string
}

// Run makes the temporary directory, builds berth unless given one, makes
// the namespace, runs the command again inside it (the child) and, once
// it has ended, sweeps and reports whether anything is left. It returns
// the exit code: the child's, or 1 if the sweep found something.
func (p Parent) Run() int {
	if os.Geteuid() != 0 {
		fmt.Fprintln(os.Stderr, "bench: needs root (network namespaces, containerd, runc)")
		return 1
	}
	for _, bin := range append(append([]string(nil), needs...), p.Needs...) {
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
	work, err := os.MkdirTemp("", p.Prefix)
	if err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		return 1
	}
	name := fmt.Sprintf("%s%d%s", p.Prefix, os.Getpid(), p.Suffix)

	sigs := make(chan os.Signal, 4)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM)
	defer signal.Stop(sigs)

	code := p.child(exe, name, work, sigs)

	if problems := p.Sweep(name, work); len(problems) > 0 {
		fmt.Fprintln(os.Stderr, "bench: cleanup check FAILED:")
		for _, pr := range problems {
			fmt.Fprintln(os.Stderr, "  -", pr)
		}
		if code == 0 {
			code = 1
		}
	} else {
		checked := fmt.Sprintf("namespace %s deleted; no process, mount, cgroup or file of the run left", name)
		if p.Checked != nil {
			checked = p.Checked(name)
		}
		fmt.Fprintln(os.Stderr, "bench: cleanup check ok:", checked)
	}
	return code
}

// child builds berth if need be, makes the namespace, runs the child in it
// until it ends, passing signals on, and returns its exit code.
func (p Parent) child(exe, name, work string, sigs <-chan os.Signal) int {
	berthBin, ok := p.berth(work)
	if !ok {
		return 1
	}
	select {
	case s := <-sigs:
		fmt.Fprintf(os.Stderr, "bench: %v before the run started\n", s)
		return 130
	default:
	}
	netns := name
	if p.Netns != nil {
		netns = p.Netns(name)
	}
	if err := AddNetns(netns); err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		return 1
	}
	args := append([]string{"--net=/run/netns/" + netns, "--", exe}, os.Args[1:]...)
	args = append(args, "-berth", berthBin)
	cmd := exec.Command("nsenter", args...)
	cmd.Stdin, cmd.Stdout, cmd.Stderr = nil, os.Stdout, os.Stderr
	cmd.Env = append(os.Environ(), p.EnvName+"="+name, p.EnvWork+"="+work)
	if p.DeathSignal {
		// Should this process be killed, the child cleans up and sweeps.
		cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGTERM}
	}
	if err := cmd.Start(); err != nil {
		fmt.Fprintln(os.Stderr, "bench: start the run in the namespace:", err)
		return 1
	}
	grace := p.Grace
	if grace == 0 {
		grace = 3 * time.Minute
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
				deadline = time.After(grace)
			}
		case <-deadline:
			fmt.Fprintln(os.Stderr, "bench: the run did not end after the signal; killing it")
			_ = cmd.Process.Kill()
			deadline = nil
		}
	}
}

// berth returns the absolute path of the berth binary the run uses,
// building it into work when none was given; false (said) if it cannot.
func (p Parent) berth(work string) (string, bool) {
	if p.Berth != "" {
		bin, err := filepath.Abs(p.Berth)
		if err != nil {
			fmt.Fprintln(os.Stderr, "bench:", err)
			return "", false
		}
		return bin, true
	}
	bin := filepath.Join(work, "berth")
	start := time.Now()
	fmt.Fprintln(os.Stderr, "bench: building berth (go build ./cmd/berth)")
	out, err := exec.Command("go", "build", "-o", bin, "github.com/berth-dev/berth/cmd/berth").CombinedOutput()
	if err != nil {
		fmt.Fprintf(os.Stderr, "bench: build berth (run from the module): %v\n%s", err, out)
		return "", false
	}
	fmt.Fprintf(os.Stderr, "bench: built berth in %v\n", time.Since(start).Round(time.Millisecond))
	return bin, true
}

// AddNetns makes a namespace with an up loopback and nothing else.
func AddNetns(name string) error {
	if out, err := exec.Command("ip", "netns", "add", name).CombinedOutput(); err != nil {
		return fmt.Errorf("ip netns add %s: %v: %s", name, err, strings.TrimSpace(string(out)))
	}
	if out, err := exec.Command("ip", "-n", name, "link", "set", "lo", "up").CombinedOutput(); err != nil {
		return fmt.Errorf("ip -n %s link set lo up: %v: %s", name, err, strings.TrimSpace(string(out)))
	}
	return nil
}
