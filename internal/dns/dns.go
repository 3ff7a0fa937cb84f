// Package dns owns berth's DNS server: it answers NAME.svc.berth (the zone
// is configurable) from the service registry, so containers and hosts can
// find services with a plain resolver.
//
// The handler is a small chain of stages in the style of CoreDNS's plugins,
// each answering the query itself or handing it to the next one:
//
//   - validate rejects what is not a well-formed standard query: a response
//     is dropped; an opcode other than QUERY gets NOTIMP; no or several
//     questions, or several OPT records, get FORMERR; an EDNS version other
//     than 0 gets BADVERS; a class other than IN (or ANY) gets REFUSED, as
//     berth is authoritative for nothing outside IN; a zone transfer (AXFR,
//     IXFR) gets REFUSED.
//   - zone refuses (REFUSED, never recursion) names outside the zone.
//   - records answers authoritatively (AA set) from the registry.
//
// Names in the zone (Z), for a service S and its endpoints:
//
//	Z                 SOA (there is no NS record)
//	S.Z               A / AAAA: the addresses of S's endpoints whose health
//	                  is passing or warning, deduplicated, rotated by one on
//	                  every answer so that clients spread over them
//	ID.S.Z            A / AAAA of the endpoint(s) with that id (see idLabel)
//	_P._tcp.S.Z       SRV (RFC 2782) for the endpoints' port named P:
//	_P._udp.S.Z       priority 0, weight 10, target ID.S.Z, whose addresses
//	                  go in the additional section. Endpoint ports carry no
//	                  protocol, so _tcp and _udp answer alike.
//
// An id that is no DNS label is made one: lowercased, dots turned into
// dashes, and if longer than 63 characters cut short and suffixed with a
// hash of the whole id.
//
// Existence follows the registry and data follows health: a name exists
// (NOERROR) when the registry has what it names, whatever the health; its
// records list only the healthy endpoints, so a known service, id or port
// with nothing healthy gets NODATA (NOERROR, empty answer). A name that does
// not exist gets NXDOMAIN. Both carry the zone's SOA in the authority section
// (negative caching for TTL seconds, RFC 2308). Other types at an existing
// name get NODATA; ANY gets the A/AAAA (or SRV) records only (RFC 8482).
// Names are case-insensitive; answers echo the question's spelling.
//
// Over UDP an answer is cut to the client's EDNS0 buffer size (512 without
// EDNS0, at most 4096), with TC set when answer or authority records had to
// go (not for additional records alone, RFC 2181 9), so clients retry over
// TCP, which gets everything up to 64 KiB.
//
// Answers with records are made once per version of a service's endpoints
// when the Source tells versions (VersionedSource, as the server's registry
// index does): the healthy addresses parsed, sorted and deduplicated, and
// the A, AAAA and SRV records in wire format. Each query then only copies
// them, rotated, after a header and the question, with every owner name
// compressed to a pointer; no dns.Msg is built or packed.
package dns

import (
	"errors"
	"fmt"
	"net"
	"strings"
	"time"

	"github.com/berth-dev/berth/api"
	"github.com/miekg/dns"
)

// Source is where names come from: the server's view of the registry; tests
// use a fake.
type Source interface {
	// Endpoints returns a service's endpoints; known is false when no such
	// service exists at all. It is called once per query that names a
	// service, from many goroutines at once, so it must be cheap and safe
	// for concurrent use. The handler modifies neither the slice nor the
	// endpoints, so a source may hand the same slice to every query.
	Endpoints(service string) (eps []api.Endpoint, known bool)
}

// Config configures the handler and the server.
type Config struct {
	// Zone is the zone berth is authoritative for; default "svc.berth.".
	Zone string
	// TTL of every record, and of negative answers; default 5 (seconds).
	// Zero means the default: berth does not serve uncacheable records.
	TTL uint32
	// Addr is where Start listens, UDP and TCP on the same port; port 0
	// picks a free one (see Server.Addr). Default "127.0.0.1:5353".
	Addr string
}

// Defaults.
const (
	DefaultZone = "svc.berth."
	DefaultTTL  = 5
	DefaultAddr = "127.0.0.1:5353"
)

// Size limits of answers.
const (
	// maxUDPSize caps the client's EDNS0 buffer size: larger UDP answers
	// risk IP fragmentation; such clients can use TCP.
	maxUDPSize = dns.DefaultMsgSize
	// advertisedUDPSize is the buffer size berth announces in its OPT
	// record (the DNS flag day 2020 value).
	advertisedUDPSize = 1232
)

// withDefaults fills in the defaults and checks the zone.
func (c Config) withDefaults() (Config, error) {
	if c.Zone == "" {
		c.Zone = DefaultZone
	}
	c.Zone = dns.CanonicalName(c.Zone)
	if _, ok := dns.IsDomainName(c.Zone); !ok || c.Zone == "." {
		return c, fmt.Errorf("dns: zone %q is not a domain name", c.Zone)
	}
	if c.TTL == 0 {
		c.TTL = DefaultTTL
	}
	if c.Addr == "" {
		c.Addr = DefaultAddr
	}
	return c, nil
}

// NewHandler returns the chain validate → zone → records answering from src.
// It fails only on an invalid Config.Zone.
func NewHandler(src Source, cfg Config) (dns.Handler, error) {
	if src == nil {
		return nil, errors.New("dns: nil Source")
	}
	cfg, err := cfg.withDefaults()
	if err != nil {
		return nil, err
	}
	z := newZone(cfg)
	return chain{first: validate{next: zoneFilter{z: z, next: &records{z: z, src: src}}}}, nil
}

// stage is one link of the chain (CoreDNS's plugin.Handler, without the
// context and the returned rcode): it answers r itself, with r.reply, or
// hands it to the next stage.
type stage interface {
	serve(r *request)
}

// chain adapts the first stage to dns.Handler.
type chain struct{ first stage }

// ServeDNS implements dns.Handler.
func (c chain) ServeDNS(w dns.ResponseWriter, m *dns.Msg) {
	c.first.serve(&request{w: w, msg: m})
}

// request is one query on its way down the chain; each stage fills in what
// it learns for the next.
type request struct {
	w   dns.ResponseWriter
	msg *dns.Msg

	// Set by validate.
	q    dns.Question // the only question
	edns bool         // the query has an OPT record
	size int          // how big the answer may be, in bytes

	// Set by zone: the labels of the name below the zone apex, lowercase,
	// leftmost first; empty at the apex.
	labels []string
}

// reply sends the answer m to r: it adds an OPT record if the query had one,
// cuts m to size and writes it. Errors writing are the client's problem.
func (r *request) reply(m *dns.Msg) {
	if r.edns {
		o := new(dns.OPT)
		o.Hdr.Name = "."
		o.Hdr.Rrtype = dns.TypeOPT
		o.SetUDPSize(advertisedUDPSize)
		m.Extra = append(m.Extra, o)
	}
	size := r.size
	if size == 0 { // validate did not get that far
		size = dns.MinMsgSize
		if !isUDP(r.w) {
			size = dns.MaxMsgSize
		}
	}
	answers, authority := len(m.Answer), len(m.Ns)
	m.Truncate(size)
	if len(m.Answer) == answers && len(m.Ns) == authority {
		// Only additional records went: the answer is still whole and TC
		// would only send the client to TCP for nothing (RFC 2181 9).
		m.Truncated = false
	}
	_ = r.w.WriteMsg(m)
}

// fail answers r with rcode and nothing else.
func (r *request) fail(rcode int) {
	m := new(dns.Msg)
	m.SetRcode(r.msg, rcode)
	m.RecursionAvailable = false
	r.reply(m)
}

// isUDP reports whether w answers over UDP.
func isUDP(w dns.ResponseWriter) bool {
	_, ok := w.RemoteAddr().(*net.UDPAddr)
	return ok
}

// zone is what the stages know of the zone.
type zone struct {
	name   string   // canonical, e.g. "svc.berth."
	labels []string // of name
	ttl    uint32
	soa    *dns.SOA
}

func newZone(cfg Config) *zone {
	return &zone{
		name:   cfg.Zone,
		labels: dns.SplitDomainName(cfg.Zone),
		ttl:    cfg.TTL,
		soa: &dns.SOA{
			Hdr: dns.RR_Header{Name: cfg.Zone, Rrtype: dns.TypeSOA, Class: dns.ClassINET, Ttl: cfg.TTL},
			Ns:  "ns.dns." + cfg.Zone,
			// hostmaster@zone: nobody reads it, it must only be well-formed.
			Mbox: "hostmaster." + cfg.Zone,
			// The records change with the registry all the time and nobody
			// transfers the zone, so the serial only needs to be plausible.
			Serial:  uint32(time.Now().Unix()),
			Refresh: 7200,
			Retry:   1800,
			Expire:  86400,
			Minttl:  cfg.TTL,
		},
	}
}

// validate is the first stage: see the package documentation.
type validate struct{ next stage }

func (v validate) serve(r *request) {
	m := r.msg
	if m.Response {
		return // never answer an answer: that is how loops start
	}
	udp := isUDP(r.w)
	r.size = dns.MaxMsgSize
	if udp {
		r.size = dns.MinMsgSize
	}
	var opt *dns.OPT
	for _, rr := range m.Extra {
		if o, ok := rr.(*dns.OPT); ok {
			if opt != nil {
				r.fail(dns.RcodeFormatError) // RFC 6891 6.1.1
				return
			}
			opt = o
		}
	}
	if opt != nil {
		r.edns = true
		if udp {
			r.size = min(max(int(opt.UDPSize()), dns.MinMsgSize), maxUDPSize)
		}
		if opt.Version() != 0 {
			r.fail(dns.RcodeBadVers) // RFC 6891 6.1.3
			return
		}
	}
	if m.Opcode != dns.OpcodeQuery {
		r.fail(dns.RcodeNotImplemented)
		return
	}
	if len(m.Question) != 1 {
		r.fail(dns.RcodeFormatError)
		return
	}
	r.q = m.Question[0]
	if r.q.Qclass != dns.ClassINET && r.q.Qclass != dns.ClassANY {
		r.fail(dns.RcodeRefused)
		return
	}
	if r.q.Qtype == dns.TypeAXFR || r.q.Qtype == dns.TypeIXFR {
		r.fail(dns.RcodeRefused)
		return
	}
	v.next.serve(r)
}

// zoneFilter is the second stage: it refuses names outside the zone and
// splits those inside it.
type zoneFilter struct {
	z    *zone
	next stage
}

func (f zoneFilter) serve(r *request) {
	// SplitDomainName honours escaped dots, so "a\.svc.berth." is not
	// taken for a name in svc.berth.
	labels := dns.SplitDomainName(dns.CanonicalName(r.q.Name))
	n := len(labels) - len(f.z.labels)
	if n < 0 {
		r.fail(dns.RcodeRefused)
		return
	}
	for i, l := range f.z.labels {
		if labels[n+i] != l {
			r.fail(dns.RcodeRefused)
			return
		}
	}
	r.labels = labels[:n]
	f.next.serve(r)
}

// joinName is strings.Join(labels, ".") + "." + zone, for building names.
func joinName(z string, labels ...string) string {
	var b strings.Builder
	for _, l := range labels {
		b.WriteString(l)
		b.WriteByte('.')
	}
	b.WriteString(z)
	return b.String()
}
