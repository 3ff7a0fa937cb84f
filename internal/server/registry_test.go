package server

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/berth-dev/berth/api"
	"github.com/berth-dev/berth/client"
	"github.com/berth-dev/berth/internal/dns"
	"github.com/berth-dev/berth/internal/store"
	mdns "github.com/miekg/dns"
	clientv3 "go.etcd.io/etcd/client/v3"
)

// put sends a registration and returns the status and the answer.
func (e *testEnv) putRegistration(service, id, body string) (int, api.Registration, error) {
	req, err := http.NewRequestWithContext(e.ctx, http.MethodPut, e.ts.URL+"/v1/registry/services/"+service+"/instances/"+id, strings.NewReader(body))
	if err != nil {
		return 0, api.Registration{}, err
	}
	resp, err := e.ts.Client().Do(req)
	if err != nil {
		return 0, api.Registration{}, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return 0, api.Registration{}, err
	}
	var r api.Registration
	if resp.StatusCode < 300 {
		if err := json.Unmarshal(b, &r); err != nil {
			return 0, api.Registration{}, fmt.Errorf("decode %s: %w", b, err)
		}
	}
	return resp.StatusCode, r, nil
}

// TestRegistrationPooledLeaseExpiry: a registration on a lease that waited
// in the pool gets its whole TTL from the registration on (the lease is
// renewed as it is taken), and expires when its heartbeats stop.
func TestRegistrationPooledLeaseExpiry(t *testing.T) {
	t.Parallel()
	e := startEnv(t)
	const ttl = 2 * time.Second
	body := `{"address":"10.0.0.9","port":80,"ttl":"2s"}`
	// A burst of registrations of this TTL fills its pool.
	for i := range 30 {
		if status, _, err := e.putRegistration("warm", fmt.Sprintf("w-%d", i), body); err != nil || status != http.StatusCreated {
			t.Fatalf("warm-up registration: %d %v", status, err)
		}
	}
	eventually(t, 5*time.Second, "the pool of 2s leases fills", func() bool { return e.srv.leases.size(ttl) >= poolMinSize })
	pooled := map[int64]bool{}
	e.srv.leases.mu.Lock()
	for _, l := range e.srv.leases.pools[2].free {
		pooled[l.id] = true
	}
	e.srv.leases.mu.Unlock()
	// Let the pooled leases age by most of what they may wait.
	time.Sleep(usable(2) * 7 / 10)
	start := time.Now()
	if status, _, err := e.putRegistration("web", "quiet", body); err != nil || status != http.StatusCreated {
		t.Fatalf("register: %d %v", status, err)
	}
	kv, err := e.st.GetKV(e.ctx, regKey("web", "quiet"))
	if err != nil {
		t.Fatal(err)
	}
	if !pooled[kv.Lease] {
		t.Skipf("the registration got lease %x, not one of the %d pooled ones (the pool was refilled meanwhile)", kv.Lease, len(pooled))
	}
	// Without the renewal the lease would end ~0.7s early, before this.
	time.Sleep(time.Until(start.Add(ttl * 9 / 10)))
	if status, _ := e.raw("GET", "/v1/registry/services/web/instances/quiet", ""); status != http.StatusOK {
		t.Fatalf("registration gone %v after registering with ttl %v (status %d)", time.Since(start), ttl, status)
	}
	eventually(t, 5*time.Second, "registration removed after its TTL", func() bool {
		s, _ := e.raw("GET", "/v1/registry/services/web/instances/quiet", "")
		return s == http.StatusNotFound
	})
	if took := time.Since(start); took < ttl {
		t.Fatalf("registration expired %v after registering with ttl %v", took, ttl)
	}
}

// TestRegistrationDedup: the same id registered by many clients at once is
// one registration: one creation (201), updates after it (200), one key on
// one live lease, every replaced lease revoked, the creation time kept.
func TestRegistrationDedup(t *testing.T) {
	e := startEnv(t)
	const clients, each = 8, 5
	var (
		mu      sync.Mutex
		created int
		first   time.Time
		results []api.Registration
		wg      sync.WaitGroup
	)
	for c := range clients {
		wg.Go(func() {
			for i := range each {
				body := fmt.Sprintf(`{"address":"10.0.0.9","port":%d,"ttl":"1m"}`, 1000+c*each+i)
				status, r, err := e.putRegistration("web", "same", body)
				if err != nil || (status != http.StatusCreated && status != http.StatusOK) {
					t.Errorf("register: %d %v", status, err)
					return
				}
				mu.Lock()
				results = append(results, r)
				if status == http.StatusCreated {
					created++
					first = r.CreatedAt
				}
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	if t.Failed() {
		return
	}
	if created != 1 {
		t.Fatalf("%d registrations answered 201 Created, want 1", created)
	}
	for _, r := range results {
		if !r.CreatedAt.Equal(first) {
			t.Fatalf("creation time %v, want the first's %v", r.CreatedAt, first)
		}
	}
	kvs, _, err := e.st.List(e.ctx, keyRegistrations+"web/")
	if err != nil || len(kvs) != 1 {
		t.Fatalf("%d keys for one id: %v", len(kvs), err)
	}
	if _, err := e.st.LeaseTTL(e.ctx, kvs[0].Lease); err != nil {
		t.Fatalf("the registration's lease: %v", err)
	}
	// Every lease a registration of the id was answered on, but the last
	// one's, is gone.
	var last api.Registration
	for _, r := range results {
		if r.Revision > last.Revision {
			last = r
		}
	}
	if kvs[0].ModRevision != last.Revision {
		t.Fatalf("stored at revision %d, the last answer says %d", kvs[0].ModRevision, last.Revision)
	}
	leases, err := e.st.Client().Leases(e.ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range leases.Leases {
		if int64(l.ID) == kvs[0].Lease {
			continue
		}
		ttl, err := e.st.Client().TimeToLive(e.ctx, l.ID, clientv3.WithAttachedKeys())
		if err == nil && len(ttl.Keys) > 0 {
			for _, k := range ttl.Keys {
				if strings.HasPrefix(string(k), keyRegistrations) {
					t.Fatalf("lease %x still holds %s", l.ID, k)
				}
			}
		}
	}
}

// TestRegistrationAgainstStaleCache: the cache's guess of what the key
// holds may lag the store; the registration then finds out in its
// transaction and still creates (201) or updates (200, creation time kept)
// as the store says.
func TestRegistrationAgainstStaleCache(t *testing.T) {
	e := startEnv(t)
	body := `{"address":"10.0.0.9","port":80,"ttl":"1m"}`
	for i := range 20 {
		id := fmt.Sprintf("s-%d", i)
		status, r1, err := e.putRegistration("web", id, body)
		if err != nil || status != http.StatusCreated {
			t.Fatalf("register %s: %d %v", id, status, err)
		}
		e.waitCache(r1.Revision)
		// Deleted behind the cache's back and registered at once: created.
		if _, err := e.st.Delete(e.ctx, regKey("web", id), -1); err != nil {
			t.Fatal(err)
		}
		status, r2, err := e.putRegistration("web", id, body)
		if err != nil || status != http.StatusCreated || r2.CreatedAt.Equal(r1.CreatedAt) {
			t.Fatalf("register %s after a delete: %d %v, created %v (before %v)", id, status, err, r2.CreatedAt, r1.CreatedAt)
		}
		// Written behind the cache's back: updated, keeping its creation.
		r3 := r2
		r3.Port, r3.Revision = 81, 0
		r3.CreatedAt = r3.CreatedAt.Add(-time.Hour)
		if _, err := e.st.Put(e.ctx, regKey("web", id), r3, -1); err != nil {
			t.Fatal(err)
		}
		status, r4, err := e.putRegistration("web", id, body)
		if err != nil || status != http.StatusOK || !r4.CreatedAt.Equal(r3.CreatedAt) || r4.Port != 80 {
			t.Fatalf("register %s after a write: %d %v, %+v", id, status, err, r4)
		}
		kv, err := e.st.GetKV(e.ctx, regKey("web", id))
		if err != nil || kv.ModRevision != r4.Revision || kv.Lease == 0 {
			t.Fatalf("stored %+v %v, answered revision %d", kv, err, r4.Revision)
		}
	}
}

// TestDeregistrationRevokesLease: deregistering revokes the registration's
// lease, which takes the key; a registration stored without a lease is
// deleted.
func TestDeregistrationRevokesLease(t *testing.T) {
	e := startEnv(t)
	if _, err := e.c.Register(e.ctx, "web", "a", api.RegistrationSpec{Address: "10.0.0.1", Port: 80}); err != nil {
		t.Fatal(err)
	}
	kv, err := e.st.GetKV(e.ctx, regKey("web", "a"))
	if err != nil {
		t.Fatal(err)
	}
	if err := e.c.Deregister(e.ctx, "web", "a"); err != nil {
		t.Fatal(err)
	}
	if _, err := e.st.GetKV(e.ctx, regKey("web", "a")); !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("key after deregistering: %v", err)
	}
	if _, err := e.st.LeaseTTL(e.ctx, kv.Lease); !errors.Is(err, store.ErrNoLease) {
		t.Fatalf("lease after deregistering: %v", err)
	}
	if _, err := e.st.Put(e.ctx, regKey("web", "b"), api.Registration{Service: "web", ID: "b",
		RegistrationSpec: api.RegistrationSpec{Address: "10.0.0.2", Port: 80}}, -1); err != nil {
		t.Fatal(err)
	}
	if err := e.c.Deregister(e.ctx, "web", "b"); err != nil {
		t.Fatal(err)
	}
	if _, err := e.st.GetKV(e.ctx, regKey("web", "b")); !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("key without a lease after deregistering: %v", err)
	}
}

// dnsRecorder is a UDP dns.ResponseWriter that keeps the answer.
type dnsRecorder struct{ m *mdns.Msg }

func (w *dnsRecorder) LocalAddr() net.Addr { return &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 53} }
func (w *dnsRecorder) RemoteAddr() net.Addr {
	return &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 40000}
}
func (w *dnsRecorder) WriteMsg(m *mdns.Msg) error {
	w.m = m
	return nil
}
func (w *dnsRecorder) Write(b []byte) (int, error) {
	w.m = new(mdns.Msg)
	return len(b), w.m.Unpack(b)
}
func (w *dnsRecorder) Close() error        { return nil }
func (w *dnsRecorder) TsigStatus() error   { return nil }
func (w *dnsRecorder) TsigTimersOnly(bool) {}
func (w *dnsRecorder) Hijack()             {}

// TestDNSFollowsRegistrations: DNS answers from the server's index (kept
// per version of a service) change with the first query after a change
// reached the cache.
func TestDNSFollowsRegistrations(t *testing.T) {
	e := startEnv(t)
	h, err := dns.NewHandler(e.srv, dns.Config{})
	if err != nil {
		t.Fatal(err)
	}
	query := func(name string, qtype uint16) *mdns.Msg {
		t.Helper()
		q := new(mdns.Msg)
		q.SetQuestion(name, qtype)
		q.SetEdns0(4096, false)
		w := &dnsRecorder{}
		h.ServeDNS(w, q)
		if w.m == nil {
			t.Fatalf("no answer to %s", name)
		}
		return w.m
	}
	addrs := func(m *mdns.Msg) []string {
		var out []string
		for _, rr := range m.Answer {
			if a, ok := rr.(*mdns.A); ok {
				out = append(out, a.A.String())
			}
		}
		slices.Sort(out)
		return out
	}
	if m := query("web.svc.berth.", mdns.TypeA); m.Rcode != mdns.RcodeNameError {
		t.Fatalf("unknown service: %s", mdns.RcodeToString[m.Rcode])
	}
	var want []string
	for i := range 20 {
		ip := fmt.Sprintf("10.9.0.%d", i+1)
		r, err := e.c.Register(e.ctx, "web", fmt.Sprintf("r%d", i), api.RegistrationSpec{Address: ip, Port: 80, Ports: map[string]int{"http": 80}})
		if err != nil {
			t.Fatal(err)
		}
		e.waitCache(r.Revision)
		want = append(want, ip)
		slices.Sort(want)
		if got := addrs(query("web.svc.berth.", mdns.TypeA)); !slices.Equal(got, want) {
			t.Fatalf("after registering %s: A %v, want %v", ip, got, want)
		}
		if m := query("_http._tcp.web.svc.berth.", mdns.TypeSRV); len(m.Answer) != i+1 {
			t.Fatalf("after registering %s: %d SRV records", ip, len(m.Answer))
		}
	}
	// Health and removal show at once too.
	r, err := e.c.Register(e.ctx, "web", "r0", api.RegistrationSpec{Address: "10.9.0.1", Port: 80, Health: api.HealthCritical})
	if err != nil {
		t.Fatal(err)
	}
	e.waitCache(r.Revision)
	if got := addrs(query("web.svc.berth.", mdns.TypeA)); slices.Contains(got, "10.9.0.1") || len(got) != 19 {
		t.Fatalf("a critical registration still answered: %v", got)
	}
	for i := range 20 {
		if err := e.c.Deregister(e.ctx, "web", fmt.Sprintf("r%d", i)); err != nil {
			t.Fatal(err)
		}
	}
	_, rev, err := e.st.List(e.ctx, keyRegistrations)
	if err != nil {
		t.Fatal(err)
	}
	e.waitCache(rev)
	if m := query("web.svc.berth.", mdns.TypeA); m.Rcode != mdns.RcodeNameError {
		t.Fatalf("service with nothing left: %s %v", mdns.RcodeToString[m.Rcode], m.Answer)
	}
}

// BenchmarkRegister: registrations of fresh ids through the API, one
// client, and deregistrations: what one client waits for per call.
func BenchmarkRegister(b *testing.B) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	st, err := store.Open(ctx, store.Config{DataDir: b.TempDir()})
	if err != nil {
		b.Fatal(err)
	}
	defer st.Close()
	s := New(st, slog.New(slog.DiscardHandler), Options{NoDeployments: true})
	done := make(chan struct{})
	go func() {
		defer close(done)
		_ = s.Run(ctx)
	}()
	defer func() { cancel(); <-done }()
	ts := httptest.NewServer(s.Handler())
	defer ts.Close()
	c, err := client.New(ts.URL)
	if err != nil {
		b.Fatal(err)
	}
	if err := c.WaitReady(ctx, 10*time.Second); err != nil {
		b.Fatal(err)
	}
	spec := api.RegistrationSpec{Address: "10.0.0.1", Port: 8080, Ports: map[string]int{"http": 8080},
		Meta: map[string]string{"zone": "z1"}, TTL: api.Duration(10 * time.Minute)}
	var n int
	b.Run("register", func(b *testing.B) {
		for b.Loop() {
			if _, err := c.Register(ctx, fmt.Sprintf("svc-%03d", n%100), fmt.Sprintf("r-%06d", n), spec); err != nil {
				b.Fatal(err)
			}
			n++
		}
	})
	var m int
	b.Run("deregister", func(b *testing.B) {
		for b.Loop() {
			if m >= n {
				b.Skip("nothing left to deregister")
			}
			if err := c.Deregister(ctx, fmt.Sprintf("svc-%03d", m%100), fmt.Sprintf("r-%06d", m)); err != nil {
				b.Fatal(err)
			}
			m++
		}
	})
}
