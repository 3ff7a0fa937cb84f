package agent

import (
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/berth-dev/berth/api"
	"github.com/berth-dev/berth/internal/health"
)

// TestServeCheck: the agent's check endpoint feeds an instance's TTL
// monitor, whose change reaches the worker's report at once, and refuses
// bad states and probed checks.
func TestServeCheck(t *testing.T) {
	a := &Agent{}
	var mu sync.Mutex
	var reported []string
	ttl := health.NewMonitor(api.CheckSpec{TTL: api.Duration(time.Minute)}, health.Target{}, func(state, _ string) {
		mu.Lock()
		defer mu.Unlock()
		reported = append(reported, state)
	})
	probed := health.NewMonitor(api.CheckSpec{TCP: &api.TCPCheck{Port: 1}}, health.Target{Address: "127.0.0.1"}, nil)
	a.checks.set("web-ttl", ttl)
	a.checks.set("web-tcp", probed)
	a.checks.set("web-gone", ttl)
	a.checks.set("web-gone", nil)
	if a.checks.get("web-gone") != nil {
		t.Fatal("a forgotten monitor is still there")
	}
	mux := http.NewServeMux()
	mux.HandleFunc("PUT /v1/agent/instances/{id}/check", a.serveCheck)
	tests := []struct {
		name, id, body string
		status         int
		state          string // the answer's, on 200
		msg            string // in the error, otherwise
	}{
		{"pass", "web-ttl", `{"state":"passing","output":"all good"}`, 200, api.HealthPassing, ""},
		{"warn", "web-ttl", `{"state":"warning"}`, 200, api.HealthWarning, ""},
		{"fail", "web-ttl", `{"state":"critical","output":"db down"}`, 200, api.HealthCritical, ""},
		{"unknown state", "web-ttl", `{"state":"fine"}`, 400, "", "state"},
		{"no state", "web-ttl", `{}`, 400, "", "state"},
		{"unknown field", "web-ttl", `{"state":"passing","ttl":"5s"}`, 400, "", "unknown field"},
		{"not JSON", "web-ttl", `pass`, 400, "", "check update"},
		{"probed check", "web-tcp", `{"state":"passing"}`, 409, "", "not a TTL check"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			rec := httptest.NewRecorder()
			mux.ServeHTTP(rec, httptest.NewRequest(http.MethodPut, "/v1/agent/instances/"+tc.id+"/check", strings.NewReader(tc.body)))
			if rec.Code != tc.status {
				t.Fatalf("status %d, want %d: %s", rec.Code, tc.status, rec.Body)
			}
			if tc.status == 200 {
				var u api.CheckUpdate
				if err := json.Unmarshal(rec.Body.Bytes(), &u); err != nil || u.State != tc.state {
					t.Fatalf("answer %s (%v), want state %s", rec.Body, err, tc.state)
				}
				return
			}
			var ae api.Error
			if err := json.Unmarshal(rec.Body.Bytes(), &ae); err != nil || !strings.Contains(ae.Message, tc.msg) {
				t.Fatalf("error %s (%v), want it to say %q", rec.Body, err, tc.msg)
			}
		})
	}
	mu.Lock()
	defer mu.Unlock()
	if got := strings.Join(reported, ","); got != "passing,warning,critical" {
		t.Fatalf("reported %s, want each change at once", got)
	}
	if s, out := ttl.State(); s != api.HealthCritical || out != "db down" {
		t.Fatalf("monitor state %s %q", s, out)
	}
}
