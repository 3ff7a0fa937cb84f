package dns

import (
	"fmt"
	"net"
	"slices"
	"sort"
	"strings"
	"testing"

	"github.com/berth-dev/berth/api"
	"github.com/miekg/dns"
)

// fakeSource is a registry of fixed endpoints.
type fakeSource map[string][]api.Endpoint

func (f fakeSource) Endpoints(service string) ([]api.Endpoint, bool) {
	eps, ok := f[service]
	return eps, ok
}

func ep(service, id, addr, health string, ports map[string]int) api.Endpoint {
	return api.Endpoint{Service: service, ID: id, Address: addr, Health: health, Ports: ports}
}

// testSource has a bit of everything.
func testSource() fakeSource {
	http := map[string]int{"http": 8080, "metrics": 9100}
	src := fakeSource{
		"web": {
			ep("web", "web-1", "10.0.0.1", api.HealthPassing, http),
			ep("web", "web-2", "10.0.0.2", api.HealthWarning, http),
			ep("web", "web-3", "10.0.0.3", api.HealthCritical, http),
			ep("web", "web-4", "10.0.0.4", api.HealthPassing, map[string]int{"http": 8081}),
			// web-1 on a second network, and a duplicate address.
			ep("web", "web-1", "10.1.0.1", api.HealthPassing, http),
			ep("web", "web-5", "10.0.0.1", api.HealthPassing, nil),
			ep("web", "bad", "not-an-ip", api.HealthPassing, http),
		},
		"v6": {
			ep("v6", "a", "fd00::1", api.HealthPassing, map[string]int{"dns": 53}),
			ep("v6", "b", "10.0.0.9", api.HealthPassing, map[string]int{"dns": 53}),
			ep("v6", "c", "::ffff:10.0.0.10", api.HealthPassing, nil),
		},
		"down": {
			ep("down", "d-1", "10.0.1.1", api.HealthCritical, map[string]int{"http": 80}),
		},
		"empty": nil,
		"odd": {
			ep("odd", "Mixed.Case.ID", "10.0.2.1", api.HealthPassing, map[string]int{"http": 80}),
			ep("odd", strings.Repeat("x", 100), "10.0.2.2", api.HealthPassing, map[string]int{"http": 80}),
		},
	}
	big := make([]api.Endpoint, 100)
	for i := range big {
		big[i] = ep("big", fmt.Sprintf("big-%d", i), fmt.Sprintf("10.2.%d.%d", i/250, i%250+1), api.HealthPassing, nil)
	}
	src["big"] = big
	return src
}

// recorder is a dns.ResponseWriter that keeps what is written, after a
// round trip through the wire format.
type recorder struct {
	t    testing.TB
	udp  bool
	msgs []*dns.Msg
	wire []int // sizes
}

func (w *recorder) LocalAddr() net.Addr {
	if w.udp {
		return &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 53}
	}
	return &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 53}
}

func (w *recorder) RemoteAddr() net.Addr {
	if w.udp {
		return &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 40000}
	}
	return &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 40000}
}

func (w *recorder) WriteMsg(m *dns.Msg) error {
	b, err := m.Pack()
	if err != nil {
		w.t.Errorf("packing the answer: %v\n%v", err, m)
		return err
	}
	back := new(dns.Msg)
	if err := back.Unpack(b); err != nil {
		w.t.Errorf("unpacking the answer: %v", err)
		return err
	}
	w.msgs = append(w.msgs, back)
	w.wire = append(w.wire, len(b))
	return nil
}

// Write keeps an answer written in wire format, and its size as written.
func (w *recorder) Write(b []byte) (int, error) {
	m := new(dns.Msg)
	if err := m.Unpack(b); err != nil {
		w.t.Errorf("unpacking the answer: %v", err)
		return 0, err
	}
	w.msgs = append(w.msgs, m)
	w.wire = append(w.wire, len(b))
	return len(b), nil
}

func (w *recorder) Close() error        { return nil }
func (w *recorder) TsigStatus() error   { return nil }
func (w *recorder) TsigTimersOnly(bool) {}
func (w *recorder) Hijack()             {}

func newTestHandler(t testing.TB, src Source) dns.Handler {
	t.Helper()
	h, err := NewHandler(src, Config{})
	if err != nil {
		t.Fatal(err)
	}
	return h
}

// serve sends m to h and returns the one answer, or nil if there was none.
func serve(t testing.TB, h dns.Handler, m *dns.Msg, udp bool) *dns.Msg {
	t.Helper()
	w := &recorder{t: t, udp: udp}
	h.ServeDNS(w, m)
	switch len(w.msgs) {
	case 0:
		return nil
	case 1:
		if udp && w.wire[0] > 512 && m.IsEdns0() == nil {
			t.Errorf("UDP answer of %d bytes to a query without EDNS0", w.wire[0])
		}
		return w.msgs[0]
	}
	t.Fatalf("%d answers to one query", len(w.msgs))
	return nil
}

func question(name string, qtype uint16) *dns.Msg {
	m := new(dns.Msg)
	m.SetQuestion(name, qtype)
	return m
}

// rrs renders records without their owner-independent noise, sorted.
func rrs(rs []dns.RR) []string {
	var out []string
	for _, r := range rs {
		switch r := r.(type) {
		case *dns.A:
			out = append(out, r.Hdr.Name+" A "+r.A.String())
		case *dns.AAAA:
			out = append(out, r.Hdr.Name+" AAAA "+r.AAAA.String())
		case *dns.SRV:
			out = append(out, fmt.Sprintf("%s SRV %d %d %d %s", r.Hdr.Name, r.Priority, r.Weight, r.Port, r.Target))
		case *dns.SOA:
			out = append(out, r.Hdr.Name+" SOA")
		case *dns.OPT:
		default:
			out = append(out, r.String())
		}
	}
	sort.Strings(out)
	return out
}

func TestHandler(t *testing.T) {
	const z = ".svc.berth."
	tests := []struct {
		name   string
		q      *dns.Msg
		rcode  int
		aa     bool
		answer []string
		extra  []string
		soa    bool // SOA in authority
	}{
		{
			name:  "A: healthy endpoints, deduped, critical and bad addresses left out",
			q:     question("web"+z, dns.TypeA),
			aa:    true,
			rcode: dns.RcodeSuccess,
			answer: []string{
				"web.svc.berth. A 10.0.0.1", "web.svc.berth. A 10.0.0.2",
				"web.svc.berth. A 10.0.0.4", "web.svc.berth. A 10.1.0.1",
			},
		},
		{
			name:   "AAAA",
			q:      question("v6"+z, dns.TypeAAAA),
			aa:     true,
			answer: []string{"v6.svc.berth. AAAA fd00::1"},
		},
		{
			name:   "A with a v4-mapped v6 address",
			q:      question("v6"+z, dns.TypeA),
			aa:     true,
			answer: []string{"v6.svc.berth. A 10.0.0.10", "v6.svc.berth. A 10.0.0.9"},
		},
		{
			name: "AAAA on a v4-only service is NODATA",
			q:    question("web"+z, dns.TypeAAAA),
			aa:   true,
			soa:  true,
		},
		{
			name: "ANY gets the addresses",
			q:    question("v6"+z, dns.TypeANY),
			aa:   true,
			answer: []string{
				"v6.svc.berth. A 10.0.0.10", "v6.svc.berth. A 10.0.0.9", "v6.svc.berth. AAAA fd00::1",
			},
		},
		{
			name: "case-insensitive, answer echoes the question",
			q:    question("WeB.SVC.Berth.", dns.TypeA),
			aa:   true,
			answer: []string{
				"WeB.SVC.Berth. A 10.0.0.1", "WeB.SVC.Berth. A 10.0.0.2",
				"WeB.SVC.Berth. A 10.0.0.4", "WeB.SVC.Berth. A 10.1.0.1",
			},
		},
		{
			name: "known service, nothing healthy: NODATA",
			q:    question("down"+z, dns.TypeA),
			aa:   true,
			soa:  true,
		},
		{
			name: "known service, no endpoints: NODATA",
			q:    question("empty"+z, dns.TypeA),
			aa:   true,
			soa:  true,
		},
		{
			name:  "unknown service: NXDOMAIN",
			q:     question("nope"+z, dns.TypeA),
			rcode: dns.RcodeNameError,
			aa:    true,
			soa:   true,
		},
		{
			name: "other type on an existing name: NODATA",
			q:    question("web"+z, dns.TypeTXT),
			aa:   true,
			soa:  true,
		},
		{
			name: "SRV with the targets' addresses",
			q:    question("_http._tcp.web"+z, dns.TypeSRV),
			aa:   true,
			answer: []string{
				"_http._tcp.web.svc.berth. SRV 0 10 8080 web-1.web.svc.berth.",
				"_http._tcp.web.svc.berth. SRV 0 10 8080 web-2.web.svc.berth.",
				"_http._tcp.web.svc.berth. SRV 0 10 8081 web-4.web.svc.berth.",
			},
			extra: []string{
				"web-1.web.svc.berth. A 10.0.0.1", "web-1.web.svc.berth. A 10.1.0.1",
				"web-2.web.svc.berth. A 10.0.0.2", "web-4.web.svc.berth. A 10.0.0.4",
			},
		},
		{
			name: "SRV over _udp answers alike",
			q:    question("_metrics._udp.web"+z, dns.TypeSRV),
			aa:   true,
			answer: []string{
				"_metrics._udp.web.svc.berth. SRV 0 10 9100 web-1.web.svc.berth.",
				"_metrics._udp.web.svc.berth. SRV 0 10 9100 web-2.web.svc.berth.",
			},
			extra: []string{
				"web-1.web.svc.berth. A 10.0.0.1", "web-1.web.svc.berth. A 10.1.0.1",
				"web-2.web.svc.berth. A 10.0.0.2",
			},
		},
		{
			name:   "SRV with a v6 target",
			q:      question("_dns._udp.v6"+z, dns.TypeSRV),
			aa:     true,
			answer: []string{"_dns._udp.v6.svc.berth. SRV 0 10 53 a.v6.svc.berth.", "_dns._udp.v6.svc.berth. SRV 0 10 53 b.v6.svc.berth."},
			extra:  []string{"a.v6.svc.berth. AAAA fd00::1", "b.v6.svc.berth. A 10.0.0.9"},
		},
		{
			name:  "SRV of an unknown port: NXDOMAIN",
			q:     question("_nope._tcp.web"+z, dns.TypeSRV),
			rcode: dns.RcodeNameError,
			aa:    true,
			soa:   true,
		},
		{
			name: "SRV of a port with nothing healthy: NODATA",
			q:    question("_http._tcp.down"+z, dns.TypeSRV),
			aa:   true,
			soa:  true,
		},
		{
			name: "A on an SRV name: NODATA",
			q:    question("_http._tcp.web"+z, dns.TypeA),
			aa:   true,
			soa:  true,
		},
		{
			name: "_tcp is an empty non-terminal: NODATA",
			q:    question("_tcp.web"+z, dns.TypeSRV),
			aa:   true,
			soa:  true,
		},
		{
			name:   "id name",
			q:      question("web-2.web"+z, dns.TypeA),
			aa:     true,
			answer: []string{"web-2.web.svc.berth. A 10.0.0.2"},
		},
		{
			name:   "id on two networks",
			q:      question("WEB-1.web"+z, dns.TypeA),
			aa:     true,
			answer: []string{"WEB-1.web.svc.berth. A 10.0.0.1", "WEB-1.web.svc.berth. A 10.1.0.1"},
		},
		{
			name: "id of a critical endpoint: NODATA",
			q:    question("web-3.web"+z, dns.TypeA),
			aa:   true,
			soa:  true,
		},
		{
			name:  "unknown id: NXDOMAIN",
			q:     question("web-9.web"+z, dns.TypeA),
			rcode: dns.RcodeNameError,
			aa:    true,
			soa:   true,
		},
		{
			name:  "below an id: NXDOMAIN",
			q:     question("x.web-1.web"+z, dns.TypeA),
			rcode: dns.RcodeNameError,
			aa:    true,
			soa:   true,
		},
		{
			name:   "id with dots and capitals",
			q:      question("mixed-case-id.odd"+z, dns.TypeA),
			aa:     true,
			answer: []string{"mixed-case-id.odd.svc.berth. A 10.0.2.1"},
		},
		{
			name: "SRV targets of odd ids are names that resolve",
			q:    question("_http._tcp.odd"+z, dns.TypeSRV),
			aa:   true,
			answer: []string{
				"_http._tcp.odd.svc.berth. SRV 0 10 80 mixed-case-id.odd.svc.berth.",
				"_http._tcp.odd.svc.berth. SRV 0 10 80 " + idLabel(strings.Repeat("x", 100)) + ".odd.svc.berth.",
			},
			extra: []string{
				"mixed-case-id.odd.svc.berth. A 10.0.2.1",
				idLabel(strings.Repeat("x", 100)) + ".odd.svc.berth. A 10.0.2.2",
			},
		},
		{
			name:   "apex SOA",
			q:      question("svc.berth.", dns.TypeSOA),
			aa:     true,
			answer: []string{"svc.berth. SOA"},
		},
		{
			name: "apex A: NODATA",
			q:    question("svc.berth.", dns.TypeA),
			aa:   true,
			soa:  true,
		},
		{name: "outside the zone: REFUSED", q: question("example.com.", dns.TypeA), rcode: dns.RcodeRefused},
		{name: "root: REFUSED", q: question(".", dns.TypeNS), rcode: dns.RcodeRefused},
		{name: "parent of the zone: REFUSED", q: question("berth.", dns.TypeA), rcode: dns.RcodeRefused},
		{name: "zone as a suffix: REFUSED", q: question("web.svc.berth.evil.", dns.TypeA), rcode: dns.RcodeRefused},
		{name: "escaped dot: REFUSED", q: question(`web\.svc.berth.`, dns.TypeA), rcode: dns.RcodeRefused},
		{name: "no question: FORMERR", q: new(dns.Msg), rcode: dns.RcodeFormatError},
		{
			name: "two questions: FORMERR",
			q: func() *dns.Msg {
				m := question("web"+z, dns.TypeA)
				m.Question = append(m.Question, m.Question[0])
				return m
			}(),
			rcode: dns.RcodeFormatError,
		},
		{
			name: "UPDATE: NOTIMP",
			q: func() *dns.Msg {
				m := new(dns.Msg)
				m.SetUpdate("svc.berth.")
				return m
			}(),
			rcode: dns.RcodeNotImplemented,
		},
		{
			name: "NOTIFY: NOTIMP",
			q: func() *dns.Msg {
				m := new(dns.Msg)
				m.SetNotify("svc.berth.")
				return m
			}(),
			rcode: dns.RcodeNotImplemented,
		},
		{
			name: "class CHAOS: REFUSED",
			q: func() *dns.Msg {
				m := question("web"+z, dns.TypeTXT)
				m.Question[0].Qclass = dns.ClassCHAOS
				return m
			}(),
			rcode: dns.RcodeRefused,
		},
		{
			name: "class ANY is served",
			q: func() *dns.Msg {
				m := question("web-2.web"+z, dns.TypeA)
				m.Question[0].Qclass = dns.ClassANY
				return m
			}(),
			aa:     true,
			answer: []string{"web-2.web.svc.berth. A 10.0.0.2"},
		},
		{name: "AXFR: REFUSED", q: question("svc.berth.", dns.TypeAXFR), rcode: dns.RcodeRefused},
		{
			name: "EDNS version 1: BADVERS",
			q: func() *dns.Msg {
				m := question("web"+z, dns.TypeA)
				m.SetEdns0(1232, false)
				m.IsEdns0().SetVersion(1)
				return m
			}(),
			rcode: dns.RcodeBadVers,
		},
		{
			name: "two OPT records: FORMERR",
			q: func() *dns.Msg {
				m := question("web"+z, dns.TypeA)
				m.SetEdns0(1232, false)
				m.Extra = append(m.Extra, m.Extra[0])
				return m
			}(),
			rcode: dns.RcodeFormatError,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			for _, udp := range []bool{true, false} {
				h := newTestHandler(t, testSource())
				q := tt.q.Copy()
				got := serve(t, h, q, udp)
				if got == nil {
					t.Fatal("no answer")
				}
				if got.Rcode != tt.rcode {
					t.Errorf("rcode %s, want %s", dns.RcodeToString[got.Rcode], dns.RcodeToString[tt.rcode])
				}
				if got.Id != q.Id || !got.Response {
					t.Errorf("id %d response %v, want %d true", got.Id, got.Response, q.Id)
				}
				if got.Authoritative != tt.aa {
					t.Errorf("AA %v, want %v", got.Authoritative, tt.aa)
				}
				if got.RecursionAvailable {
					t.Error("RA set")
				}
				if got.Truncated {
					t.Error("TC set")
				}
				if a := rrs(got.Answer); !slices.Equal(a, tt.answer) {
					t.Errorf("answer\n%q\nwant\n%q", a, tt.answer)
				}
				if a := rrs(got.Extra); !slices.Equal(a, tt.extra) {
					t.Errorf("additional\n%q\nwant\n%q", a, tt.extra)
				}
				var soa []string
				if tt.soa {
					soa = []string{"svc.berth. SOA"}
					if s, ok := got.Ns[0].(*dns.SOA); !ok || s.Hdr.Ttl != DefaultTTL || s.Minttl != DefaultTTL {
						t.Errorf("authority %v", got.Ns)
					}
				}
				if a := rrs(got.Ns); !slices.Equal(a, soa) {
					t.Errorf("authority %q, want %q", a, soa)
				}
				for _, rr := range got.Answer {
					if rr.Header().Ttl != DefaultTTL {
						t.Errorf("TTL of %v", rr)
					}
				}
				if (q.IsEdns0() != nil) != (got.IsEdns0() != nil) && got.Rcode != dns.RcodeFormatError {
					t.Errorf("OPT in the query %v, in the answer %v", q.IsEdns0() != nil, got.IsEdns0() != nil)
				}
			}
		})
	}
}

func TestRoundRobin(t *testing.T) {
	h := newTestHandler(t, testSource())
	for _, q := range []*dns.Msg{question("web.svc.berth.", dns.TypeA), question("_http._tcp.web.svc.berth.", dns.TypeSRV)} {
		firsts := map[string]int{}
		var want []string
		const n = 30
		for i := range n {
			got := serve(t, h, q.Copy(), true)
			if i == 0 {
				want = rrs(got.Answer)
			} else if a := rrs(got.Answer); !slices.Equal(a, want) {
				t.Fatalf("answer %d: %q, want %q", i, a, want)
			}
			firsts[got.Answer[0].String()]++
		}
		// 4 addresses, 3 SRV records: every one comes first as often.
		if len(firsts) != len(want) {
			t.Errorf("%s: first records %v, want each of %d", q.Question[0].Name, firsts, len(want))
		}
		for rr, c := range firsts {
			if c < n/len(want)-1 {
				t.Errorf("%s: %s first %d times of %d", q.Question[0].Name, rr, c, n)
			}
		}
	}
}

func TestTruncation(t *testing.T) {
	h := newTestHandler(t, testSource())
	q := question("big.svc.berth.", dns.TypeA)

	got := serve(t, h, q.Copy(), true)
	if !got.Truncated || len(got.Answer) == 0 || len(got.Answer) >= 100 {
		t.Errorf("UDP, no EDNS0: TC %v with %d answers, want TC and some", got.Truncated, len(got.Answer))
	}

	small := q.Copy()
	small.SetEdns0(1000, false)
	got = serve(t, h, small, true)
	if !got.Truncated || len(got.Answer) >= 100 || got.IsEdns0() == nil {
		t.Errorf("UDP, EDNS0 1000: TC %v with %d answers, OPT %v", got.Truncated, len(got.Answer), got.IsEdns0())
	}

	big := q.Copy()
	big.SetEdns0(4096, false)
	got = serve(t, h, big, true)
	if got.Truncated || len(got.Answer) != 100 {
		t.Errorf("UDP, EDNS0 4096: TC %v with %d answers, want all 100", got.Truncated, len(got.Answer))
	}

	got = serve(t, h, q.Copy(), false)
	if got.Truncated || len(got.Answer) != 100 {
		t.Errorf("TCP: TC %v with %d answers, want all 100", got.Truncated, len(got.Answer))
	}
}

// Additional records that don't fit are dropped without TC (RFC 2181 9).
func TestTruncationOfAdditional(t *testing.T) {
	src := fakeSource{"many": nil}
	for i := range 10 {
		src["many"] = append(src["many"], ep("many", fmt.Sprintf("n%02d", i),
			fmt.Sprintf("10.3.0.%d", i+1), api.HealthPassing, map[string]int{"http": 80}))
	}
	h := newTestHandler(t, src)
	got := serve(t, h, question("_http._tcp.many.svc.berth.", dns.TypeSRV), true)
	if got.Truncated || len(got.Answer) != 10 || len(got.Extra) >= 10 {
		t.Errorf("TC %v, %d answers, %d additional; want no TC, 10, fewer than 10", got.Truncated, len(got.Answer), len(got.Extra))
	}
}

func TestResponsesAreNotAnswered(t *testing.T) {
	h := newTestHandler(t, testSource())
	q := question("web.svc.berth.", dns.TypeA)
	q.Response = true
	if got := serve(t, h, q, true); got != nil {
		t.Errorf("answered a response: %v", got)
	}
}

func TestConfig(t *testing.T) {
	src := fakeSource{"web": {ep("web", "w", "10.0.0.1", api.HealthPassing, nil)}}
	h, err := NewHandler(src, Config{Zone: "Internal.Example", TTL: 60})
	if err != nil {
		t.Fatal(err)
	}
	got := serve(t, h, question("web.internal.example.", dns.TypeA), true)
	if len(got.Answer) != 1 || got.Answer[0].Header().Ttl != 60 {
		t.Errorf("answer %v", got.Answer)
	}
	if got := serve(t, h, question("web.svc.berth.", dns.TypeA), true); got.Rcode != dns.RcodeRefused {
		t.Errorf("default zone answered: %v", got)
	}
	for _, zone := range []string{".", "a..b", strings.Repeat("a", 64) + ".b"} {
		if _, err := NewHandler(src, Config{Zone: zone}); err == nil {
			t.Errorf("zone %q accepted", zone)
		}
	}
	if _, err := NewHandler(nil, Config{}); err == nil {
		t.Error("nil source accepted")
	}
}

func TestIDLabel(t *testing.T) {
	long := strings.Repeat("a", 128)
	for id, want := range map[string]string{
		"web-1":     "web-1",
		"Web.1.X":   "web-1-x",
		long:        idLabel(long),
		long + "b":  idLabel(long + "b"),
		"0123abcde": "0123abcde",
	} {
		got := idLabel(id)
		if got != want || len(got) > 63 {
			t.Errorf("idLabel(%q) = %q, want %q", id, got, want)
		}
		if _, ok := dns.IsDomainName(got + ".svc.berth."); !ok {
			t.Errorf("idLabel(%q) = %q: not a label", id, got)
		}
	}
	if idLabel(long) == idLabel(long[:127]+"b") || len(idLabel(long)) != 63 {
		t.Error("long ids collide or have the wrong length")
	}
}

func FuzzHandler(f *testing.F) {
	for _, name := range []string{"web.svc.berth.", "_http._tcp.web.svc.berth.", "web-1.web.svc.berth.", "svc.berth.", "x.org.", "big.svc.berth."} {
		for _, t := range []uint16{dns.TypeA, dns.TypeAAAA, dns.TypeSRV, dns.TypeANY, dns.TypeSOA} {
			m := question(name, t)
			b, _ := m.Pack()
			f.Add(b)
			m.SetEdns0(600, false)
			b, _ = m.Pack()
			f.Add(b)
		}
	}
	f.Add([]byte{})
	f.Add([]byte("garbage that is no DNS message"))
	h := newTestHandler(f, testSource())
	f.Fuzz(func(t *testing.T, b []byte) {
		m := new(dns.Msg)
		if err := m.Unpack(b); err != nil {
			return // the server answers FORMERR before the handler
		}
		for _, udp := range []bool{true, false} {
			w := &recorder{t: t, udp: udp}
			h.ServeDNS(w, m.Copy())
			if len(w.msgs) > 1 {
				t.Fatalf("%d answers", len(w.msgs))
			}
			if udp && len(w.wire) == 1 && w.wire[0] > maxUDPSize {
				t.Fatalf("UDP answer of %d bytes", w.wire[0])
			}
		}
	})
}
