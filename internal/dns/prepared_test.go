package dns

import (
	"fmt"
	"net"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/berth-dev/berth/api"
	"github.com/miekg/dns"
)

// versionedSource is a registry whose endpoints change, with a version
// per service that moves with them, as the server's index does.
type versionedSource struct {
	mu      sync.Mutex
	eps     map[string][]api.Endpoint
	version map[string]int64
	calls   int
}

func (v *versionedSource) Endpoints(service string) ([]api.Endpoint, bool) {
	eps, known, _ := v.EndpointsAt(service)
	return eps, known
}

func (v *versionedSource) EndpointsAt(service string) ([]api.Endpoint, bool, int64) {
	v.mu.Lock()
	defer v.mu.Unlock()
	v.calls++
	eps, ok := v.eps[service]
	return eps, ok, v.version[service]
}

// set replaces a service's endpoints (nil eps and !known: it is gone).
func (v *versionedSource) set(service string, known bool, eps ...api.Endpoint) {
	v.mu.Lock()
	defer v.mu.Unlock()
	if !known {
		delete(v.eps, service)
	} else {
		v.eps[service] = eps // a new slice: the old one is never changed
	}
	v.version[service]++
}

// TestPreparedAnswersFollowChanges: with a versioned source, the answers
// made once per version change with the very next query after a change,
// for A, AAAA, ANY and SRV alike.
func TestPreparedAnswersFollowChanges(t *testing.T) {
	src := &versionedSource{eps: map[string][]api.Endpoint{}, version: map[string]int64{}}
	h := newTestHandler(t, src)
	http := map[string]int{"http": 80}
	steps := []struct {
		name  string
		known bool
		eps   []api.Endpoint
		a     []string // A answer
		aaaa  []string
		srv   []string // SRV targets
		rcode int
	}{
		{"one endpoint", true, []api.Endpoint{ep("s", "one", "10.0.0.1", api.HealthPassing, http)},
			[]string{"s.svc.berth. A 10.0.0.1"}, nil, []string{"one.s.svc.berth."}, dns.RcodeSuccess},
		{"two, one v6", true, []api.Endpoint{ep("s", "one", "10.0.0.1", api.HealthPassing, http), ep("s", "two", "fd00::2", api.HealthWarning, http)},
			[]string{"s.svc.berth. A 10.0.0.1"}, []string{"s.svc.berth. AAAA fd00::2"}, []string{"one.s.svc.berth.", "two.s.svc.berth."}, dns.RcodeSuccess},
		{"the first critical", true, []api.Endpoint{ep("s", "one", "10.0.0.1", api.HealthCritical, http), ep("s", "two", "fd00::2", api.HealthWarning, http)},
			nil, []string{"s.svc.berth. AAAA fd00::2"}, []string{"two.s.svc.berth."}, dns.RcodeSuccess},
		{"moved address", true, []api.Endpoint{ep("s", "one", "10.0.0.9", api.HealthPassing, nil), ep("s", "two", "fd00::2", api.HealthWarning, http)},
			[]string{"s.svc.berth. A 10.0.0.9"}, []string{"s.svc.berth. AAAA fd00::2"}, []string{"two.s.svc.berth."}, dns.RcodeSuccess},
		{"no endpoint left", true, nil, nil, nil, nil, dns.RcodeSuccess},
		{"gone", false, nil, nil, nil, nil, dns.RcodeNameError},
		{"back", true, []api.Endpoint{ep("s", "three", "10.0.0.3", api.HealthPassing, http)},
			[]string{"s.svc.berth. A 10.0.0.3"}, nil, []string{"three.s.svc.berth."}, dns.RcodeSuccess},
	}
	for _, st := range steps {
		src.set("s", st.known, st.eps...)
		for range 3 { // the second and third come from what the first prepared
			for _, udp := range []bool{true, false} {
				a := serve(t, h, question("s.svc.berth.", dns.TypeA), udp)
				if a.Rcode != st.rcode || !slices.Equal(rrs(a.Answer), st.a) {
					t.Fatalf("%s: A %s %q, want %s %q", st.name, dns.RcodeToString[a.Rcode], rrs(a.Answer), dns.RcodeToString[st.rcode], st.a)
				}
				aaaa := serve(t, h, question("s.svc.berth.", dns.TypeAAAA), udp)
				if !slices.Equal(rrs(aaaa.Answer), st.aaaa) {
					t.Fatalf("%s: AAAA %q, want %q", st.name, rrs(aaaa.Answer), st.aaaa)
				}
				any := serve(t, h, question("s.svc.berth.", dns.TypeANY), udp)
				if want := append(slices.Clone(st.a), st.aaaa...); len(any.Answer) != len(want) {
					t.Fatalf("%s: ANY %q, want %q", st.name, rrs(any.Answer), want)
				}
				srv := serve(t, h, question("_http._tcp.s.svc.berth.", dns.TypeSRV), udp)
				var targets []string
				for _, rr := range srv.Answer {
					targets = append(targets, rr.(*dns.SRV).Target)
				}
				slices.Sort(targets)
				if !slices.Equal(targets, st.srv) {
					t.Fatalf("%s: SRV targets %q, want %q", st.name, targets, st.srv)
				}
			}
		}
	}
	c := &h.(chain).first.(validate).next.(zoneFilter).next.(*records).prepared
	c.mu.RLock()
	n := len(c.m)
	c.mu.RUnlock()
	if n != 1 {
		t.Fatalf("%d services prepared, want 1", n)
	}
}

// TestPreparedOncePerVersion: answers to the same service at the same
// version are made once.
func TestPreparedOncePerVersion(t *testing.T) {
	var c preparedCache
	eps := []api.Endpoint{ep("s", "one", "10.0.0.1", api.HealthPassing, nil)}
	p1 := c.get("s", 1, eps, 5, "svc.berth.")
	if p2 := c.get("s", 1, eps, 5, "svc.berth."); p2 != p1 {
		t.Fatal("prepared twice at one version")
	}
	eps2 := []api.Endpoint{ep("s", "one", "10.0.0.2", api.HealthPassing, nil)}
	p3 := c.get("s", 2, eps2, 5, "svc.berth.")
	if p3 == p1 || p3.a.len() != 1 || !strings.HasSuffix(string(p3.a.rec(0)), "\x0a\x00\x00\x02") {
		t.Fatalf("at a new version: %+v", p3)
	}
	// An older version asked late (a query that raced a change) is
	// answered from its own endpoints and does not replace the newer.
	if p := c.get("s", 1, eps, 5, "svc.berth."); p.a.len() != 1 || !strings.HasSuffix(string(p.a.rec(0)), "\x0a\x00\x00\x01") {
		t.Fatal("an old version's answer from the new endpoints")
	}
	if p := c.get("s", 2, eps2, 5, "svc.berth."); p != p3 {
		t.Fatal("the newer version replaced by an older one")
	}
	c.drop("s")
	if len(c.m) != 0 {
		t.Fatal("dropped service kept")
	}
}

// TestSRVGlueBeyondPointerRange: over TCP an SRV answer may be larger than
// compression pointers reach; additional records whose target lies beyond
// carry their owner name in full.
func TestSRVGlueBeyondPointerRange(t *testing.T) {
	src := fakeSource{}
	const n = 300
	for i := range n {
		id := fmt.Sprintf("%s-%03d", strings.Repeat("x", 50), i)
		src["big"] = append(src["big"], ep("big", id, fmt.Sprintf("10.4.%d.%d", i/250, i%250+1), api.HealthPassing, map[string]int{"http": 80}))
	}
	h := newTestHandler(t, src)
	w := &recorder{t: t}
	h.ServeDNS(w, question("_http._tcp.big.svc.berth.", dns.TypeSRV))
	if len(w.msgs) != 1 {
		t.Fatalf("%d answers", len(w.msgs))
	}
	got := w.msgs[0]
	if w.wire[0] <= maxPointer || got.Truncated || len(got.Answer) != n || len(got.Extra) != n {
		t.Fatalf("%d bytes, TC %v, %d answers, %d additional; want > %d bytes, all %d of each", w.wire[0], got.Truncated,
			len(got.Answer), len(got.Extra), maxPointer, n)
	}
	targets := map[string]bool{}
	for _, rr := range got.Answer {
		targets[rr.(*dns.SRV).Target] = true
	}
	for _, rr := range got.Extra {
		if !targets[rr.Header().Name] {
			t.Fatalf("additional record %v names no SRV target", rr)
		}
	}
}

// TestSRVTruncatedDropsAdditional: an SRV answer cut short over UDP has TC
// set and no additional records but OPT.
func TestSRVTruncatedDropsAdditional(t *testing.T) {
	src := fakeSource{}
	for i := range 100 {
		src["many"] = append(src["many"], ep("many", fmt.Sprintf("instance-%03d", i), fmt.Sprintf("10.5.0.%d", i+1),
			api.HealthPassing, map[string]int{"http": 80}))
	}
	h := newTestHandler(t, src)
	q := question("_http._tcp.many.svc.berth.", dns.TypeSRV)
	q.SetEdns0(4096, false)
	got := serve(t, h, q, true)
	if !got.Truncated || len(got.Answer) == 0 || len(got.Answer) >= 100 || len(got.Extra) != 1 || got.IsEdns0() == nil {
		t.Fatalf("TC %v, %d answers, %d additional (OPT %v)", got.Truncated, len(got.Answer), len(got.Extra), got.IsEdns0() != nil)
	}
}

// BenchmarkAnswer: the handler's work for the benchmark's queries (A of a
// service of 100 endpoints, SRV of its port) from the server's kind of
// source, without the network.
func BenchmarkAnswer(b *testing.B) {
	src := &versionedSource{eps: map[string][]api.Endpoint{}, version: map[string]int64{}}
	var eps []api.Endpoint
	for i := range 100 {
		eps = append(eps, ep("svc-000", fmt.Sprintf("b-%05d", i), fmt.Sprintf("10.100.0.%d", i+1), api.HealthPassing, map[string]int{"http": 8080}))
	}
	src.set("svc-000", true, eps...)
	h := newTestHandler(b, src)
	for _, tt := range []struct {
		name  string
		qname string
		qtype uint16
	}{
		{"A", "svc-000.svc.berth.", dns.TypeA},
		{"SRV", "_http._tcp.svc-000.svc.berth.", dns.TypeSRV},
	} {
		b.Run(tt.name, func(b *testing.B) {
			q := question(tt.qname, tt.qtype)
			q.SetEdns0(4096, false)
			w := &discard{}
			b.ReportAllocs()
			for b.Loop() {
				h.ServeDNS(w, q)
			}
		})
	}
}

// discard is a UDP dns.ResponseWriter that drops what is written.
type discard struct{ recorder }

func (d *discard) RemoteAddr() net.Addr        { return &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 40000} }
func (d *discard) WriteMsg(m *dns.Msg) error   { _, err := m.Pack(); return err }
func (d *discard) Write(b []byte) (int, error) { return len(b), nil }
