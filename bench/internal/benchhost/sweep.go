package benchhost

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"time"

	"github.com/berth-dev/berth/bench/internal/hostclean"
	"github.com/berth-dev/berth/internal/runtime"
)

// Leftovers says where to look for what one run may have left on the host.
type Leftovers struct {
	// Work is the run's temporary directory.
	Work string
	// Data are the data directories of the containerds the run starts
	// (berth's or its own, laid out by internal/runtime); their volatile
	// run directories (/run/berth-<hash>) are the run's too.
	Data []string
	// Cgroup starts the names of the run's containers and so of their
	// cgroups (hostclean.CgroupProcs).
	Cgroup string
	// Netns says whether a namespace of /run/netns is one of the run's.
	Netns func(name string) bool
	// NetnsDirs are more directories whose netns subdirectory holds
	// namespace files of the run's instances, besides the containerds'
	// run directories.
	NetnsDirs []string
	// Stop, if set, stops what else the run may have left running; it is
	// called after the containerds are shut down, before the kill.
	Stop func(ctx context.Context)
	// Check, if set, returns what else is left, after the namespaces are
	// deleted.
	Check func() (problems []string)
}

// Sweep removes whatever the run left (normally nothing: the child cleans
// up itself): it shuts the containerds down with their shims and
// containers, kills, by PID, every process still in one of the run's
// namespaces or cgroups, unmounts what is left under its directories,
// removes its cgroups, deletes its namespaces and its directories. It
// returns what is still there afterwards.
func (r Leftovers) Sweep() []string {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	log := slog.New(slog.NewTextHandler(io.Discard, nil))

	// Containerds that still run: remove their containers, stop them and
	// their shims, unmount.
	var runDirs []string
	for _, d := range r.Data {
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
	if r.Stop != nil {
		r.Stop(ctx)
	}
	// Processes: whatever is still in one of the run's namespaces (only
	// the run starts processes there: berth, containerd, shims, loggers,
	// containers) or in a cgroup of its containers.
	var paths []string
	for _, n := range r.namespaces() {
		paths = append(paths, "/run/netns/"+n)
	}
	for _, d := range append(append([]string(nil), runDirs...), r.NetnsDirs...) {
		ents, _ := os.ReadDir(filepath.Join(d, "netns"))
		for _, e := range ents {
			paths = append(paths, filepath.Join(d, "netns", e.Name()))
		}
	}
	var ids []hostclean.NSID
	for _, p := range paths {
		if id, ok := hostclean.Inode(p); ok {
			ids = append(ids, id)
		}
	}
	hostclean.KillInNetns(paths)
	for _, pid := range hostclean.CgroupProcs(r.Cgroup) {
		_ = syscall.Kill(pid, syscall.SIGKILL)
	}
	hostclean.WaitGone(func() bool {
		for _, id := range ids {
			if len(hostclean.NetnsProcs(id)) > 0 {
				return false
			}
		}
		return len(hostclean.CgroupProcs(r.Cgroup)) == 0
	}, 10*time.Second)
	dirs := append([]string{r.Work}, runDirs...)
	for _, d := range dirs {
		if err := hostclean.UnmountUnder(d); err != nil {
			fmt.Fprintf(os.Stderr, "bench: sweep: %v\n", err)
		}
	}
	hostclean.RemoveCgroups(r.Cgroup)

	var problems []string
	for _, n := range r.namespaces() {
		if id, ok := hostclean.Inode("/run/netns/" + n); ok {
			if pids := hostclean.NetnsProcs(id); len(pids) > 0 {
				problems = append(problems, fmt.Sprintf("processes still in namespace %s: %v", n, pids))
			}
		}
		if out, err := exec.Command("ip", "netns", "delete", n).CombinedOutput(); err != nil {
			problems = append(problems, fmt.Sprintf("ip netns delete %s: %v %s", n, err, strings.TrimSpace(string(out))))
		}
	}
	if left := r.namespaces(); len(left) > 0 {
		problems = append(problems, fmt.Sprintf("namespaces left: %v", left))
	}
	out, _ := exec.Command("ip", "netns", "list").Output()
	var listed []string
	for _, f := range strings.Fields(string(out)) {
		if r.Netns(f) {
			listed = append(listed, f)
		}
	}
	if len(listed) > 0 {
		problems = append(problems, fmt.Sprintf("namespaces still listed by ip netns list: %v", listed))
	}
	if r.Check != nil {
		problems = append(problems, r.Check()...)
	}
	if pids := hostclean.CgroupProcs(r.Cgroup); len(pids) > 0 {
		problems = append(problems, fmt.Sprintf("container processes left: %v", pids))
	}
	if cgs := hostclean.CgroupDirs(r.Cgroup); len(cgs) > 0 {
		problems = append(problems, fmt.Sprintf("cgroups left: %v", cgs))
	}
	if pids := hostclean.ProcsMentioning(dirs); len(pids) > 0 {
		problems = append(problems, fmt.Sprintf("processes of the run left: %v", pids))
	}
	if m := hostclean.MountsUnder(dirs); len(m) > 0 {
		problems = append(problems, fmt.Sprintf("mounts left: %v", m))
	}
	for _, d := range dirs {
		if err := os.RemoveAll(d); err != nil {
			problems = append(problems, fmt.Sprintf("remove %s: %v", d, err))
		}
	}
	return problems
}

// namespaces lists the run's namespaces under /run/netns, sorted.
func (r Leftovers) namespaces() []string {
	ents, _ := os.ReadDir("/run/netns")
	var out []string
	for _, e := range ents {
		if r.Netns(e.Name()) {
			out = append(out, e.Name())
		}
	}
	sort.Strings(out)
	return out
}
