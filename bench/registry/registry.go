package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/berth-dev/berth/api"
	"github.com/berth-dev/berth/client"
)

// regTTL is the TTL of the benchmark's registrations: longer than a run, so
// that nothing needs renewing while it measures.
const regTTL = 10 * time.Minute

// registration is one instance of a service to register.
type registration struct {
	service, id string
	spec        api.RegistrationSpec
}

// serviceName is the i-th registry service.
func serviceName(i int) string { return fmt.Sprintf("svc-%03d", i) }

// registrations are n instances spread round-robin over services, with ids
// starting with set, each with its own address.
func registrations(set string, n, services int) []registration {
	out := make([]registration, n)
	for i := range out {
		out[i] = registration{
			service: serviceName(i % services),
			id:      fmt.Sprintf("%s-%05d", set, i),
			spec: api.RegistrationSpec{
				Address: fmt.Sprintf("10.%d.%d.%d", 100+i/62500, i/250%250, i%250+1),
				Port:    8080,
				Ports:   map[string]int{"http": 8080},
				Meta:    map[string]string{"zone": "z" + strconv.Itoa(i%3)},
				TTL:     api.Duration(regTTL),
			},
		}
	}
	return out
}

// opResult is what a batch of API calls did.
type opResult struct {
	n     int             // calls that succeeded
	errs  int             // calls that failed
	first error           // the first failure
	took  time.Duration   // wall time of the batch
	lat   []time.Duration // of each successful call
}

// each runs op on every registration with workers concurrent clients (each
// with its own connection), one call in flight each.
func each(ctx context.Context, regs []registration, workers int, op func(context.Context, *client.Client, registration) error) (opResult, error) {
	clients := make([]*client.Client, workers)
	transports := make([]*http.Transport, workers)
	defer func() {
		for _, tr := range transports {
			if tr != nil {
				tr.CloseIdleConnections()
			}
		}
	}()
	for i := range clients {
		transports[i] = newTransport(2)
		c, err := client.New(apiAddr, client.WithHTTPClient(&http.Client{Transport: transports[i], Timeout: 30 * time.Second}))
		if err != nil {
			return opResult{}, fmt.Errorf("berth client: %w", err)
		}
		clients[i] = c
	}
	var (
		next atomic.Int64
		mu   sync.Mutex
		res  opResult
		wg   sync.WaitGroup
	)
	start := time.Now()
	for _, c := range clients {
		wg.Go(func() {
			lat := make([]time.Duration, 0, len(regs)/workers+1)
			errs := 0
			var first error
			for ctx.Err() == nil {
				i := int(next.Add(1)) - 1
				if i >= len(regs) {
					break
				}
				t0 := time.Now()
				if err := op(ctx, c, regs[i]); err != nil {
					errs++
					if first == nil {
						first = fmt.Errorf("%s/%s: %w", regs[i].service, regs[i].id, err)
					}
					continue
				}
				lat = append(lat, time.Since(t0))
			}
			mu.Lock()
			res.lat = append(res.lat, lat...)
			res.errs += errs
			if res.first == nil {
				res.first = first
			}
			mu.Unlock()
		})
	}
	wg.Wait()
	res.took = time.Since(start)
	res.n = len(res.lat)
	if ctx.Err() != nil {
		return res, ctx.Err()
	}
	return res, nil
}

func register(ctx context.Context, c *client.Client, r registration) error {
	_, err := c.Register(ctx, r.service, r.id, r.spec)
	return err
}

func deregister(ctx context.Context, c *client.Client, r registration) error {
	return c.Deregister(ctx, r.service, r.id)
}

// checkDiscovery lists every service once, decoding the answers, and checks
// that each holds its registrations, all healthy.
func checkDiscovery(ctx context.Context, c *client.Client, services, instances int) error {
	for s := range services {
		want := instances / services
		if s < instances%services {
			want++
		}
		l, err := c.Discover(ctx, serviceName(s), client.DiscoverOptions{Healthy: true})
		if err != nil {
			return fmt.Errorf("discover %s: %w", serviceName(s), err)
		}
		if len(l.Items) != want {
			return fmt.Errorf("discover %s: %d endpoints, want %d", serviceName(s), len(l.Items), want)
		}
	}
	return nil
}

// loadResult is what a timed load saw.
type loadResult struct {
	lat     []time.Duration // of each successful request
	errs    int
	first   error
	elapsed time.Duration
	bytes   int64
}

// discoveryLoad has workers clients GET /v1/discovery/{name}?healthy=1
// round-robin over the services for d, one request in flight each. The
// answers are read to the end but not decoded (checkDiscovery decoded them
// once): the load generator shares the machine's cores with berth.
func discoveryLoad(ctx context.Context, services, workers int, d time.Duration) loadResult {
	var (
		mu  sync.Mutex
		res loadResult
		wg  sync.WaitGroup
	)
	urls := make([]string, services)
	for s := range urls {
		urls[s] = "http://" + apiAddr + client.DiscoveryPath(serviceName(s), client.DiscoverOptions{Healthy: true})
	}
	start := time.Now()
	deadline := start.Add(d)
	for w := range workers {
		wg.Go(func() {
			tr := newTransport(2)
			defer tr.CloseIdleConnections()
			hc := &http.Client{Transport: tr, Timeout: 10 * time.Second}
			lat := make([]time.Duration, 0, 1<<14)
			var errs int
			var first error
			var n int64
			for i := w * 7; ctx.Err() == nil && time.Now().Before(deadline); i++ {
				t0 := time.Now()
				k, err := get(ctx, hc, urls[i%len(urls)])
				if err != nil {
					errs++
					if first == nil {
						first = err
					}
					continue
				}
				lat = append(lat, time.Since(t0))
				n += k
			}
			mu.Lock()
			res.lat = append(res.lat, lat...)
			res.errs += errs
			res.bytes += n
			if res.first == nil {
				res.first = first
			}
			mu.Unlock()
		})
	}
	wg.Wait()
	res.elapsed = time.Since(start)
	return res
}

// get reads url to the end and returns its length.
func get(ctx context.Context, hc *http.Client, url string) (int64, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return 0, err
	}
	resp, err := hc.Do(req)
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	n, err := io.Copy(io.Discard, resp.Body)
	if err != nil {
		return n, fmt.Errorf("GET %s: %w", url, err)
	}
	if resp.StatusCode != http.StatusOK {
		return n, fmt.Errorf("GET %s: %s", url, resp.Status)
	}
	return n, nil
}

// watchResult is what the watchers of one propagation phase saw.
type watchResult struct {
	watchers int
	changes  int             // changes written
	delays   []time.Duration // write acknowledged → received, per watcher per change
	fromSent []time.Duration // write sent → received, per watcher per change
	early    int             // received before the write's answer (counted as 0)
	missing  int             // (watcher, change) pairs not received within missWait
	writes   []time.Duration // latency of the writes
	open     time.Duration   // time to open every watch and get its first bookmark
	took     time.Duration   // time of the changes
	stopped  bool            // the phase ran out of time before all changes
}

// missWait is how long a change may take to reach every watcher before
// the next one is written anyway.
const missWait = 5 * time.Second

// probeID is the registration the propagation phases change.
const probeID = "probe"

// watchPropagation opens n discovery watch streams of service (healthy
// ones, as client.Discoverer does), then registers probeID changes times,
// each time with a new "seq" in its metadata, and times each write's
// arrival on every stream from the moment the write was acknowledged. It
// writes the next change once every stream has the previous one (or after
// missWait), and stops early after budget.
func watchPropagation(ctx context.Context, service string, n, changes int, budget time.Duration) (watchResult, error) {
	res := watchResult{watchers: n}
	wctx, cancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	defer wg.Wait()
	defer cancel()

	// One transport for the streams, a connection each.
	tr := newTransport(n)
	defer tr.CloseIdleConnections()
	wc, err := client.New(apiAddr, client.WithHTTPClient(&http.Client{Transport: tr}))
	if err != nil {
		return res, err
	}
	path := client.DiscoveryPath(service, client.DiscoverOptions{Healthy: true})
	key := probeID + "@" // an external endpoint has no network

	recv := make([][]time.Time, n) // [watcher][seq]
	got := make([]atomic.Int32, changes+1)
	all := make([]chan struct{}, changes+1)
	for i := range all {
		all[i] = make(chan struct{})
	}
	ready := make(chan error, n)
	var failed atomic.Pointer[error]

	openStart := time.Now()
	sem := make(chan struct{}, 16) // streams being opened at once
	for w := range n {
		recv[w] = make([]time.Time, changes+1)
		wg.Go(func() {
			select {
			case sem <- struct{}{}:
			case <-wctx.Done():
				ready <- wctx.Err()
				return
			}
			st, err := wc.Watch(wctx, path, 0)
			<-sem
			if err != nil {
				ready <- fmt.Errorf("watch %s: %w", path, err)
				return
			}
			defer st.Close()
			synced := false
			for {
				ev, err := st.Next()
				if err != nil {
					if !synced {
						ready <- fmt.Errorf("watch %s: %w", path, err)
					} else if wctx.Err() == nil {
						e := fmt.Errorf("watch %s: %w", path, err)
						failed.CompareAndSwap(nil, &e)
					}
					return
				}
				switch {
				case ev.Type == api.EventBookmark && !synced:
					synced = true
					ready <- nil
				case ev.Type == api.EventPut && ev.Name == key && synced:
					at := time.Now()
					var ep struct {
						Meta map[string]string `json:"meta"`
					}
					if json.Unmarshal(ev.Object, &ep) != nil {
						continue
					}
					seq, err := strconv.Atoi(ep.Meta["seq"])
					if err != nil || seq < 1 || seq > changes || !recv[w][seq].IsZero() {
						continue
					}
					recv[w][seq] = at
					if int(got[seq].Add(1)) == n {
						close(all[seq])
					}
				}
			}
		})
	}
	for range n {
		if err := <-ready; err != nil {
			return res, err
		}
	}
	res.open = time.Since(openStart)

	wtr := newTransport(2)
	defer wtr.CloseIdleConnections()
	c, err := client.New(apiAddr, client.WithHTTPClient(&http.Client{Transport: wtr, Timeout: 30 * time.Second}))
	if err != nil {
		return res, fmt.Errorf("berth client: %w", err)
	}
	acks := make([]time.Time, changes+1)
	sent := make([]time.Time, changes+1)
	start := time.Now()
	for seq := 1; seq <= changes; seq++ {
		if time.Since(start) > budget {
			res.stopped = true
			break
		}
		spec := api.RegistrationSpec{Address: "10.250.0.1", Port: 9000, TTL: api.Duration(regTTL),
			Meta: map[string]string{"seq": strconv.Itoa(seq)}}
		sent[seq] = time.Now()
		if _, err := c.Register(ctx, service, probeID, spec); err != nil {
			return res, fmt.Errorf("register %s/%s: %w", service, probeID, err)
		}
		acks[seq] = time.Now()
		res.writes = append(res.writes, acks[seq].Sub(sent[seq]))
		res.changes = seq
		select {
		case <-all[seq]:
		case <-time.After(missWait):
		case <-ctx.Done():
			return res, ctx.Err()
		}
		if e := failed.Load(); e != nil {
			return res, *e
		}
	}
	res.took = time.Since(start)
	cancel()
	wg.Wait()
	for w := range n {
		for seq := 1; seq <= res.changes; seq++ {
			at := recv[w][seq]
			if !at.IsZero() {
				res.fromSent = append(res.fromSent, at.Sub(sent[seq]))
			}
			switch {
			case at.IsZero():
				res.missing++
			case at.Before(acks[seq]):
				res.early++
				res.delays = append(res.delays, 0)
			default:
				res.delays = append(res.delays, at.Sub(acks[seq]))
			}
		}
	}
	if err := c.Deregister(ctx, service, probeID); err != nil && !client.IsNotFound(err) {
		fmt.Fprintf(os.Stderr, "bench: deregister %s/%s: %v\n", service, probeID, err)
	}
	return res, nil
}
