package cli

import (
	"fmt"
	"io"
	"os"
	"runtime/pprof"
	"strconv"
	"strings"
)

// startProfile writes a CPU profile of the whole run to the file named by
// BERTH_CPUPROFILE, and a heap profile at the end to BERTH_HEAPPROFILE, when
// set: diagnostics for benchmarks of the daemons. "%p" in a path becomes
// the process id, for a benchmark that runs several berth processes. The
// returned function ends them.
func startProfile(stderr io.Writer) func() {
	heap := profilePath("BERTH_HEAPPROFILE")
	cpu := startCPUProfile(stderr)
	return func() {
		cpu()
		if heap == "" {
			return
		}
		f, err := os.Create(heap)
		if err != nil {
			fmt.Fprintf(stderr, "berth: BERTH_HEAPPROFILE: %v\n", err)
			return
		}
		defer f.Close()
		if err := pprof.Lookup("heap").WriteTo(f, 0); err != nil {
			fmt.Fprintf(stderr, "berth: BERTH_HEAPPROFILE: %v\n", err)
		}
	}
}

func startCPUProfile(stderr io.Writer) func() {
	path := profilePath("BERTH_CPUPROFILE")
	if path == "" {
		return func() {}
	}
	f, err := os.Create(path)
	if err != nil {
		fmt.Fprintf(stderr, "berth: BERTH_CPUPROFILE: %v\n", err)
		return func() {}
	}
	if err := pprof.StartCPUProfile(f); err != nil {
		fmt.Fprintf(stderr, "berth: BERTH_CPUPROFILE: %v\n", err)
		f.Close()
		return func() {}
	}
	return func() {
		pprof.StopCPUProfile()
		f.Close()
	}
}

func profilePath(env string) string {
	return strings.ReplaceAll(os.Getenv(env), "%p", strconv.Itoa(os.Getpid()))
}
