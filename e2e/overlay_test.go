package e2e

import (
	"fmt"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/berth-dev/berth/api"
	"github.com/berth-dev/berth/e2e/testhost"
	"github.com/berth-dev/berth/internal/network"
)

// TestOverlayAcrossNodes: an overlay network spans three isolated node
// namespaces joined by a test underlay bridge. Each node gets a slice of
// the subnet; instances on different nodes reach each other over VXLAN;
// a node that leaves has its entries removed on the others.
func TestOverlayAcrossNodes(t *testing.T) {
	testhost.SkipIfUnsupported(t)
	hosts := testhost.NewCluster(t, 3)
	srvAddr := hosts[0].Addr + ":7480"
	b := startBerth(t, hosts[0], "dev", "--api-addr", srvAddr, "--node-name", "node0", "--node-address", hosts[0].Addr)
	agents := map[string]*berth{}
	for i, h := range hosts[1:] {
		name := fmt.Sprintf("node%d", i+1)
		agents[name] = startBerth(t, h, "agent", "--server", "http://"+srvAddr, "--node-name", name,
			"--node-address", h.Addr, "--node-ttl", "2s")
	}
	importTestImage(t, b)
	b.mustCLI("network", "create", "ov", "--subnet", "10.200.0.0/16", "--driver", "overlay")
	var nw api.Network
	eventually(t, 10*time.Second, "a slice for each node", func() (bool, string) {
		var err error
		nw, err = b.client().GetNetwork(ctxT(t), "ov")
		return err == nil && len(nw.Status.NodeSubnets) == 3 && nw.Status.VNI > 0, fmt.Sprint(nw.Status, err)
	})
	seen := map[string]bool{}
	for node, sl := range nw.Status.NodeSubnets {
		p := netip.MustParsePrefix(sl)
		if p.Bits() != 24 || !netip.MustParsePrefix("10.200.0.0/16").Contains(p.Addr()) || seen[sl] {
			t.Fatalf("slice of %s: %s (all: %v)", node, sl, nw.Status.NodeSubnets)
		}
		seen[sl] = true
	}

	// Three replicas land one per node (the least-loaded node is chosen).
	b.mustCLI("run", "web", "--image", testImage, "--replicas", "3", "--network", "ov",
		"--", "httpd", "-f", "-p", "8080", "-h", "/www")
	ins := b.waitInstances("web", 3, 60*time.Second, "3 running", running)
	byNode := map[string]api.Instance{}
	for _, in := range ins {
		byNode[in.Node] = in
		v := vnic(t, in, "ov")
		if !netip.MustParsePrefix(nw.Status.NodeSubnets[in.Node]).Contains(netip.MustParseAddr(v.IP)) {
			t.Fatalf("%s on %s has %s, outside its node's slice %s", in.ID, in.Node, v.IP, nw.Status.NodeSubnets[in.Node])
		}
	}
	if len(byNode) != 3 {
		t.Fatalf("replicas not one per node: %v", byNode)
	}
	// Every pair across nodes talks.
	for from, fi := range byNode {
		for to, ti := range byNode {
			if from != to && !b.reach(fi.ID, vnic(t, ti, "ov").IP) {
				t.Fatalf("%s on %s cannot reach %s on %s over the overlay", fi.ID, from, ti.ID, to)
			}
		}
	}
	// Each node has the VXLAN device with entries for the two others.
	vx := network.VXLANName("ov")
	for i, h := range hosts {
		out, err := h.Run(ctxT(t), "ip", "route", "show", "dev", vx)
		if err != nil || strings.Count(out, "via") != 2 {
			t.Fatalf("node%d routes on %s: %v\n%s", i, vx, err, out)
		}
	}

	// node2 leaves: its entries go from the others.
	gone := nw.Status.NodeSubnets["node2"]
	if code := agents["node2"].stop(); code != 0 {
		t.Fatalf("agent exit %d", code)
	}
	for _, i := range []int{0, 1} {
		h := hosts[i]
		eventually(t, 15*time.Second, fmt.Sprintf("node%d drops node2's entries", i), func() (bool, string) {
			routes, _ := h.Run(ctxT(t), "ip", "route", "show", "dev", vx)
			fdb, _ := h.Run(ctxT(t), "bridge", "fdb", "show", "dev", vx)
			return !strings.Contains(routes, gone) && !strings.Contains(fdb, hosts[2].Addr), routes + fdb
		})
	}
	// node0 and node1 still talk.
	if !b.reach(byNode["node0"].ID, vnic(t, byNode["node1"], "ov").IP) {
		t.Fatal("node0 and node1 lost each other when node2 left")
	}
}
