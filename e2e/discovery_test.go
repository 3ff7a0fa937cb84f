package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/berth-dev/berth/api"
	"github.com/berth-dev/berth/client"
	"github.com/berth-dev/berth/e2e/testhost"
)

// TestDiscoveryOfInstancesAndRegistrations: a service's running instances
// are discovered with their VNIC addresses; an instance that dies leaves the
// healthy view; an external registration appears, and expires by itself
// when it is not renewed.
func TestDiscoveryOfInstancesAndRegistrations(t *testing.T) {
	testhost.SkipIfUnsupported(t)
	h := testhost.New(t)
	b := startDevRuntime(t, h, t.TempDir())
	importTestImage(t, b)
	b.mustCLI("run", "web", "--image", testImage, "--replicas", "3", "--restart", "never", "--", "httpd", "-f", "-p", "8080", "-h", "/www")
	ins := b.waitInstances("web", 3, 30*time.Second, "3 running", running)
	discover := func(args ...string) []api.Endpoint {
		t.Helper()
		var eps []api.Endpoint
		if err := json.Unmarshal([]byte(b.mustCLI(append([]string{"discover", "web", "-o", "json"}, args...)...)), &eps); err != nil {
			t.Fatal(err)
		}
		return eps
	}
	eps := discover("--healthy")
	if len(eps) != 3 {
		t.Fatalf("discover: %+v", eps)
	}
	ips := map[string]bool{}
	for _, in := range ins {
		ips[vnic(t, in, api.DefaultNetwork).IP] = true
	}
	for _, ep := range eps {
		if !ips[ep.Address] || ep.Health != api.HealthPassing || ep.Network != api.DefaultNetwork {
			t.Fatalf("endpoint %+v not one of the instances' addresses %v", ep, ips)
		}
	}

	// Kill one instance's process: it leaves the healthy view.
	killContainer(t, ins[0].ID)
	eventually(t, 5*time.Second, "the dead instance out of discovery", func() (bool, string) {
		eps := discover("--healthy")
		for _, ep := range eps {
			if ep.ID == ins[0].ID {
				return false, ep.Health
			}
		}
		return len(eps) == 2, ""
	})

	// External registration with a short TTL: present, then expired.
	b.mustCLI("registry", "register", "web", "198.51.100.7", "9000", "--id", "legacy-1", "--ttl", "2s", "--meta", "zone=b")
	if eps := discover("--meta", "zone:b"); len(eps) != 1 || !eps[0].External || eps[0].Address != "198.51.100.7" {
		t.Fatalf("registered endpoint: %+v", eps)
	}
	eventually(t, 10*time.Second, "the registration expired", func() (bool, string) {
		return len(discover("--meta", "zone:b")) == 0, ""
	})
	b.mustCLI("registry", "register", "web", "198.51.100.8", "9000", "--id", "legacy-2")
	b.mustCLI("registry", "deregister", "web", "legacy-2")
	if out := b.mustCLI("discover", "web"); strings.Contains(out, "legacy-2") {
		t.Fatalf("deregistered endpoint still listed:\n%s", out)
	}
}

// TestDNS: berth dev --dns-addr answers NAME.svc.berth with the healthy
// instances' addresses (queried with dig), SRV for named ports, NXDOMAIN for
// unknown names; a killed instance leaves the answers.
func TestDNS(t *testing.T) {
	testhost.SkipIfUnsupported(t)
	if _, err := exec.LookPath("dig"); err != nil {
		t.Skip("dig (bind9-dnsutils) is not installed")
	}
	h := testhost.New(t)
	b := startDevRuntime(t, h, t.TempDir(), "--dns-addr", "127.0.0.1:5353")
	if !strings.Contains(b.proc.Stdout(), "DNS for svc.berth on 127.0.0.1:5353") {
		t.Fatalf("dev does not say where DNS listens: %s", b.proc.Stdout())
	}
	importTestImage(t, b)
	spec := filepath.Join(t.TempDir(), "web.json")
	os.WriteFile(spec, []byte(fmt.Sprintf(`{"name":"web","image":%q,"replicas":2,"command":["httpd","-f","-p","8080","-h","/www"],
		"ports":[{"name":"http","port":8080}],"restart":{"policy":"never"}}`, testImage)), 0o644)
	b.mustCLI("apply", "-f", spec)
	ins := b.waitInstances("web", 2, 30*time.Second, "2 running", running)
	dig := func(args ...string) string {
		t.Helper()
		out, err := h.Run(ctxT(t), "dig", append([]string{"@127.0.0.1", "-p", "5353", "+time=2", "+tries=1"}, args...)...)
		if err != nil {
			t.Fatalf("dig %v: %v\n%s", args, err, out)
		}
		return out
	}
	want := map[string]bool{}
	for _, in := range ins {
		want[vnic(t, in, api.DefaultNetwork).IP] = true
	}
	eventually(t, 5*time.Second, "A records of both instances", func() (bool, string) {
		out := dig("+short", "web.svc.berth", "A")
		got := strings.Fields(out)
		ok := len(got) == 2
		for _, ip := range got {
			ok = ok && want[ip]
		}
		return ok, out
	})
	if out := dig("+short", "_http._tcp.web.svc.berth", "SRV"); strings.Count(out, " 8080 ") != 2 {
		t.Fatalf("SRV: %q", out)
	}
	if out := dig("nope.svc.berth", "A"); !strings.Contains(out, "status: NXDOMAIN") {
		t.Fatalf("unknown name: %s", out)
	}
	if out := dig("example.com", "A"); !strings.Contains(out, "status: REFUSED") {
		t.Fatalf("outside the zone: %s", out)
	}
	// Containers resolve the same names through the DNS their resolv.conf
	// names: the agent's, on their network's gateway.
	out := b.mustCLI("exec", ins[0].ID, "--", "nslookup", "web.svc.berth")
	for ip := range want {
		if !strings.Contains(out, ip) {
			t.Fatalf("nslookup inside a container does not list %s:\n%s", ip, out)
		}
	}
	if out, _, err := b.cli("exec", ins[0].ID, "--", "nslookup", "nope.svc.berth"); err == nil && !strings.Contains(out, "NXDOMAIN") {
		t.Fatalf("nslookup of an unknown name inside a container:\n%s", out)
	}
	killContainer(t, ins[0].ID)
	gone := vnic(t, ins[0], api.DefaultNetwork).IP
	eventually(t, 5*time.Second, "the killed instance out of DNS", func() (bool, string) {
		out := dig("+short", "web.svc.berth", "A")
		return !strings.Contains(out, gone) && strings.TrimSpace(out) != "", out
	})
}

// TestHealthCheckStartsFailing: an HTTP check run by the agent turns an
// instance passing, then critical when the check starts failing, which
// takes it out of the healthy view; it comes back when the check passes.
func TestHealthCheckStartsFailing(t *testing.T) {
	testhost.SkipIfUnsupported(t)
	h := testhost.New(t)
	b := startDevRuntime(t, h, t.TempDir())
	importTestImage(t, b)
	spec := filepath.Join(t.TempDir(), "web.json")
	os.WriteFile(spec, []byte(fmt.Sprintf(`{"name":"web","image":%q,"replicas":2,
		"command":["httpd","-f","-p","8080","-h","/www"],"ports":[{"name":"http","port":8080}],
		"check":{"http":{"port":8080,"path":"/index.html"},"interval":"200ms","timeout":"150ms","failuresBeforeCritical":2}}`, testImage)), 0o644)
	b.mustCLI("apply", "-f", spec)
	healthyIDs := func() map[string]bool {
		l, err := b.client().Discover(ctxT(t), "web", client.DiscoverOptions{Healthy: true})
		if err != nil {
			t.Fatal(err)
		}
		out := map[string]bool{}
		for _, ep := range l.Items {
			out[ep.ID] = true
		}
		return out
	}
	eventually(t, 20*time.Second, "both instances passing", func() (bool, string) {
		ids := healthyIDs()
		return len(ids) == 2, fmt.Sprint(ids)
	})
	victim := b.instances("web")[0].ID
	b.mustCLI("exec", victim, "--", "rm", "/www/index.html")
	eventually(t, 5*time.Second, "the failing instance critical and out of the healthy view", func() (bool, string) {
		in, _ := b.client().GetInstance(ctxT(t), victim)
		ids := healthyIDs()
		return in.Status.Health == api.HealthCritical && !ids[victim] && len(ids) == 1, in.Status.Health
	})
	b.mustCLI("exec", victim, "--", "sh", "-c", "echo back > /www/index.html")
	eventually(t, 5*time.Second, "passing again", func() (bool, string) {
		return healthyIDs()[victim], ""
	})
}

// TestDiscovererFailover: a client calling a service through the Go
// client's Discoverer while one of its instances dies sees no failed call:
// the failed call is retried on another instance, and the dead one leaves
// the client's view.
func TestDiscovererFailover(t *testing.T) {
	testhost.SkipIfUnsupported(t)
	h := testhost.New(t)
	b := startDevRuntime(t, h, t.TempDir())
	importTestImage(t, b)
	spec := filepath.Join(t.TempDir(), "web.json")
	os.WriteFile(spec, []byte(fmt.Sprintf(`{"name":"web","image":%q,"replicas":3,"command":["httpd","-f","-p","8080","-h","/www"],
		"ports":[{"name":"http","port":8080}],"restart":{"policy":"never"}}`, testImage)), 0o644)
	b.mustCLI("apply", "-f", spec)
	ins := b.waitInstances("web", 3, 30*time.Second, "3 running", running)

	ctx := ctxT(t)
	d, err := b.client().NewDiscoverer(ctx, "web", client.DiscovererOptions{Balancer: client.RoundRobin, Port: "http"})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	eventually(t, 5*time.Second, "3 endpoints in the client's view", func() (bool, string) {
		return len(d.Endpoints()) == 3, fmt.Sprint(d.Endpoints())
	})
	hc := h.HTTPClient()
	hc.Timeout = time.Second
	call := func(ctx context.Context, ep api.Endpoint) error {
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+d.Addr(ep)+"/index.html", nil)
		resp, err := hc.Do(req)
		if err != nil {
			return err
		}
		defer resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			return fmt.Errorf("status %d", resp.StatusCode)
		}
		return nil
	}
	calls, failed := 0, 0
	deadline := time.Now().Add(3 * time.Second)
	killed := false
	for time.Now().Before(deadline) {
		if !killed && time.Until(deadline) < 2*time.Second {
			killContainer(t, ins[0].ID)
			killed = true
		}
		calls++
		if err := d.Do(ctx, call); err != nil {
			failed++
			t.Logf("call %d failed: %v", calls, err)
		}
	}
	if failed != 0 {
		t.Fatalf("%d of %d calls failed while an instance died", failed, calls)
	}
	for _, ep := range d.Endpoints() {
		if ep.ID == ins[0].ID {
			t.Fatalf("the dead instance is still in the client's view")
		}
	}
	t.Logf("%d calls through the Discoverer, none failed, while %s died", calls, ins[0].ID)
}
