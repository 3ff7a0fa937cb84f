package main

import (
	"fmt"
	"os/exec"
	"strings"
)

// Addresses. Every namespace is private to the run and has no default
// route; none of these is reachable from outside it.
const (
	// Row 1, the bare veth pair.
	vethA, vethB = "10.201.0.1", "10.201.0.2"
	// Row 2, the bare bridge.
	bridgeA, bridgeB = "10.202.0.1", "10.202.0.2"
	// Row 4, the bare VXLAN pair: underlay (RFC 2544) and overlay.
	vxUnderA, vxUnderB = "198.19.0.1", "198.19.0.2"
	vxA, vxB           = "10.203.0.1", "10.203.0.2"
	vxID               = "4242"
	// Row 4b, the same VXLAN pair over an underlay like the berth nodes'
	// (each side's veth on a bridge in a third namespace).
	vyUnderA, vyUnderB = "198.19.1.1", "198.19.1.2"
	vyA, vyB           = "10.204.0.1", "10.204.0.2"
	vxPort             = "4789"
	// Row 4c, berth's overlay topology built bare: two nodes on 4b's
	// underlay bridge, a slice of 10.205.0.0/16 each, one endpoint per node.
	vzUnderA, vzUnderB = "198.19.1.3", "198.19.1.4"
	vzSliceA, vzSliceB = "10.205.1.0", "10.205.2.0" // the slices' network addresses, /24
	vzGwA, vzGwB       = "10.205.1.1", "10.205.2.1" // the gateways on the nodes' bridges
	vzA, vzB           = "10.205.1.2", "10.205.2.2" // the endpoints
	vzMACA, vzMACB     = "02:00:0a:cd:01:00", "02:00:0a:cd:02:00"
	overlayMTU         = "1450" // berth's (internal/network.OverlayMTU)
	// The two berth nodes on their underlay (like e2e/testhost.NewCluster).
	nodeA, nodeB = "198.18.0.10", "198.18.0.11"
	// berth's networks.
	berthBridgeNet, berthBridgeSubnet   = "nbbr", "10.210.0.0/24"
	berthOverlayNet, berthOverlaySubnet = "nbov", "10.200.0.0/16"
)

// ipCmd runs `ip args...`.
func ipCmd(args ...string) error { return run("ip", args...) }

// run runs a command (ip, bridge) and returns its output in the error.
func run(name string, args ...string) error {
	if out, err := exec.Command(name, args...).CombinedOutput(); err != nil {
		return fmt.Errorf("%s %s: %v: %s", name, strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return nil
}

func ipAll(cmds ...[]string) error {
	for _, c := range cmds {
		if err := ipCmd(c...); err != nil {
			return err
		}
	}
	return nil
}

// addBridge is the commands that make an up bridge br0 in namespace ns.
func addBridge(ns string, opts ...string) [][]string {
	return [][]string{
		append(append([]string{"-n", ns, "link", "add", "br0"}, opts...), "type", "bridge"),
		{"-n", ns, "link", "set", "br0", "up"},
	}
}

// onBridge is the commands that join namespace ns to the bridge br0 in
// brNS: a veth, eth0 in ns with addr (a prefix) and its peer port on the
// bridge, both up. opts (e.g. "mtu", "1450") are given to both ends.
func onBridge(ns, addr, brNS, port string, opts ...string) [][]string {
	add := append([]string{"-n", ns, "link", "add", "eth0"}, opts...)
	add = append(append(add, "type", "veth", "peer", "name", port), opts...)
	return [][]string{
		append(add, "netns", brNS),
		{"-n", brNS, "link", "set", port, "master", "br0"},
		{"-n", brNS, "link", "set", port, "up"},
		{"-n", ns, "addr", "add", addr, "dev", "eth0"},
		{"-n", ns, "link", "set", "eth0", "up"},
	}
}

// vxlanPair is the commands that give namespace ns a VXLAN device vx0 with
// a static remote over its eth0, and the address ip on it.
func vxlanPair(ns, local, remote, ip string) [][]string {
	return [][]string{
		{"-n", ns, "link", "add", "vx0", "type", "vxlan", "id", vxID, "local", local, "remote", remote, "dstport", vxPort, "dev", "eth0"},
		{"-n", ns, "addr", "add", ip + "/24", "dev", "vx0"},
		{"-n", ns, "link", "set", "vx0", "up"},
	}
}

// topology makes the namespaces and links of every row. Links are always
// created inside one of the run's namespaces with their peer put straight
// into another: nothing ever touches the root namespace.
func (e *env) topology() error {
	// Row 1: v1 <-veth-> v2.
	v1, v2 := e.l.ns("v1"), e.l.ns("v2")
	if err := e.addNS("v1", "v2"); err != nil {
		return err
	}
	if err := ipAll(
		[]string{"-n", v1, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", v2},
		[]string{"-n", v1, "addr", "add", vethA + "/24", "dev", "eth0"},
		[]string{"-n", v2, "addr", "add", vethB + "/24", "dev", "eth0"},
		[]string{"-n", v1, "link", "set", "eth0", "up"},
		[]string{"-n", v2, "link", "set", "eth0", "up"},
	); err != nil {
		return err
	}

	// Row 2: b1 <-veth-> [br0 in bs] <-veth-> b2.
	bs, b1, b2 := e.l.ns("bs"), e.l.ns("b1"), e.l.ns("b2")
	if err := e.addNS("bs", "b1", "b2"); err != nil {
		return err
	}
	cmds := addBridge(bs)
	cmds = append(cmds, onBridge(b1, bridgeA+"/24", bs, "p1")...)
	cmds = append(cmds, onBridge(b2, bridgeB+"/24", bs, "p2")...)
	if err := ipAll(cmds...); err != nil {
		return err
	}

	// Row 4: x1 and x2 joined by an underlay veth, a VXLAN device with a
	// static remote on each, the addresses on the VXLAN devices.
	x1, x2 := e.l.ns("x1"), e.l.ns("x2")
	if err := e.addNS("x1", "x2"); err != nil {
		return err
	}
	cmds = [][]string{{"-n", x1, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", x2}}
	for _, h := range []struct{ ns, local, remote, ip string }{{x1, vxUnderA, vxUnderB, vxA}, {x2, vxUnderB, vxUnderA, vxB}} {
		cmds = append(cmds,
			[]string{"-n", h.ns, "addr", "add", h.local + "/24", "dev", "eth0"},
			[]string{"-n", h.ns, "link", "set", "eth0", "up"})
		cmds = append(cmds, vxlanPair(h.ns, h.local, h.remote, h.ip)...)
	}
	if err := ipAll(cmds...); err != nil {
		return err
	}

	// Row 4b: y1 and y2, each with eth0 on a bridge in uy, a VXLAN device
	// with a static remote on each, the addresses on the VXLAN devices.
	y1, y2, uy := e.l.ns("y1"), e.l.ns("y2"), e.l.ns("uy")
	if err := e.addNS("y1", "y2", "uy"); err != nil {
		return err
	}
	cmds = addBridge(uy)
	for i, h := range []struct{ ns, local, remote, ip string }{{y1, vyUnderA, vyUnderB, vyA}, {y2, vyUnderB, vyUnderA, vyB}} {
		cmds = append(cmds, onBridge(h.ns, h.local+"/24", uy, fmt.Sprintf("p%d", i+1))...)
		cmds = append(cmds, vxlanPair(h.ns, h.local, h.remote, h.ip)...)
	}
	if err := ipAll(cmds...); err != nil {
		return err
	}

	// Row 4c: berth's overlay topology, bare, on 4b's underlay bridge.
	if err := e.overlayTopology(); err != nil {
		return err
	}

	// The berth nodes: a (this process's namespace, made by the parent) and
	// b, each with eth0 on a bridge in ul, the underlay.
	ul, b := e.l.ns("ul"), e.l.ns("b")
	if err := e.addNS("ul", "b"); err != nil {
		return err
	}
	cmds = addBridge(ul)
	cmds = append(cmds, onBridge(e.l.ns("a"), nodeA+"/24", ul, "na")...)
	cmds = append(cmds, onBridge(b, nodeB+"/24", ul, "nb")...)
	if err := ipAll(cmds...); err != nil {
		return err
	}

	// The setup benchmark's own namespace.
	return e.addNS("s")
}

// overlayTopology makes row 4c: what berth's agents build for an overlay
// network (internal/network: the CNI bridge plugin and Manager.Overlay),
// made here with ip and bridge, without berth's nftables table. Nodes n1
// and n2 have eth0 on 4b's underlay bridge (in uy). Each has a bridge
// holding the gateway of its slice, an endpoint namespace (i1, i2) with a
// veth into that bridge (MTU 1450) and a default route via the gateway, IP
// forwarding on, and a VXLAN device (no learning, MTU 1450, its own MAC,
// local = its underlay address) with the /32 of its slice's network
// address. For the other node: an onlink route to its slice via its slice's
// network address, a permanent neighbour entry for that address (→ its
// VXLAN MAC) and a permanent FDB entry (its MAC → its underlay address).
func (e *env) overlayTopology() error {
	if err := e.addNS("n1", "n2", "i1", "i2"); err != nil {
		return err
	}
	uy := e.l.ns("uy")
	type node struct{ ns, inst, port, under, slice, gw, ip, mac string }
	nodes := []node{
		{e.l.ns("n1"), e.l.ns("i1"), "p3", vzUnderA, vzSliceA, vzGwA, vzA, vzMACA},
		{e.l.ns("n2"), e.l.ns("i2"), "p4", vzUnderB, vzSliceB, vzGwB, vzB, vzMACB},
	}
	for i, n := range nodes {
		peer := nodes[1-i]
		cmds := onBridge(n.ns, n.under+"/24", uy, n.port)
		cmds = append(cmds, addBridge(n.ns, "mtu", overlayMTU)...)
		cmds = append(cmds, []string{"-n", n.ns, "addr", "add", n.gw + "/24", "dev", "br0"})
		cmds = append(cmds, onBridge(n.inst, n.ip+"/24", n.ns, "veth0", "mtu", overlayMTU)...)
		cmds = append(cmds,
			[]string{"-n", n.ns, "link", "set", "veth0", "type", "bridge_slave", "hairpin", "on"},
			[]string{"-n", n.inst, "route", "add", "default", "via", n.gw},
			[]string{"netns", "exec", n.ns, "sysctl", "-qw", "net.ipv4.ip_forward=1"},
			[]string{"-n", n.ns, "link", "add", "vx0", "address", n.mac, "mtu", overlayMTU,
				"type", "vxlan", "id", vxID, "local", n.under, "dstport", vxPort, "nolearning"},
			[]string{"-n", n.ns, "link", "set", "vx0", "up"},
			[]string{"-n", n.ns, "addr", "add", n.slice + "/32", "dev", "vx0"},
			[]string{"-n", n.ns, "neigh", "replace", peer.slice, "lladdr", peer.mac, "dev", "vx0", "nud", "permanent"},
		)
		if err := ipAll(cmds...); err != nil {
			return err
		}
		if err := run("bridge", "-n", n.ns, "fdb", "replace", peer.mac, "dev", "vx0", "dst", peer.under, "self", "permanent"); err != nil {
			return err
		}
		if err := ipCmd("-n", n.ns, "route", "replace", peer.slice+"/24", "via", peer.slice, "dev", "vx0", "onlink"); err != nil {
			return err
		}
	}
	return nil
}

// addNS makes namespaces of the run and remembers them for the cleanup.
func (e *env) addNS(suffixes ...string) error {
	for _, s := range suffixes {
		if err := addNetns(e.l.ns(s)); err != nil {
			return err
		}
		e.made = append(e.made, e.l.ns(s))
	}
	return nil
}
