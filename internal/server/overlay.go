package server

import (
	"context"
	"errors"
	"net/netip"
	"sort"
	"time"

	"github.com/berth-dev/berth/api"
	"github.com/berth-dev/berth/internal/store"
)

// SliceBits is the prefix length of a node's slice of an overlay network:
// eight bits longer than the network's, at most /28.
func sliceBits(subnet netip.Prefix) int { return min(subnet.Bits()+8, 28) }

// reconcileOverlays gives every ready node a slice of every overlay
// network's subnet, and frees the slices of nodes that no longer exist.
func (s *Server) reconcileOverlays(ctx context.Context, networks []api.Network, nodes []api.Node) {
	known := map[string]bool{}
	var ready []string
	for _, n := range nodes {
		known[n.Name] = true
		if n.Status.State == api.NodeReady {
			ready = append(ready, n.Name)
		}
	}
	sort.Strings(ready)
	for _, nw := range networks {
		if nw.Driver != api.DriverOverlay {
			continue
		}
		p, err := netip.ParsePrefix(nw.Subnet)
		if err != nil {
			continue
		}
		changed := false
		slices := map[string]string{}
		used := map[string]bool{}
		for node, sl := range nw.Status.NodeSubnets {
			if known[node] {
				slices[node] = sl
				used[sl] = true
			} else {
				changed = true // the node is gone: its slice is free again
			}
		}
		bits := sliceBits(p)
		for _, node := range ready {
			if _, ok := slices[node]; ok {
				continue
			}
			sl, ok := freeSlice(p, bits, used)
			if !ok {
				s.log.Warn("overlay: no free slice left", "network", nw.Name, "node", node)
				break
			}
			slices[node], used[sl] = sl, true
			changed = true
		}
		if !changed {
			continue
		}
		rev := nw.Revision
		nw.Status.NodeSubnets = slices
		nw.Status.Attached, nw.Status.AddressesUsed, nw.Status.AddressesFree = nil, 0, 0
		nw.Revision = 0
		nw.UpdatedAt = time.Now().UTC()
		if _, err := s.st.Put(ctx, keyNetworks+nw.Name, nw, rev); err != nil && !errors.Is(err, store.ErrConflict) {
			s.log.Warn("overlay: store slices", "network", nw.Name, "err", err)
		}
	}
}

// freeSlice finds the first slice of p of the given size not in used.
func freeSlice(p netip.Prefix, bits int, used map[string]bool) (string, bool) {
	a := p.Masked().Addr().As4()
	base := uint32(a[0])<<24 | uint32(a[1])<<16 | uint32(a[2])<<8 | uint32(a[3])
	n := uint32(1) << (bits - p.Bits())
	step := uint32(1) << (32 - bits)
	for i := uint32(0); i < n; i++ {
		v := base + i*step
		sl := netip.PrefixFrom(netip.AddrFrom4([4]byte{byte(v >> 24), byte(v >> 16), byte(v >> 8), byte(v)}), bits).String()
		if !used[sl] {
			return sl, true
		}
	}
	return "", false
}
