package dns

import (
	"cmp"
	"encoding/binary"
	"net/netip"
	"slices"
	"strings"
	"sync"

	"github.com/berth-dev/berth/api"
	"github.com/miekg/dns"
)

// VersionedSource is a Source that also tells when a service's endpoints
// change. The handler then keeps what it makes of a service's endpoints
// (addresses parsed, sorted and deduplicated, records in wire format) until
// the version moves, instead of making it again for every query.
type VersionedSource interface {
	Source
	// EndpointsAt is Endpoints and the version of the service's
	// endpoints: a call that returns the same version for a service
	// returns the same endpoints.
	EndpointsAt(service string) (eps []api.Endpoint, known bool, version int64)
}

// maxPrepared bounds the services whose answers are kept; past it the
// cache starts over.
const maxPrepared = 1 << 14

// preparedCache keeps each service's prepared answers, by name.
type preparedCache struct {
	mu sync.RWMutex
	m  map[string]*prepared
}

// get returns the service's prepared answers at version, making them from
// eps when the cache holds none of that version.
func (c *preparedCache) get(service string, version int64, eps []api.Endpoint, ttl uint32, zone string) *prepared {
	c.mu.RLock()
	p := c.m[service]
	c.mu.RUnlock()
	if p != nil && p.version == version {
		return p
	}
	p = prepare(eps, ttl, zone, service)
	p.version = version
	c.mu.Lock()
	if c.m == nil || len(c.m) >= maxPrepared {
		c.m = map[string]*prepared{}
	}
	if old := c.m[service]; old == nil || old.version <= version {
		c.m[service] = p
	}
	c.mu.Unlock()
	return p
}

// drop forgets a service that no longer exists.
func (c *preparedCache) drop(service string) {
	c.mu.RLock()
	_, ok := c.m[service]
	c.mu.RUnlock()
	if ok {
		c.mu.Lock()
		delete(c.m, service)
		c.mu.Unlock()
	}
}

// prepared is what answers about one service need, made once per version
// of its endpoints: the healthy endpoints' addresses, sorted and
// deduplicated, as A and AAAA records in wire format (owner name a pointer
// to the question), and its SRV answers per port name, made on demand.
type prepared struct {
	version int64
	eps     []api.Endpoint
	ttl     uint32
	zone    string
	service string

	addrs []netip.Addr // sorted, deduplicated
	a     rrset        // A records of the IPv4 ones
	aaaa  rrset        // AAAA records of the IPv6 ones
	any   rrset        // both, in the order of addrs

	mu   sync.Mutex
	srvs map[string]*srvSet // by port name
}

// rrset is resource records in wire format, one after the other.
type rrset struct {
	b    []byte
	ends []int // record i is b[ends[i-1]:ends[i]]
}

func (s *rrset) len() int { return len(s.ends) }

func (s *rrset) rec(i int) []byte {
	start := 0
	if i > 0 {
		start = s.ends[i-1]
	}
	return s.b[start:s.ends[i]]
}

func (s *rrset) add(rec []byte) {
	s.b = append(s.b, rec...)
	s.ends = append(s.ends, len(s.b))
}

// prepare makes a service's prepared answers from its endpoints.
func prepare(eps []api.Endpoint, ttl uint32, zone, service string) *prepared {
	p := &prepared{eps: eps, ttl: ttl, zone: zone, service: service}
	p.addrs = make([]netip.Addr, 0, len(eps))
	for _, ep := range eps {
		if a, ok := address(ep); ok {
			p.addrs = append(p.addrs, a)
		}
	}
	slices.SortFunc(p.addrs, netip.Addr.Compare)
	p.addrs = slices.Compact(p.addrs)
	var rr [2 + 10 + 16]byte
	for _, a := range p.addrs {
		b := appendAddressRR(rr[:0], ptrToQuestion, a, ttl)
		p.any.add(b)
		if a.Is4() {
			p.a.add(b)
		} else {
			p.aaaa.add(b)
		}
	}
	return p
}

// ptrToQuestion is a compression pointer to the question's name, which
// every answer starts with right after the header.
var ptrToQuestion = []byte{0xC0, 12}

// appendAddressRR appends the A or AAAA record saying owner (a name in wire
// format) has address a.
func appendAddressRR(b, owner []byte, a netip.Addr, ttl uint32) []byte {
	b = append(b, owner...)
	if a.Is4() {
		b = binary.BigEndian.AppendUint16(b, dns.TypeA)
	} else {
		b = binary.BigEndian.AppendUint16(b, dns.TypeAAAA)
	}
	b = binary.BigEndian.AppendUint16(b, dns.ClassINET)
	b = binary.BigEndian.AppendUint32(b, ttl)
	raw := a.AsSlice()
	b = binary.BigEndian.AppendUint16(b, uint16(len(raw)))
	return append(b, raw...)
}

// addresses returns the records of the families qtype asks for.
func (p *prepared) addresses(qtype uint16) *rrset {
	switch qtype {
	case dns.TypeA:
		return &p.a
	case dns.TypeAAAA:
		return &p.aaaa
	}
	return &p.any
}

// srvSet is the SRV answer of one port name of a service: the SRV records
// (owner a pointer to the question, target uncompressed as RFC 2782 wants)
// sorted by target and port, and the targets' addresses for the additional
// section, sorted by target and address.
type srvSet struct {
	srv     rrset
	targets [][]byte // each SRV record's target, in wire format
	glue    []glue
}

// glue is an additional record: the address of the target of SRV record
// srv, without its owner name.
type glue struct {
	srv  int
	tail []byte // type, class, TTL, length and address
}

// services returns the SRV answer of port, made on first use.
func (p *prepared) services(port string) *srvSet {
	p.mu.Lock()
	defer p.mu.Unlock()
	if s, ok := p.srvs[port]; ok {
		return s
	}
	if p.srvs == nil {
		p.srvs = map[string]*srvSet{}
	}
	s := makeSRVSet(p.eps, p.service, port, p.zone, p.ttl)
	p.srvs[port] = s
	return s
}

func makeSRVSet(eps []api.Endpoint, service, port, zone string, ttl uint32) *srvSet {
	type srv struct {
		target string
		port   uint16
	}
	type addr struct {
		target string
		addr   netip.Addr
	}
	var srvs []srv
	var addrs []addr
	for _, ep := range eps {
		a, ok := address(ep)
		p := ep.Ports[port]
		if !ok || p <= 0 || p > 65535 {
			continue
		}
		t := joinName(zone, idLabel(ep.ID), service)
		srvs = append(srvs, srv{t, uint16(p)})
		addrs = append(addrs, addr{t, a})
	}
	// An id on several networks has one name, several addresses and,
	// usually, one port: one SRV record, several additional ones.
	slices.SortFunc(srvs, func(a, b srv) int {
		return cmp.Or(strings.Compare(a.target, b.target), cmp.Compare(a.port, b.port))
	})
	srvs = slices.Compact(srvs)
	slices.SortFunc(addrs, func(a, b addr) int {
		return cmp.Or(strings.Compare(a.target, b.target), a.addr.Compare(b.addr))
	})
	addrs = slices.Compact(addrs)
	s := &srvSet{targets: make([][]byte, len(srvs))}
	first := map[string]int{} // target → its first SRV record
	for i, r := range srvs {
		t := packName(nil, r.target)
		s.targets[i] = t
		b := append([]byte(nil), ptrToQuestion...)
		b = binary.BigEndian.AppendUint16(b, dns.TypeSRV)
		b = binary.BigEndian.AppendUint16(b, dns.ClassINET)
		b = binary.BigEndian.AppendUint32(b, ttl)
		b = binary.BigEndian.AppendUint16(b, uint16(6+len(t)))
		b = binary.BigEndian.AppendUint16(b, 0) // priority
		b = binary.BigEndian.AppendUint16(b, srvWeight)
		b = binary.BigEndian.AppendUint16(b, r.port)
		s.srv.add(append(b, t...))
		if _, ok := first[r.target]; !ok {
			first[r.target] = i
		}
	}
	for _, a := range addrs {
		s.glue = append(s.glue, glue{srv: first[a.target], tail: appendAddressRR(nil, nil, a.addr, ttl)})
	}
	return s
}

// packName is name in wire format, uncompressed, appended to b.
func packName(b []byte, name string) []byte {
	buf := make([]byte, 256)
	n, err := dns.PackDomainName(name, buf, 0, nil, false)
	if err != nil {
		return append(b, 0) // not reached: names here come from the zone's own labels
	}
	return append(b, buf[:n]...)
}
