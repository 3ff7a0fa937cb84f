// Command network measures the datapath of berth's container networks
// against the bare Linux constructs they are built from, and the time berth
// adds to an instance's start to give it its network.
//
// In one run it measures TCP throughput (iperf3 -J, one stream, a few
// seconds) and round-trip latency (a TCP ping-pong of 1-byte messages,
// p50/p99 over 5,000 round trips, run by this command re-executed inside the
// namespaces) between:
//
//  1. two namespaces joined by a bare veth pair (the floor);
//  2. two namespaces each with a veth on a plain Linux bridge (bare bridge);
//  3. two berth instances on one berth bridge network on one `berth dev`
//     node;
//  4. two namespaces joined by a plain VXLAN pair over an underlay veth
//     (bare overlay: a VXLAN device with a static remote on each side, the
//     addresses on the VXLAN devices); 4b. the same over an underlay
//     bridge in a third namespace; 4c. berth's overlay topology built bare
//     on that underlay (each node a bridge with its slice's gateway, an
//     endpoint's veth on it, a VXLAN device with static routes, neighbour
//     and FDB entries to the other node) without berth's nftables table;
//  5. two berth instances on one berth overlay network on two berth nodes
//     (a `berth dev` and a `berth agent`, each in a namespace joined by veth
//     to an underlay bridge in a third namespace, like e2e/testhost's
//     clusters).
//
// The berth rows run iperf3 and the ping-pong from the host inside the
// instances' own network namespaces (berth keeps each one bind-mounted at
// /run/berth-<hash>/netns/<instance>): the traffic goes through the
// instances' veths and berth's bridge (and VXLAN device) exactly as the
// containers' own traffic would.
//
// Then the instance network setup time: internal/network.Manager.Setup and
// Teardown, what the agent calls between creating and starting a container,
// timed over many cycles inside a namespace of its own.
//
// The rows are measured in rounds (default 4), interleaved, in an order that
// reverses from round to round; each round runs one iperf3 test and one
// ping-pong per row. It prints a table with the median Gbit/s and the median
// RTT p50/p99 per row, berth's bridge as a percentage of the bare bridge and
// berth's overlay as a percentage of the bare VXLAN pair (the median of the
// per-round ratios), and the setup time's p50/p95, next to the goals:
// bridge >= 95% of the bare bridge, overlay >= 95% of the bare VXLAN pair,
// setup < 15 ms. When the overlay does not work (yet), row 5 says
// "overlay: not available yet" and the rest is measured.
//
// It needs root, ip, nsenter, iperf3, runc, containerd and the CNI plugins.
// Everything runs inside network namespaces the command makes (no route out
// of the machine): it re-executes itself inside one with nsenter, builds the
// other namespaces from there, and on exit (also on SIGINT or SIGTERM) stops
// what it started, deletes the namespaces (and with them every bridge, veth
// and VXLAN device), unmounts what is left and checks that nothing remains.
//
// Usage (from the module's root):
//
//	go run ./bench/network [-t 2] [-omit 1] [-rounds 4] [-pings 5000] [-setups 50] [-berth PATH]
package main

import (
	"flag"
	"fmt"
	"os"
	"time"
)

// Hidden first arguments of the helpers the child starts inside namespaces.
const (
	cmdRTTServer = "__rtt-server"
	cmdRTTClient = "__rtt-client"
	cmdSetup     = "__setup"
)

type options struct {
	seconds  int
	omit     int
	rounds   int
	pings    int
	setups   int
	affinity string
	berth    string
	timeout  time.Duration
}

func main() {
	if len(os.Args) > 1 {
		switch os.Args[1] {
		case cmdRTTServer:
			os.Exit(rttServer(os.Args[2:]))
		case cmdRTTClient:
			os.Exit(rttClient(os.Args[2:]))
		case cmdSetup:
			os.Exit(setupHelper(os.Args[2:]))
		}
	}
	var o options
	flag.IntVar(&o.seconds, "t", 2, "seconds of each iperf3 run (counted)")
	flag.IntVar(&o.omit, "omit", 1, "seconds at the start of each iperf3 run not counted (TCP ramp-up)")
	flag.IntVar(&o.rounds, "rounds", 4, "rounds of one iperf3 run and one ping-pong per row (interleaved; medians are reported)")
	flag.IntVar(&o.pings, "pings", 5000, "round trips of the latency ping-pong per row")
	flag.IntVar(&o.setups, "setups", 50, "Setup+Teardown cycles for the network setup time")
	flag.StringVar(&o.affinity, "affinity", "", "iperf3 -A n,m: pin the client to CPU n and the server to m (default: no pinning)")
	flag.StringVar(&o.berth, "berth", "", "the berth binary (default: go build ./cmd/berth into a temporary directory)")
	flag.DurationVar(&o.timeout, "timeout", 60*time.Second, "longest wait for berth to be ready or instances to run")
	flag.Usage = func() {
		fmt.Fprintf(flag.CommandLine.Output(), "usage: go run ./bench/network [flags]\n\n"+
			"Measures TCP throughput and round-trip latency of berth's bridge and overlay\n"+
			"networks against a bare veth pair, a bare Linux bridge and a bare VXLAN pair,\n"+
			"and the time berth's network setup adds to an instance start, inside private\n"+
			"network namespaces.\n\n")
		flag.PrintDefaults()
	}
	flag.Parse()
	if o.seconds < 1 || o.omit < 0 || o.rounds < 1 || o.pings < 10 || o.setups < 1 {
		fmt.Fprintln(os.Stderr, "bench: -t, -rounds and -setups must be at least 1, -pings at least 10, -omit at least 0")
		os.Exit(2)
	}
	if p, work, ok := host.Child(); ok {
		os.Exit(child(o, p, work))
	}
	os.Exit(parent(o))
}
