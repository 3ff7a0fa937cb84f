package main

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"sync"
	"time"

	"github.com/miekg/dns"
)

// dnsBufSize is the EDNS0 buffer size the DNS clients announce: the most
// berth's server fills over UDP (4096). An A answer with a service's 100
// addresses is about 1.7 KB, over the 1232 bytes most stub resolvers
// announce: with those, every answer would be truncated and clients would
// retry over TCP.
const dnsBufSize = 4096

// srvEvery makes one query in srvEvery an SRV query; the others are A.
const srvEvery = 20

// dnsResult is what the DNS clients saw.
type dnsResult struct {
	loadResult
	timeouts  int
	bad       int // answers with an error rcode or no records
	truncated int
	srv       int // SRV queries answered
}

// dnsWorkers runs work as workers clients at once until d has passed and
// adds up what they measured; it returns the first error, and a client
// that failed is not counted.
func dnsWorkers(workers int, d time.Duration, work func(w int, deadline time.Time) (dnsResult, error)) (dnsResult, error) {
	var (
		mu   sync.Mutex
		res  dnsResult
		wg   sync.WaitGroup
		errs = make(chan error, workers)
	)
	start := time.Now()
	deadline := start.Add(d)
	for w := range workers {
		wg.Go(func() {
			r, err := work(w, deadline)
			if err != nil {
				errs <- err
				return
			}
			mu.Lock()
			res.add(r)
			mu.Unlock()
		})
	}
	wg.Wait()
	res.elapsed = time.Since(start)
	close(errs)
	return res, <-errs
}

// add counts one client's results in.
func (d *dnsResult) add(r dnsResult) {
	d.lat = append(d.lat, r.lat...)
	d.timeouts += r.timeouts
	d.bad += r.bad
	d.truncated += r.truncated
	d.srv += r.srv
}

// dnsQuestion is the i-th query of the mix.
func dnsQuestion(i, services int) (string, uint16) {
	s := serviceName(i % services)
	if i%srvEvery == srvEvery-1 {
		return "_http._tcp." + s + ".svc.berth.", dns.TypeSRV
	}
	return s + ".svc.berth.", dns.TypeA
}

// dnsLoad has workers UDP clients (one socket each) query berth's DNS
// server for d, one query in flight each: A for NAME.svc.berth round-robin
// over the services, and every srvEvery-th query SRV for
// _http._tcp.NAME.svc.berth. With raw false each client is a miekg/dns
// Client (Exchange: the query packed and the whole answer unpacked, as a
// resolver would); with raw true the queries are packed once with miekg/dns
// and each answer is only read and its header checked (id, rcode, answer
// count, TC), so that the load generator takes less of the cores it shares
// with berth.
func dnsLoad(ctx context.Context, services, workers int, d time.Duration, raw bool) (dnsResult, error) {
	if raw {
		return dnsLoadRaw(ctx, services, workers, d)
	}
	return dnsWorkers(workers, d, func(w int, deadline time.Time) (dnsResult, error) {
		cl := &dns.Client{Net: "udp", Timeout: time.Second}
		co, err := cl.Dial(dnsAddr)
		if err != nil {
			return dnsResult{}, fmt.Errorf("dns dial %s: %w", dnsAddr, err)
		}
		defer co.Close()
		var r dnsResult
		r.lat = make([]time.Duration, 0, 1<<15)
		m := new(dns.Msg)
		for i := w * 7; ctx.Err() == nil && time.Now().Before(deadline); i++ {
			name, qt := dnsQuestion(i, services)
			m.SetQuestion(name, qt)
			m.Extra = m.Extra[:0]
			m.SetEdns0(dnsBufSize, false)
			t0 := time.Now()
			a, _, err := cl.ExchangeWithConn(m, co)
			if err != nil {
				var ne net.Error
				if errors.As(err, &ne) && ne.Timeout() {
					r.timeouts++
					continue
				}
				return dnsResult{}, fmt.Errorf("dns query %s: %w", name, err)
			}
			r.lat = append(r.lat, time.Since(t0))
			if a.Rcode != dns.RcodeSuccess || len(a.Answer) == 0 {
				r.bad++
			}
			if a.Truncated {
				r.truncated++
			}
			if qt == dns.TypeSRV {
				r.srv++
			}
		}
		return r, nil
	})
}

// dnsAddresses asks berth's DNS server for the A records of name.
func dnsAddresses(cl *dns.Client, co *dns.Conn, name string) (map[string]bool, error) {
	m := new(dns.Msg)
	m.SetQuestion(name, dns.TypeA)
	m.SetEdns0(dnsBufSize, false)
	a, _, err := cl.ExchangeWithConn(m, co)
	if err != nil {
		return nil, err
	}
	out := map[string]bool{}
	for _, rr := range a.Answer {
		if r, ok := rr.(*dns.A); ok {
			out[r.A.String()] = true
		}
	}
	return out, nil
}

// dnsLoadRaw is dnsLoad with raw reads.
func dnsLoadRaw(ctx context.Context, services, workers int, d time.Duration) (dnsResult, error) {
	// Every query of the mix, packed once (the id is set per query).
	n := services * srvEvery
	queries := make([][]byte, n)
	kinds := make([]uint16, n)
	for i := range queries {
		name, qt := dnsQuestion(i, services)
		m := new(dns.Msg)
		m.SetQuestion(name, qt)
		m.SetEdns0(dnsBufSize, false)
		b, err := m.Pack()
		if err != nil {
			return dnsResult{}, fmt.Errorf("pack %s: %w", name, err)
		}
		queries[i], kinds[i] = b, qt
	}
	return dnsWorkers(workers, d, func(w int, deadline time.Time) (dnsResult, error) {
		co, err := net.Dial("udp", dnsAddr)
		if err != nil {
			return dnsResult{}, fmt.Errorf("dns dial %s: %w", dnsAddr, err)
		}
		defer co.Close()
		var r dnsResult
		r.lat = make([]time.Duration, 0, 1<<16)
		q := make([]byte, 0, 512)
		buf := make([]byte, 65536)
		id := uint16(w) << 10
		for i := w * 7; ctx.Err() == nil && time.Now().Before(deadline); i++ {
			k := i % n
			q = append(q[:0], queries[k]...)
			id++
			binary.BigEndian.PutUint16(q, id)
			t0 := time.Now()
			if _, err := co.Write(q); err != nil {
				return dnsResult{}, fmt.Errorf("dns query: %w", err)
			}
			_ = co.SetReadDeadline(t0.Add(time.Second))
			for {
				m, err := co.Read(buf)
				if err != nil {
					var ne net.Error
					if errors.As(err, &ne) && ne.Timeout() {
						r.timeouts++
						break
					}
					return dnsResult{}, fmt.Errorf("dns answer: %w", err)
				}
				if m < 12 || binary.BigEndian.Uint16(buf) != id {
					continue // a late answer to a query that timed out
				}
				r.lat = append(r.lat, time.Since(t0))
				if buf[3]&0xf != dns.RcodeSuccess || binary.BigEndian.Uint16(buf[6:]) == 0 {
					r.bad++
				}
				if buf[2]&0x2 != 0 {
					r.truncated++
				}
				if kinds[k] == dns.TypeSRV {
					r.srv++
				}
				break
			}
		}
		return r, nil
	})
}
