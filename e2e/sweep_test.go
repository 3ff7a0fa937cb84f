package e2e

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
)

// sweepStaleNodes stops and removes what an earlier, killed test run left
// of the berth nodes it started: a test binary killed before its cleanups
// leaves each node's data dir under /tmp/Test*/ and, beside it, the node's
// run directory with its mounts and the containers' cgroups. (Its processes
// were in its test hosts' namespaces, which testhost.Sweep has killed.) A
// data dir still named on a live process's command line belongs to a run
// in progress and is left alone.
func sweepStaleNodes() {
	dirs, _ := filepath.Glob(filepath.Join(os.TempDir(), "Test*", "[0-9][0-9][0-9]"))
	var stale []string
	for _, d := range dirs {
		if !isDir(filepath.Join(d, "containerd")) || !isDir(filepath.Join(d, "etcd")) {
			continue
		}
		if usedByLiveProcess(d) {
			continue
		}
		stale = append(stale, d)
	}
	for _, d := range stale {
		out, err := exec.Command(berthBin, "agent", "cleanup", "--data-dir", d).CombinedOutput()
		if err != nil {
			fmt.Fprintf(os.Stderr, "e2e: sweep: berth agent cleanup --data-dir %s: %v\n%s", d, err, out)
			continue
		}
		_ = os.RemoveAll(filepath.Dir(d))
		fmt.Fprintf(os.Stderr, "e2e: sweep: removed the node left in %s by an earlier run\n", d)
	}
}

func isDir(p string) bool {
	st, err := os.Stat(p)
	return err == nil && st.IsDir()
}

// usedByLiveProcess reports whether a live (not zombie) process names dir
// on its command line.
func usedByLiveProcess(dir string) bool {
	procs, _ := filepath.Glob("/proc/[0-9]*")
	for _, p := range procs {
		stat, err := os.ReadFile(filepath.Join(p, "stat"))
		if err != nil {
			continue
		}
		if i := strings.LastIndexByte(string(stat), ')'); i >= 0 && i+2 < len(stat) && stat[i+2] == 'Z' {
			continue
		}
		cmd, err := os.ReadFile(filepath.Join(p, "cmdline"))
		if err != nil {
			continue
		}
		for _, a := range strings.Split(string(cmd), "\x00") {
			if a == dir || strings.HasPrefix(a, dir+"/") {
				return true
			}
		}
	}
	return false
}
