package main

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"github.com/berth-dev/berth/bench/internal/benchhost"
)

// layout is where one run keeps its files, under the temporary directory.
type layout struct {
	work      string
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
		berthData: filepath.Join(work, "berth-data"),
		ctdData:   filepath.Join(work, "ctd-data"),
		runcRoot:  filepath.Join(work, "runc-root"),
		bundle:    filepath.Join(work, "bundle"),
		archive:   filepath.Join(work, "image.tar"),
		prefix:    prefix,
	}
}

const netnsPrefix = "berthbench-"

// host names the run's namespace and temporary directory, and hands them
// to the child that runs inside the namespace.
var host = benchhost.Host{
	Prefix:  netnsPrefix,
	EnvName: "BERTH_BENCH_NETNS",   // the namespace's name
	EnvWork: "BERTH_BENCH_WORKDIR", // the temporary directory the parent made
}

// parent makes the namespace and the temporary directory, builds berth,
// runs itself inside the namespace, and cleans up after it whatever happens.
func parent(o options) int {
	return benchhost.Parent{
		Host: host, Berth: o.berth,
		Sweep: func(netns, work string) []string { return sweep(layoutFor(work, netns), netns) },
	}.Run()
}

// sweep removes whatever the child left (normally nothing: it cleans up
// itself), deletes the namespace and the temporary directory, and returns
// what is still there afterwards.
func sweep(l layout, netns string) []string {
	return benchhost.Leftovers{
		Work: l.work, Data: []string{l.berthData, l.ctdData}, Cgroup: l.prefix,
		Netns: func(name string) bool { return name == netns },
		Stop:  func(ctx context.Context) { runcLeftovers(ctx, l.runcRoot) },
	}.Sweep()
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
