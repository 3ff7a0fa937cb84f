// Command dns measures berth's DNS server (internal/dns): it starts the
// server on 127.0.0.1 with a fixed registry (by default 100 services of 10
// endpoints each) and has concurrent clients query it over UDP, one query in
// flight each, for a bounded time; then it prints queries per second and
// latency percentiles. Clients and server share the machine's cores.
//
//	go run ./bench/dns                       # -clients 32 -duration 5s
//	go run ./bench/dns -clients 64 -duration 10s
//
// The query mix, round-robin over all services: 3 of 5 are A for the
// service (10 records), 1 is A for one endpoint's id name, 1 is SRV for the
// service's "http" port (10 records and their 10 addresses as additional
// records). Queries carry EDNS0 with a 1232-byte buffer, as Go's resolver
// and systemd-resolved send: without it the SRV answers (about 700 bytes)
// would be truncated to 512 bytes and clients would retry over TCP.
package main

import (
	"context"
	"encoding/binary"
	"errors"
	"flag"
	"fmt"
	"log"
	"net"
	"os"
	"runtime"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/berth-dev/berth/api"
	berthdns "github.com/berth-dev/berth/internal/dns"
	"github.com/miekg/dns"
)

// goal is the throughput the server should reach on 2 cores.
const goal = 50_000

type source map[string][]api.Endpoint

func (s source) Endpoints(service string) ([]api.Endpoint, bool) {
	eps, ok := s[service]
	return eps, ok
}

func main() {
	clients := flag.Int("clients", 32, "concurrent UDP clients (1-1024)")
	duration := flag.Duration("duration", 5*time.Second, "how long to measure (at most 60s)")
	services := flag.Int("services", 100, "services in the registry (1-10000)")
	endpoints := flag.Int("endpoints", 10, "endpoints per service (1-250)")
	flag.Parse()
	if *clients < 1 || *clients > 1024 || *duration <= 0 || *duration > time.Minute ||
		*services < 1 || *services > 10000 || *endpoints < 1 || *endpoints > 250 {
		flag.Usage()
		os.Exit(2)
	}

	src := source{}
	var queries [][]byte
	for s := range *services {
		name := fmt.Sprintf("svc-%04d", s)
		for e := range *endpoints {
			src[name] = append(src[name], api.Endpoint{
				Service: name,
				ID:      fmt.Sprintf("%s-%d", name, e),
				Address: fmt.Sprintf("10.%d.%d.%d", s/250, s%250, e+1),
				Ports:   map[string]int{"http": 8080},
				Health:  api.HealthPassing,
			})
		}
		for _, q := range []struct {
			name  string
			qtype uint16
		}{
			{name + ".svc.berth.", dns.TypeA},
			{name + ".svc.berth.", dns.TypeA},
			{name + ".svc.berth.", dns.TypeA},
			{name + "-0." + name + ".svc.berth.", dns.TypeA},
			{"_http._tcp." + name + ".svc.berth.", dns.TypeSRV},
		} {
			m := new(dns.Msg)
			m.SetQuestion(q.name, q.qtype)
			m.SetEdns0(1232, false)
			b, err := m.Pack()
			if err != nil {
				log.Fatal(err)
			}
			queries = append(queries, b)
		}
	}

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	srv, err := berthdns.Start(ctx, berthdns.Config{Addr: "127.0.0.1:0"}, src)
	if err != nil {
		log.Fatal(err)
	}
	defer srv.Close()

	fmt.Printf("berth DNS on %s: %d services × %d endpoints, %d UDP clients, %s, GOMAXPROCS %d, %d CPUs\n",
		srv.Addr(), *services, *endpoints, *clients, *duration, runtime.GOMAXPROCS(0), runtime.NumCPU())

	// Warm up, then measure.
	if _, err := run(srv.Addr(), queries, *clients, 500*time.Millisecond); err != nil {
		log.Fatal(err)
	}
	res, err := run(srv.Addr(), queries, *clients, *duration)
	if err != nil {
		log.Fatal(err)
	}
	res.print(*duration)
}

// result is what the clients saw.
type result struct {
	lat      []time.Duration // of each answered query
	timeouts int64
	bad      int64 // answers with an error rcode or no records
	tc       int64 // truncated answers
	elapsed  time.Duration
}

// run has n clients send queries to addr for d, each with one in flight.
func run(addr string, queries [][]byte, n int, d time.Duration) (result, error) {
	var (
		res      result
		mu       sync.Mutex
		wg       sync.WaitGroup
		timeouts atomic.Int64
		bad      atomic.Int64
		tc       atomic.Int64
		errs     = make(chan error, n)
	)
	start := time.Now()
	deadline := start.Add(d)
	for c := range n {
		wg.Go(func() {
			conn, err := net.Dial("udp", addr)
			if err != nil {
				errs <- err
				return
			}
			defer conn.Close()
			lat := make([]time.Duration, 0, 1<<16)
			q := make([]byte, 512)
			buf := make([]byte, 4096)
			id := uint16(c) << 10
			for i := c * 7; time.Now().Before(deadline); i++ {
				b := queries[i%len(queries)]
				q = append(q[:0], b...)
				id++
				binary.BigEndian.PutUint16(q, id)
				t0 := time.Now()
				if _, err := conn.Write(q); err != nil {
					errs <- err
					return
				}
				conn.SetReadDeadline(t0.Add(time.Second))
				for {
					k, err := conn.Read(buf)
					if err != nil {
						var ne net.Error
						if errors.As(err, &ne) && ne.Timeout() {
							timeouts.Add(1)
							break
						}
						errs <- err
						return
					}
					if k < 12 || binary.BigEndian.Uint16(buf) != id {
						continue // a late answer to a query that timed out
					}
					if buf[3]&0xf != dns.RcodeSuccess || binary.BigEndian.Uint16(buf[6:]) == 0 {
						bad.Add(1)
					}
					if buf[2]&0x2 != 0 {
						tc.Add(1)
					}
					lat = append(lat, time.Since(t0))
					break
				}
			}
			mu.Lock()
			res.lat = append(res.lat, lat...)
			mu.Unlock()
		})
	}
	wg.Wait()
	res.elapsed = time.Since(start)
	res.timeouts, res.bad, res.tc = timeouts.Load(), bad.Load(), tc.Load()
	close(errs)
	return res, <-errs
}

func (r result) print(d time.Duration) {
	slices.Sort(r.lat)
	pct := func(p float64) time.Duration {
		if len(r.lat) == 0 {
			return 0
		}
		return r.lat[min(len(r.lat)-1, int(p*float64(len(r.lat))))]
	}
	qps := float64(len(r.lat)) / r.elapsed.Seconds()
	fmt.Printf("queries:  %d answered in %s, %d timed out, %d bad answers, %d truncated\n",
		len(r.lat), r.elapsed.Round(time.Millisecond), r.timeouts, r.bad, r.tc)
	fmt.Printf("rate:     %.0f queries/s (goal ≥ %d queries/s on 2 cores)\n", qps, goal)
	fmt.Printf("latency:  p50 %s  p99 %s  max %s\n",
		pct(0.50).Round(time.Microsecond), pct(0.99).Round(time.Microsecond), pct(1).Round(time.Microsecond))
}
