// Package network gives instances their virtual NICs: for every virtual
// network an instance joins, a veth into the instance's own network
// namespace, plugged into that network's Linux bridge (the virtual switch
// of the node), with an address from IPAM and optionally published ports.
// It drives the standard CNI plugins (bridge, host-local, portmap) through
// libcni, keeps their state under the agent's data directory, isolates
// networks from each other with nftables rules it owns, turns br_netfilter's
// switches off in its namespace unless told to keep them (bridgenf.go), and
// sweeps up what a crash left behind.
package network

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"

	"github.com/containernetworking/cni/libcni"
	types100 "github.com/containernetworking/cni/pkg/types/100"

	"github.com/berth-dev/berth/api"
)

// PluginDirs are searched for the CNI plugins (Debian's, then the usual).
var PluginDirs = []string{"/usr/lib/cni", "/opt/cni/bin"}

// BridgeName is the Linux bridge of a network on every node.
func BridgeName(network string) string {
	if len("bz-"+network) <= 15 {
		return "bz-" + network
	}
	sum := sha256.Sum256([]byte(network))
	return "bz-" + network[:6] + "-" + hex.EncodeToString(sum[:])[:5]
}

// Manager sets up and tears down instances' networking on one node.
type Manager struct {
	cni      *libcni.CNIConfig
	dataDir  string // CNI cache and IPAM state
	netnsDir string
	log      *slog.Logger
	fw       *firewall

	// mu: setups and teardowns of different instances run in parallel
	// (host-local locks its own state; the firewall has its own lock);
	// a sweep or a network's removal runs alone.
	mu sync.RWMutex
}

// Options tune a Manager.
type Options struct {
	// KeepBridgeNetfilter leaves br_netfilter's switches
	// (net.bridge.bridge-nf-call-*) as they are; by default the manager
	// turns them off in its network namespace (bridgenf.go).
	KeepBridgeNetfilter bool
}

// New prepares a manager whose state lives under dataDir and whose
// namespaces are bind-mounted under runDir.
func New(dataDir, runDir string, log *slog.Logger, opts Options) (*Manager, error) {
	found := false
	for _, d := range PluginDirs {
		if _, err := os.Stat(filepath.Join(d, "bridge")); err == nil {
			found = true
		}
	}
	if !found {
		return nil, fmt.Errorf("network: the CNI plugins are not installed (looked in %v; run scripts/install.sh)", PluginDirs)
	}
	abs, err := filepath.Abs(dataDir)
	if err != nil {
		return nil, err
	}
	m := &Manager{
		cni:      libcni.NewCNIConfigWithCacheDir(PluginDirs, filepath.Join(abs, "cni", "cache"), nil),
		dataDir:  abs,
		netnsDir: filepath.Join(runDir, "netns"),
		log:      log,
		fw:       newFirewall(log, filepath.Join(abs, "cni"), opts.KeepBridgeNetfilter),
	}
	return m, nil
}

// NetnsPath is where an instance's network namespace is kept.
func (m *Manager) NetnsPath(id string) string { return filepath.Join(m.netnsDir, id) }

// Gateway is the address an attachment's VNIC routes through: the network's
// gateway, or on an overlay the first address of this node's slice.
func Gateway(a Attachment) string {
	if a.Network.Driver == api.DriverOverlay {
		if p, err := netip.ParsePrefix(a.Slice); err == nil {
			return p.Addr().Next().String()
		}
	}
	return a.Network.Gateway
}

// conflist is the plugin chain of a network; portmap only when ports are
// published (it costs iptables calls on every add and delete).
func (m *Manager) conflist(a Attachment) (*libcni.NetworkConfigList, error) {
	n := a.Network
	subnet, gateway, mtu := n.Subnet, n.Gateway, 0
	if n.Driver == api.DriverOverlay {
		p, err := netip.ParsePrefix(a.Slice)
		if err != nil {
			return nil, fmt.Errorf("overlay network %s has no subnet slice for this node yet", n.Name)
		}
		subnet, gateway, mtu = p.String(), Gateway(a), OverlayMTU
	}
	plugins := []any{
		map[string]any{
			"type":        "bridge",
			"mtu":         mtu,
			"bridge":      BridgeName(n.Name),
			"isGateway":   true,
			"ipMasq":      false, // one nftables rule per network instead (firewall.go)
			"hairpinMode": true,
			"ipam": map[string]any{
				"type":    "host-local",
				"dataDir": filepath.Join(m.dataDir, "cni", "ipam"),
				"ranges":  [][]map[string]string{{{"subnet": subnet, "gateway": gateway}}},
				"routes":  []map[string]string{{"dst": "0.0.0.0/0"}},
			},
		},
	}
	for _, p := range a.Ports {
		if p.HostPort != 0 {
			plugins = append(plugins, map[string]any{"type": "portmap", "capabilities": map[string]bool{"portMappings": true}, "snat": true})
			break
		}
	}
	conf := map[string]any{
		"cniVersion": "1.0.0",
		"name":       "berth-" + n.Name,
		"plugins":    plugins,
	}
	b, err := json.Marshal(conf)
	if err != nil {
		return nil, err
	}
	return libcni.ConfListFromBytes(b)
}

// Attachment is one network an instance joins, with the ports to publish on it.
type Attachment struct {
	Network api.Network
	Ports   []api.PortSpec // only those with a HostPort are published
	// Slice is this node's part of an overlay network's subnet, from which
	// its instances get addresses.
	Slice string
}

func runtimeConf(id, netns string, i int, a Attachment) *libcni.RuntimeConf {
	rt := &libcni.RuntimeConf{ContainerID: id, NetNS: netns, IfName: fmt.Sprintf("eth%d", i),
		Args: [][2]string{{"IgnoreUnknown", "1"}, {"K8S_POD_NAME", id}}}
	var pm []map[string]any
	for _, p := range a.Ports {
		if p.HostPort != 0 {
			pm = append(pm, map[string]any{"hostPort": p.HostPort, "containerPort": p.Port, "protocol": p.Protocol})
		}
	}
	if len(pm) > 0 {
		rt.CapabilityArgs = map[string]any{"portMappings": pm}
	}
	return rt
}

// Prepare creates the instance's network namespace, with its loopback up,
// if it has none yet, and returns its path. A container may be created
// in it while Setup gives it its VNICs.
func (m *Manager) Prepare(id string) (string, error) {
	path := m.NetnsPath(id)
	if _, err := os.Stat(path); err != nil {
		if err := newNetns(path); err != nil {
			return "", err
		}
	}
	// Also for a namespace that exists: a crash may have come between
	// making it and this.
	if err := inNetns(path, loUp); err != nil {
		return "", fmt.Errorf("network: loopback of %s: %w", id, err)
	}
	return path, nil
}

// Setup creates the instance's namespace (if it has none yet) and a VNIC
// on each network; it returns the namespace's path and the VNICs. A
// namespace that already exists keeps its VNICs: an instance keeps its MAC
// and IP across restarts.
func (m *Manager) Setup(ctx context.Context, id string, atts []Attachment) (string, []api.VNIC, error) {
	path, err := m.Prepare(id)
	if err != nil {
		return "", nil, err
	}
	vnics, err := m.Attach(ctx, id, path, atts)
	return path, vnics, err
}

// Attach gives an instance's namespace, made by Prepare, a VNIC on each
// network (Setup without the Prepare, for a caller that prepares the
// namespace first and goes on while the VNICs are made).
func (m *Manager) Attach(ctx context.Context, id, path string, atts []Attachment) ([]api.VNIC, error) {
	m.mu.RLock()
	defer m.mu.RUnlock()
	var vnics []api.VNIC
	for i, a := range atts {
		list, err := m.conflist(a)
		if err != nil {
			return nil, err
		}
		rt := runtimeConf(id, path, i, a)
		var res *types100.Result
		if cached, err := m.cni.GetNetworkListCachedResult(list, rt); err == nil && cached != nil {
			res, err = types100.NewResultFromResult(cached)
			if err != nil {
				return nil, err
			}
		} else {
			r, err := m.cni.AddNetworkList(ctx, list, rt)
			if err != nil {
				_ = m.cni.DelNetworkList(context.WithoutCancel(ctx), list, rt)
				return nil, fmt.Errorf("network %s: %w", a.Network.Name, cleanCNIErr(err))
			}
			if res, err = types100.NewResultFromResult(r); err != nil {
				return nil, err
			}
		}
		if err := m.fw.ensure(BridgeName(a.Network.Name), a.Network.Subnet); err != nil {
			m.log.Warn("network: isolation rules", "network", a.Network.Name, "err", err)
		}
		vnics = append(vnics, vnicOf(a.Network.Name, rt.IfName, res))
	}
	return vnics, nil
}

func vnicOf(network, ifName string, res *types100.Result) api.VNIC {
	v := api.VNIC{Network: network, Interface: ifName}
	for i, ifc := range res.Interfaces {
		if ifc.Name == ifName && ifc.Sandbox != "" {
			v.MAC = ifc.Mac
			for _, ip := range res.IPs {
				if ip.Interface != nil && *ip.Interface == i {
					v.IP = ip.Address.IP.String()
				}
			}
		}
	}
	if v.IP == "" && len(res.IPs) > 0 {
		v.IP = res.IPs[0].Address.IP.String()
	}
	return v
}

func cleanCNIErr(err error) error {
	msg := err.Error()
	if strings.Contains(msg, "no IP addresses available") {
		return errors.New("no free address left in the network's subnet")
	}
	return err
}

// Teardown removes the instance's VNICs, frees their addresses and deletes
// its namespace. It is safe to call again.
func (m *Manager) Teardown(ctx context.Context, id string, atts []Attachment) error {
	m.mu.RLock()
	defer m.mu.RUnlock()
	path := m.NetnsPath(id)
	netns := path
	if _, err := os.Stat(path); err != nil {
		netns = "" // plugins still free what they hold
	}
	var errs []error
	for i, a := range atts {
		list, err := m.conflist(a)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		if err := m.cni.DelNetworkList(ctx, list, runtimeConf(id, netns, i, a)); err != nil {
			errs = append(errs, fmt.Errorf("network %s: %w", a.Network.Name, err))
		}
	}
	m.releaseAddresses(func(owner string) bool { return owner == id })
	if err := removeNetns(path); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// Sweep frees what instances that are no longer live left behind after a
// crash between setup and teardown: their namespaces and their addresses.
func (m *Manager) Sweep(live func(id string) bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	ents, _ := os.ReadDir(m.netnsDir)
	for _, e := range ents {
		if !live(e.Name()) {
			m.log.Info("network: sweeping the namespace of a gone instance", "instance", e.Name())
			_ = removeNetns(filepath.Join(m.netnsDir, e.Name()))
		}
	}
	m.releaseAddresses(func(owner string) bool { return !live(owner) })
	// Cached results of gone instances.
	results := filepath.Join(m.dataDir, "cni", "cache", "results")
	ents, _ = os.ReadDir(results)
	for _, e := range ents {
		b, err := os.ReadFile(filepath.Join(results, e.Name()))
		if err != nil {
			continue
		}
		var c struct {
			ContainerID string `json:"containerId"`
		}
		if json.Unmarshal(b, &c) == nil && c.ContainerID != "" && !live(c.ContainerID) {
			_ = os.Remove(filepath.Join(results, e.Name()))
		}
	}
}

// releaseAddresses deletes host-local reservations whose owner matches.
// host-local keeps one file per address, holding the container id and the
// interface on two lines.
func (m *Manager) releaseAddresses(match func(owner string) bool) {
	root := filepath.Join(m.dataDir, "cni", "ipam")
	nets, _ := os.ReadDir(root)
	for _, n := range nets {
		dir := filepath.Join(root, n.Name())
		files, _ := os.ReadDir(dir)
		for _, f := range files {
			if net.ParseIP(f.Name()) == nil {
				continue // last_reserved_ip.0, lock
			}
			b, err := os.ReadFile(filepath.Join(dir, f.Name()))
			if err != nil {
				continue
			}
			owner, _, _ := strings.Cut(strings.TrimSpace(string(b)), "\n")
			if match(strings.TrimSpace(owner)) {
				_ = os.Remove(filepath.Join(dir, f.Name()))
			}
		}
	}
}

// Used lists the addresses held on a network on this node.
func (m *Manager) Used(network string) []string {
	dir := filepath.Join(m.dataDir, "cni", "ipam", "berth-"+network)
	files, _ := os.ReadDir(dir)
	var out []string
	for _, f := range files {
		if net.ParseIP(f.Name()) != nil {
			out = append(out, f.Name())
		}
	}
	return out
}

// RemoveNetwork deletes a removed network's bridge and IPAM state here.
func (m *Manager) RemoveNetwork(name string) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	_ = os.RemoveAll(filepath.Join(m.dataDir, "cni", "ipam", "berth-"+name))
	_ = removeLink(VXLANName(name))
	return removeBridge(BridgeName(name))
}
