package e2e

import (
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/berth-dev/berth/api"
	"github.com/berth-dev/berth/e2e/testhost"
)

// promTarget is one of Prometheus's active targets (GET /api/v1/targets).
type promTarget struct {
	DiscoveredLabels map[string]string `json:"discoveredLabels"`
	Labels           map[string]string `json:"labels"`
	ScrapePool       string            `json:"scrapePool"`
	ScrapeURL        string            `json:"scrapeUrl"`
	Health           string            `json:"health"`
}

// TestPrometheusDiscovery: a stock Prometheus (Debian's) whose
// http_sd_configs point at berth finds a service's instances, one target
// per network address, and its external registrations, with berth's
// __meta_berth_ labels to relabel; a dead instance leaves its targets.
func TestPrometheusDiscovery(t *testing.T) {
	testhost.SkipIfUnsupported(t)
	prom, err := exec.LookPath("prometheus")
	if err != nil {
		t.Skip("prometheus is not installed (scripts/install.sh installs Debian's)")
	}
	h := testhost.New(t)
	b := startDevRuntime(t, h, t.TempDir())
	importTestImage(t, b)
	spec := filepath.Join(t.TempDir(), "web.json")
	os.WriteFile(spec, []byte(fmt.Sprintf(`{"name":"web","image":%q,"replicas":2,"command":["httpd","-f","-p","8080","-h","/www"],
		"ports":[{"name":"http","port":8080}],"restart":{"policy":"never"},"meta":{"team.name":"edge"}}`, testImage)), 0o644)
	b.mustCLI("apply", "-f", spec)
	ins := b.waitInstances("web", 2, 30*time.Second, "2 running", running)
	// An external instance: Prometheus itself, whose /metrics answers, so
	// one target is up (the busybox httpd has no /metrics: its are down,
	// which proves discovery just as well).
	const promAddr = "127.0.0.1:9090"
	b.mustCLI("registry", "register", "web", "127.0.0.1", "9090", "--id", "prom-self", "--ttl", "10m", "--meta", "zone=lab")

	dir := t.TempDir()
	cfg := filepath.Join(dir, "prometheus.yml")
	os.WriteFile(cfg, []byte(fmt.Sprintf(`global:
  scrape_interval: 1s
  scrape_timeout: 500ms
scrape_configs:
  - job_name: berth
    http_sd_configs:
      - url: http://%s/v1/prometheus/targets?healthy=1
        refresh_interval: 1s
    relabel_configs:
      - source_labels: [__meta_berth_service]
        target_label: service
      - source_labels: [__meta_berth_instance]
        target_label: berth_instance
      - source_labels: [__meta_berth_network]
        target_label: network
`, b.addr)), 0o644)
	p := h.Start(t, prom, "--config.file="+cfg, "--storage.tsdb.path="+filepath.Join(dir, "data"),
		"--web.listen-address="+promAddr)
	defer func() {
		// Stopped by its PID (cleanup would do it too), to see it exit cleanly.
		if err := p.Signal(syscall.SIGTERM); err == nil {
			if _, err := p.Wait(20 * time.Second); err != nil {
				t.Errorf("prometheus did not stop: %v", err)
			}
		}
		if t.Failed() {
			t.Logf("prometheus stderr:\n%s", p.Stderr())
		}
	}()

	hc := h.HTTPClient()
	hc.Timeout = 2 * time.Second
	active := func() ([]promTarget, error) {
		resp, err := hc.Get("http://" + promAddr + "/api/v1/targets?state=active")
		if err != nil {
			return nil, err
		}
		defer resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			return nil, fmt.Errorf("status %d", resp.StatusCode)
		}
		var body struct {
			Status string `json:"status"`
			Data   struct {
				ActiveTargets []promTarget `json:"activeTargets"`
			} `json:"data"`
		}
		if err := json.NewDecoder(resp.Body).Decode(&body); err != nil {
			return nil, err
		}
		return body.Data.ActiveTargets, nil
	}
	want := map[string]string{"127.0.0.1:9090": "prom-self"}
	for _, in := range ins {
		want[vnic(t, in, api.DefaultNetwork).IP+":8080"] = in.ID
	}
	addrs := func(ts []promTarget) string {
		var out []string
		for _, tg := range ts {
			out = append(out, tg.DiscoveredLabels["__address__"])
		}
		sort.Strings(out)
		return strings.Join(out, " ")
	}
	var got []promTarget
	start := time.Now()
	eventually(t, 30*time.Second, "Prometheus lists the service's instances and registration", func() (bool, string) {
		ts, err := active()
		if err != nil {
			return false, err.Error()
		}
		got = ts
		if len(ts) != len(want) {
			return false, addrs(ts)
		}
		for _, tg := range ts {
			if want[tg.DiscoveredLabels["__address__"]] == "" {
				return false, addrs(ts)
			}
		}
		return true, ""
	})
	t.Logf("Prometheus found %d targets %v after it started: %s", len(got), time.Since(start).Round(10*time.Millisecond), addrs(got))
	for _, tg := range got {
		addr := tg.DiscoveredLabels["__address__"]
		id := want[addr]
		l, d := tg.Labels, tg.DiscoveredLabels
		if tg.ScrapePool != "berth" || l["service"] != "web" || l["berth_instance"] != id || d["__meta_berth_instance"] != id ||
			d["__meta_berth_health"] != api.HealthPassing {
			t.Fatalf("target %s: labels %v, discovered %v", addr, l, d)
		}
		if id == "prom-self" {
			if d["__meta_berth_external"] != "true" || d["__meta_berth_meta_zone"] != "lab" {
				t.Fatalf("the registration's labels: %v", d)
			}
			continue
		}
		if d["__meta_berth_external"] != "false" || l["network"] != api.DefaultNetwork || d["__meta_berth_node"] != "node1" ||
			d["__meta_berth_port_name"] != "http" || d["__meta_berth_meta_team_name"] != "edge" {
			t.Fatalf("an instance's labels: %v", d)
		}
	}
	// Prometheus scrapes what it found: itself, up.
	eventually(t, 15*time.Second, "the registered Prometheus scraped and up", func() (bool, string) {
		ts, err := active()
		if err != nil {
			return false, err.Error()
		}
		var states []string
		for _, tg := range ts {
			if tg.DiscoveredLabels["__address__"] == "127.0.0.1:9090" && tg.Health == "up" {
				return true, ""
			}
			states = append(states, tg.DiscoveredLabels["__address__"]+"="+tg.Health)
		}
		return false, strings.Join(states, " ")
	})

	// A dead instance leaves the healthy targets.
	killContainer(t, ins[0].ID)
	gone := vnic(t, ins[0], api.DefaultNetwork).IP + ":8080"
	eventually(t, 15*time.Second, "the killed instance's target gone from Prometheus", func() (bool, string) {
		ts, err := active()
		if err != nil {
			return false, err.Error()
		}
		return len(ts) == len(want)-1 && !strings.Contains(addrs(ts), gone), addrs(ts)
	})
}
