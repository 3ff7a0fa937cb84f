package dns

import (
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
	// prepared keeps each service's answers while its endpoints stay the
	// same, when src is a VersionedSource.
	prepared preparedCache
}

func (s *records) serve(r *request) {
	l := r.labels
	if len(l) == 0 {
		s.apex(r)
		return
	}
	service := l[len(l)-1]
	var (
		eps       []api.Endpoint
		known     bool
		version   int64
		versioned bool
	)
	if vs, ok := s.src.(VersionedSource); ok {
		eps, known, version = vs.EndpointsAt(service)
		versioned = true
	} else {
		eps, known = s.src.Endpoints(service)
	}
	if !known {
		if versioned {
			s.prepared.drop(service)
		}
		s.negative(r, dns.RcodeNameError)
		return
	}
	prep := func() *prepared {
		if versioned {
			return s.prepared.get(service, version, eps, s.z.ttl, s.z.name)
		}
		return prepare(eps, s.z.ttl, s.z.name, service)
	}
	switch {
	case len(l) == 1: // S.Z
		s.addresses(r, prep)
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
		s.addresses(r, func() *prepared { return prepare(eps, s.z.ttl, s.z.name, service) })
	case len(l) == 3 && isProto(l[1]) && len(l[0]) > 1 && l[0][0] == '_': // _P._tcp.S.Z
		port := l[0][1:]
		if !slices.ContainsFunc(eps, func(ep api.Endpoint) bool { _, ok := ep.Ports[port]; return ok }) {
			s.negative(r, dns.RcodeNameError)
			return
		}
		s.services(r, prep, port)
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

// addresses answers with the A or AAAA records of the healthy endpoints of
// an existing name, from prep.
func (s *records) addresses(r *request, prep func() *prepared) {
	want4, want6 := wants(r.q.Qtype)
	if !want4 && !want6 {
		s.negative(r, dns.RcodeSuccess)
		return
	}
	set := prep().addresses(r.q.Qtype)
	if set.len() == 0 {
		s.negative(r, dns.RcodeSuccess)
		return
	}
	if !writeRRs(r, set, s.rotation(set.len())) {
		r.fail(dns.RcodeServerFailure)
	}
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

// services answers with the SRV records of port of the healthy endpoints
// of a service that have that port, and the targets' addresses as
// additional records, from prep.
func (s *records) services(r *request, prep func() *prepared, port string) {
	if r.q.Qtype != dns.TypeSRV && r.q.Qtype != dns.TypeANY {
		s.negative(r, dns.RcodeSuccess)
		return
	}
	set := prep().services(port)
	if set.srv.len() == 0 {
		s.negative(r, dns.RcodeSuccess)
		return
	}
	if !writeSRV(r, set, s.rotation(set.srv.len())) {
		r.fail(dns.RcodeServerFailure)
	}
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
