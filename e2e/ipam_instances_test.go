package e2e

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/berth-dev/berth/api"
	"github.com/berth-dev/berth/e2e/testhost"
)

// TestIPAMNoLeakOver1000Instances: 1,000 whole instances (containers with a
// VNIC each) are created and deleted on a /24, in waves of 100 — four times
// the addresses the network has. Every wave gets addresses, and none is
// held at the end: deleting an instance frees its address.
func TestIPAMNoLeakOver1000Instances(t *testing.T) {
	testhost.SkipIfUnsupported(t)
	h := testhost.New(t)
	dir := t.TempDir()
	b := startDevRuntime(t, h, dir)
	importTestImage(t, b)
	b.mustCLI("network", "create", "small", "--subnet", "10.92.0.0/24")
	const waves, per = 10, 100
	seen := map[string]bool{}
	start := time.Now()
	for w := range waves {
		spec := fmt.Sprintf(`{"name":"churn","image":%q,"command":["sleep","1000"],"replicas":%d,"networks":["small"],`+
			`"restart":{"policy":"never"}}`, testImage, per)
		if _, err := b.client().ApplyServiceJSON(ctxT(t), []byte(spec)); err != nil {
			t.Fatal(err)
		}
		ips := map[string]bool{}
		running := b.waitInstances("churn", per, 3*time.Minute, fmt.Sprintf("wave %d: %d running with an address", w, per), func(in api.Instance) bool {
			return in.Status.State == api.InstanceRunning && len(in.Status.VNICs) == 1 && in.Status.VNICs[0].IP != ""
		})
		for _, in := range running {
			if seen[in.ID] {
				t.Fatalf("wave %d: instance %s seen before", w, in.ID)
			}
			seen[in.ID] = true
			ip := in.Status.VNICs[0].IP
			if ips[ip] {
				t.Fatalf("wave %d: address %s given twice", w, ip)
			}
			ips[ip] = true
		}
		if err := b.client().DeleteService(ctxT(t), "churn"); err != nil {
			t.Fatal(err)
		}
		eventually(t, 3*time.Minute, fmt.Sprintf("wave %d: every instance removed", w), func() (bool, string) {
			n := len(b.instances("churn"))
			return n == 0, fmt.Sprintf("%d left", n)
		})
	}
	t.Logf("%d instances created and deleted on a /24 in %v", len(seen), time.Since(start).Round(time.Second))
	if len(seen) != waves*per {
		t.Fatalf("%d instances, want %d", len(seen), waves*per)
	}
	var nw api.Network
	if err := json.Unmarshal([]byte(b.mustCLI("network", "inspect", "small", "-o", "json")), &nw); err != nil {
		t.Fatal(err)
	}
	if nw.Status.AddressesUsed != 0 || nw.Status.AddressesFree != 253 {
		t.Fatalf("network inspect small after the churn: %+v", nw.Status)
	}
	// host-local keeps one file per address it holds: none is left.
	var dirs []string
	for _, p := range []string{"cni/ipam/berth-small", "*/cni/ipam/berth-small"} {
		m, _ := filepath.Glob(filepath.Join(dir, p))
		dirs = append(dirs, m...)
	}
	if len(dirs) != 1 {
		t.Fatalf("IPAM state of network small: %v", dirs)
	}
	// The agent tears containers and their VNICs down after their
	// instances are gone from the API: give it time to finish.
	eventually(t, time.Minute, "every address given back", func() (bool, string) {
		entries, err := os.ReadDir(dirs[0])
		if err != nil {
			return false, err.Error()
		}
		var held []string
		for _, e := range entries {
			if strings.HasPrefix(e.Name(), "10.92.0.") {
				held = append(held, e.Name())
			}
		}
		return len(held) == 0, fmt.Sprintf("%d held: %v", len(held), held)
	})
}
