package client

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/berth-dev/berth/api"
)

func TestNewAddr(t *testing.T) {
	tests := []struct {
		addr, want string
		bad        bool
	}{
		{"", DefaultAddr, false},
		{"127.0.0.1:7480", "http://127.0.0.1:7480", false},
		{"http://host:1/", "http://host:1", false},
		{"https://berth.example.com", "https://berth.example.com", false},
		{"http://", "", true},
		{"http://[::1", "", true},
	}
	for _, tt := range tests {
		c, err := New(tt.addr)
		if tt.bad {
			if err == nil {
				t.Errorf("New(%q) = %q, want an error", tt.addr, c.Addr())
			}
			continue
		}
		if err != nil || c.Addr() != tt.want {
			t.Errorf("New(%q) = %v %v, want %q", tt.addr, c, err, tt.want)
		}
	}
}

// recorder is a fake API: it answers each request with a canned response and
// records what it was sent.
type recorder struct {
	mu     sync.Mutex
	reqs   []string // "METHOD /path?query body"
	status int
	body   string
}

func (rec *recorder) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	b, _ := io.ReadAll(r.Body)
	rec.mu.Lock()
	rec.reqs = append(rec.reqs, strings.TrimSpace(r.Method+" "+r.URL.RequestURI()+" "+string(b)))
	status, body := rec.status, rec.body
	rec.mu.Unlock()
	if status == 0 {
		status = http.StatusOK
	}
	if status == http.StatusNoContent {
		w.WriteHeader(status)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_, _ = io.WriteString(w, body)
}

func (rec *recorder) last() string {
	rec.mu.Lock()
	defer rec.mu.Unlock()
	if len(rec.reqs) == 0 {
		return ""
	}
	return rec.reqs[len(rec.reqs)-1]
}

func fake(t *testing.T, h http.Handler) *Client {
	t.Helper()
	ts := httptest.NewServer(h)
	t.Cleanup(ts.Close)
	c, err := New(ts.URL)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// TestRequests checks the method, path (escaped) and body of each call.
func TestRequests(t *testing.T) {
	rec := &recorder{body: `{}`}
	c := fake(t, rec)
	ctx := context.Background()
	calls := []struct {
		call func() error
		want string
	}{
		{func() error { _, err := c.GetNode(ctx, "n1"); return err }, "GET /v1/nodes/n1"},
		{func() error { _, err := c.Heartbeat(ctx, "n1"); return err }, "POST /v1/nodes/n1/heartbeat"},
		{func() error { return c.ReleaseNode(ctx, "n1") }, "DELETE /v1/nodes/n1/lease"},
		{func() error { return c.DeleteNode(ctx, "n1", false) }, "DELETE /v1/nodes/n1"},
		{func() error { return c.DeleteNode(ctx, "n1", true) }, "DELETE /v1/nodes/n1?force=1"},
		{func() error { _, err := c.GetService(ctx, "a b/c"); return err }, "GET /v1/services/a%20b%2Fc"},
		{func() error { _, err := c.ApplyServiceJSON(ctx, []byte(`{"name":"x"}`)); return err }, `POST /v1/services {"name":"x"}`},
		{func() error {
			_, err := c.CreateNetwork(ctx, api.NetworkSpec{Name: "n", Subnet: "10.0.0.0/24"})
			return err
		}, `POST /v1/networks {"name":"n","subnet":"10.0.0.0/24"}`},
		{func() error {
			_, err := c.ListInstances(ctx, InstanceFilter{Service: "web", Node: "n 1"})
			return err
		}, "GET /v1/instances?node=n+1&service=web"},
		{func() error { _, err := c.ListInstances(ctx, InstanceFilter{}); return err }, "GET /v1/instances"},
		{func() error {
			_, err := c.PutInstanceStatus(ctx, "web-1", api.InstanceStatus{State: "running"})
			return err
		}, `PUT /v1/instances/web-1/status {"state":"running"}`},
		{func() error {
			_, err := c.Register(ctx, "web", "i-1", api.RegistrationSpec{Address: "10.0.0.1", Port: 80})
			return err
		}, `PUT /v1/registry/services/web/instances/i-1 {"address":"10.0.0.1","port":80}`},
		{func() error { return c.Renew(ctx, "web", "i-1") }, "PUT /v1/registry/services/web/instances/i-1/renew"},
		{func() error { return c.Deregister(ctx, "web", "i-1") }, "DELETE /v1/registry/services/web/instances/i-1"},
		{func() error { _, err := c.ListRegistrations(ctx, ""); return err }, "GET /v1/registry/services"},
		{func() error { _, err := c.ListRegistrations(ctx, "web"); return err }, "GET /v1/registry/services/web/instances"},
	}
	for _, tt := range calls {
		if err := tt.call(); err != nil {
			t.Errorf("%s: %v", tt.want, err)
			continue
		}
		if got := rec.last(); got != tt.want {
			t.Errorf("sent %q, want %q", got, tt.want)
		}
	}
}

func TestErrors(t *testing.T) {
	tests := []struct {
		name       string
		status     int
		body       string
		wantCode   string
		wantMsg    string
		notFound   bool
		gone       bool
		wantFields int
	}{
		{"api error", 400, `{"status":400,"code":"invalid","message":"invalid service: spec.replicas: must be >= 0","fields":[{"field":"spec.replicas","reason":"must be >= 0"}]}`,
			api.CodeInvalid, "invalid service: spec.replicas: must be >= 0", false, false, 1},
		{"not found", 404, `{"status":404,"code":"not_found","message":"service \"x\" not found"}`, api.CodeNotFound, `service "x" not found`, true, false, 0},
		{"gone", 410, `{"status":410,"code":"gone","message":"too old"}`, api.CodeGone, "too old", false, true, 0},
		{"plain text from a proxy", 502, "bad gateway\n", api.CodeInternal, "bad gateway", false, false, 0},
		{"status taken from the response", 409, `{"status":200,"code":"conflict","message":"exists"}`, api.CodeConflict, "exists", false, false, 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := fake(t, &recorder{status: tt.status, body: tt.body})
			_, err := c.GetService(context.Background(), "x")
			var ae *api.Error
			if !errors.As(err, &ae) {
				t.Fatalf("error %v (%T), want *api.Error", err, err)
			}
			if ae.Status != tt.status || ae.Code != tt.wantCode || ae.Message != tt.wantMsg || len(ae.Fields) != tt.wantFields {
				t.Fatalf("error %+v", ae)
			}
			if IsNotFound(err) != tt.notFound || IsGone(err) != tt.gone {
				t.Fatalf("IsNotFound %v IsGone %v", IsNotFound(err), IsGone(err))
			}
		})
	}
	if IsNotFound(errors.New("x")) || IsGone(nil) {
		t.Fatal("IsNotFound/IsGone of a non-API error")
	}
	// A connection failure is not an API error.
	c, _ := New("127.0.0.1:1")
	if err := c.Health(context.Background()); err == nil || IsNotFound(err) {
		t.Fatalf("Health of nothing: %v", err)
	}
}

// streamServer serves a watch: it checks the query, writes lines and ends
// the stream.
func streamServer(t *testing.T, wantQuery string, lines ...string) *Client {
	t.Helper()
	return fake(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if got := r.URL.RawQuery; got != wantQuery {
			http.Error(w, fmt.Sprintf(`{"status":400,"code":"invalid","message":"query %q, want %q"}`, got, wantQuery), http.StatusBadRequest)
			return
		}
		w.Header().Set("Content-Type", "application/x-ndjson")
		for _, l := range lines {
			_, _ = io.WriteString(w, l+"\n")
		}
		w.(http.Flusher).Flush()
	}))
}

func TestWatchStream(t *testing.T) {
	ctx := context.Background()
	c := streamServer(t, "watch=1",
		`{"type":"put","kind":"service","name":"a","revision":5,"object":{"name":"a"}}`,
		`{"type":"bookmark","revision":7}`,
		`{"type":"delete","kind":"service","name":"a","revision":8,"object":{"name":"a"}}`,
		`{"type":"error","revision":8,"error":{"status":410,"code":"gone","message":"too old"}}`,
	)
	s, err := c.Watch(ctx, WatchServices, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	for _, want := range []struct {
		typ string
		rev int64
	}{{api.EventPut, 5}, {api.EventBookmark, 7}, {api.EventDelete, 8}} {
		ev, err := s.Next()
		if err != nil || ev.Type != want.typ || ev.Revision != want.rev || s.Revision() != want.rev {
			t.Fatalf("Next = %+v %v (stream at %d), want %s at %d", ev, err, s.Revision(), want.typ, want.rev)
		}
	}
	_, err = s.Next()
	if !IsGone(err) {
		t.Fatalf("error event: %v, want gone", err)
	}
	if s.Revision() != 8 {
		t.Fatalf("an error event moved the revision to %d", s.Revision())
	}

	// The query: from > 0 asks for a revision; an existing query is kept.
	c = streamServer(t, "service=web&watch=1&revision=42", `{"type":"bookmark","revision":42}`)
	s, err = c.Watch(ctx, WatchInstances+"?service=web", 42)
	if err != nil {
		t.Fatal(err)
	}
	if s.Revision() != 42 {
		t.Fatalf("a stream from 42 starts at %d", s.Revision())
	}
	if ev, err := s.Next(); err != nil || ev.Type != api.EventBookmark {
		t.Fatalf("Next: %+v %v", ev, err)
	}
	// The server ended the stream: EOF.
	if _, err := s.Next(); !errors.Is(err, io.EOF) {
		t.Fatalf("end of stream: %v, want io.EOF", err)
	}
	s.Close()

	// A line that is not an event is an error.
	c = streamServer(t, "watch=1", `not json`)
	s, err = c.Watch(ctx, WatchNodes, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.Next(); err == nil || !strings.Contains(err.Error(), "bad event") {
		t.Fatalf("bad line: %v", err)
	}
	s.Close()

	// A refused watch is an error from Watch itself.
	c = fake(t, &recorder{status: 410, body: `{"status":410,"code":"gone","message":"too old"}`})
	if _, err := c.Watch(ctx, WatchServices, 3); !IsGone(err) {
		t.Fatalf("refused watch: %v", err)
	}
}

// TestWatchIgnoresClientTimeout: a watch outlives the HTTP client's
// timeout, which bounds ordinary calls only.
func TestWatchIgnoresClientTimeout(t *testing.T) {
	release := make(chan struct{})
	ts := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/x-ndjson")
		_, _ = io.WriteString(w, `{"type":"bookmark","revision":1}`+"\n")
		w.(http.Flusher).Flush()
		select {
		case <-release:
			_, _ = io.WriteString(w, `{"type":"put","name":"late","revision":2}`+"\n")
		case <-r.Context().Done():
		}
	}))
	defer ts.Close()
	c, err := New(ts.URL, WithHTTPClient(&http.Client{Timeout: 100 * time.Millisecond}))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	s, err := c.Watch(ctx, WatchServices, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if _, err := s.Next(); err != nil {
		t.Fatal(err)
	}
	time.Sleep(300 * time.Millisecond)
	close(release)
	ev, err := s.Next()
	if err != nil || ev.Name != "late" {
		t.Fatalf("event after the client timeout: %+v %v", ev, err)
	}
	if c.hc.Timeout != 100*time.Millisecond {
		t.Fatal("Watch changed the client's own timeout")
	}
}

func TestWaitReady(t *testing.T) {
	var mu sync.Mutex
	calls := 0
	c := fake(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		calls++
		n := calls
		mu.Unlock()
		if n < 3 {
			http.Error(w, `{"status":503,"code":"internal","message":"starting"}`, http.StatusServiceUnavailable)
			return
		}
		_, _ = io.WriteString(w, `{"status":"ok"}`)
	}))
	if err := c.WaitReady(context.Background(), 5*time.Second); err != nil {
		t.Fatal(err)
	}
	never := fake(t, &recorder{status: 503, body: `{"status":503,"code":"internal","message":"starting"}`})
	err := never.WaitReady(context.Background(), 100*time.Millisecond)
	if err == nil || !strings.Contains(err.Error(), "starting") {
		t.Fatalf("WaitReady of a server that never starts: %v", err)
	}
}
