package main

import (
	"path/filepath"
	"strings"

	"github.com/berth-dev/berth/bench/internal/benchhost"
)

// netnsPrefix starts the name of the run's namespace: "berthreg-<pid>".
const netnsPrefix = "berthreg-"

// host names the run's namespace and temporary directory, and hands them
// to the child that runs inside the namespace.
var host = benchhost.Host{
	Prefix:  netnsPrefix,
	EnvName: "BERTH_REGBENCH_NETNS",   // the namespace's name
	EnvWork: "BERTH_REGBENCH_WORKDIR", // the temporary directory the parent made
}

// layout is where one run keeps its files, under the temporary directory.
type layout struct {
	work      string
	berthData string // berth dev's data dir (its containerd lives under it)
	archive   string // the test image as an OCI archive
	log       string // berth dev's output
	prefix    string // starts the failover service's name, so its containers and cgroups
}

func layoutFor(work, netns string) layout {
	return layout{
		work:      work,
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
	return benchhost.Parent{
		Host: host, Berth: o.berth, DeathSignal: true,
		Sweep: func(netns, work string) []string { return sweep(layoutFor(work, netns), netns) },
	}.Run()
}

// sweep removes whatever the child left (normally nothing: it cleans up
// itself), deletes the namespace and the temporary directory, and returns
// what is still there afterwards.
func sweep(l layout, netns string) []string {
	return benchhost.Leftovers{
		Work: l.work, Data: []string{l.berthData}, Cgroup: l.prefix,
		Netns: func(name string) bool { return name == netns },
	}.Sweep()
}
