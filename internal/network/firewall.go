package network

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"sync"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// tableName is the nftables table berth owns on a node.
const tableName = "berth"

// firewall keeps networks apart: one rule per bridge drops what is routed
// from that bridge to any other berth bridge. Traffic inside one bridge is
// switched, not routed, and is not affected.
type firewall struct {
	log *slog.Logger
	// stateDir keeps what bridgeNetfilterOff found; keepBridgeNF leaves
	// br_netfilter's switches as they are.
	stateDir     string
	keepBridgeNF bool

	mu      sync.Mutex
	started bool
	bridges map[string]bool
}

func newFirewall(log *slog.Logger, stateDir string, keepBridgeNF bool) *firewall {
	return &firewall{log: log, stateDir: stateDir, keepBridgeNF: keepBridgeNF, bridges: map[string]bool{}}
}

func ifname(n string) []byte {
	b := make([]byte, 16)
	copy(b, n)
	return b
}

func (f *firewall) table() *nftables.Table {
	return &nftables.Table{Family: nftables.TableFamilyINet, Name: tableName}
}

// ensure installs the rules of one network, once per agent run: isolation
// of its bridge, and masquerade of what leaves its subnet for elsewhere
// (one rule per network instead of CNI's per-container iptables chains).
// The first call replaces whatever an earlier run left in berth's table.
func (f *firewall) ensure(bridge, subnet string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.bridges[bridge] {
		return nil
	}
	c, err := nftables.New()
	if err != nil {
		return fmt.Errorf("nftables: %w", err)
	}
	t := f.table()
	if !f.started {
		if !f.keepBridgeNF {
			if err := bridgeNetfilterOff(f.stateDir, f.log); err != nil {
				f.log.Warn("network: br_netfilter left on", "err", err)
			}
		}
		c.DelTable(t)
		_ = c.Flush() // absent the first time
		f.started = true
	}
	c.AddTable(t)
	accept := nftables.ChainPolicyAccept
	ch := c.AddChain(&nftables.Chain{Name: "isolate", Table: t, Type: nftables.ChainTypeFilter,
		Hooknum: nftables.ChainHookForward, Priority: nftables.ChainPriorityFilter, Policy: &accept})
	c.AddRule(&nftables.Rule{Table: t, Chain: ch, Exprs: []expr.Any{
		&expr.Meta{Key: expr.MetaKeyIIFNAME, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: ifname(bridge)},
		&expr.Meta{Key: expr.MetaKeyOIFNAME, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte("bz-")},
		&expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: ifname(bridge)},
		&expr.Verdict{Kind: expr.VerdictDrop},
	}})
	// Nor to another overlay network's VXLAN device.
	c.AddRule(&nftables.Rule{Table: t, Chain: ch, Exprs: []expr.Any{
		&expr.Meta{Key: expr.MetaKeyIIFNAME, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: ifname(bridge)},
		&expr.Meta{Key: expr.MetaKeyOIFNAME, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte("vx-")},
		&expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: ifname("vx-" + bridge[3:])},
		&expr.Verdict{Kind: expr.VerdictDrop},
	}})
	if p, err := netip.ParsePrefix(subnet); err == nil && p.Addr().Is4() {
		nat := c.AddChain(&nftables.Chain{Name: "masquerade", Table: t, Type: nftables.ChainTypeNAT,
			Hooknum: nftables.ChainHookPostrouting, Priority: nftables.ChainPriorityNATSource})
		mask := net.CIDRMask(p.Bits(), 32)
		addr := p.Masked().Addr().As4()
		c.AddRule(&nftables.Rule{Table: t, Chain: nat, Exprs: []expr.Any{
			&expr.Meta{Key: expr.MetaKeyNFPROTO, Register: 1},
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{unix.NFPROTO_IPV4}},
			&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: 12, Len: 4},
			&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4, Mask: mask, Xor: []byte{0, 0, 0, 0}},
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: addr[:]},
			// ... and is not for the network itself (other nodes' slices).
			&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: 16, Len: 4},
			&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4, Mask: mask, Xor: []byte{0, 0, 0, 0}},
			&expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: addr[:]},
			&expr.Masq{},
		}})
	}
	if err := c.Flush(); err != nil {
		return fmt.Errorf("nftables: isolate %s: %w", bridge, err)
	}
	f.bridges[bridge] = true
	return nil
}

// removeBridge deletes a network's bridge on this node; its rule goes when
// the agent next rebuilds the table.
func removeBridge(name string) error {
	l, err := netlink.LinkByName(name)
	if err != nil {
		return nil
	}
	return netlink.LinkDel(l)
}

func loUp() error {
	lo, err := netlink.LinkByName("lo")
	if err != nil {
		return err
	}
	return netlink.LinkSetUp(lo)
}

// Cleanup removes berth's bridges, VXLAN devices and nftables table from
// this network namespace (for resets and tests: instances must be gone).
func Cleanup() error {
	links, err := netlink.LinkList()
	if err != nil {
		return err
	}
	var errs []error
	for _, l := range links {
		name := l.Attrs().Name
		if len(name) > 3 && (name[:3] == "bz-" || name[:3] == "vx-") {
			if err := netlink.LinkDel(l); err != nil {
				errs = append(errs, fmt.Errorf("delete %s: %w", name, err))
			}
		}
	}
	if c, err := nftables.New(); err == nil {
		c.DelTable(&nftables.Table{Family: nftables.TableFamilyINet, Name: tableName})
		_ = c.Flush() // absent is fine
	}
	return errors.Join(errs...)
}
