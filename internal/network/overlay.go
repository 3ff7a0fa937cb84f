package network

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"net"
	"net/netip"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/berth-dev/berth/api"
)

// VXLAN settings of overlay networks.
const (
	VXLANPort  = 4789
	OverlayMTU = 1450 // 1500 less the VXLAN encapsulation
)

// VXLANName is the VXLAN device of an overlay network on every node.
func VXLANName(network string) string {
	if len("vx-"+network) <= 15 {
		return "vx-" + network
	}
	sum := sha256.Sum256([]byte(network))
	return "vx-" + network[:6] + "-" + hex.EncodeToString(sum[:])[:5]
}

// OverlayMAC is the MAC of a node's VXLAN device on a network. It is derived
// from both names, so every node knows every other node's MAC without
// asking: the node list and the network are all an agent needs.
func OverlayMAC(network, node string) net.HardwareAddr {
	sum := sha256.Sum256([]byte(network + "/" + node))
	mac := net.HardwareAddr(sum[:6])
	mac[0] = (mac[0] | 0x02) &^ 0x01 // locally administered, unicast
	return mac
}

// Peer is another node on an overlay network.
type Peer struct {
	Node    string
	Address net.IP       // its underlay address
	Slice   netip.Prefix // its part of the network's subnet
}

// Overlay makes this node's VXLAN device of network n match the peers:
// for each, a neighbour entry (its VTEP address → its MAC), an FDB entry
// (its MAC → its underlay address) and a route to its slice; entries of
// nodes that left are removed.
func (m *Manager) Overlay(n api.Network, me string, local net.IP, mine netip.Prefix, peers []Peer) error {
	m.mu.RLock()
	defer m.mu.RUnlock()
	name := VXLANName(n.Name)
	link, err := netlink.LinkByName(name)
	if err != nil {
		vx := &netlink.Vxlan{
			LinkAttrs: netlink.LinkAttrs{Name: name, HardwareAddr: OverlayMAC(n.Name, me), MTU: OverlayMTU},
			VxlanId:   n.Status.VNI, SrcAddr: local, Port: VXLANPort, Learning: false,
		}
		if err := netlink.LinkAdd(vx); err != nil {
			return fmt.Errorf("overlay %s: add %s: %w", n.Name, name, err)
		}
		if link, err = netlink.LinkByName(name); err != nil {
			return err
		}
	}
	if err := netlink.LinkSetUp(link); err != nil {
		return fmt.Errorf("overlay %s: up: %w", n.Name, err)
	}
	vtep := &net.IPNet{IP: mine.Addr().AsSlice(), Mask: net.CIDRMask(32, 32)}
	if err := netlink.AddrReplace(link, &netlink.Addr{IPNet: vtep}); err != nil {
		return fmt.Errorf("overlay %s: address: %w", n.Name, err)
	}
	idx := link.Attrs().Index
	wantRoute, wantNeigh, wantFDB := map[string]bool{}, map[string]bool{}, map[string]bool{}
	for _, p := range peers {
		mac := OverlayMAC(n.Name, p.Node)
		gw := p.Slice.Addr().AsSlice()
		neigh := &netlink.Neigh{LinkIndex: idx, Family: unix.AF_INET, State: netlink.NUD_PERMANENT, IP: gw, HardwareAddr: mac}
		if err := netlink.NeighSet(neigh); err != nil {
			return fmt.Errorf("overlay %s: neighbour %s: %w", n.Name, p.Node, err)
		}
		fdb := &netlink.Neigh{LinkIndex: idx, Family: unix.AF_BRIDGE, Flags: netlink.NTF_SELF, State: netlink.NUD_PERMANENT, IP: p.Address, HardwareAddr: mac}
		if err := netlink.NeighSet(fdb); err != nil {
			return fmt.Errorf("overlay %s: fdb %s: %w", n.Name, p.Node, err)
		}
		dst := &net.IPNet{IP: p.Slice.Masked().Addr().AsSlice(), Mask: net.CIDRMask(p.Slice.Bits(), 32)}
		route := &netlink.Route{LinkIndex: idx, Dst: dst, Gw: gw, Flags: int(netlink.FLAG_ONLINK)}
		if err := netlink.RouteReplace(route); err != nil {
			return fmt.Errorf("overlay %s: route to %s: %w", n.Name, p.Node, err)
		}
		wantRoute[dst.String()], wantNeigh[net.IP(gw).String()], wantFDB[mac.String()] = true, true, true
	}
	// What belongs to nodes that left.
	routes, _ := netlink.RouteList(link, netlink.FAMILY_V4)
	for _, r := range routes {
		if r.Dst != nil && r.Gw != nil && !wantRoute[r.Dst.String()] {
			_ = netlink.RouteDel(&r)
		}
	}
	neighs, _ := netlink.NeighList(idx, unix.AF_INET)
	for _, nb := range neighs {
		if nb.State == netlink.NUD_PERMANENT && !wantNeigh[nb.IP.String()] {
			_ = netlink.NeighDel(&nb)
		}
	}
	fdbs, _ := netlink.NeighList(idx, unix.AF_BRIDGE)
	for _, f := range fdbs {
		if f.HardwareAddr != nil && !wantFDB[f.HardwareAddr.String()] && f.HardwareAddr.String() != "00:00:00:00:00:00" {
			_ = netlink.NeighDel(&f)
		}
	}
	return nil
}

func removeLink(name string) error {
	l, err := netlink.LinkByName(name)
	if err != nil {
		return nil
	}
	return netlink.LinkDel(l)
}
