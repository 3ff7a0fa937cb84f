package server

import (
	"context"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/berth-dev/berth/api"
	"github.com/berth-dev/berth/client"
)

// fakeAgent stands in for a node's agent: it records check updates and,
// like the real one, reports the new health in the instance's status.
type fakeAgent struct {
	c      *client.Client
	mu     sync.Mutex
	got    []string // id=state of each update received
	status int      // answer with this error status when not 0
	msg    string
}

func (f *fakeAgent) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	id := strings.TrimSuffix(strings.TrimPrefix(r.URL.Path, "/v1/agent/instances/"), "/check")
	var u api.CheckUpdate
	b, _ := io.ReadAll(r.Body)
	if r.Method != http.MethodPut || json.Unmarshal(b, &u) != nil {
		http.Error(w, "bad request", http.StatusBadRequest)
		return
	}
	f.mu.Lock()
	f.got = append(f.got, id+"="+u.State)
	status, msg := f.status, f.msg
	f.mu.Unlock()
	if status != 0 {
		w.WriteHeader(status)
		_ = json.NewEncoder(w).Encode(api.Error{Status: status, Code: api.CodeConflict, Message: msg})
		return
	}
	go func() {
		// The status report comes a moment later, as from the worker.
		time.Sleep(50 * time.Millisecond)
		in, err := f.c.GetInstance(context.Background(), id)
		if err == nil {
			in.Status.Health = u.State
			_, _ = f.c.PutInstanceStatus(context.Background(), id, in.Status)
		}
	}()
	_ = json.NewEncoder(w).Encode(api.CheckUpdate{State: u.State, Output: u.Output})
}

func TestInstanceCheck(t *testing.T) {
	e := startEnv(t)
	ctx := context.Background()
	agent := &fakeAgent{c: e.c}
	ats := httptest.NewServer(agent)
	defer ats.Close()
	reg := nodeReg(time.Minute)
	reg.AgentAddr = strings.TrimPrefix(ats.URL, "http://")
	if _, err := e.c.RegisterNode(ctx, "n1", reg); err != nil {
		t.Fatal(err)
	}
	specs := map[string]*api.CheckSpec{
		"ttl":   {TTL: api.Duration(5 * time.Second)},
		"http":  {HTTP: &api.HTTPCheck{Port: 80}},
		"plain": nil,
	}
	for name, check := range specs {
		if _, err := e.st.Put(ctx, keyServices+name, api.Service{Spec: api.ServiceSpec{Name: name, Image: "x", Check: check}}, -1); err != nil {
			t.Fatal(err)
		}
	}
	put := func(id, svc, node, state string) {
		t.Helper()
		in := api.Instance{ID: id, Service: svc, Node: node, DesiredState: api.DesiredRunning,
			Status: api.InstanceStatus{State: state, Health: api.HealthCritical, VNICs: []api.VNIC{{Network: "default", IP: "10.88.0.9"}}}}
		if _, err := e.st.Put(ctx, keyInstances+id, in, -1); err != nil {
			t.Fatal(err)
		}
	}
	put("ttl-a", "ttl", "n1", api.InstanceRunning)
	put("ttl-stopped", "ttl", "n1", api.InstanceFailed)
	put("ttl-unplaced", "ttl", "", api.InstancePending)
	put("http-a", "http", "n1", api.InstanceRunning)
	put("plain-a", "plain", "n1", api.InstanceRunning)

	refusals := []struct {
		name, id, body string
		status         int
		field, msg     string
	}{
		{"unknown state", "ttl-a", `{"state":"ok"}`, 400, "state", `"ok" is not a health state`},
		{"no state", "ttl-a", `{"output":"x"}`, 400, "state", "is required"},
		{"unknown field", "ttl-a", `{"state":"passing","extra":1}`, 400, "extra", "unknown field"},
		{"output too long", "ttl-a", `{"state":"passing","output":"` + strings.Repeat("x", api.MaxCheckOutput+1) + `"}`, 400, "output", "at most"},
		{"unknown instance", "nope-1", `{"state":"passing"}`, 404, "", "not found"},
		{"probed check", "http-a", `{"state":"passing"}`, 409, "", "http check, not a TTL check"},
		{"no check", "plain-a", `{"state":"passing"}`, 409, "", "no health check"},
		{"not running", "ttl-stopped", `{"state":"passing"}`, 409, "", "is not running (failed)"},
		{"not placed", "ttl-unplaced", `{"state":"passing"}`, 409, "", "is not running"},
	}
	for _, tc := range refusals {
		t.Run(tc.name, func(t *testing.T) {
			code := api.CodeInvalid
			switch tc.status {
			case 404:
				code = api.CodeNotFound
			case 409:
				code = api.CodeConflict
			}
			ae := e.in(t).apiErr("PUT", "/v1/instances/"+tc.id+"/check", tc.body, tc.status, code)
			if !strings.Contains(ae.Message, tc.msg) {
				t.Fatalf("message %q does not say %q", ae.Message, tc.msg)
			}
			if tc.field != "" && (len(ae.Fields) != 1 || ae.Fields[0].Field != tc.field) {
				t.Fatalf("fields %+v, want %s", ae.Fields, tc.field)
			}
		})
	}
	agent.mu.Lock()
	if len(agent.got) != 0 {
		t.Fatalf("refused updates reached the agent: %v", agent.got)
	}
	agent.mu.Unlock()

	// Accepted: forwarded, and answered once the status has the state, so
	// the next discovery read sees it.
	for _, state := range []string{api.HealthPassing, api.HealthWarning, api.HealthCritical, api.HealthPassing} {
		in, err := e.c.UpdateCheck(ctx, "ttl-a", api.CheckUpdate{State: state, Output: "from the test"})
		if err != nil {
			t.Fatal(err)
		}
		if in.Status.Health != state {
			t.Fatalf("answer's health %q, want %q", in.Status.Health, state)
		}
		eps, _ := e.srv.Endpoints("ttl")
		if len(eps) != 3 || eps[0].ID != "ttl-a" || eps[0].Health != state {
			t.Fatalf("discovery after the update: %+v", eps)
		}
	}
	agent.mu.Lock()
	if got := strings.Join(agent.got, " "); got != "ttl-a=passing ttl-a=warning ttl-a=critical ttl-a=passing" {
		t.Fatalf("the agent got %s", got)
	}
	// The agent's refusals come back as they are; its 404 means the node
	// has no such container running.
	agent.status, agent.msg = http.StatusConflict, "the check of instance ttl-a is not a TTL check"
	agent.mu.Unlock()
	_, err := e.c.UpdateCheck(ctx, "ttl-a", api.CheckUpdate{State: api.HealthPassing})
	if ae := wantAPIError(t, err, http.StatusConflict, api.CodeConflict); !strings.Contains(ae.Message, "not a TTL check") {
		t.Fatalf("agent's refusal: %q", ae.Message)
	}
	agent.mu.Lock()
	agent.status, agent.msg = http.StatusNotFound, "container not found"
	agent.mu.Unlock()
	_, err = e.c.UpdateCheck(ctx, "ttl-a", api.CheckUpdate{State: api.HealthPassing})
	if ae := wantAPIError(t, err, http.StatusConflict, api.CodeConflict); !strings.Contains(ae.Message, "not running on node n1") {
		t.Fatalf("agent's 404: %q", ae.Message)
	}
	// A node whose agent is gone: a clear 502.
	ats.Close()
	_, err = e.c.UpdateCheck(ctx, "ttl-a", api.CheckUpdate{State: api.HealthPassing})
	wantAPIError(t, err, http.StatusBadGateway, api.CodeInternal)
}
