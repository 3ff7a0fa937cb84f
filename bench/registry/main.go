// Command registry measures berth's service registry and discovery, end to
// end, against a real `berth dev` (server, embedded etcd and agent in one
// process) started with its data in a temporary directory and its DNS on the
// loopback of a network namespace the command makes for itself. In one run it
// measures:
//
//  1. registrations per second through the API (PUT
//     /v1/registry/services/{name}/instances/{id}, the client's Register):
//     10,000 instances of 100 services with 1 client, then, after
//     deregistering those, 10,000 fresh ones with 32 concurrent clients;
//  2. discovery reads per second and their latency: 32 concurrent clients
//     doing GET /v1/discovery/{name}?healthy=1 over the 100 services;
//  3. watch propagation: from a registration write acknowledged to each of
//     1, then 1,000, discovery watch streams of one service receiving it;
//  4. DNS queries per second and latency against berth's DNS server, from
//     32 concurrent UDP clients (miekg/dns), A for NAME.svc.berth over the
//     100 services and a few SRV;
//  5. failover: a service of 3 busybox httpd replicas (the test image of
//     internal/testimage) with an HTTP check; 50 times, SIGKILL the process
//     of one instance and time until it is gone from a discovery watch
//     stream, from GET /v1/discovery/{name}?healthy=1 and from DNS A
//     answers;
//  6. the memory (VmRSS, VmHWM) of the berth process with the 10,000
//     registrations in place.
//
// Each figure is printed beside its goal and beside what Consul 1.22 was
// measured to do on this kind of machine.
//
// It needs root, runc, containerd, ip and nsenter. Everything runs inside a
// network namespace the command makes (loopback only, no route out): the
// command builds berth, creates the namespace and re-executes itself there
// through nsenter, so berth, its containerd, the shims, the containers and
// every load generator run inside it. On exit, and on SIGINT or SIGTERM, it
// stops berth, removes the containers, berth's containerd and shims
// (`berth agent cleanup`), unmounts what is left, deletes its temporary
// directory, its cgroups and the namespace, and checks that nothing it
// started is left.
//
// Usage (from the module's root, as root):
//
//	go run ./bench/registry [-berth PATH] [-instances 10000] [-services 100] [-clients 32] ...
package main

import (
	"flag"
	"fmt"
	"os"
	"time"
)

type options struct {
	berth     string
	instances int
	services  int
	clients   int
	readFor   time.Duration
	dnsFor    time.Duration
	changes   int
	watchers  int
	watchFor  time.Duration
	kills     int
	replicas  int
	timeout   time.Duration
}

func main() {
	var o options
	flag.StringVar(&o.berth, "berth", "", "the berth binary (default: go build ./cmd/berth into a temporary directory)")
	flag.IntVar(&o.instances, "instances", 10000, "registrations (instances) in the registry")
	flag.IntVar(&o.services, "services", 100, "services the registrations are spread over")
	flag.IntVar(&o.clients, "clients", 32, "concurrent clients of the registration, discovery and DNS loads")
	flag.DurationVar(&o.readFor, "read-for", 5*time.Second, "how long the discovery read load is measured")
	flag.DurationVar(&o.dnsFor, "dns-for", 5*time.Second, "how long the DNS load is measured")
	flag.IntVar(&o.changes, "changes", 200, "registration changes timed by the watch propagation phases")
	flag.IntVar(&o.watchers, "watchers", 1000, "watch streams of the second watch propagation phase")
	flag.DurationVar(&o.watchFor, "watch-for", time.Minute, "longest time one watch propagation phase may take (it then stops with fewer changes)")
	flag.IntVar(&o.kills, "kills", 50, "instances killed by the failover phase")
	flag.IntVar(&o.replicas, "replicas", 3, "replicas of the failover service")
	flag.DurationVar(&o.timeout, "timeout", 60*time.Second, "longest wait for berth to start, an image import or an instance to come back")
	flag.Usage = func() {
		fmt.Fprintf(flag.CommandLine.Output(), "usage: go run ./bench/registry [flags]\n\n"+
			"Measures berth's registry and discovery (registrations/s, discovery reads/s,\n"+
			"watch propagation, DNS queries/s, failover time, memory) against a real\n"+
			"`berth dev` inside a private network namespace.\n\n")
		flag.PrintDefaults()
	}
	flag.Parse()
	if o.instances < 1 || o.instances > 100000 || o.services < 1 || o.services > o.instances ||
		o.clients < 1 || o.clients > 1024 || o.readFor <= 0 || o.readFor > time.Minute ||
		o.dnsFor <= 0 || o.dnsFor > time.Minute || o.changes < 1 || o.changes > 10000 ||
		o.watchers < 1 || o.watchers > 5000 || o.watchFor <= 0 || o.kills < 0 || o.kills > 1000 ||
		o.replicas < 2 || o.replicas > 50 || o.timeout <= 0 {
		fmt.Fprintln(os.Stderr, "bench: a flag is out of range; see -h")
		os.Exit(2)
	}
	if ns, work, ok := host.Child(); ok {
		os.Exit(child(o, ns, work))
	}
	os.Exit(parent(o))
}
