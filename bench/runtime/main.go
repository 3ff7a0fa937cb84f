// Command runtime measures what berth adds on top of the container runtime
// it drives. In one run it starts and removes the same tiny busybox test
// image (internal/testimage) through four subjects, one after the other in
// every round and in a rotating order, so that machine noise hits all of
// them alike:
//
//   - berth: a `berth dev` (server, embedded etcd and agent in one process),
//     driven through its API: applying a fresh one-replica service and
//     timing until a watch of instances reports the instance running, then
//     removing the service and the instance (rm -f) and timing until the
//     watch has dropped the instance and berth's containerd has deleted the
//     container;
//   - containerd (berth's calls): a second private containerd driven
//     directly through internal/runtime (Create + Start, Remove), i.e. the
//     containerd client calls berth's agent makes, with its hardening
//     (seccomp, capabilities, bind-mounted resolv.conf and hosts, the
//     log collector, a runc root per container);
//   - containerd (raw): the same containerd through plain client calls
//     (NewContainer with snapshot + spec, NewTask with null IO, Start;
//     SIGKILL, task delete, container delete);
//   - runc: `runc run -d` of an OCI bundle prepared once (the image's
//     rootfs, read-only, shared), then `runc state`; `runc kill KILL`, then
//     `runc delete -f` once the process is gone.
//
// It prints create→running and stop→removed p50/p95 per subject, then the
// throughput of starting -parallel containers at once through berth (one
// service with that many replicas) and through bare containerd (that many
// goroutines), the CPU time all this costs per container (cpu.go), and
// berth's overhead over bare containerd in percent.
//
// Every container runs `sh -c 'trap "exit 0" TERM; sleep 1000 & wait'`: a
// `sleep 1000` that ends at once on SIGTERM. berth removes an instance with
// SIGTERM and SIGKILL only after a 10s grace; with this command the grace
// never runs, so all subjects stop with kill semantics (the bare subjects
// send SIGKILL).
//
// It needs root, runc, containerd, ip and nsenter. Everything runs inside a
// network namespace the command makes for itself with only a loopback: the
// command re-executes itself there through nsenter, so that berth,
// containerd, the shims, runc and the containers all start inside it and
// nothing can reach outside the machine. On exit, and on SIGINT or SIGTERM,
// it removes every container, stops the containerds and their shims,
// unmounts what they left, deletes its temporary directory, its cgroups and
// the namespace, and checks that nothing it started is left.
//
// Usage (from the module's root):
//
//	go run ./bench/runtime [-n 30] [-parallel 100] [-warmup 2] [-berth PATH] [-subjects berth,calls,raw,runc]
package main

import (
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/berth-dev/berth/internal/runtime"
)

type options struct {
	n        int
	parallel int
	warmup   int
	berth    string
	timeout  time.Duration
	subjects string // which subjects to measure, comma-separated
}

func main() {
	// The bare containerd's runtime (internal/runtime) runs this binary as
	// its log collector, as berth's runs the berth binary.
	if filepath.Base(os.Args[0]) == runtime.LogdName {
		os.Exit(runtime.RunLogd(os.Args[1:]))
	}
	var o options
	flag.IntVar(&o.n, "n", 30, "samples per subject for the latencies")
	flag.IntVar(&o.parallel, "parallel", 100, "containers started at once for the throughput")
	flag.IntVar(&o.warmup, "warmup", 2, "rounds run first and not counted")
	flag.StringVar(&o.berth, "berth", "", "the berth binary (default: go build ./cmd/berth into a temporary directory)")
	flag.DurationVar(&o.timeout, "timeout", 60*time.Second, "longest wait for one operation")
	flag.StringVar(&o.subjects, "subjects", "berth,none,calls,raw,runc", "the subjects to measure: berth, none (berth, services with networks [\"none\"]), calls (containerd with berth's calls), raw (containerd), runc")
	flag.Usage = func() {
		fmt.Fprintf(flag.CommandLine.Output(), "usage: go run ./bench/runtime [flags]\n\n"+
			"Measures create→running and stop→removed latency and start throughput of\n"+
			"berth against bare containerd and bare runc, inside a private network namespace.\n\n")
		flag.PrintDefaults()
	}
	flag.Parse()
	if o.n < 1 || o.parallel < 1 || o.warmup < 0 {
		fmt.Fprintln(os.Stderr, "bench: -n and -parallel must be at least 1, -warmup at least 0")
		os.Exit(2)
	}
	if ns, work, ok := host.Child(); ok {
		os.Exit(child(o, ns, work))
	}
	os.Exit(parent(o))
}
