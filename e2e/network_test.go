package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/berth-dev/berth/api"
	"github.com/berth-dev/berth/client"
	"github.com/berth-dev/berth/e2e/testhost"
	"github.com/berth-dev/berth/internal/network"
)

func vnic(t *testing.T, in api.Instance, net string) api.VNIC {
	t.Helper()
	for _, v := range in.Status.VNICs {
		if v.Network == net {
			return v
		}
	}
	t.Fatalf("%s has no VNIC on %s: %+v", in.ID, net, in.Status.VNICs)
	return api.VNIC{}
}

// reach reports whether instance id gets an answer from ip:8080.
func (b *berth) reach(id, ip string) bool {
	_, _, err := b.cli("exec", id, "--", "timeout", "2", "wget", "-q", "-O", "-", "http://"+ip+":8080/index.html")
	return err == nil
}

// TestNetworksReachabilityAndIsolation: VNICs with MACs and IPs from IPAM
// on each network; instances on one network reach each other, instances
// on different networks do not, one on both reaches both; published ports
// reach the instance from the node; bridges come and go with networks.
func TestNetworksReachabilityAndIsolation(t *testing.T) {
	testhost.SkipIfUnsupported(t)
	h := testhost.New(t)
	b := startDevRuntime(t, h, t.TempDir())
	importTestImage(t, b)
	if out := b.mustCLI("network", "ls"); !strings.Contains(out, api.DefaultNetwork) {
		t.Fatalf("no default network:\n%s", out)
	}
	b.mustCLI("network", "create", "front", "--subnet", "10.90.0.0/24")
	b.mustCLI("network", "create", "back", "--subnet", "10.91.0.0/24")
	httpd := []string{"--", "httpd", "-f", "-p", "8080", "-h", "/www"}
	b.mustCLI(append([]string{"run", "a", "--image", testImage, "--replicas", "2", "--network", "front"}, httpd...)...)
	b.mustCLI(append([]string{"run", "b", "--image", testImage, "--network", "back"}, httpd...)...)
	b.mustCLI(append([]string{"run", "c", "--image", testImage, "--network", "front", "--network", "back"}, httpd...)...)
	as, bs, cs := b.instances("a"), b.instances("b"), b.instances("c")

	front, back := netip.MustParsePrefix("10.90.0.0/24"), netip.MustParsePrefix("10.91.0.0/24")
	a0, a1 := vnic(t, as[0], "front"), vnic(t, as[1], "front")
	b0 := vnic(t, bs[0], "back")
	cf, cb := vnic(t, cs[0], "front"), vnic(t, cs[0], "back")
	for _, v := range []api.VNIC{a0, a1, cf} {
		if !front.Contains(netip.MustParseAddr(v.IP)) || v.MAC == "" {
			t.Fatalf("VNIC on front: %+v", v)
		}
	}
	for _, v := range []api.VNIC{b0, cb} {
		if !back.Contains(netip.MustParseAddr(v.IP)) || v.MAC == "" {
			t.Fatalf("VNIC on back: %+v", v)
		}
	}
	if cf.Interface == cb.Interface {
		t.Fatalf("two VNICs share an interface: %+v %+v", cf, cb)
	}
	// The VNIC the instance sees is the one recorded.
	if out := b.mustCLI("exec", as[0].ID, "--", "cat", "/sys/class/net/eth0/address"); strings.TrimSpace(out) != a0.MAC {
		t.Fatalf("MAC inside %q, recorded %q", out, a0.MAC)
	}
	if hosts := b.mustCLI("exec", as[0].ID, "--", "cat", "/etc/hosts"); !strings.Contains(hosts, a0.IP+"\t"+as[0].ID) {
		t.Fatalf("/etc/hosts: %q", hosts)
	}
	if rc := b.mustCLI("exec", cs[0].ID, "--", "cat", "/etc/resolv.conf"); !strings.Contains(rc, "nameserver 10.90.0.1\nnameserver 10.91.0.1\nsearch svc.berth") {
		t.Fatalf("resolv.conf should point at berth's DNS on each network's gateway:\n%s", rc)
	}
	if out := b.mustCLI("ps", "-o", "wide"); !strings.Contains(out, "front="+a0.IP) {
		t.Fatalf("ps -o wide does not show VNICs:\n%s", out)
	}

	if !b.reach(as[0].ID, a1.IP) {
		t.Fatal("two instances on one network cannot talk")
	}
	if !b.reach(cs[0].ID, a0.IP) || !b.reach(cs[0].ID, b0.IP) {
		t.Fatal("an instance on two networks cannot reach both")
	}
	if b.reach(bs[0].ID, a0.IP) || b.reach(as[0].ID, b0.IP) {
		t.Fatal("instances on different networks reach each other")
	}

	// Each network is a bridge on the node.
	for _, n := range []string{"front", "back"} {
		if out, err := h.Run(ctxT(t), "ip", "link", "show", network.BridgeName(n)); err != nil {
			t.Fatalf("bridge of %s: %v %s", n, err, out)
		}
	}

	// berth's own nftables table isolates the bridges and masquerades.
	rules, err := h.Run(ctxT(t), "nft", "list", "table", "inet", "berth")
	if err != nil || !strings.Contains(rules, `iifname "bz-front"`) || !strings.Contains(rules, "masquerade") || !strings.Contains(rules, "10.91.0.0/24") {
		t.Fatalf("nft table inet berth: %v\n%s", err, rules)
	}

	// br_netfilter's switch is off in the node's namespace (where the
	// module is loaded): frames switched inside a network skip the IP
	// hooks, and isolation (routed traffic) holds without it, as above.
	if v, err := h.Run(ctxT(t), "cat", "/proc/sys/net/bridge/bridge-nf-call-iptables"); err == nil && strings.TrimSpace(v) != "0" {
		t.Fatalf("net.bridge.bridge-nf-call-iptables = %q in the node, want 0", v)
	}

	var nw api.Network
	if err := json.Unmarshal([]byte(b.mustCLI("network", "inspect", "front", "-o", "json")), &nw); err != nil {
		t.Fatal(err)
	}
	if len(nw.Status.Attached) != 3 || nw.Status.AddressesUsed != 3 || nw.Status.AddressesFree != 253-3 {
		t.Fatalf("network inspect front: %+v", nw.Status)
	}
	if _, errOut, err := b.cli("network", "rm", "front"); err == nil || !strings.Contains(errOut, "in use") {
		t.Fatalf("network rm of a network in use: %v %q", err, errOut)
	}

	// A published port reaches the instance from the node.
	b.mustCLI("run", "pub", "--image", testImage, "--publish", "18080:8080", "--", "httpd", "-f", "-p", "8080", "-h", "/www")
	eventually(t, 10*time.Second, "published port answers on the node", func() (bool, string) {
		out, err := h.Run(ctxT(t), "curl", "-s", "--max-time", "2", "http://127.0.0.1:18080/index.html")
		return err == nil && strings.Contains(out, "hello from berth"), fmt.Sprint(out, err)
	})
	// ... and from an instance on the same network, through the node's
	// address on it (hairpin: SNAT by portmap, no br_netfilter needed).
	pub := b.instances("pub")
	gw := netip.MustParsePrefix(api.DefaultNetworkSubnet).Addr().Next().String()
	eventually(t, 10*time.Second, "published port answers an instance on the same network", func() (bool, string) {
		out, errOut, err := b.cli("exec", pub[0].ID, "--", "timeout", "2", "wget", "-q", "-O", "-", "http://"+gw+":18080/index.html")
		return err == nil && strings.Contains(out, "hello from berth"), fmt.Sprint(out, errOut, err)
	})

	// Networks go when nothing uses them, and so do their bridges.
	for _, s := range []string{"a", "b", "c", "pub"} {
		b.mustCLI("service", "rm", s)
	}
	eventually(t, 30*time.Second, "instances gone", func() (bool, string) {
		out := b.mustCLI("ps")
		return strings.Count(out, "\n") == 1, out
	})
	b.mustCLI("network", "rm", "front")
	eventually(t, 10*time.Second, "bridge of front removed", func() (bool, string) {
		_, err := h.Run(ctxT(t), "ip", "link", "show", network.BridgeName("front"))
		return err != nil, ""
	})
}

// ipamHelper runs inside an isolated host (the test binary re-executed
// there): it sets up and tears down n instances' networking on a /24 and
// checks that no address is left held. With crash=1 it leaves one set up
// and exits, as a crash between create and delete would.
func ipamHelper(mode string) {
	f := strings.Fields(mode) // "ipam DATADIR RUNDIR N" or "crash DATADIR RUNDIR" or "sweep DATADIR RUNDIR"
	ctx := context.Background()
	m, err := network.New(f[1], f[2], slog.New(slog.NewTextHandler(io.Discard, nil)), network.Options{})
	if err != nil {
		fmt.Println("error:", err)
		os.Exit(1)
	}
	n := api.Network{NetworkSpec: api.NetworkSpec{Name: "small", Subnet: "10.93.0.0/24", Gateway: "10.93.0.1"}}
	atts := []network.Attachment{{Network: n}}
	switch f[0] {
	case "ipam":
		count, _ := strconv.Atoi(f[3])
		seen := map[string]bool{}
		for i := range count {
			id := fmt.Sprintf("leak-%d", i)
			_, vnics, err := m.Setup(ctx, id, atts)
			if err != nil {
				fmt.Printf("error: setup %d: %v\n", i, err)
				os.Exit(1)
			}
			seen[vnics[0].IP] = true
			if err := m.Teardown(ctx, id, atts); err != nil {
				fmt.Printf("error: teardown %d: %v\n", i, err)
				os.Exit(1)
			}
		}
		fmt.Printf("cycles=%d distinct=%d held=%d\n", count, len(seen), len(m.Used("small")))
	case "crash":
		_, vnics, err := m.Setup(ctx, "crashed", atts)
		if err != nil {
			fmt.Println("error:", err)
			os.Exit(1)
		}
		fmt.Printf("held=%d ip=%s\n", len(m.Used("small")), vnics[0].IP)
	case "sweep":
		m.Sweep(func(string) bool { return false })
		_, err := os.Stat(m.NetnsPath("crashed"))
		fmt.Printf("held=%d netns-left=%v\n", len(m.Used("small")), err == nil)
	}
	os.Exit(0)
}

// TestIPAMNoLeak: 1,000 instances' networking set up and torn down on a
// /24 leaves no address held; a crash between create and delete is swept
// at the next start.
func TestIPAMNoLeak(t *testing.T) {
	testhost.SkipIfUnsupported(t)
	h := testhost.New(t)
	data := t.TempDir()
	run := t.TempDir()
	self, _ := os.Executable()
	t.Cleanup(func() { unmountUnder(t, run) })
	helper := func(mode string) string {
		t.Helper()
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
		defer cancel()
		cmd := h.Command(ctx, self, "-test.run=^$")
		cmd.Env = append(os.Environ(), "BERTH_E2E_NET_HELPER="+mode)
		out, err := cmd.CombinedOutput()
		if err != nil || strings.Contains(string(out), "error:") {
			t.Fatalf("%s: %v\n%s", mode, err, out)
		}
		return strings.TrimSpace(string(out))
	}
	start := time.Now()
	out := helper(fmt.Sprintf("ipam %s %s 1000", data, run))
	t.Logf("%s in %v", out, time.Since(start).Round(time.Millisecond))
	if !strings.Contains(out, "cycles=1000") || !strings.HasSuffix(out, "held=0") {
		t.Fatalf("addresses leaked: %s", out)
	}
	// 1,000 cycles on 253 addresses: addresses were reused.
	if out := helper(fmt.Sprintf("crash %s %s", data, run)); !strings.HasPrefix(out, "held=1") {
		t.Fatalf("crash: %s", out)
	}
	if out := helper(fmt.Sprintf("sweep %s %s", data, run)); out != "held=0 netns-left=false" {
		t.Fatalf("sweep after a crash: %s", out)
	}
	if out, _ := h.Run(ctxT(t), "ip", "link", "show", network.BridgeName("small")); strings.Contains(out, "veth") {
		t.Fatalf("veths left: %s", out)
	}
}

// unmountUnder detaches every mount below dir (what a failed helper left).
func unmountUnder(t *testing.T, dir string) {
	b, _ := os.ReadFile("/proc/self/mountinfo")
	for _, line := range strings.Split(string(b), "\n") {
		if f := strings.Fields(line); len(f) > 4 && strings.HasPrefix(f[4], dir+"/") {
			if err := syscall.Unmount(f[4], syscall.MNT_DETACH); err != nil {
				t.Logf("unmount %s: %v", f[4], err)
			}
		}
	}
}

// TestInstancesNoIPLeak: 1,000 whole instances (containers with their
// VNICs) created and deleted on a /24, in rounds that each take 250 of
// its 253 addresses: a single address kept by a deleted instance would
// leave a later round short. After every round the network holds none,
// host-local keeps no lease, and no veth or namespace is left.
func TestInstancesNoIPLeak(t *testing.T) {
	testhost.SkipIfUnsupported(t)
	const rounds, perRound = 4, 250
	h := testhost.New(t)
	dir := t.TempDir()
	b := startDevRuntime(t, h, dir)
	importTestImage(t, b)
	b.mustCLI("network", "create", "small", "--subnet", "10.94.0.0/24")
	subnet := netip.MustParsePrefix("10.94.0.0/24")
	c := b.client()
	ids, ips := map[string]bool{}, map[string]bool{}
	for r := range rounds {
		name := fmt.Sprintf("leak%d", r)
		start := time.Now()
		b.mustCLI("run", name, "--image", testImage, "--network", "small", "--replicas", strconv.Itoa(perRound),
			"--cpu", "5m", "--memory", "8Mi", "--detach", "--", "sh", "-c", `trap "exit 0" TERM; sleep 3600 & wait`)
		list := b.waitInstances(name, perRound, 3*time.Minute, fmt.Sprintf("round %d: %d instances running", r, perRound), running)
		up := time.Since(start)
		round := map[string]bool{}
		for _, in := range list {
			v := vnic(t, in, "small")
			if !subnet.Contains(netip.MustParseAddr(v.IP)) || round[v.IP] {
				t.Fatalf("round %d: %s has %s (outside the subnet, or twice)", r, in.ID, v.IP)
			}
			round[v.IP], ips[v.IP], ids[in.ID] = true, true, true
		}
		start = time.Now()
		b.mustCLI("service", "rm", name)
		eventually(t, 3*time.Minute, fmt.Sprintf("round %d: instances gone and addresses free", r), func() (bool, string) {
			left := len(b.instances(name))
			nw, err := c.GetNetwork(ctxT(t), "small")
			if err != nil {
				return false, err.Error()
			}
			return left == 0 && nw.Status.AddressesUsed == 0 && len(nw.Status.Attached) == 0,
				fmt.Sprintf("%d instances, %d addresses used", left, nw.Status.AddressesUsed)
		})
		eventually(t, 3*time.Minute, fmt.Sprintf("round %d: node holds nothing", r), func() (bool, string) {
			leases := ipamLeases(t, dir, "small")
			veths, _ := h.Run(ctxT(t), "ip", "-o", "link", "show", "master", network.BridgeName("small"))
			return len(leases) == 0 && strings.TrimSpace(veths) == "", fmt.Sprintf("%d leases; veths %q", len(leases), veths)
		})
		t.Logf("round %d: %d running in %v, all deleted from the node in %v", r, perRound, up.Round(time.Millisecond), time.Since(start).Round(time.Millisecond))
	}
	if len(ids) != rounds*perRound {
		t.Fatalf("%d distinct instances, want %d", len(ids), rounds*perRound)
	}
	t.Logf("%d instances created and deleted on %s; %d distinct addresses used", len(ids), subnet, len(ips))
}

// ipamLeases lists the addresses host-local holds for a network under a
// node's data dir: one file per address, beside its own bookkeeping. The
// network's IPAM directory must exist (else nothing would be proved).
func ipamLeases(t *testing.T, dataDir, netName string) []string {
	t.Helper()
	var dirs []string
	for _, p := range []string{"cni/ipam/berth-" + netName, "*/cni/ipam/berth-" + netName} {
		m, _ := filepath.Glob(filepath.Join(dataDir, p))
		dirs = append(dirs, m...)
	}
	if len(dirs) != 1 {
		t.Fatalf("IPAM state of network %s: %v", netName, dirs)
	}
	entries, err := os.ReadDir(dirs[0])
	if err != nil {
		t.Fatal(err)
	}
	var found []string
	for _, e := range entries {
		if _, err := netip.ParseAddr(e.Name()); err == nil {
			found = append(found, e.Name())
		}
	}
	return found
}

// TestNoNetwork: a service on networks ["none"] runs in a namespace of its
// own with loopback only: no VNIC, nothing on any bridge, no endpoint to
// discover; an exec check still runs; the name "none" cannot be a network.
func TestNoNetwork(t *testing.T) {
	testhost.SkipIfUnsupported(t)
	h := testhost.New(t)
	b := startDevRuntime(t, h, t.TempDir())
	importTestImage(t, b)
	spec := filepath.Join(t.TempDir(), "batch.json")
	os.WriteFile(spec, []byte(fmt.Sprintf(`{"name":"batch","image":%q,"networks":["none"],
		"command":["sh","-c","trap 'exit 0' TERM; sleep 1000 & wait"],
		"check":{"exec":{"command":["true"]},"interval":"200ms","timeout":"150ms"}}`, testImage)), 0o644)
	b.mustCLI("apply", "-f", spec)
	in := b.waitInstances("batch", 1, 30*time.Second, "running and passing", func(in api.Instance) bool {
		return running(in) && in.Status.Health == api.HealthPassing
	})[0]
	if len(in.Status.VNICs) != 0 {
		t.Fatalf("VNICs of an instance with no network: %+v", in.Status.VNICs)
	}
	var ifaces []string
	for _, line := range strings.Split(b.mustCLI("exec", in.ID, "--", "cat", "/proc/net/dev"), "\n") {
		if name, _, ok := strings.Cut(line, ":"); ok {
			ifaces = append(ifaces, strings.TrimSpace(name))
		}
	}
	if len(ifaces) != 1 || ifaces[0] != "lo" {
		t.Fatalf("interfaces in the container: %v, want lo only", ifaces)
	}
	if out := b.mustCLI("exec", in.ID, "--", "cat", "/sys/class/net/lo/operstate"); strings.TrimSpace(out) == "down" {
		t.Fatalf("loopback is down")
	}
	if out, _ := h.Run(ctxT(t), "ip", "-o", "link", "show", "type", "veth"); strings.TrimSpace(out) != "" {
		t.Fatalf("veths on the node for an instance with no network:\n%s", out)
	}
	l, err := b.client().Discover(ctxT(t), "batch", client.DiscoverOptions{})
	if err != nil || len(l.Items) != 0 {
		t.Fatalf("discover batch: %v %+v", err, l.Items)
	}

	// Bad input, refused and naming the field.
	if _, errOut, err := b.cli("network", "create", "none", "--subnet", "10.97.0.0/24"); err == nil || !strings.Contains(errOut, "reserved") {
		t.Fatalf("network create none: %v %q", err, errOut)
	}
	if _, errOut, err := b.cli("run", "mixed", "--image", testImage, "--network", "none", "--network", "default", "--", "sleep", "1"); err == nil || !strings.Contains(errOut, "spec.networks[0]") {
		t.Fatalf("run on none and default: %v %q", err, errOut)
	}

	netns := func() string {
		out, _ := h.Run(ctxT(t), "sh", "-c", "ls /run/berth-*/netns 2>/dev/null")
		return out
	}
	if out := netns(); !strings.Contains(out, in.ID) {
		t.Fatalf("no network namespace of %s among:\n%s", in.ID, out)
	}
	b.mustCLI("service", "rm", "batch")
	eventually(t, 30*time.Second, "the instance's namespace removed", func() (bool, string) {
		out := netns()
		return !strings.Contains(out, in.ID), out
	})
}
