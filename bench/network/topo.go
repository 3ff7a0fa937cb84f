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
	// The two berth nodes on their underlay (like e2e/testhost.NewCluster).
	nodeA, nodeB = "198.18.0.10", "198.18.0.11"
	// berth's networks.
	berthBridgeNet, berthBridgeSubnet   = "nbbr", "10.210.0.0/24"
	berthOverlayNet, berthOverlaySubnet = "nbov", "10.200.0.0/16"
)

// ipCmd runs `ip args...`.
func ipCmd(args ...string) error {
	if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
		return fmt.Errorf("ip %s: %v: %s", strings.Join(args, " "), err, strings.TrimSpace(string(out)))
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
	if err := ipAll(
		[]string{"-n", bs, "link", "add", "br0", "type", "bridge"},
		[]string{"-n", bs, "link", "set", "br0", "up"},
	); err != nil {
		return err
	}
	for i, h := range []struct{ ns, ip string }{{b1, bridgeA}, {b2, bridgeB}} {
		port := fmt.Sprintf("p%d", i+1)
		if err := ipAll(
			[]string{"-n", h.ns, "link", "add", "eth0", "type", "veth", "peer", "name", port, "netns", bs},
			[]string{"-n", bs, "link", "set", port, "master", "br0"},
			[]string{"-n", bs, "link", "set", port, "up"},
			[]string{"-n", h.ns, "addr", "add", h.ip + "/24", "dev", "eth0"},
			[]string{"-n", h.ns, "link", "set", "eth0", "up"},
		); err != nil {
			return err
		}
	}

	// Row 4: x1 and x2 joined by an underlay veth, a VXLAN device with a
	// static remote on each, the addresses on the VXLAN devices.
	x1, x2 := e.l.ns("x1"), e.l.ns("x2")
	if err := e.addNS("x1", "x2"); err != nil {
		return err
	}
	if err := ipCmd("-n", x1, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", x2); err != nil {
		return err
	}
	for _, h := range []struct{ ns, local, remote, ip string }{{x1, vxUnderA, vxUnderB, vxA}, {x2, vxUnderB, vxUnderA, vxB}} {
		if err := ipAll(
			[]string{"-n", h.ns, "addr", "add", h.local + "/24", "dev", "eth0"},
			[]string{"-n", h.ns, "link", "set", "eth0", "up"},
			[]string{"-n", h.ns, "link", "add", "vx0", "type", "vxlan", "id", vxID, "local", h.local, "remote", h.remote, "dstport", vxPort, "dev", "eth0"},
			[]string{"-n", h.ns, "addr", "add", h.ip + "/24", "dev", "vx0"},
			[]string{"-n", h.ns, "link", "set", "vx0", "up"},
		); err != nil {
			return err
		}
	}

	// Row 4b: y1 and y2, each with eth0 on a bridge in uy, a VXLAN device
	// with a static remote on each, the addresses on the VXLAN devices.
	y1, y2, uy := e.l.ns("y1"), e.l.ns("y2"), e.l.ns("uy")
	if err := e.addNS("y1", "y2", "uy"); err != nil {
		return err
	}
	if err := ipAll(
		[]string{"-n", uy, "link", "add", "br0", "type", "bridge"},
		[]string{"-n", uy, "link", "set", "br0", "up"},
	); err != nil {
		return err
	}
	for i, h := range []struct{ ns, local, remote, ip string }{{y1, vyUnderA, vyUnderB, vyA}, {y2, vyUnderB, vyUnderA, vyB}} {
		port := fmt.Sprintf("p%d", i+1)
		if err := ipAll(
			[]string{"-n", h.ns, "link", "add", "eth0", "type", "veth", "peer", "name", port, "netns", uy},
			[]string{"-n", uy, "link", "set", port, "master", "br0"},
			[]string{"-n", uy, "link", "set", port, "up"},
			[]string{"-n", h.ns, "addr", "add", h.local + "/24", "dev", "eth0"},
			[]string{"-n", h.ns, "link", "set", "eth0", "up"},
			[]string{"-n", h.ns, "link", "add", "vx0", "type", "vxlan", "id", vxID, "local", h.local, "remote", h.remote, "dstport", vxPort, "dev", "eth0"},
			[]string{"-n", h.ns, "addr", "add", h.ip + "/24", "dev", "vx0"},
			[]string{"-n", h.ns, "link", "set", "vx0", "up"},
		); err != nil {
			return err
		}
	}

	// The berth nodes: a (this process's namespace, made by the parent) and
	// b, each with eth0 on a bridge in ul, the underlay.
	ul, b := e.l.ns("ul"), e.l.ns("b")
	if err := e.addNS("ul", "b"); err != nil {
		return err
	}
	if err := ipAll(
		[]string{"-n", ul, "link", "add", "br0", "type", "bridge"},
		[]string{"-n", ul, "link", "set", "br0", "up"},
	); err != nil {
		return err
	}
	for _, h := range []struct{ ns, ip, port string }{{e.l.ns("a"), nodeA, "na"}, {b, nodeB, "nb"}} {
		if err := ipAll(
			[]string{"-n", h.ns, "link", "add", "eth0", "type", "veth", "peer", "name", h.port, "netns", ul},
			[]string{"-n", ul, "link", "set", h.port, "master", "br0"},
			[]string{"-n", ul, "link", "set", h.port, "up"},
			[]string{"-n", h.ns, "addr", "add", h.ip + "/24", "dev", "eth0"},
			[]string{"-n", h.ns, "link", "set", "eth0", "up"},
		); err != nil {
			return err
		}
	}

	// The setup benchmark's own namespace.
	return e.addNS("s")
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
