package client

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/berth-dev/berth/api"
)

// fakeRegistry fakes the registry endpoints and counts the calls per
// service/id. Its answers carry ttl when set, else the spec's TTL.
type fakeRegistry struct {
	mu         sync.Mutex
	ttl        time.Duration
	registered map[string]bool
	registers  map[string]int
	renews     map[string]int
	deletes    map[string]int
}

func newFakeRegistry(ttl time.Duration) *fakeRegistry {
	return &fakeRegistry{ttl: ttl, registered: map[string]bool{}, registers: map[string]int{},
		renews: map[string]int{}, deletes: map[string]int{}}
}

func (f *fakeRegistry) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	rest, ok := strings.CutPrefix(r.URL.Path, "/v1/registry/services/")
	parts := strings.Split(rest, "/")
	if !ok || len(parts) < 3 || parts[1] != "instances" {
		http.NotFound(w, r)
		return
	}
	key := parts[0] + "/" + parts[2]
	renew := len(parts) == 4 && parts[3] == "renew"
	f.mu.Lock()
	defer f.mu.Unlock()
	switch {
	case r.Method == http.MethodPut && renew:
		f.renews[key]++
		if !f.registered[key] {
			w.WriteHeader(http.StatusNotFound)
			_ = json.NewEncoder(w).Encode(api.Error{Code: api.CodeNotFound, Message: "registration " + key + " not found"})
			return
		}
		w.WriteHeader(http.StatusNoContent)
	case r.Method == http.MethodPut:
		var spec api.RegistrationSpec
		if err := json.NewDecoder(r.Body).Decode(&spec); err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		if f.ttl > 0 {
			spec.TTL = api.Duration(f.ttl)
		}
		f.registers[key]++
		f.registered[key] = true
		_ = json.NewEncoder(w).Encode(api.Registration{Service: parts[0], ID: parts[2], RegistrationSpec: spec})
	case r.Method == http.MethodDelete:
		f.deletes[key]++
		if !f.registered[key] {
			w.WriteHeader(http.StatusNotFound)
			_ = json.NewEncoder(w).Encode(api.Error{Code: api.CodeNotFound, Message: "not found"})
			return
		}
		delete(f.registered, key)
		w.WriteHeader(http.StatusNoContent)
	default:
		http.NotFound(w, r)
	}
}

func (f *fakeRegistry) count(m map[string]int, key string) int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return m[key]
}

func (f *fakeRegistry) expire(key string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	delete(f.registered, key)
}

// eventually polls cond until it holds or d passes.
func eventually(t *testing.T, d time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

var regSpec = api.RegistrationSpec{Address: "127.0.0.1", Port: 8080, TTL: api.Duration(2 * time.Second)}

func TestRegistryRenewsEveryThirdOfTTL(t *testing.T) {
	f := newFakeRegistry(0) // the spec's 2s: a renewal every ~667ms
	r := fake(t, f).NewRegistry()
	defer r.Close()
	start := time.Now()
	if err := r.Register(context.Background(), "web", "w1", regSpec); err != nil {
		t.Fatal(err)
	}
	if n := f.count(f.registers, "web/w1"); n != 1 {
		t.Fatalf("registers = %d, want 1", n)
	}
	time.Sleep(1500*time.Millisecond - time.Since(start))
	// Renewals at ~0.67s and ~1.33s.
	if n := f.count(f.renews, "web/w1"); n != 2 {
		t.Errorf("renews after 1.5s = %d, want 2", n)
	}
	if n := f.count(f.registers, "web/w1"); n != 1 {
		t.Errorf("registers = %d, want still 1", n)
	}
}

func TestRegistryRegistersAgainAfter404(t *testing.T) {
	f := newFakeRegistry(150 * time.Millisecond) // renew every 50ms
	r := fake(t, f).NewRegistry()
	defer r.Close()
	if err := r.Register(context.Background(), "web", "w1", regSpec); err != nil {
		t.Fatal(err)
	}
	eventually(t, 2*time.Second, "a renewal", func() bool { return f.count(f.renews, "web/w1") >= 1 })
	f.expire("web/w1")
	eventually(t, 2*time.Second, "a second registration", func() bool { return f.count(f.registers, "web/w1") == 2 })
	// And it goes on renewing the new registration.
	n := f.count(f.renews, "web/w1")
	eventually(t, 2*time.Second, "renewals after re-registering", func() bool { return f.count(f.renews, "web/w1") >= n+2 })
	if got := f.count(f.registers, "web/w1"); got != 2 {
		t.Errorf("registers = %d, want 2", got)
	}
}

func TestRegistryDeregisterAndClose(t *testing.T) {
	f := newFakeRegistry(150 * time.Millisecond)
	r := fake(t, f).NewRegistry()
	ctx := context.Background()
	for _, id := range []string{"a", "b", "c"} {
		if err := r.Register(ctx, "web", id, regSpec); err != nil {
			t.Fatal(err)
		}
	}
	if err := r.Deregister(ctx, "web", "a"); err != nil {
		t.Fatal(err)
	}
	renewsA := f.count(f.renews, "web/a")
	eventually(t, 2*time.Second, "renewals of b", func() bool { return f.count(f.renews, "web/b") >= 2 })

	if err := r.Close(); err != nil {
		t.Fatal(err)
	}
	for _, id := range []string{"a", "b", "c"} {
		if n := f.count(f.deletes, "web/"+id); n != 1 {
			t.Errorf("deletes of %s = %d, want 1", id, n)
		}
	}
	renewsB := f.count(f.renews, "web/b")
	time.Sleep(200 * time.Millisecond)
	if n := f.count(f.renews, "web/a"); n != renewsA {
		t.Errorf("a renewed after Deregister: %d → %d", renewsA, n)
	}
	if n := f.count(f.renews, "web/b"); n != renewsB {
		t.Errorf("b renewed after Close: %d → %d", renewsB, n)
	}
	if n := f.count(f.registers, "web/b"); n != 1 {
		t.Errorf("b registered %d times, want 1", n)
	}
	if err := r.Register(ctx, "web", "d", regSpec); !errors.Is(err, ErrClosed) {
		t.Errorf("Register after Close = %v, want ErrClosed", err)
	}
	if err := r.Close(); err != nil {
		t.Errorf("second Close = %v", err)
	}
}

func TestRegistryRegisterError(t *testing.T) {
	rec := &recorder{status: http.StatusBadRequest, body: `{"code":"invalid","message":"bad ttl"}`}
	r := fake(t, rec).NewRegistry()
	err := r.Register(context.Background(), "web", "w1", regSpec)
	var ae *api.Error
	if !errors.As(err, &ae) || ae.Status != http.StatusBadRequest {
		t.Fatalf("Register = %v, want the 400", err)
	}
	if err := r.Close(); err != nil {
		t.Errorf("Close = %v, want nothing to deregister", err)
	}
	rec.mu.Lock()
	defer rec.mu.Unlock()
	if len(rec.reqs) != 1 {
		t.Errorf("requests = %q, want only the registration", rec.reqs)
	}
}
