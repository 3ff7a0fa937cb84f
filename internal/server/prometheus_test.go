package server

import (
	"context"
	"encoding/json"
	"net/http"
	"reflect"
	"regexp"
	"strings"
	"testing"

	"github.com/berth-dev/berth/api"
)

func TestTargetGroupOf(t *testing.T) {
	inst := api.Endpoint{Service: "web", ID: "web-a", Address: "10.88.0.2", Port: 8080, Network: "default", Node: "n1",
		Health: api.HealthPassing, Ports: map[string]int{"http": 8080, "metrics": 9100},
		Meta: map[string]string{"service": "web", "zone.name": "eu-1", "zone-name": "shadowed", "9x": "digit"}}
	ext := api.Endpoint{Service: "db", ID: "pg-1", Address: "2001:db8::7", Port: 5432, Health: api.HealthCritical, External: true}
	noPort := api.Endpoint{Service: "w", ID: "w-1", Address: "10.88.0.3", Network: "default", Health: api.HealthPassing}
	tests := []struct {
		name    string
		ep      api.Endpoint
		f       promFilter
		target  string // "" when left out
		portTag string
		labels  map[string]string // checked when set
	}{
		{name: "instance at its first port", ep: inst, target: "10.88.0.2:8080", portTag: "http",
			labels: map[string]string{
				"__meta_berth_service": "web", "__meta_berth_instance": "web-a", "__meta_berth_node": "n1",
				"__meta_berth_network": "default", "__meta_berth_health": "passing", "__meta_berth_external": "false",
				"__meta_berth_port_name": "http", "__meta_berth_meta_service": "web",
				// "zone-name" and "zone.name" sanitise alike: the first in order wins.
				"__meta_berth_meta_zone_name": "shadowed", "__meta_berth_meta_9x": "digit",
			}},
		{name: "instance at a named port", ep: inst, f: promFilter{port: "metrics"}, target: "10.88.0.2:9100", portTag: "metrics"},
		{name: "instance without the named port", ep: inst, f: promFilter{port: "grpc"}},
		{name: "external, IPv6, critical", ep: ext, target: "[2001:db8::7]:5432",
			labels: map[string]string{
				"__meta_berth_service": "db", "__meta_berth_instance": "pg-1", "__meta_berth_node": "",
				"__meta_berth_network": "", "__meta_berth_health": "critical", "__meta_berth_external": "true",
				"__meta_berth_port_name": "",
			}},
		{name: "critical left out of the healthy view", ep: ext, f: promFilter{healthy: true}},
		{name: "warning kept in the healthy view", ep: func() api.Endpoint { e := inst; e.Health = api.HealthWarning; return e }(),
			f: promFilter{healthy: true}, target: "10.88.0.2:8080", portTag: "http"},
		{name: "no port: nothing to scrape", ep: noPort},
	}
	labelRE := regexp.MustCompile(`^[a-zA-Z_][a-zA-Z0-9_]*$`)
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			g, ok := targetGroupOf(tc.ep, tc.f)
			if tc.target == "" {
				if ok {
					t.Fatalf("want left out, got %+v", g)
				}
				return
			}
			if !ok || len(g.Targets) != 1 || g.Targets[0] != tc.target {
				t.Fatalf("got %+v (%v), want target %s", g, ok, tc.target)
			}
			if tc.portTag != "" && g.Labels[promLabelPortName] != tc.portTag {
				t.Fatalf("port name %q, want %q", g.Labels[promLabelPortName], tc.portTag)
			}
			if tc.labels != nil && !reflect.DeepEqual(g.Labels, tc.labels) {
				t.Fatalf("labels\n got %v\nwant %v", g.Labels, tc.labels)
			}
			for k := range g.Labels {
				if !labelRE.MatchString(k) || !strings.HasPrefix(k, "__meta_berth_") {
					t.Fatalf("label name %q is not a valid __meta_berth_ label", k)
				}
			}
		})
	}
}

func TestPromLabelName(t *testing.T) {
	for in, want := range map[string]string{
		"zone": "zone", "Zone_1": "Zone_1", "a.b-c/d": "a_b_c_d", "ключ": "____", "9": "9", "": "",
	} {
		if got := promLabelName(in); got != want {
			t.Errorf("promLabelName(%q) = %q, want %q", in, got, want)
		}
	}
}

// TestPrometheusTargets: the endpoint answers Prometheus's http_sd format
// for every service or one, filtered, and refuses bad parameters naming them.
func TestPrometheusTargets(t *testing.T) {
	e := startEnv(t)
	ctx := context.Background()
	get := func(q string) (http.Header, []map[string]any) {
		t.Helper()
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, e.ts.URL+"/v1/prometheus/targets"+q, nil)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			t.Fatalf("%s: status %d", q, resp.StatusCode)
		}
		// Strictly the format: a list of objects with exactly targets
		// (a list of strings) and labels (an object of strings).
		var raw []map[string]json.RawMessage
		dec := json.NewDecoder(resp.Body)
		if err := dec.Decode(&raw); err != nil {
			t.Fatalf("%s: not a JSON list: %v", q, err)
		}
		if raw == nil {
			t.Fatalf("%s: null, not a list", q)
		}
		var out []map[string]any
		for _, g := range raw {
			var targets []string
			var labels map[string]string
			if len(g) != 2 || json.Unmarshal(g["targets"], &targets) != nil || json.Unmarshal(g["labels"], &labels) != nil {
				t.Fatalf("%s: not a target group: %v", q, g)
			}
			out = append(out, map[string]any{"targets": targets, "labels": labels})
		}
		return resp.Header, out
	}
	if h, groups := get(""); len(groups) != 0 || h.Get("Content-Type") != "application/json" {
		t.Fatalf("empty registry: %v %v", h, groups)
	}
	put := func(key string, v any) {
		t.Helper()
		rev, err := e.st.Put(ctx, key, v, -1)
		if err != nil {
			t.Fatal(err)
		}
		e.waitCache(rev)
	}
	put(keyServices+"web", api.Service{Spec: api.ServiceSpec{Name: "web", Meta: map[string]string{"team": "core"}}})
	for i, h := range []string{api.HealthPassing, api.HealthCritical} {
		id := []string{"web-a", "web-b"}[i]
		put(keyInstances+id, api.Instance{ID: id, Service: "web", Node: "n1", DesiredState: api.DesiredRunning,
			Status: api.InstanceStatus{State: api.InstanceRunning, Health: h,
				Ports: []api.PortBinding{{Name: "http", Port: 8080}, {Name: "metrics", Port: 9100}},
				VNICs: []api.VNIC{{Network: "default", IP: []string{"10.88.0.2", "10.88.0.3"}[i]}, {Network: "front", IP: []string{"10.90.0.2", "10.90.0.3"}[i]}}}})
	}
	if _, err := e.c.Register(ctx, "legacy", "db-1", api.RegistrationSpec{Address: "192.0.2.5", Port: 5432, Meta: map[string]string{"role": "primary"}}); err != nil {
		t.Fatal(err)
	}
	targets := func(groups []map[string]any) string {
		var out []string
		for _, g := range groups {
			out = append(out, strings.Join(g["targets"].([]string), ","))
		}
		return strings.Join(out, " ")
	}
	eventuallyTargets := func(q, want string) []map[string]any {
		t.Helper()
		var groups []map[string]any
		eventually(t, 5e9, q, func() bool {
			_, groups = get(q)
			return targets(groups) == want
		})
		return groups
	}
	all := eventuallyTargets("", "192.0.2.5:5432 10.88.0.2:8080 10.90.0.2:8080 10.88.0.3:8080 10.90.0.3:8080")
	if l := all[0]["labels"].(map[string]string); l["__meta_berth_external"] != "true" || l["__meta_berth_meta_role"] != "primary" || l["__meta_berth_service"] != "legacy" {
		t.Fatalf("registration labels: %v", l)
	}
	if l := all[1]["labels"].(map[string]string); l["__meta_berth_meta_team"] != "core" || l["__meta_berth_health"] != "passing" || l["__meta_berth_port_name"] != "http" {
		t.Fatalf("instance labels: %v", l)
	}
	eventuallyTargets("?healthy=1", "192.0.2.5:5432 10.88.0.2:8080 10.90.0.2:8080")
	eventuallyTargets("?service=web&port=metrics&healthy=true", "10.88.0.2:9100 10.90.0.2:9100")
	eventuallyTargets("?service=legacy", "192.0.2.5:5432")
	eventuallyTargets("?service=nope", "")
	for q, field := range map[string]string{
		"?service=Bad_Name": "service", "?service=": "service", "?port=no_such!": "port", "?healthy=maybe": "healthy",
	} {
		ae := e.apiErr("GET", "/v1/prometheus/targets"+q, "", http.StatusBadRequest, api.CodeInvalid)
		if len(ae.Fields) != 1 || ae.Fields[0].Field != field {
			t.Fatalf("%s: fields %+v, want %s", q, ae.Fields, field)
		}
	}
}
