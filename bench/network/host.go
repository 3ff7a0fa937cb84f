package main

import (
	"fmt"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"github.com/berth-dev/berth/bench/internal/benchhost"
	"github.com/berth-dev/berth/bench/internal/hostclean"
)

// layout is where one run keeps its files, and how it names what it makes.
type layout struct {
	prefix    string // every namespace of the run: "berthnet-<pid>-"
	svcPrefix string // every service, container and cgroup name: "nx<pid>"
	work      string
	dataA     string // berth dev's data dir (node a)
	dataB     string // berth agent's data dir (node b)
	setupData string // the setup benchmark's network.Manager data dir
	setupRun  string // and its run dir (instance namespaces)
	archive   string // the test image as an OCI archive
	logs      string
}

const netnsPrefix = "berthnet-"

// host names the run's namespaces and temporary directory, and hands them
// to the child that runs inside node a's namespace.
var host = benchhost.Host{
	Prefix:  netnsPrefix,
	Suffix:  "-",
	EnvName: "BERTH_NETBENCH_PREFIX",  // the namespaces' name prefix
	EnvWork: "BERTH_NETBENCH_WORKDIR", // the temporary directory the parent made
}

func layoutFor(prefix, work string) layout {
	pid := strings.TrimSuffix(strings.TrimPrefix(prefix, netnsPrefix), "-")
	return layout{
		prefix:    prefix,
		svcPrefix: "nx" + pid,
		work:      work,
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

// parent builds berth, makes the first namespace (node a's), runs itself
// inside it, and sweeps up after it whatever happens.
func parent(o options) int {
	rootLinks := linkNames()
	return benchhost.Parent{
		Host: host, Needs: []string{"iperf3"}, Berth: o.berth, DeathSignal: true, Grace: 2 * time.Minute,
		Netns: func(prefix string) string { return layout{prefix: prefix}.ns("a") },
		Sweep: func(prefix, work string) []string { return sweep(layoutFor(prefix, work), rootLinks) },
		Checked: func(prefix string) string {
			return fmt.Sprintf("no namespace %s*, no new link in the root namespace, no process, mount, cgroup or file of the run left", prefix)
		},
	}.Run()
}

// addNetns makes a namespace with an up loopback and nothing else.
func addNetns(name string) error { return benchhost.AddNetns(name) }

// killInNamespaces kills, by PID, every process in one of the namespaces at
// paths, and returns how many there were.
func killInNamespaces(paths []string) int { return hostclean.KillInNetns(paths) }

// sweep removes whatever the child left (normally nothing: it cleans up
// itself), deletes the namespaces and the temporary directory, and returns
// what is still there afterwards. rootLinks are the links of the root
// namespace before the run (nil: not checked).
func sweep(l layout, rootLinks map[string]bool) []string {
	return benchhost.Leftovers{
		Work: l.work, Data: []string{l.dataA, l.dataB}, Cgroup: l.svcPrefix,
		Netns:     func(name string) bool { return strings.HasPrefix(name, l.prefix) },
		NetnsDirs: []string{l.setupRun},
		Check: func() []string {
			if rootLinks == nil {
				return nil // not run from the root namespace: nothing to compare
			}
			var added []string
			for n := range linkNames() {
				if !rootLinks[n] {
					added = append(added, n)
				}
			}
			if len(added) == 0 {
				return nil
			}
			sort.Strings(added)
			return []string{fmt.Sprintf("links in the root namespace that were not there before: %v", added)}
		},
	}.Sweep()
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
