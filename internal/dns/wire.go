package dns

import (
	"encoding/binary"
	"slices"
	"sync"

	"github.com/miekg/dns"
)

// Answers with records are written in wire format straight from the
// prepared records: no dns.Msg, no records to allocate, nothing to pack
// or compress. They are what miekg/dns would send for the same dns.Msg
// (see reply), but that every owner name is compressed (a pointer to the
// question, or for additional records to their SRV record's target).

// Header bits and sizes.
const (
	flagQR    = 1 << 15
	flagAA    = 1 << 10
	flagTC    = 1 << 9
	flagRD    = 1 << 8
	flagCD    = 1 << 4
	headerLen = 12
	// optRR is the OPT record of every answer to an EDNS0 query: root
	// owner, type OPT, the advertised UDP size as its class, no extended
	// rcode, version 0, no flags, no options.
	optRRLen = 11
	// srvTargetAt is where an SRV record's target starts, from the
	// record's start: the owner pointer, type, class, TTL, length,
	// priority, weight and port.
	srvTargetAt = 2 + 10 + 6
	// maxPointer is the largest offset a compression pointer can hold.
	maxPointer = 0x3FFF
)

var optRR = []byte{0, byte(dns.TypeOPT >> 8), byte(dns.TypeOPT & 0xFF),
	byte(advertisedUDPSize >> 8), byte(advertisedUDPSize & 0xFF), 0, 0, 0, 0, 0, 0}

// wireBufs are the buffers answers are written in.
var wireBufs = sync.Pool{New: func() any { b := make([]byte, 0, 2048); return &b }}

// wireAnswer is an answer being written.
type wireAnswer struct {
	r       *request
	bp      *[]byte
	b       []byte
	limit   int // the size the answer must fit in, its OPT record not counted
	answers int
	extra   int
	tc      bool
}

// beginAnswer starts an authoritative NOERROR answer to r: the header and
// the question, as the query has it. It returns false when the question's
// name does not pack (not reached: the query was unpacked from the wire).
func beginAnswer(r *request) (*wireAnswer, bool) {
	bp := wireBufs.Get().(*[]byte)
	b := (*bp)[:0]
	flags := uint16(flagQR | flagAA)
	if r.msg.RecursionDesired {
		flags |= flagRD
	}
	if r.msg.CheckingDisabled {
		flags |= flagCD
	}
	b = binary.BigEndian.AppendUint16(b, r.msg.Id)
	b = binary.BigEndian.AppendUint16(b, flags)
	b = append(b, 0, 1, 0, 0, 0, 0, 0, 0) // one question; counts filled in by send
	b = slices.Grow(b, 256+4)
	n, err := dns.PackDomainName(r.q.Name, b[:cap(b)], len(b), nil, false)
	if err != nil {
		wireBufs.Put(bp)
		return nil, false
	}
	b = b[:n]
	b = binary.BigEndian.AppendUint16(b, r.q.Qtype)
	b = binary.BigEndian.AppendUint16(b, r.q.Qclass)
	a := &wireAnswer{r: r, bp: bp, b: b, limit: max(r.size, dns.MinMsgSize)}
	if r.edns {
		a.limit -= optRRLen
	}
	return a, true
}

// answer adds an answer record unless it does not fit; then TC is set and
// no further record goes in.
func (a *wireAnswer) answer(rec []byte) bool {
	if a.tc || len(a.b)+len(rec) > a.limit {
		a.tc = true
		return false
	}
	a.b = append(a.b, rec...)
	a.answers++
	return true
}

// additional adds an additional record (owner, then the rest) if it fits
// and every answer record did; an additional record that does not fit
// does not set TC (RFC 2181 9), but none goes in after it.
func (a *wireAnswer) additional(owner, rest []byte) bool {
	if a.tc || len(a.b)+len(owner)+len(rest) > a.limit {
		a.limit = 0
		return false
	}
	a.b = append(a.b, owner...)
	a.b = append(a.b, rest...)
	a.extra++
	return true
}

// send finishes the answer (counts, TC, OPT) and writes it. Errors writing
// are the client's problem.
func (a *wireAnswer) send() {
	b := a.b
	if a.tc {
		b[2] |= flagTC >> 8
	}
	extra := a.extra
	if a.r.edns {
		b = append(b, optRR...)
		extra++
	}
	binary.BigEndian.PutUint16(b[6:], uint16(a.answers))
	binary.BigEndian.PutUint16(b[10:], uint16(extra))
	_, _ = a.r.w.Write(b)
	if cap(b) <= 1<<16 {
		*a.bp = b[:0]
		wireBufs.Put(a.bp)
	}
}

// writeRRs answers r with the records of set, rotated to start at the
// off-th, as many as fit.
func writeRRs(r *request, set *rrset, off int) bool {
	a, ok := beginAnswer(r)
	if !ok {
		return false
	}
	n := set.len()
	for i := range n {
		if !a.answer(set.rec((off + i) % n)) {
			break
		}
	}
	a.send()
	return true
}

// writeSRV answers r with the SRV records of set, rotated to start at the
// off-th, as many as fit, and if all do, their targets' addresses as
// additional records, as many as fit.
func writeSRV(r *request, set *srvSet, off int) bool {
	a, ok := beginAnswer(r)
	if !ok {
		return false
	}
	n := set.srv.len()
	targetAt := make([]int, n)
	for i := range n {
		j := (off + i) % n
		at := len(a.b) + srvTargetAt
		if !a.answer(set.srv.rec(j)) {
			break
		}
		targetAt[j] = at
	}
	var ptr [2]byte
	for _, g := range set.glue {
		owner := set.targets[g.srv]
		if at := targetAt[g.srv]; at > 0 && at <= maxPointer {
			binary.BigEndian.PutUint16(ptr[:], 0xC000|uint16(at))
			owner = ptr[:]
		}
		if !a.additional(owner, g.tail) {
			break
		}
	}
	a.send()
	return true
}
