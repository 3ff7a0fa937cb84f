package dns

import (
	"cmp"
	"hash/fnv"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"

	"github.com/berth-dev/berth/api"
	"github.com/miekg/dns"
)

// srvWeight is every SRV record's weight: endpoints are equal.
const srvWeight = 10

// records is the last stage: it answers names in the zone from the registry.
type records struct {
	z   *zone
	src Source
	// turn rotates the order of answers, one step per answer.
	turn atomic.Uint64
}

func (s *records) serve(r *request) {
	l := r.labels
	if len(l) == 0 {
		s.apex(r)
		return
	}
	service := l[len(l)-1]
	eps, known := s.src.Endpoints(service)
	if !known {
		s.negative(r, dns.RcodeNameError)
		return
	}
	switch {
	case len(l) == 1: // S.Z
		s.addresses(r, eps)
	case len(l) == 2 && isProto(l[0]): // _tcp.S.Z: an empty non-terminal
		if !slices.ContainsFunc(eps, func(ep api.Endpoint) bool { return len(ep.Ports) > 0 }) {
			s.negative(r, dns.RcodeNameError)
			return
		}
		s.negative(r, dns.RcodeSuccess)
	case len(l) == 2: // ID.S.Z
		eps = filter(eps, func(ep api.Endpoint) bool { return idLabel(ep.ID) == l[0] })
		if len(eps) == 0 {
			s.negative(r, dns.RcodeNameError)
			return
		}
		s.addresses(r, eps)
	case len(l) == 3 && isProto(l[1]) && len(l[0]) > 1 && l[0][0] == '_': // _P._tcp.S.Z
		port := l[0][1:]
		eps = filter(eps, func(ep api.Endpoint) bool { _, ok := ep.Ports[port]; return ok })
		if len(eps) == 0 {
			s.negative(r, dns.RcodeNameError)
			return
		}
		s.services(r, service, port, eps)
	default:
		s.negative(r, dns.RcodeNameError)
	}
}

// isProto reports whether label is the protocol label of an SRV name.
func isProto(label string) bool { return label == "_tcp" || label == "_udp" }

// apex answers for the zone's own name: its SOA, and nothing else.
func (s *records) apex(r *request) {
	if r.q.Qtype != dns.TypeSOA && r.q.Qtype != dns.TypeANY {
		s.negative(r, dns.RcodeSuccess)
		return
	}
	m := s.answer(r)
	soa := *s.z.soa
	soa.Hdr.Name = r.q.Name
	m.Answer = append(m.Answer, &soa)
	r.reply(m)
}

// addresses answers with the A or AAAA records of the healthy ones of eps,
// an existing name's endpoints.
func (s *records) addresses(r *request, eps []api.Endpoint) {
	want4, want6 := wants(r.q.Qtype)
	if !want4 && !want6 {
		s.negative(r, dns.RcodeSuccess)
		return
	}
	addrs := make([]netip.Addr, 0, len(eps))
	for _, ep := range eps {
		if a, ok := address(ep); ok && (a.Is4() && want4 || a.Is6() && want6) {
			addrs = append(addrs, a)
		}
	}
	if len(addrs) == 0 {
		s.negative(r, dns.RcodeSuccess)
		return
	}
	slices.SortFunc(addrs, netip.Addr.Compare)
	addrs = slices.Compact(addrs)
	m := s.answer(r)
	m.Answer = make([]dns.RR, 0, len(addrs))
	off := s.rotation(len(addrs))
	for i := range addrs {
		m.Answer = append(m.Answer, s.addressRR(r.q.Name, addrs[(off+i)%len(addrs)]))
	}
	r.reply(m)
}

// wants tells which address families a query of type t asks for.
func wants(t uint16) (v4, v6 bool) {
	switch t {
	case dns.TypeA:
		return true, false
	case dns.TypeAAAA:
		return false, true
	case dns.TypeANY:
		return true, true
	}
	return false, false
}

// address is ep's address, if it has a usable one and is healthy.
func address(ep api.Endpoint) (netip.Addr, bool) {
	if ep.Health != api.HealthPassing && ep.Health != api.HealthWarning {
		return netip.Addr{}, false
	}
	a, err := netip.ParseAddr(ep.Address)
	if err != nil {
		return netip.Addr{}, false
	}
	return a.Unmap().WithZone(""), true
}

// addressRR is the A or AAAA record saying name has address a.
func (s *records) addressRR(name string, a netip.Addr) dns.RR {
	if a.Is4() {
		return &dns.A{
			Hdr: dns.RR_Header{Name: name, Rrtype: dns.TypeA, Class: dns.ClassINET, Ttl: s.z.ttl},
			A:   a.AsSlice(),
		}
	}
	return &dns.AAAA{
		Hdr:  dns.RR_Header{Name: name, Rrtype: dns.TypeAAAA, Class: dns.ClassINET, Ttl: s.z.ttl},
		AAAA: a.AsSlice(),
	}
}

// services answers with the SRV records of port of the healthy ones of eps,
// the endpoints of service that have that port, and the targets' addresses
// as additional records.
func (s *records) services(r *request, service, port string, eps []api.Endpoint) {
	if r.q.Qtype != dns.TypeSRV && r.q.Qtype != dns.TypeANY {
		s.negative(r, dns.RcodeSuccess)
		return
	}
	type srv struct {
		target string
		port   uint16
	}
	type glue struct {
		target string
		addr   netip.Addr
	}
	srvs := make([]srv, 0, len(eps))
	glues := make([]glue, 0, len(eps))
	for _, ep := range eps {
		a, ok := address(ep)
		p := ep.Ports[port]
		if !ok || p <= 0 || p > 65535 {
			continue
		}
		t := joinName(s.z.name, idLabel(ep.ID), service)
		srvs = append(srvs, srv{t, uint16(p)})
		glues = append(glues, glue{t, a})
	}
	if len(srvs) == 0 {
		s.negative(r, dns.RcodeSuccess)
		return
	}
	// An id on several networks has one name, several addresses and,
	// usually, one port: one SRV record, several additional ones.
	slices.SortFunc(srvs, func(a, b srv) int {
		return cmp.Or(strings.Compare(a.target, b.target), cmp.Compare(a.port, b.port))
	})
	srvs = slices.Compact(srvs)
	slices.SortFunc(glues, func(a, b glue) int {
		return cmp.Or(strings.Compare(a.target, b.target), a.addr.Compare(b.addr))
	})
	glues = slices.Compact(glues)
	m := s.answer(r)
	m.Answer = make([]dns.RR, 0, len(srvs))
	off := s.rotation(len(srvs))
	for i := range srvs {
		t := srvs[(off+i)%len(srvs)]
		m.Answer = append(m.Answer, &dns.SRV{
			Hdr:      dns.RR_Header{Name: r.q.Name, Rrtype: dns.TypeSRV, Class: dns.ClassINET, Ttl: s.z.ttl},
			Priority: 0,
			Weight:   srvWeight,
			Port:     t.port,
			Target:   t.target,
		})
	}
	m.Extra = make([]dns.RR, 0, len(glues))
	for _, g := range glues {
		m.Extra = append(m.Extra, s.addressRR(g.target, g.addr))
	}
	r.reply(m)
}

// rotation is the offset to start n records at in this answer.
func (s *records) rotation(n int) int {
	if n < 2 {
		return 0
	}
	return int(s.turn.Add(1) % uint64(n))
}

// answer starts an authoritative answer to r.
func (s *records) answer(r *request) *dns.Msg {
	m := new(dns.Msg)
	m.SetReply(r.msg)
	m.Authoritative = true
	return m
}

// negative answers r with rcode (NXDOMAIN, or NOERROR for NODATA), no
// answer and the zone's SOA in the authority section.
func (s *records) negative(r *request, rcode int) {
	m := s.answer(r)
	m.Rcode = rcode
	soa := *s.z.soa // a copy: answers must not share records
	m.Ns = []dns.RR{&soa}
	r.reply(m)
}

// filter returns the endpoints for which keep is true, in a new slice.
func filter(eps []api.Endpoint, keep func(api.Endpoint) bool) []api.Endpoint {
	var out []api.Endpoint
	for _, ep := range eps {
		if keep(ep) {
			out = append(out, ep)
		}
	}
	return out
}

// idLabel is the DNS label naming the endpoint with id: the id, lowercased
// (DNS names ignore case; ids that differ only in case share a name). Ids
// may hold dots and be up to 128 characters long, which a label can't: dots
// become dashes and an id too long is cut to 54 characters, followed by a
// dash and 8 hex digits of a hash of the whole id.
func idLabel(id string) string {
	l := strings.ToLower(id)
	if strings.IndexByte(l, '.') >= 0 {
		l = strings.ReplaceAll(l, ".", "-")
	}
	if len(l) > 63 {
		h := fnv.New32a()
		h.Write([]byte(id))
		l = l[:54] + "-" + strconv.FormatUint(uint64(h.Sum32())|1<<32, 16)[1:]
	}
	return l
}
