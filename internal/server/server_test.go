package server

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"reflect"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/berth-dev/berth/api"
	"github.com/berth-dev/berth/client"
	"github.com/berth-dev/berth/internal/store"
)

// --- harness ---

// logBuffer collects the server's log; it is printed only if the test fails.
type logBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *logBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *logBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

type testEnv struct {
	t   *testing.T
	ctx context.Context
	st  *store.Store
	srv *Server
	ts  *httptest.Server
	c   *client.Client
}

func startEnv(t *testing.T) *testEnv { return startEnvWith(t, Options{}, nil) }

// startEnvWith opens an embedded store, runs before on it (to seed data the
// server finds at start), starts the server's Run and an HTTP test server,
// and waits until the API is ready. Cleanup cancels Run and waits for it,
// closes the HTTP server, then the store.
func startEnvWith(t *testing.T, opts Options, before func(st *store.Store)) *testEnv {
	t.Helper()
	// These tests are of the API: the deployment controller would change
	// the store under them (deploy_test.go tests it).
	opts.NoDeployments = !opts.deployments
	ctx, cancel := context.WithCancel(context.Background())
	octx, ocancel := context.WithTimeout(ctx, 30*time.Second)
	defer ocancel()
	st, err := store.Open(octx, store.Config{DataDir: t.TempDir()})
	if err != nil {
		cancel()
		t.Fatal(err)
	}
	if before != nil {
		before(st)
	}
	logs := &logBuffer{}
	log := slog.New(slog.NewTextHandler(logs, nil))
	if opts.ID == "" {
		opts.ID = "test-" + t.Name()
	}
	srv := New(st, log, opts)
	ts := httptest.NewUnstartedServer(srv.Handler())
	// Requests (watch streams above all) end with the test's context.
	ts.Config.BaseContext = func(net.Listener) context.Context { return ctx }
	ts.Start()
	done := make(chan struct{})
	go func() {
		defer close(done)
		_ = srv.Run(ctx)
	}()
	t.Cleanup(func() {
		cancel()
		select {
		case <-done:
		case <-time.After(15 * time.Second):
			t.Error("server Run did not return after cancel")
		}
		ts.Close()
		_ = st.Close()
		if t.Failed() {
			t.Logf("server log:\n%s", logs)
		}
	})
	c, err := client.New(ts.URL)
	if err != nil {
		t.Fatal(err)
	}
	if err := c.WaitReady(ctx, 10*time.Second); err != nil {
		t.Fatal(err)
	}
	// Wait for the election's candidacy key: after it, only the tests write
	// (the liveness controller marks down nodes whose lease lapsed, no more),
	// so tests can compare store revisions.
	eventually(t, 10*time.Second, "the server campaigns for leadership", func() bool {
		n, err := st.Count(ctx, keyElection+"/")
		return err == nil && n > 0
	})
	return &testEnv{t: t, ctx: ctx, st: st, srv: srv, ts: ts, c: c}
}

// in is e for a subtest: failures are reported on t.
func (e *testEnv) in(t *testing.T) *testEnv {
	c := *e
	c.t = t
	return &c
}

// raw sends body as is and returns the status and the response body.
func (e *testEnv) raw(method, path, body string) (int, []byte) {
	e.t.Helper()
	var rd io.Reader
	if body != "" {
		rd = strings.NewReader(body)
	}
	req, err := http.NewRequestWithContext(e.ctx, method, e.ts.URL+path, rd)
	if err != nil {
		e.t.Fatal(err)
	}
	if body != "" {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		e.t.Fatalf("%s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		e.t.Fatal(err)
	}
	return resp.StatusCode, b
}

// rawInto sends body, checks the status and decodes the answer into out.
func (e *testEnv) rawInto(method, path, body string, wantStatus int, out any) {
	e.t.Helper()
	status, b := e.raw(method, path, body)
	if status != wantStatus {
		e.t.Fatalf("%s %s: status %d, want %d: %s", method, path, status, wantStatus, b)
	}
	if out != nil {
		if err := json.Unmarshal(b, out); err != nil {
			e.t.Fatalf("%s %s: decode %s: %v", method, path, b, err)
		}
	}
}

// apiErr sends body and decodes the error it must be answered with.
func (e *testEnv) apiErr(method, path, body string, wantStatus int, wantCode string) api.Error {
	e.t.Helper()
	status, b := e.raw(method, path, body)
	var ae api.Error
	if err := json.Unmarshal(b, &ae); err != nil {
		e.t.Fatalf("%s %s: status %d, body is not an API error: %s", method, path, status, b)
	}
	if status != wantStatus || ae.Status != wantStatus || ae.Code != wantCode {
		e.t.Fatalf("%s %s: status %d (body %d), code %q; want %d %q: %s", method, path, status, ae.Status, ae.Code, wantStatus, wantCode, b)
	}
	return ae
}

// wantAPIError checks that err is an *api.Error with status and code.
func wantAPIError(t *testing.T, err error, status int, code string) *api.Error {
	t.Helper()
	var ae *api.Error
	if !errors.As(err, &ae) {
		t.Fatalf("error %v (%T), want an *api.Error %d %s", err, err, status, code)
	}
	if ae.Status != status || ae.Code != code {
		t.Fatalf("error %d %q %q, want %d %q", ae.Status, ae.Code, ae.Message, status, code)
	}
	return ae
}

type storedKV struct {
	Value string
	Mod   int64
	Lease int64
}

// dump reads every object berth stored (the election's keys aside) and the
// store's revision.
func (e *testEnv) dump() (map[string]storedKV, int64) {
	e.t.Helper()
	kvs, rev, err := e.st.List(e.ctx, store.Prefix)
	if err != nil {
		e.t.Fatal(err)
	}
	out := map[string]storedKV{}
	for _, kv := range kvs {
		if strings.HasPrefix(kv.Key, keyElection) {
			continue
		}
		out[kv.Key] = storedKV{string(kv.Value), kv.ModRevision, kv.Lease}
	}
	return out, rev
}

// waitCache waits until the server's cache has seen revision rev.
func (e *testEnv) waitCache(rev int64) {
	e.t.Helper()
	ctx, cancel := context.WithTimeout(e.ctx, 5*time.Second)
	defer cancel()
	if err := e.srv.cache.WaitFor(ctx, rev); err != nil {
		e.t.Fatalf("cache not current to %d: %v", rev, err)
	}
}

// eventually polls cond every 50ms until it holds or timeout passes.
func eventually(t *testing.T, timeout time.Duration, what string, cond func() bool) time.Duration {
	t.Helper()
	start := time.Now()
	for {
		if cond() {
			return time.Since(start)
		}
		if time.Since(start) > timeout {
			t.Fatalf("%s: not within %v", what, timeout)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func nodeReg(ttl time.Duration) api.NodeRegistration {
	return api.NodeRegistration{Address: "10.0.0.1",
		Capacity:    api.Resources{CPU: 2000, Memory: 1 << 30},
		Allocatable: api.Resources{CPU: 1500, Memory: 1 << 29},
		TTL:         api.Duration(ttl), Labels: map[string]string{"zone": "a"}}
}

func intp(i int) *int { return &i }

// --- validation ---

// TestWritesRefuseBadInput sends every write endpoint bad input and checks
// the 400, its code, the field named in Fields and in the message, and that
// nothing stored changed.
func TestWritesRefuseBadInput(t *testing.T) {
	e := startEnv(t)
	ctx := e.ctx
	// Objects that the refused writes would otherwise change.
	if _, err := e.c.CreateNetwork(ctx, api.NetworkSpec{Name: "net1", Subnet: "10.90.0.0/24"}); err != nil {
		t.Fatal(err)
	}
	if _, err := e.c.ApplyService(ctx, api.ServiceSpec{Name: "web", Image: "nginx", Networks: []string{"net1"}}); err != nil {
		t.Fatal(err)
	}
	if _, err := e.c.RegisterNode(ctx, "n1", nodeReg(time.Minute)); err != nil {
		t.Fatal(err)
	}
	if _, err := e.c.Register(ctx, "web", "i-1", api.RegistrationSpec{Address: "10.0.0.9", Port: 80}); err != nil {
		t.Fatal(err)
	}
	if _, err := e.st.Put(ctx, keyInstances+"web-1", api.Instance{ID: "web-1", Service: "web", Generation: 1,
		DesiredState: "running", Status: api.InstanceStatus{State: api.InstancePending}}, 0); err != nil {
		t.Fatal(err)
	}

	const (
		svc   = "/v1/services"
		net_  = "/v1/networks"
		node  = "/v1/nodes/n1"
		reg   = "/v1/registry/services/web/instances/i-1"
		inst  = "/v1/instances/web-1/status"
		goodN = `"address":"10.0.0.1","capacity":{"cpu":"2","memory":"1Gi"},"allocatable":{"cpu":"1","memory":"512Mi"}`
	)
	tests := []struct {
		name         string
		method, path string
		body         string
		field        string
		reason       string // a substring of the field's reason
	}{
		// services (field paths start at "spec")
		{"service malformed JSON", "POST", svc, `{"name":"web",`, "spec", "malformed JSON"},
		{"service bad JSON syntax", "POST", svc, `{"name" "web"}`, "spec", "malformed JSON"},
		{"service empty body", "POST", svc, ``, "spec", "empty body"},
		{"service not an object", "POST", svc, `[1,2]`, "spec", "must be an object"},
		{"service trailing data", "POST", svc, `{"name":"web","image":"nginx"} {}`, "spec", "unexpected data"},
		{"service unknown field", "POST", svc, `{"name":"web","image":"nginx","replica":2}`, "spec.replica", "unknown field"},
		{"service nested unknown field", "POST", svc, `{"name":"web","image":"nginx","ports":[{"name":"http","port":80,"proto":"tcp"}]}`, "spec.ports[0].proto", "unknown field"},
		{"service wrong type", "POST", svc, `{"name":"web","image":"nginx","replicas":"3"}`, "spec.replicas", "must be an integer"},
		{"service wrong type in list", "POST", svc, `{"name":"web","image":"nginx","networks":["net1",1]}`, "spec.networks[1]", "must be a string"},
		{"service bad quantity", "POST", svc, `{"name":"web","image":"nginx","resources":{"memory":"lots"}}`, "spec.resources.memory", "not a memory quantity"},
		{"service bad duration", "POST", svc, `{"name":"web","image":"nginx","restart":{"delay":"soon"}}`, "spec.restart.delay", "not a duration"},
		{"service replicas -1", "POST", svc, `{"name":"web","image":"nginx","replicas":-1}`, "spec.replicas", "must be >= 0"},
		{"service bad name", "POST", svc, `{"name":"Web_1","image":"nginx"}`, "spec.name", "not a DNS label"},
		{"service no image", "POST", svc, `{"name":"web"}`, "spec.image", "is required"},
		{"service bad port", "POST", svc, `{"name":"web","image":"nginx","ports":[{"name":"http","port":0}]}`, "spec.ports[0].port", "1 to 65535"},
		{"service missing network", "POST", svc, `{"name":"web","image":"nginx","networks":["nope"]}`, "spec.networks[0]", `network "nope" does not exist`},
		{"service second network missing", "POST", svc, `{"name":"web","image":"nginx","networks":["net1","nope"]}`, "spec.networks[1]", "does not exist"},
		{"service name differs from URL", "PUT", svc + "/web", `{"name":"api","image":"nginx"}`, "spec.name", "does not match"},
		{"service PUT replicas -1", "PUT", svc + "/web", `{"image":"nginx","replicas":-1}`, "spec.replicas", "must be >= 0"},

		// networks
		{"network malformed JSON", "POST", net_, `{"name":"n2"`, "body", "malformed JSON"},
		{"network empty body", "POST", net_, ``, "body", "empty body"},
		{"network null body", "POST", net_, `null`, "body", "not null"},
		{"service null body", "POST", svc, `null`, "spec", "not null"},
		{"network unknown field", "POST", net_, `{"name":"n2","subnet":"10.91.0.0/24","vni":5}`, "vni", "unknown field"},
		{"network wrong type", "POST", net_, `{"name":"n2","subnet":24}`, "subnet", "must be a string"},
		{"network subnet not a CIDR", "POST", net_, `{"name":"n2","subnet":"banana"}`, "subnet", "not a CIDR"},
		{"network subnet prefix 33", "POST", net_, `{"name":"n2","subnet":"10.91.0.0/33"}`, "subnet", "not a CIDR"},
		{"network subnet too small", "POST", net_, `{"name":"n2","subnet":"10.91.0.0/30"}`, "subnet", "too small"},
		{"network subnet IPv6", "POST", net_, `{"name":"n2","subnet":"fd00::/64"}`, "subnet", "IPv4"},
		{"network no subnet", "POST", net_, `{"name":"n2"}`, "subnet", "is required"},
		{"network bad gateway", "POST", net_, `{"name":"n2","subnet":"10.91.0.0/24","gateway":"10.92.0.1"}`, "gateway", "not a usable address"},
		{"network bad driver", "POST", net_, `{"name":"n2","subnet":"10.91.0.0/24","driver":"macvlan"}`, "driver", "bridge"},
		{"network bad name", "POST", net_, `{"name":"N 2","subnet":"10.91.0.0/24"}`, "name", "not a DNS label"},
		{"network overlapping subnet", "POST", net_, `{"name":"n2","subnet":"10.90.0.128/25"}`, "subnet", `overlaps network "net1"`},

		// node registration
		{"node malformed JSON", "PUT", node, `{"address":`, "body", "malformed JSON"},
		{"node unknown field", "PUT", node, `{` + goodN + `,"gpus":1}`, "gpus", "unknown field"},
		{"node nested unknown field", "PUT", node, `{"address":"10.0.0.1","capacity":{"cpu":"2","memory":"1Gi","gpu":1}}`, "capacity.gpu", "unknown field"},
		{"node wrong type", "PUT", node, `{"address":10,"capacity":{"cpu":"2","memory":"1Gi"}}`, "address", "must be a string"},
		{"node bad address", "PUT", node, `{"address":"not-an-ip","capacity":{"cpu":"2","memory":"1Gi"}}`, "address", "not an IP address"},
		{"node bad cpu quantity", "PUT", node, `{"address":"10.0.0.1","capacity":{"cpu":"lots","memory":"1Gi"}}`, "capacity.cpu", "not a CPU quantity"},
		{"node no capacity", "PUT", node, `{"address":"10.0.0.1"}`, "capacity.cpu", "must be > 0"},
		{"node allocatable over capacity", "PUT", node, `{"address":"10.0.0.1","capacity":{"cpu":"2","memory":"1Gi"},"allocatable":{"cpu":"3"}}`, "allocatable.cpu", "between 0 and capacity.cpu"},
		{"node ttl too short", "PUT", node, `{` + goodN + `,"ttl":"1s"}`, "ttl", "between 2s and 10m"},
		{"node ttl not a string", "PUT", node, `{` + goodN + `,"ttl":5}`, "ttl", "duration"},
		{"node bad name", "PUT", "/v1/nodes/Bad_Node", `{` + goodN + `}`, "name", "not a node name"},

		// registrations
		{"registration malformed JSON", "PUT", reg, `{"address":"10.0.0.9","port":80`, "body", "malformed JSON"},
		{"registration unknown field", "PUT", reg, `{"address":"10.0.0.9","port":80,"weight":1}`, "weight", "unknown field"},
		{"registration wrong type", "PUT", reg, `{"address":"10.0.0.9","port":"80"}`, "port", "must be an integer"},
		{"registration port 70000", "PUT", reg, `{"address":"10.0.0.9","port":70000}`, "port", "from 1 to 65535, not 70000"},
		{"registration no port", "PUT", reg, `{"address":"10.0.0.9"}`, "port", "from 1 to 65535, not 0"},
		{"registration bad address", "PUT", reg, `{"address":"web.local","port":80}`, "address", "not an IP address"},
		{"registration named port bad", "PUT", reg, `{"address":"10.0.0.9","port":80,"ports":{"admin":0}}`, "ports.admin", "1 to 65535"},
		{"registration ttl too short", "PUT", reg, `{"address":"10.0.0.9","port":80,"ttl":"1s"}`, "ttl", "between 2s and 24h"},
		{"registration bad health", "PUT", reg, `{"address":"10.0.0.9","port":80,"health":"fine"}`, "health", "passing, warning or critical"},
		{"registration bad service", "PUT", "/v1/registry/services/Web/instances/i-1", `{"address":"10.0.0.9","port":80}`, "service", "not a DNS label"},
		{"registration bad id", "PUT", "/v1/registry/services/web/instances/i%201", `{"address":"10.0.0.9","port":80}`, "id", "not an id"},

		// instance status (paths start at "status")
		{"status malformed JSON", "PUT", inst, `{"state":`, "status", "malformed JSON"},
		{"status unknown field", "PUT", inst, `{"state":"running","pid":1}`, "status.pid", "unknown field"},
		{"status wrong type", "PUT", inst, `{"state":"running","restarts":"2"}`, "status.restarts", "must be an integer"},
		{"status bad state", "PUT", inst, `{"state":"sleeping"}`, "status.state", `unknown instance state "sleeping"`},
		{"status no state", "PUT", inst, `{}`, "status.state", "unknown instance state"},
		{"status bad health", "PUT", inst, `{"state":"running","health":"ok"}`, "status.health", "passing, warning or critical"},
		{"status negative restarts", "PUT", inst, `{"state":"running","restarts":-1}`, "status.restarts", "must be >= 0"},
		{"status bad vnic ip", "PUT", inst, `{"state":"running","vnics":[{"network":"net1","interface":"eth0","mac":"x","ip":"1.2.3"}]}`, "status.vnics[0].ip", "not an IP address"},
		{"status of unknown instance", "PUT", "/v1/instances/nope/status", `{"state":"sleeping"}`, "status.state", "unknown instance state"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e := e.in(t)
			before, beforeRev := e.dump()
			ae := e.apiErr(tt.method, tt.path, tt.body, http.StatusBadRequest, api.CodeInvalid)
			found := false
			for _, f := range ae.Fields {
				if f.Field == tt.field && strings.Contains(f.Reason, tt.reason) {
					found = true
				}
			}
			if !found {
				t.Errorf("fields %+v: want field %q with a reason containing %q", ae.Fields, tt.field, tt.reason)
			}
			if !strings.Contains(ae.Message, tt.field+": ") {
				t.Errorf("message %q does not name the field %q", ae.Message, tt.field)
			}
			for _, f := range ae.Fields {
				if f.Field == "" {
					t.Errorf("a field error has no field path: %+v", f)
				}
			}
			after, afterRev := e.dump()
			if !reflect.DeepEqual(before, after) || afterRev != beforeRev {
				t.Errorf("a refused write changed the store (revision %d -> %d)\nbefore %v\nafter  %v", beforeRev, afterRev, before, after)
			}
		})
	}

	// The same refusals through the client come back as *api.Error.
	_, err := e.c.ApplyService(ctx, api.ServiceSpec{Name: "web", Image: "nginx", Replicas: intp(-1)})
	ae := wantAPIError(t, err, http.StatusBadRequest, api.CodeInvalid)
	if !strings.Contains(ae.Message, "spec.replicas: must be >= 0") || len(ae.Fields) != 1 || ae.Fields[0].Field != "spec.replicas" {
		t.Errorf("client apply replicas -1: %q %+v", ae.Message, ae.Fields)
	}
	_, err = e.c.Register(ctx, "web", "i-1", api.RegistrationSpec{Address: "10.0.0.9", Port: 70000})
	ae = wantAPIError(t, err, http.StatusBadRequest, api.CodeInvalid)
	if !strings.Contains(ae.Message, "port: must be a port number from 1 to 65535, not 70000") {
		t.Errorf("client register port 70000: %q", ae.Message)
	}
	_, err = e.c.RegisterNode(ctx, "n1", api.NodeRegistration{Address: "nowhere", Capacity: api.Resources{CPU: 1000, Memory: 1 << 20}})
	ae = wantAPIError(t, err, http.StatusBadRequest, api.CodeInvalid)
	if len(ae.Fields) != 1 || ae.Fields[0].Field != "address" {
		t.Errorf("client register node with bad address: %+v", ae.Fields)
	}
	_, err = e.c.CreateNetwork(ctx, api.NetworkSpec{Name: "n2", Subnet: "10.1.0.0/40"})
	ae = wantAPIError(t, err, http.StatusBadRequest, api.CodeInvalid)
	if len(ae.Fields) != 1 || ae.Fields[0].Field != "subnet" {
		t.Errorf("client create network with bad subnet: %+v", ae.Fields)
	}

	// The stored objects are as they were created.
	svcs, err := e.c.ListServices(ctx)
	if err != nil || len(svcs.Items) != 1 || svcs.Items[0].Generation != 1 || *svcs.Items[0].Spec.Replicas != 1 {
		t.Errorf("services after refused writes: %+v %v", svcs, err)
	}
	regs, err := e.c.ListRegistrations(ctx, "web")
	if err != nil || len(regs.Items) != 1 || regs.Items[0].Port != 80 {
		t.Errorf("registrations after refused writes: %+v %v", regs, err)
	}
	n, err := e.c.GetNode(ctx, "n1")
	if err != nil || n.Address != "10.0.0.1" || n.Status.State != api.NodeReady {
		t.Errorf("node after refused writes: %+v %v", n, err)
	}
}

func TestUnknownEndpointAndHealth(t *testing.T) {
	e := startEnv(t)
	e.apiErr("GET", "/v1/nope", "", http.StatusNotFound, api.CodeNotFound)
	e.apiErr("GET", "/v2/services", "", http.StatusNotFound, api.CodeNotFound)
	var h struct {
		Status   string `json:"status"`
		Revision int64  `json:"revision"`
	}
	e.rawInto("GET", "/v1/health", "", http.StatusOK, &h)
	if h.Status != "ok" || h.Revision <= 0 {
		t.Fatalf("health: %+v", h)
	}
	ae := e.apiErr("GET", "/v1/services?watch=1&revision=abc", "", http.StatusBadRequest, api.CodeInvalid)
	if len(ae.Fields) != 1 || ae.Fields[0].Field != "revision" {
		t.Fatalf("watch with a bad revision: %+v", ae)
	}
}

// --- services ---

func TestServices(t *testing.T) {
	e := startEnv(t)
	ctx := e.ctx

	var created api.ApplyResult
	e.rawInto("POST", "/v1/services", `{"name":"web","image":"nginx:1.27","replicas":2}`, http.StatusCreated, &created)
	if !created.Created || len(created.Changed) != 0 || created.Service.Generation != 1 ||
		created.Service.Name != "web" || *created.Service.Spec.Replicas != 2 || created.Service.Revision == 0 {
		t.Fatalf("create: %+v", created)
	}
	// Defaults were filled in.
	if created.Service.Spec.Restart.Policy != api.RestartAlways || created.Service.Spec.Placement.Strategy != api.StrategyBinpack {
		t.Errorf("create: defaults not filled: %+v", created.Service.Spec)
	}

	// The same spec again changes nothing.
	var same api.ApplyResult
	e.rawInto("POST", "/v1/services", `{"name":"web","image":"nginx:1.27","replicas":2}`, http.StatusOK, &same)
	if same.Created || len(same.Changed) != 0 || same.Service.Generation != 1 || same.Service.Revision != created.Service.Revision {
		t.Fatalf("re-apply of the same spec: %+v", same)
	}
	// Spelling out a default is the same spec too.
	e.rawInto("POST", "/v1/services", `{"name":"web","image":"nginx:1.27","replicas":2,"restart":{"policy":"always"}}`, http.StatusOK, &same)
	if len(same.Changed) != 0 || same.Service.Generation != 1 {
		t.Fatalf("re-apply with a default spelled out: %+v", same)
	}

	// A change bumps the generation and names the field.
	res, err := e.c.ApplyServiceJSON(ctx, []byte(`{"name":"web","image":"nginx:1.28","replicas":2}`))
	if err != nil {
		t.Fatal(err)
	}
	if res.Created || res.Service.Generation != 2 || !slices.Equal(res.Changed, []string{"image"}) ||
		res.Service.Revision <= created.Service.Revision {
		t.Fatalf("change image: %+v", res)
	}
	if !res.Service.CreatedAt.Equal(created.Service.CreatedAt) {
		t.Errorf("createdAt changed on update: %v -> %v", created.Service.CreatedAt, res.Service.CreatedAt)
	}
	res, err = e.c.ApplyServiceJSON(ctx, []byte(`{"name":"web","image":"nginx:1.28","replicas":3,"env":{"A":"1"}}`))
	if err != nil {
		t.Fatal(err)
	}
	if res.Service.Generation != 3 || !slices.Equal(res.Changed, []string{"env", "replicas"}) {
		t.Fatalf("change replicas and env: %+v", res)
	}
	// Replicas absent means 1: a change from 3.
	res, err = e.c.ApplyServiceJSON(ctx, []byte(`{"name":"web","image":"nginx:1.28","env":{"A":"1"}}`))
	if err != nil {
		t.Fatal(err)
	}
	if res.Service.Generation != 4 || !slices.Equal(res.Changed, []string{"replicas"}) || *res.Service.Spec.Replicas != 1 {
		t.Fatalf("replicas back to the default: %+v", res)
	}

	// PUT by name: the URL names the service.
	var put api.ApplyResult
	e.rawInto("PUT", "/v1/services/api", `{"image":"api:1"}`, http.StatusCreated, &put)
	if !put.Created || put.Service.Name != "api" || put.Service.Spec.Name != "api" {
		t.Fatalf("PUT create: %+v", put)
	}
	e.rawInto("PUT", "/v1/services/api", `{"name":"api","image":"api:1"}`, http.StatusOK, &put)
	if put.Created || len(put.Changed) != 0 || put.Service.Generation != 1 {
		t.Fatalf("PUT same: %+v", put)
	}

	// A spec naming a network that does not exist is refused; once it exists, accepted.
	_, err = e.c.ApplyService(ctx, api.ServiceSpec{Name: "db", Image: "postgres", Networks: []string{"backend"}})
	ae := wantAPIError(t, err, http.StatusBadRequest, api.CodeInvalid)
	if len(ae.Fields) != 1 || ae.Fields[0].Field != "spec.networks[0]" || !strings.Contains(ae.Message, "spec.networks[0]: ") {
		t.Fatalf("missing network: %q %+v", ae.Message, ae.Fields)
	}
	if _, err := e.c.GetService(ctx, "db"); !client.IsNotFound(err) {
		t.Fatalf("refused service was stored: %v", err)
	}
	if _, err := e.c.CreateNetwork(ctx, api.NetworkSpec{Name: "backend", Subnet: "10.50.0.0/16"}); err != nil {
		t.Fatal(err)
	}
	res, err = e.c.ApplyService(ctx, api.ServiceSpec{Name: "db", Image: "postgres", Networks: []string{"backend"}})
	if err != nil || !res.Created {
		t.Fatalf("service on an existing network: %+v %v", res, err)
	}

	// Get and list.
	got, err := e.c.GetService(ctx, "web")
	if err != nil || got.Generation != 4 || got.Spec.Image != "nginx:1.28" || got.Revision == 0 {
		t.Fatalf("get: %+v %v", got, err)
	}
	l, err := e.c.ListServices(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, s := range l.Items {
		names = append(names, s.Name)
	}
	if !slices.Equal(names, []string{"api", "db", "web"}) || l.Revision < got.Revision {
		t.Fatalf("list: %v at %d", names, l.Revision)
	}

	// Delete; then everything about it is 404 not_found.
	if err := e.c.DeleteService(ctx, "web"); err != nil {
		t.Fatal(err)
	}
	_, err = e.c.GetService(ctx, "web")
	wantAPIError(t, err, http.StatusNotFound, api.CodeNotFound)
	if !client.IsNotFound(err) {
		t.Fatal("IsNotFound is false for a 404")
	}
	wantAPIError(t, e.c.DeleteService(ctx, "web"), http.StatusNotFound, api.CodeNotFound)
	e.apiErr("GET", "/v1/services/nothing", "", http.StatusNotFound, api.CodeNotFound)
	e.apiErr("DELETE", "/v1/services/nothing", "", http.StatusNotFound, api.CodeNotFound)

	// Applying after a delete creates it again, at generation 1.
	e.rawInto("POST", "/v1/services", `{"name":"web","image":"nginx"}`, http.StatusCreated, &created)
	if created.Service.Generation != 1 {
		t.Fatalf("re-create: %+v", created)
	}
}

// TestServiceReapplyEmptyCollections: a spec whose empty lists and maps are
// dropped in storage (omitempty) is still the same spec when applied again.
func TestServiceReapplyEmptyCollections(t *testing.T) {
	e := startEnv(t)
	specs := []string{
		`{"name":"a","image":"nginx","env":{}}`,
		`{"name":"b","image":"nginx","command":[],"args":[]}`,
		`{"name":"c","image":"nginx","networks":[],"ports":[],"meta":{}}`,
		`{"name":"d","image":"nginx","placement":{"constraints":[]}}`,
	}
	for _, spec := range specs {
		var first, again api.ApplyResult
		e.rawInto("POST", "/v1/services", spec, http.StatusCreated, &first)
		e.rawInto("POST", "/v1/services", spec, http.StatusOK, &again)
		if len(again.Changed) != 0 || again.Service.Generation != 1 || again.Service.Revision != first.Service.Revision {
			t.Errorf("re-apply of %s: changed %v, generation %d", spec, again.Changed, again.Service.Generation)
		}
	}
}

// --- networks ---

func TestNetworks(t *testing.T) {
	e := startEnv(t)
	ctx := e.ctx

	var n api.Network
	e.rawInto("POST", "/v1/networks", `{"name":"front","subnet":"10.90.0.7/24"}`, http.StatusCreated, &n)
	if n.Name != "front" || n.Subnet != "10.90.0.0/24" || n.Gateway != "10.90.0.1" || n.Driver != api.DriverBridge || n.Revision == 0 {
		t.Fatalf("create: %+v", n)
	}

	// Same name again: 409, whatever the subnet.
	_, err := e.c.CreateNetwork(ctx, api.NetworkSpec{Name: "front", Subnet: "10.91.0.0/24"})
	wantAPIError(t, err, http.StatusConflict, api.CodeConflict)

	// Overlapping subnets are refused naming "subnet"; disjoint ones accepted.
	for _, sub := range []string{"10.90.0.0/24", "10.90.0.128/25", "10.90.0.0/16", "10.90.0.0/29"} {
		_, err := e.c.CreateNetwork(ctx, api.NetworkSpec{Name: "other", Subnet: sub})
		ae := wantAPIError(t, err, http.StatusBadRequest, api.CodeInvalid)
		if len(ae.Fields) != 1 || ae.Fields[0].Field != "subnet" || !strings.Contains(ae.Message, "subnet: ") ||
			!strings.Contains(ae.Fields[0].Reason, `"front"`) {
			t.Errorf("overlap %s: %q %+v", sub, ae.Message, ae.Fields)
		}
	}
	back, err := e.c.CreateNetwork(ctx, api.NetworkSpec{Name: "back", Subnet: "10.91.0.0/24", Driver: api.DriverOverlay})
	if err != nil || back.Driver != api.DriverOverlay {
		t.Fatalf("disjoint network: %+v %v", back, err)
	}

	// Concurrent creations of overlapping subnets: exactly one wins.
	var wg sync.WaitGroup
	errs := make([]error, 8)
	for i := range errs {
		wg.Go(func() {
			_, errs[i] = e.c.CreateNetwork(ctx, api.NetworkSpec{Name: fmt.Sprintf("race%d", i), Subnet: "10.92.0.0/24"})
		})
	}
	wg.Wait()
	ok := 0
	for _, err := range errs {
		if err == nil {
			ok++
		} else {
			wantAPIError(t, err, http.StatusBadRequest, api.CodeInvalid)
		}
	}
	if ok != 1 {
		t.Fatalf("%d of %d concurrent overlapping networks were accepted: %v", ok, len(errs), errs)
	}

	// The default network, created at the first start, and the three above.
	l, err := e.c.ListNetworks(ctx)
	if err != nil || len(l.Items) != 4 || l.Items[1].Name != api.DefaultNetwork {
		t.Fatalf("list: %+v %v", l, err)
	}
	got, err := e.c.GetNetwork(ctx, "front")
	if err != nil || got.Subnet != "10.90.0.0/24" {
		t.Fatalf("get: %+v %v", got, err)
	}

	// A network in use by a service cannot be deleted.
	if _, err := e.c.ApplyService(ctx, api.ServiceSpec{Name: "web", Image: "nginx", Networks: []string{"back", "front"}}); err != nil {
		t.Fatal(err)
	}
	ae := wantAPIError(t, e.c.DeleteNetwork(ctx, "front"), http.StatusConflict, api.CodeConflict)
	if !strings.Contains(ae.Message, "web") {
		t.Errorf("in-use message does not name the service: %q", ae.Message)
	}
	if _, err := e.c.GetNetwork(ctx, "front"); err != nil {
		t.Fatalf("network in use was deleted: %v", err)
	}
	// Once the service leaves it, it can.
	if _, err := e.c.ApplyService(ctx, api.ServiceSpec{Name: "web", Image: "nginx", Networks: []string{"back"}}); err != nil {
		t.Fatal(err)
	}
	if err := e.c.DeleteNetwork(ctx, "front"); err != nil {
		t.Fatalf("delete unused network: %v", err)
	}
	_, err = e.c.GetNetwork(ctx, "front")
	wantAPIError(t, err, http.StatusNotFound, api.CodeNotFound)
	wantAPIError(t, e.c.DeleteNetwork(ctx, "front"), http.StatusNotFound, api.CodeNotFound)
	wantAPIError(t, e.c.DeleteNetwork(ctx, "back"), http.StatusConflict, api.CodeConflict)

	// Its subnet is free again.
	if _, err := e.c.CreateNetwork(ctx, api.NetworkSpec{Name: "front2", Subnet: "10.90.0.0/25"}); err != nil {
		t.Fatalf("reuse the deleted network's subnet: %v", err)
	}
}

// --- nodes ---

func TestNodeLifecycle(t *testing.T) {
	e := startEnv(t)
	ctx := e.ctx

	n, err := e.c.RegisterNode(ctx, "n1", nodeReg(10*time.Second))
	if err != nil {
		t.Fatal(err)
	}
	if n.Name != "n1" || n.Status.State != api.NodeReady || n.Revision == 0 || n.TTL.D() != 10*time.Second ||
		n.Allocatable.CPU != 1500 || n.Labels["zone"] != "a" || n.Status.LastHeartbeat.IsZero() {
		t.Fatalf("register: %+v", n)
	}
	got, err := e.c.GetNode(ctx, "n1")
	if err != nil || got.Status.State != api.NodeReady {
		t.Fatalf("get after register: %+v %v", got, err)
	}

	// Heartbeats renew the lease and show as lastHeartbeat.
	time.Sleep(10 * time.Millisecond)
	hb, err := e.c.Heartbeat(ctx, "n1")
	if err != nil || !hb.Registered || hb.TTL.D() != 10*time.Second {
		t.Fatalf("heartbeat: %+v %v", hb, err)
	}
	got, err = e.c.GetNode(ctx, "n1")
	if err != nil || !got.Status.LastHeartbeat.After(n.Status.LastHeartbeat) {
		t.Fatalf("lastHeartbeat did not advance: %v -> %v (%v)", n.Status.LastHeartbeat, got.Status.LastHeartbeat, err)
	}
	l, err := e.c.ListNodes(ctx)
	if err != nil || len(l.Items) != 1 || !l.Items[0].Status.LastHeartbeat.Equal(got.Status.LastHeartbeat) {
		t.Fatalf("list: %+v %v", l, err)
	}

	// A ready node cannot be deleted without force.
	wantAPIError(t, e.c.DeleteNode(ctx, "n1", false), http.StatusConflict, api.CodeConflict)

	// Release: down at once, without waiting for the lease.
	if err := e.c.ReleaseNode(ctx, "n1"); err != nil {
		t.Fatal(err)
	}
	got, err = e.c.GetNode(ctx, "n1")
	if err != nil || got.Status.State != api.NodeDown || got.Status.Message == "" {
		t.Fatalf("after release: %+v %v", got.Status, err)
	}
	if c, _ := e.st.Count(ctx, keyNodeLeases+"n1"); c != 0 {
		t.Fatal("lease key still there after release")
	}
	// Releasing again is harmless.
	if err := e.c.ReleaseNode(ctx, "n1"); err != nil {
		t.Fatal(err)
	}

	// A heartbeat brings a down node back.
	hb, err = e.c.Heartbeat(ctx, "n1")
	if err != nil || !hb.Registered {
		t.Fatalf("heartbeat after release: %+v %v", hb, err)
	}
	got, err = e.c.GetNode(ctx, "n1")
	if err != nil || got.Status.State != api.NodeReady || got.Status.Message != "" {
		t.Fatalf("after heartbeat: %+v %v", got.Status, err)
	}
	if c, _ := e.st.Count(ctx, keyNodeLeases+"n1"); c != 1 {
		t.Fatal("no lease key after the node came back")
	}

	// Unknown nodes.
	hb, err = e.c.Heartbeat(ctx, "ghost")
	if err != nil || hb.Registered {
		t.Fatalf("heartbeat of an unknown node: %+v %v", hb, err)
	}
	_, err = e.c.GetNode(ctx, "ghost")
	wantAPIError(t, err, http.StatusNotFound, api.CodeNotFound)
	wantAPIError(t, e.c.DeleteNode(ctx, "ghost", true), http.StatusNotFound, api.CodeNotFound)

	// Re-registering keeps createdAt.
	again, err := e.c.RegisterNode(ctx, "n1", nodeReg(10*time.Second))
	if err != nil || !again.CreatedAt.Equal(n.CreatedAt) || again.Status.State != api.NodeReady {
		t.Fatalf("re-register: %+v %v", again, err)
	}

	// Force delete: gone, lease and all; a heartbeat then says unregistered.
	if err := e.c.DeleteNode(ctx, "n1", true); err != nil {
		t.Fatal(err)
	}
	_, err = e.c.GetNode(ctx, "n1")
	wantAPIError(t, err, http.StatusNotFound, api.CodeNotFound)
	if c, _ := e.st.Count(ctx, keyNodeLeases+"n1"); c != 0 {
		t.Fatal("lease key still there after delete")
	}
	hb, err = e.c.Heartbeat(ctx, "n1")
	if err != nil || hb.Registered {
		t.Fatalf("heartbeat after delete: %+v %v", hb, err)
	}
}

func TestNodeDefaultTTL(t *testing.T) {
	e := startEnvWith(t, Options{DefaultNodeTTL: 7 * time.Second}, nil)
	n, err := e.c.RegisterNode(e.ctx, "n1", nodeReg(0))
	if err != nil || n.TTL.D() != 7*time.Second {
		t.Fatalf("register without a TTL: %+v %v", n.TTL, err)
	}
	var nl nodeLease
	if _, err := e.st.Get(e.ctx, keyNodeLeases+"n1", &nl); err != nil {
		t.Fatal(err)
	}
	if ttl, err := e.st.LeaseTTL(e.ctx, nl.Lease); err != nil || ttl != 7 {
		t.Fatalf("lease TTL %d %v, want 7", ttl, err)
	}
}

// TestNodeLeaseExpiry: a node whose heartbeats stop becomes down by itself
// when its lease lapses, and a heartbeat brings it back.
func TestNodeLeaseExpiry(t *testing.T) {
	t.Parallel()
	e := startEnv(t)
	ctx := e.ctx
	start := time.Now()
	if _, err := e.c.RegisterNode(ctx, "n1", nodeReg(2*time.Second)); err != nil {
		t.Fatal(err)
	}
	eventually(t, 5*time.Second, "node down after its 2s lease lapsed", func() bool {
		n, err := e.c.GetNode(ctx, "n1")
		return err == nil && n.Status.State == api.NodeDown
	})
	t.Logf("down %v after registering with ttl 2s", time.Since(start))
	n, _ := e.c.GetNode(ctx, "n1")
	if !strings.Contains(n.Status.Message, "expired") {
		t.Errorf("down message %q", n.Status.Message)
	}

	hb, err := e.c.Heartbeat(ctx, "n1")
	if err != nil || !hb.Registered || hb.TTL.D() != 2*time.Second {
		t.Fatalf("heartbeat after expiry: %+v %v", hb, err)
	}
	n, err = e.c.GetNode(ctx, "n1")
	if err != nil || n.Status.State != api.NodeReady {
		t.Fatalf("after heartbeat: %+v %v", n.Status, err)
	}
	// Heartbeats keep it ready past its TTL.
	for range 6 {
		time.Sleep(500 * time.Millisecond)
		if _, err := e.c.Heartbeat(ctx, "n1"); err != nil {
			t.Fatal(err)
		}
	}
	if n, _ := e.c.GetNode(ctx, "n1"); n.Status.State != api.NodeReady {
		t.Fatalf("heartbeating node went %s", n.Status.State)
	}
}

// TestNodeReregisterTTL: a re-registration with a different TTL replaces
// the node's lease.
func TestNodeReregisterTTL(t *testing.T) {
	t.Parallel()
	e := startEnv(t)
	ctx := e.ctx
	leaseOf := func() int64 {
		var nl nodeLease
		if _, err := e.st.Get(ctx, keyNodeLeases+"n1", &nl); err != nil {
			t.Fatal(err)
		}
		return nl.Lease
	}
	if _, err := e.c.RegisterNode(ctx, "n1", nodeReg(time.Minute)); err != nil {
		t.Fatal(err)
	}
	long := leaseOf()
	if ttl, _ := e.st.LeaseTTL(ctx, long); ttl != 60 {
		t.Fatalf("lease TTL %d, want 60", ttl)
	}
	// Same TTL again: the same lease, renewed.
	if _, err := e.c.RegisterNode(ctx, "n1", nodeReg(time.Minute)); err != nil {
		t.Fatal(err)
	}
	if l := leaseOf(); l != long {
		t.Fatalf("same TTL re-registration changed the lease %x -> %x", long, l)
	}

	start := time.Now()
	n, err := e.c.RegisterNode(ctx, "n1", nodeReg(2*time.Second))
	if err != nil || n.TTL.D() != 2*time.Second || n.Status.State != api.NodeReady {
		t.Fatalf("re-register with ttl 2s: %+v %v", n, err)
	}
	short := leaseOf()
	if short == long {
		t.Fatal("the lease was not replaced")
	}
	if ttl, err := e.st.LeaseTTL(ctx, short); err != nil || ttl != 2 {
		t.Fatalf("new lease TTL %d %v, want 2", ttl, err)
	}
	if _, err := e.st.LeaseTTL(ctx, long); !errors.Is(err, store.ErrNoLease) {
		t.Fatalf("old lease still alive: %v", err)
	}
	if hb, err := e.c.Heartbeat(ctx, "n1"); err != nil || hb.TTL.D() != 2*time.Second {
		t.Fatalf("heartbeat TTL: %+v %v", hb, err)
	}
	// Revoking the old lease did not take the node down...
	if got, _ := e.c.GetNode(ctx, "n1"); got.Status.State != api.NodeReady {
		t.Fatalf("node %s right after re-registration", got.Status.State)
	}
	// ...but without heartbeats the new, short lease lapses.
	eventually(t, 5*time.Second, "node down after the new 2s lease lapsed", func() bool {
		n, err := e.c.GetNode(ctx, "n1")
		return err == nil && n.Status.State == api.NodeDown
	})
	t.Logf("down %v after re-registering with ttl 2s", time.Since(start))

	// And back to a longer TTL: a node registered with 6s is still ready after 3s.
	if _, err := e.c.RegisterNode(ctx, "n1", nodeReg(6*time.Second)); err != nil {
		t.Fatal(err)
	}
	time.Sleep(3 * time.Second)
	if got, _ := e.c.GetNode(ctx, "n1"); got.Status.State != api.NodeReady {
		t.Fatalf("node with ttl 6s is %s after 3s", got.Status.State)
	}
}

// --- registrations ---

func TestRegistrations(t *testing.T) {
	e := startEnv(t)
	ctx := e.ctx
	path := "/v1/registry/services/web/instances/i-1"

	var r1 api.Registration
	e.rawInto("PUT", path, `{"address":"10.0.0.9","port":80}`, http.StatusCreated, &r1)
	if r1.Service != "web" || r1.ID != "i-1" || r1.Port != 80 || r1.TTL.D() != api.DefaultRegistrationTTL ||
		r1.Health != api.HealthPassing || r1.Revision == 0 {
		t.Fatalf("register: %+v", r1)
	}
	kv1, err := e.st.GetKV(ctx, regKey("web", "i-1"))
	if err != nil || kv1.Lease == 0 {
		t.Fatalf("registration not under a lease: %+v %v", kv1, err)
	}

	// The same id again updates in place.
	var r2 api.Registration
	e.rawInto("PUT", path, `{"address":"10.0.0.9","port":8080,"meta":{"v":"2"}}`, http.StatusOK, &r2)
	if r2.Port != 8080 || r2.RegistrationSpec.Meta["v"] != "2" || !r2.CreatedAt.Equal(r1.CreatedAt) || r2.Revision <= r1.Revision {
		t.Fatalf("re-register: %+v", r2)
	}
	l, err := e.c.ListRegistrations(ctx, "web")
	if err != nil || len(l.Items) != 1 || l.Items[0].Port != 8080 {
		t.Fatalf("list after re-register: %+v %v", l, err)
	}
	// The old lease is gone, the key lives on the new one.
	kv2, err := e.st.GetKV(ctx, regKey("web", "i-1"))
	if err != nil || kv2.Lease == kv1.Lease {
		t.Fatalf("lease not replaced: %+v %v", kv2, err)
	}
	if _, err := e.st.LeaseTTL(ctx, kv1.Lease); !errors.Is(err, store.ErrNoLease) {
		t.Fatalf("old registration lease still alive: %v", err)
	}

	// More instances and services.
	if _, err := e.c.Register(ctx, "web", "i-2", api.RegistrationSpec{Address: "10.0.0.10", Port: 80, Health: api.HealthWarning}); err != nil {
		t.Fatal(err)
	}
	if _, err := e.c.Register(ctx, "db", "i-1", api.RegistrationSpec{Address: "10.0.0.11", Port: 5432}); err != nil {
		t.Fatal(err)
	}
	if l, _ := e.c.ListRegistrations(ctx, "web"); len(l.Items) != 2 {
		t.Fatalf("web has %d registrations, want 2", len(l.Items))
	}
	if l, _ := e.c.ListRegistrations(ctx, ""); len(l.Items) != 3 {
		t.Fatalf("%d registrations in all, want 3", len(l.Items))
	}
	var one api.Registration
	e.rawInto("GET", path, "", http.StatusOK, &one)
	if one.Port != 8080 {
		t.Fatalf("get: %+v", one)
	}

	// Renew.
	if err := e.c.Renew(ctx, "web", "i-1"); err != nil {
		t.Fatal(err)
	}
	wantAPIError(t, e.c.Renew(ctx, "web", "nope"), http.StatusNotFound, api.CodeNotFound)

	// Deregister.
	if err := e.c.Deregister(ctx, "web", "i-1"); err != nil {
		t.Fatal(err)
	}
	e.apiErr("GET", path, "", http.StatusNotFound, api.CodeNotFound)
	wantAPIError(t, e.c.Deregister(ctx, "web", "i-1"), http.StatusNotFound, api.CodeNotFound)
	wantAPIError(t, e.c.Renew(ctx, "web", "i-1"), http.StatusNotFound, api.CodeNotFound)
	if _, err := e.st.LeaseTTL(ctx, kv2.Lease); !errors.Is(err, store.ErrNoLease) {
		t.Fatalf("deregistered instance's lease still alive: %v", err)
	}
	if l, _ := e.c.ListRegistrations(ctx, "web"); len(l.Items) != 1 || l.Items[0].ID != "i-2" {
		t.Fatalf("after deregister: %+v", l.Items)
	}
	// Registering after a deregistration creates it again.
	e.rawInto("PUT", path, `{"address":"10.0.0.9","port":80}`, http.StatusCreated, nil)

	ae := e.apiErr("GET", "/v1/registry/services/Bad_Name/instances", "", http.StatusBadRequest, api.CodeInvalid)
	if len(ae.Fields) != 1 || ae.Fields[0].Field != "service" {
		t.Fatalf("list with a bad service name: %+v", ae)
	}
}

// TestRegistrationExpiry: a registration whose renewals stop is removed
// when its TTL passes; one that is renewed stays.
func TestRegistrationExpiry(t *testing.T) {
	t.Parallel()
	e := startEnv(t)
	ctx := e.ctx
	spec := api.RegistrationSpec{Address: "10.0.0.9", Port: 80, TTL: api.Duration(2 * time.Second)}
	start := time.Now()
	if _, err := e.c.Register(ctx, "web", "quiet", spec); err != nil {
		t.Fatal(err)
	}
	if _, err := e.c.Register(ctx, "web", "renewed", spec); err != nil {
		t.Fatal(err)
	}
	stop := make(chan struct{})
	renewed := make(chan error, 1)
	go func() {
		tick := time.NewTicker(500 * time.Millisecond)
		defer tick.Stop()
		for {
			select {
			case <-stop:
				renewed <- nil
				return
			case <-tick.C:
				if err := e.c.Renew(ctx, "web", "renewed"); err != nil {
					renewed <- err
					return
				}
			}
		}
	}()
	eventually(t, 5*time.Second, "registration removed after its 2s TTL", func() bool {
		s, _ := e.raw("GET", "/v1/registry/services/web/instances/quiet", "")
		return s == http.StatusNotFound
	})
	t.Logf("removed %v after registering with ttl 2s", time.Since(start))
	// Let the renewed one outlive its TTL by a margin.
	if d := 3*time.Second - time.Since(start); d > 0 {
		time.Sleep(d)
	}
	close(stop)
	if err := <-renewed; err != nil {
		t.Fatalf("renew: %v", err)
	}
	l, err := e.c.ListRegistrations(ctx, "web")
	if err != nil || len(l.Items) != 1 || l.Items[0].ID != "renewed" {
		t.Fatalf("after expiry: %+v %v", l.Items, err)
	}
	wantAPIError(t, e.c.Renew(ctx, "web", "quiet"), http.StatusNotFound, api.CodeNotFound)
}

// --- instances ---

func TestInstanceStatus(t *testing.T) {
	e := startEnv(t)
	ctx := e.ctx
	if _, err := e.st.Put(ctx, keyInstances+"web-1", api.Instance{ID: "web-1", Service: "web", Generation: 1, Node: "n1",
		DesiredState: "running", Status: api.InstanceStatus{State: api.InstancePending}}, 0); err != nil {
		t.Fatal(err)
	}
	if _, err := e.st.Put(ctx, keyInstances+"db-1", api.Instance{ID: "db-1", Service: "db", Generation: 1, Node: "n2",
		DesiredState: "running"}, 0); err != nil {
		t.Fatal(err)
	}

	// Unknown instance: 404 not_found.
	_, err := e.c.PutInstanceStatus(ctx, "nope", api.InstanceStatus{State: api.InstanceRunning})
	wantAPIError(t, err, http.StatusNotFound, api.CodeNotFound)
	_, err = e.c.GetInstance(ctx, "nope")
	wantAPIError(t, err, http.StatusNotFound, api.CodeNotFound)
	// Unknown state: 400 naming status.state, nothing written.
	_, err = e.c.PutInstanceStatus(ctx, "web-1", api.InstanceStatus{State: "dancing"})
	ae := wantAPIError(t, err, http.StatusBadRequest, api.CodeInvalid)
	if len(ae.Fields) != 1 || ae.Fields[0].Field != "status.state" || !strings.Contains(ae.Message, "status.state: ") {
		t.Fatalf("bad state: %q %+v", ae.Message, ae.Fields)
	}
	if in, _ := e.c.GetInstance(ctx, "web-1"); in.Status.State != api.InstancePending {
		t.Fatalf("refused status was stored: %+v", in.Status)
	}

	code := 0
	in, err := e.c.PutInstanceStatus(ctx, "web-1", api.InstanceStatus{State: api.InstanceRunning, Health: api.HealthPassing,
		ExitCode: &code, VNICs: []api.VNIC{{Network: "net1", Interface: "eth0", MAC: "02:00:00:00:00:01", IP: "10.90.0.2"}}})
	if err != nil {
		t.Fatal(err)
	}
	if in.Status.State != api.InstanceRunning || in.ID != "web-1" || in.Service != "web" || in.Revision == 0 || in.UpdatedAt.IsZero() {
		t.Fatalf("put status: %+v", in)
	}
	got, err := e.c.GetInstance(ctx, "web-1")
	if err != nil || got.Status.State != api.InstanceRunning || len(got.Status.VNICs) != 1 || got.DesiredState != "running" {
		t.Fatalf("get after status: %+v %v", got, err)
	}

	// Filters of the instance list.
	for _, tt := range []struct {
		f    client.InstanceFilter
		want []string
	}{
		{client.InstanceFilter{}, []string{"db-1", "web-1"}},
		{client.InstanceFilter{Service: "web"}, []string{"web-1"}},
		{client.InstanceFilter{Node: "n2"}, []string{"db-1"}},
		{client.InstanceFilter{Service: "web", Node: "n2"}, nil},
	} {
		l, err := e.c.ListInstances(ctx, tt.f)
		if err != nil {
			t.Fatal(err)
		}
		var ids []string
		for _, in := range l.Items {
			ids = append(ids, in.ID)
		}
		if !slices.Equal(ids, tt.want) {
			t.Errorf("ListInstances(%+v) = %v, want %v", tt.f, ids, tt.want)
		}
	}
}

// --- watch ---

type watchResult struct {
	ev  api.Event
	err error
}

// watcher reads a client stream into a channel so that tests can time out.
type watcher struct {
	s  *client.Stream
	ch chan watchResult
}

func (e *testEnv) watch(path string, from int64) (*watcher, error) {
	s, err := e.c.Watch(e.ctx, path, from)
	if err != nil {
		return nil, err
	}
	w := &watcher{s: s, ch: make(chan watchResult, 100)}
	go func() {
		defer close(w.ch)
		for {
			ev, err := s.Next()
			w.ch <- watchResult{ev, err}
			if err != nil {
				return
			}
		}
	}()
	e.t.Cleanup(func() { _ = s.Close() })
	return w, nil
}

func (w *watcher) next(t *testing.T) (api.Event, error) {
	t.Helper()
	select {
	case r, ok := <-w.ch:
		if !ok {
			t.Fatal("watch stream ended")
		}
		return r.ev, r.err
	case <-time.After(5 * time.Second):
		t.Fatal("no watch event within 5s")
	}
	return api.Event{}, nil
}

// nextEvent returns the next put or delete, skipping periodic bookmarks.
func (w *watcher) nextEvent(t *testing.T) api.Event {
	t.Helper()
	for {
		ev, err := w.next(t)
		if err != nil {
			t.Fatalf("watch: %v", err)
		}
		if ev.Type != api.EventBookmark {
			return ev
		}
	}
}

type evSummary struct {
	Type, Name string
	Rev        int64
}

func summary(ev api.Event) evSummary { return evSummary{ev.Type, ev.Name, ev.Revision} }

func TestWatchServices(t *testing.T) {
	e := startEnv(t)
	ctx := e.ctx
	a, err := e.c.ApplyService(ctx, api.ServiceSpec{Name: "a", Image: "nginx"})
	if err != nil {
		t.Fatal(err)
	}
	b, err := e.c.ApplyService(ctx, api.ServiceSpec{Name: "b", Image: "nginx"})
	if err != nil {
		t.Fatal(err)
	}
	// Another kind, which a service watch must not show.
	if _, err := e.c.CreateNetwork(ctx, api.NetworkSpec{Name: "n", Subnet: "10.9.0.0/24"}); err != nil {
		t.Fatal(err)
	}
	_, rev := e.dump()
	e.waitCache(rev)

	w, err := e.watch(client.WatchServices, 0)
	if err != nil {
		t.Fatal(err)
	}
	// The current objects, then a bookmark at the revision they are current to.
	for _, want := range []evSummary{{api.EventPut, "a", a.Service.Revision}, {api.EventPut, "b", b.Service.Revision}} {
		ev, err := w.next(t)
		if err != nil {
			t.Fatal(err)
		}
		if summary(ev) != want || ev.Kind != api.KindService {
			t.Fatalf("initial event %+v, want %+v", summary(ev), want)
		}
		var s api.Service
		if err := json.Unmarshal(ev.Object, &s); err != nil || s.Name != want.Name || s.Revision != want.Rev {
			t.Fatalf("initial object %s: %+v %v", ev.Object, s, err)
		}
	}
	bm, err := w.next(t)
	if err != nil || bm.Type != api.EventBookmark || bm.Revision < rev {
		t.Fatalf("after the snapshot: %+v %v, want a bookmark at %d", bm, err, rev)
	}

	// Changes, in revision order.
	c, err := e.c.ApplyService(ctx, api.ServiceSpec{Name: "c", Image: "nginx"})
	if err != nil {
		t.Fatal(err)
	}
	a2, err := e.c.ApplyService(ctx, api.ServiceSpec{Name: "a", Image: "nginx:2"})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := e.c.CreateNetwork(ctx, api.NetworkSpec{Name: "n2", Subnet: "10.8.0.0/24"}); err != nil {
		t.Fatal(err)
	}
	if err := e.c.DeleteService(ctx, "b"); err != nil {
		t.Fatal(err)
	}
	_, delRev := e.dump()
	want := []evSummary{
		{api.EventPut, "c", c.Service.Revision},
		{api.EventPut, "a", a2.Service.Revision},
		{api.EventDelete, "b", delRev},
	}
	var got []api.Event
	for range want {
		got = append(got, w.nextEvent(t))
	}
	for i := range want {
		if summary(got[i]) != want[i] {
			t.Fatalf("event %d: %+v, want %+v", i, summary(got[i]), want[i])
		}
	}
	var upd api.Service
	if err := json.Unmarshal(got[1].Object, &upd); err != nil || upd.Spec.Image != "nginx:2" || upd.Generation != 2 {
		t.Fatalf("update event object: %s", got[1].Object)
	}
	var gone api.Service
	if err := json.Unmarshal(got[2].Object, &gone); err != nil || gone.Name != "b" {
		t.Fatalf("delete event carries the last value: %s", got[2].Object)
	}
	if w.s.Revision() != delRev {
		t.Fatalf("stream revision %d, want %d", w.s.Revision(), delRev)
	}

	// Resuming from the revision of an earlier event replays exactly the
	// events after it.
	r, err := e.watch(client.WatchServices, c.Service.Revision)
	if err != nil {
		t.Fatal(err)
	}
	for i, want := range want[1:] {
		if ev := r.nextEvent(t); summary(ev) != want {
			t.Fatalf("resumed event %d: %+v, want %+v", i, summary(ev), want)
		}
	}
	// The next thing both streams see is the next change: nothing was
	// replayed twice, nothing from the snapshot repeated.
	d, err := e.c.ApplyService(ctx, api.ServiceSpec{Name: "d", Image: "nginx"})
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range []*watcher{w, r} {
		if ev := s.nextEvent(t); summary(ev) != (evSummary{api.EventPut, "d", d.Service.Revision}) {
			t.Fatalf("after the replay: %+v, want the put of d", summary(ev))
		}
	}

	// From the latest revision: nothing to replay, only what follows.
	l, err := e.c.ListServices(ctx)
	if err != nil {
		t.Fatal(err)
	}
	f, err := e.watch(client.WatchServices, l.Revision)
	if err != nil {
		t.Fatal(err)
	}
	if err := e.c.DeleteService(ctx, "c"); err != nil {
		t.Fatal(err)
	}
	if ev := f.nextEvent(t); ev.Type != api.EventDelete || ev.Name != "c" || ev.Revision <= l.Revision {
		t.Fatalf("watch from the list's revision: %+v", summary(ev))
	}
}

func TestWatchRegistrationsAndFilters(t *testing.T) {
	e := startEnv(t)
	ctx := e.ctx
	w, err := e.watch(client.WatchRegistrations, 0)
	if err != nil {
		t.Fatal(err)
	}
	if ev, err := w.next(t); err != nil || ev.Type != api.EventBookmark {
		t.Fatalf("empty watch starts with %+v %v, want a bookmark", ev, err)
	}
	web, err := e.watch(client.WatchInstances+"?service=web", 0)
	if err != nil {
		t.Fatal(err)
	}
	if ev, err := web.next(t); err != nil || ev.Type != api.EventBookmark {
		t.Fatalf("empty instance watch starts with %+v %v", ev, err)
	}

	if _, err := e.c.Register(ctx, "api", "i-1", api.RegistrationSpec{Address: "10.0.0.1", Port: 80}); err != nil {
		t.Fatal(err)
	}
	if ev := w.nextEvent(t); ev.Type != api.EventPut || ev.Name != "api/i-1" || ev.Kind != api.KindRegistration {
		t.Fatalf("registration event: %+v", summary(ev))
	}
	if _, err := e.st.Put(ctx, keyInstances+"db-1", api.Instance{ID: "db-1", Service: "db"}, 0); err != nil {
		t.Fatal(err)
	}
	if _, err := e.st.Put(ctx, keyInstances+"web-1", api.Instance{ID: "web-1", Service: "web"}, 0); err != nil {
		t.Fatal(err)
	}
	if ev := web.nextEvent(t); ev.Name != "web-1" || ev.Kind != api.KindInstance {
		t.Fatalf("filtered instance watch: %+v", summary(ev))
	}
}

// TestWatchGone: a watch from a revision older than the cache holds is
// refused with 410 gone, which the client reports as IsGone. The objects
// written before the server started predate the cache's first list.
func TestWatchGone(t *testing.T) {
	var early int64
	e := startEnvWith(t, Options{}, func(st *store.Store) {
		ctx := context.Background()
		svc := api.Service{Name: "old", Spec: api.ServiceSpec{Name: "old", Image: "nginx"}, Generation: 1}
		var err error
		if early, err = st.Put(ctx, keyServices+"old", svc, 0); err != nil {
			t.Fatal(err)
		}
		svc.Generation = 2
		if _, err = st.Put(ctx, keyServices+"old", svc, early); err != nil {
			t.Fatal(err)
		}
	})
	// A snapshot watch shows the objects written before the start.
	snap, err := e.watch(client.WatchServices, 0)
	if err != nil {
		t.Fatal(err)
	}
	if ev := snap.nextEvent(t); ev.Type != api.EventPut || ev.Name != "old" || ev.Revision <= early {
		t.Fatalf("snapshot of a pre-start object: %+v", summary(ev))
	}

	_, err = e.c.Watch(e.ctx, client.WatchServices, early)
	if !client.IsGone(err) {
		t.Fatalf("watch from %d (before the cache's first list at %d): %v, want gone", early, e.srv.cache.Revision(), err)
	}
	wantAPIError(t, err, http.StatusGone, api.CodeGone)
	e.apiErr("GET", fmt.Sprintf("/v1/nodes?watch=1&revision=%d", early), "", http.StatusGone, api.CodeGone)

	// Listing again and watching from the list's revision works.
	l, err := e.c.ListServices(e.ctx)
	if err != nil || len(l.Items) != 1 || l.Items[0].Generation != 2 {
		t.Fatalf("list: %+v %v", l, err)
	}
	w, err := e.watch(client.WatchServices, l.Revision)
	if err != nil {
		t.Fatalf("watch from the list's revision: %v", err)
	}
	if err := e.c.DeleteService(e.ctx, "old"); err != nil {
		t.Fatal(err)
	}
	if ev := w.nextEvent(t); ev.Type != api.EventDelete || ev.Name != "old" {
		t.Fatalf("after relist: %+v", summary(ev))
	}
}

// TestNodeForceDeleteRaces: force-deleting a ready node revokes its lease;
// the liveness controller reacting to that must not make the delete fail
// as a concurrent change.
func TestNodeForceDeleteRaces(t *testing.T) {
	e := startEnv(t)
	for i := range 25 {
		if _, err := e.c.RegisterNode(e.ctx, "n1", nodeReg(10*time.Second)); err != nil {
			t.Fatal(err)
		}
		if err := e.c.DeleteNode(e.ctx, "n1", true); err != nil {
			t.Fatalf("round %d: force delete of a ready node: %v", i, err)
		}
		if _, err := e.c.GetNode(e.ctx, "n1"); !client.IsNotFound(err) {
			t.Fatalf("round %d: node after delete: %v", i, err)
		}
		if c, _ := e.st.Count(e.ctx, keyNodeLeases+"n1"); c != 0 {
			t.Fatalf("round %d: lease key left after delete", i)
		}
	}
}

// TestNodeHeartbeatRacesLapse: a heartbeat that arrives just as the node's
// lease lapses races the liveness controller marking the node down; once it
// is acknowledged, the node must be ready with a live lease.
func TestNodeHeartbeatRacesLapse(t *testing.T) {
	e := startEnv(t)
	for i := range 20 {
		if _, err := e.c.RegisterNode(e.ctx, "n1", nodeReg(10*time.Second)); err != nil {
			t.Fatal(err)
		}
		var nl nodeLease
		if _, err := e.st.Get(e.ctx, keyNodeLeases+"n1", &nl); err != nil {
			t.Fatal(err)
		}
		// The lease ends as on expiry, and the heartbeat comes at once.
		if err := e.st.Revoke(e.ctx, nl.Lease); err != nil {
			t.Fatal(err)
		}
		time.Sleep(time.Duration(i%4) * time.Millisecond)
		hb, err := e.c.Heartbeat(e.ctx, "n1")
		if err != nil || !hb.Registered {
			t.Fatalf("round %d: heartbeat: %+v %v", i, hb, err)
		}
		// Whatever the controller was doing has settled.
		_, rev := e.dump()
		e.waitCache(rev)
		time.Sleep(20 * time.Millisecond)
		n, err := e.c.GetNode(e.ctx, "n1")
		var nl2 nodeLease
		_, lerr := e.st.Get(e.ctx, keyNodeLeases+"n1", &nl2)
		if err != nil || n.Status.State != api.NodeReady || lerr != nil {
			t.Fatalf("round %d: after an acknowledged heartbeat: node %s (%v), lease key: %v", i, n.Status.State, err, lerr)
		}
		if _, err := e.st.LeaseTTL(e.ctx, nl2.Lease); err != nil {
			t.Fatalf("round %d: the node's lease is not alive: %v", i, err)
		}
	}
}

// TestNetworkAttachments: a network's inspect lists the VNICs instances
// report on it, sorted by instance, and follows their changes.
func TestNetworkAttachments(t *testing.T) {
	e := startEnv(t)
	ctx := e.ctx
	if _, err := e.c.CreateNetwork(ctx, api.NetworkSpec{Name: "front", Subnet: "10.90.0.0/24"}); err != nil {
		t.Fatal(err)
	}
	for _, in := range []api.Instance{
		{ID: "web-b", Service: "web", Node: "n1"}, {ID: "web-a", Service: "web", Node: "n2"}, {ID: "db-1", Service: "db", Node: "n1"},
	} {
		in.Generation, in.DesiredState = 1, api.DesiredRunning
		if _, err := e.st.Put(ctx, keyInstances+in.ID, in, 0); err != nil {
			t.Fatal(err)
		}
	}
	vnic := func(net, ip string) api.VNIC {
		return api.VNIC{Network: net, Interface: "eth0", MAC: "02:00:00:00:00:01", IP: ip}
	}
	report := func(id string, vnics ...api.VNIC) {
		t.Helper()
		if _, err := e.c.PutInstanceStatus(ctx, id, api.InstanceStatus{State: api.InstanceRunning, VNICs: vnics}); err != nil {
			t.Fatal(err)
		}
	}
	attached := func() string {
		t.Helper()
		n, err := e.c.GetNetwork(ctx, "front")
		if err != nil {
			t.Fatal(err)
		}
		var s []string
		for _, a := range n.Status.Attached {
			s = append(s, a.Instance+"@"+a.Node+"="+a.IP)
		}
		if n.Status.AddressesUsed != len(n.Status.Attached) || n.Status.AddressesFree != 253-len(n.Status.Attached) {
			t.Fatalf("addresses used %d, free %d, for %d attached", n.Status.AddressesUsed, n.Status.AddressesFree, len(n.Status.Attached))
		}
		return strings.Join(s, " ")
	}
	for _, step := range []struct {
		do   func()
		want string
	}{
		{func() {}, ""},
		{func() { report("web-b", vnic("front", "10.90.0.3")) }, "web-b@n1=10.90.0.3"},
		{func() {
			report("web-a", vnic("default", "10.88.0.2"), vnic("front", "10.90.0.2"))
			report("db-1", vnic("default", "10.88.0.3"))
		}, "web-a@n2=10.90.0.2 web-b@n1=10.90.0.3"},
		{func() { report("web-b") }, "web-a@n2=10.90.0.2"},
		{func() {
			if _, err := e.st.Delete(ctx, keyInstances+"web-a", 0); err != nil {
				t.Fatal(err)
			}
		}, ""},
	} {
		step.do()
		// The inspect reads the server's cache, which follows the store
		// within moments.
		deadline := time.Now().Add(5 * time.Second)
		for {
			got := attached()
			if got == step.want {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("attached %q, want %q", got, step.want)
			}
			time.Sleep(5 * time.Millisecond)
		}
	}
}
