package client

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"runtime"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/berth-dev/berth/api"
)

// fakeDiscovery fakes GET /v1/discovery/web: the list, and watches that
// start with the whole view then carry what push sends.
type fakeDiscovery struct {
	mu       sync.Mutex
	eps      map[string]api.Endpoint
	rev      int64
	subs     map[chan api.Event]bool
	lists    int
	watches  int
	goneTill int64 // a watch from a revision below this answers 410
}

func newFakeDiscovery(eps ...api.Endpoint) *fakeDiscovery {
	f := &fakeDiscovery{eps: map[string]api.Endpoint{}, rev: 10, subs: map[chan api.Event]bool{}}
	for _, ep := range eps {
		f.eps[endpointKey(ep)] = ep
	}
	return f
}

func ep(id string) api.Endpoint {
	return api.Endpoint{Service: "web", ID: id, Address: "10.0.0." + id[len(id)-1:], Port: 80,
		Ports: map[string]int{"http": 80, "grpc": 9090}, Network: "n1", Health: api.HealthPassing}
}

func (f *fakeDiscovery) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.URL.Path != "/v1/discovery/web" || r.URL.Query().Get("healthy") != "1" {
		http.NotFound(w, r)
		return
	}
	f.mu.Lock()
	if r.URL.Query().Get("watch") == "" {
		f.lists++
		l := api.List[api.Endpoint]{Items: sortedEps(f.eps), Revision: f.rev}
		f.mu.Unlock()
		_ = json.NewEncoder(w).Encode(l)
		return
	}
	f.watches++
	if from, _ := strconv.ParseInt(r.URL.Query().Get("revision"), 10, 64); from > 0 && from < f.goneTill {
		f.mu.Unlock()
		w.WriteHeader(http.StatusGone)
		_ = json.NewEncoder(w).Encode(api.Error{Code: api.CodeGone, Message: "compacted"})
		return
	}
	ch := make(chan api.Event, 100)
	f.subs[ch] = true
	var first []api.Event
	for _, e := range sortedEps(f.eps) {
		b, _ := json.Marshal(e)
		first = append(first, api.Event{Type: api.EventPut, Name: endpointKey(e), Revision: f.rev, Object: b})
	}
	first = append(first, api.Event{Type: api.EventBookmark, Revision: f.rev})
	f.mu.Unlock()
	defer func() {
		f.mu.Lock()
		delete(f.subs, ch)
		f.mu.Unlock()
	}()
	w.WriteHeader(http.StatusOK)
	enc := json.NewEncoder(w)
	for _, ev := range first {
		_ = enc.Encode(ev)
	}
	w.(http.Flusher).Flush()
	for {
		select {
		case <-r.Context().Done():
			return
		case ev, ok := <-ch:
			if !ok {
				return // the fake drops the stream
			}
			if enc.Encode(ev) != nil {
				return
			}
			w.(http.Flusher).Flush()
		}
	}
}

func sortedEps(m map[string]api.Endpoint) []api.Endpoint {
	var out []api.Endpoint
	for _, e := range m {
		out = append(out, e)
	}
	slices.SortFunc(out, func(a, b api.Endpoint) int { return cmpStr(endpointKey(a), endpointKey(b)) })
	return out
}

func cmpStr(a, b string) int {
	switch {
	case a < b:
		return -1
	case a > b:
		return 1
	}
	return 0
}

// put adds or changes an endpoint and tells the watches.
func (f *fakeDiscovery) put(e api.Endpoint) { f.change(api.EventPut, e, true) }

// del removes an endpoint and tells the watches.
func (f *fakeDiscovery) del(e api.Endpoint) { f.change(api.EventDelete, e, true) }

// change applies a change, telling the watches only when tell.
func (f *fakeDiscovery) change(typ string, e api.Endpoint, tell bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.rev++
	if typ == api.EventPut {
		f.eps[endpointKey(e)] = e
	} else {
		delete(f.eps, endpointKey(e))
	}
	if !tell {
		return
	}
	b, _ := json.Marshal(e)
	for ch := range f.subs {
		ch <- api.Event{Type: typ, Name: endpointKey(e), Revision: f.rev, Object: b}
		ch <- api.Event{Type: api.EventBookmark, Revision: f.rev}
	}
}

// drop ends every open watch.
func (f *fakeDiscovery) drop() {
	f.mu.Lock()
	defer f.mu.Unlock()
	for ch := range f.subs {
		close(ch)
		delete(f.subs, ch)
	}
}

func (f *fakeDiscovery) counts() (lists, watches, open int) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.lists, f.watches, len(f.subs)
}

func newDisc(t *testing.T, f *fakeDiscovery, o DiscovererOptions) *Discoverer {
	t.Helper()
	d, err := fake(t, f).NewDiscoverer(context.Background(), "web", o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = d.Close() })
	return d
}

func ids(eps []api.Endpoint) string {
	s := ""
	for i, e := range eps {
		if i > 0 {
			s += ","
		}
		s += e.ID
	}
	return s
}

func waitIDs(t *testing.T, d *Discoverer, want string) {
	t.Helper()
	eventually(t, 3*time.Second, "endpoints "+want, func() bool { return ids(d.Endpoints()) == want })
}

func TestDiscovererFollowsWatch(t *testing.T) {
	f := newFakeDiscovery(ep("a"), ep("b"))
	d := newDisc(t, f, DiscovererOptions{})
	if got := ids(d.Endpoints()); got != "a,b" {
		t.Fatalf("after the list: %q, want a,b", got)
	}
	eventually(t, 3*time.Second, "the watch", func() bool { _, _, open := f.counts(); return open == 1 })

	f.put(ep("c"))
	waitIDs(t, d, "a,b,c")
	f.del(ep("a"))
	waitIDs(t, d, "b,c")
	moved := ep("b")
	moved.Address = "10.0.1.2"
	f.put(moved)
	eventually(t, 3*time.Second, "b's new address", func() bool {
		eps := d.Endpoints()
		return len(eps) == 2 && eps[0].Address == "10.0.1.2"
	})
	// A critical endpoint (which a healthy view would not send) is dropped.
	sick := ep("c")
	sick.Health = api.HealthCritical
	f.put(sick)
	waitIDs(t, d, "b")
}

func TestDiscovererReconnectsAndReconciles(t *testing.T) {
	f := newFakeDiscovery(ep("a"), ep("b"))
	d := newDisc(t, f, DiscovererOptions{})
	eventually(t, 3*time.Second, "the watch", func() bool { _, _, open := f.counts(); return open == 1 })
	// Changes nobody is told of, then the stream drops: the next watch's
	// first batch replaces the cache.
	f.change(api.EventDelete, ep("a"), false)
	f.change(api.EventPut, ep("c"), false)
	f.drop()
	waitIDs(t, d, "b,c")
	_, watches, _ := f.counts()
	if watches != 2 {
		t.Errorf("watches = %d, want 2", watches)
	}

	// The server no longer holds the revision: list again.
	eventually(t, 3*time.Second, "the second watch", func() bool { _, _, open := f.counts(); return open == 1 })
	f.mu.Lock()
	f.goneTill = f.rev + 1 // what the watch resumes from, not what a list answers
	f.mu.Unlock()
	f.change(api.EventPut, ep("d"), false)
	f.drop()
	waitIDs(t, d, "b,c,d")
	eventually(t, 3*time.Second, "a second list", func() bool { lists, _, _ := f.counts(); return lists == 2 })
	eventually(t, 3*time.Second, "a watch from the new list", func() bool { _, _, open := f.counts(); return open == 1 })
	f.put(ep("e"))
	waitIDs(t, d, "b,c,d,e")
	if lists, _, _ := f.counts(); lists != 2 {
		t.Errorf("lists = %d, want 2", lists)
	}
}

func TestRoundRobinCycles(t *testing.T) {
	d := newDisc(t, newFakeDiscovery(ep("a"), ep("b"), ep("c")), DiscovererOptions{Balancer: RoundRobin})
	seen := map[string]int{}
	var seq string
	for range 300 {
		e, err := d.Pick()
		if err != nil {
			t.Fatal(err)
		}
		seen[e.ID]++
		if len(seq) < 6 {
			seq += e.ID
		}
	}
	if seen["a"] != 100 || seen["b"] != 100 || seen["c"] != 100 {
		t.Errorf("picks = %v, want 100 each", seen)
	}
	if seq != "abcabc" && seq != "bcabca" && seq != "cabcab" {
		t.Errorf("sequence %q does not cycle", seq)
	}
}

func TestRandomCoversAll(t *testing.T) {
	d := newDisc(t, newFakeDiscovery(ep("a"), ep("b"), ep("c"), ep("d")), DiscovererOptions{Balancer: Random})
	seen := map[string]int{}
	for range 400 {
		e, err := d.Pick()
		if err != nil {
			t.Fatal(err)
		}
		seen[e.ID]++
	}
	for _, id := range []string{"a", "b", "c", "d"} {
		if seen[id] < 40 { // expected 100; 40 is far in the tail
			t.Errorf("picks = %v: %s too rarely", seen, id)
		}
	}
}

// hold starts a Do whose call stays open until release closes; it answers
// the endpoint the call got.
func hold(t *testing.T, d *Discoverer, release chan struct{}, wg *sync.WaitGroup) string {
	t.Helper()
	got := make(chan string, 1)
	wg.Add(1)
	go func() {
		defer wg.Done()
		_ = d.Do(context.Background(), func(_ context.Context, e api.Endpoint) error {
			got <- e.ID
			<-release
			return nil
		})
	}()
	select {
	case id := <-got:
		return id
	case <-time.After(3 * time.Second):
		t.Fatal("the held call did not start")
	}
	return ""
}

func TestLeastOutstandingPrefersIdle(t *testing.T) {
	d := newDisc(t, newFakeDiscovery(ep("a"), ep("b"), ep("c")), DiscovererOptions{Balancer: LeastOutstanding})
	release := make(chan struct{})
	var wg sync.WaitGroup
	defer wg.Wait()
	defer close(release)

	x := hold(t, d, release, &wg)
	// x alone is busy: it loses every comparison.
	for range 100 {
		if e, _ := d.Pick(); e.ID == x {
			t.Fatalf("picked the busy %s", x)
		}
	}
	y := hold(t, d, release, &wg)
	if x == y {
		t.Fatalf("second call went to the busy %s", x)
	}
	// Two busy, one idle: the idle one wins whenever it is among the two
	// choices (2/3 of picks); the busy ones only when paired together.
	idle := 0
	for range 300 {
		e, err := d.Pick()
		if err != nil {
			t.Fatal(err)
		}
		if e.ID != x && e.ID != y {
			idle++
		}
	}
	if idle < 160 { // expected 200, sd ~8
		t.Errorf("the idle endpoint got %d of 300 picks, want about 200", idle)
	}
}

func TestLeastOutstandingCountsDrain(t *testing.T) {
	d := newDisc(t, newFakeDiscovery(ep("a"), ep("b")), DiscovererOptions{Balancer: LeastOutstanding})
	release := make(chan struct{})
	var wg sync.WaitGroup
	busy := hold(t, d, release, &wg)
	for range 50 {
		if e, _ := d.Pick(); e.ID == busy {
			t.Fatalf("picked the busy %s", busy)
		}
	}
	close(release)
	wg.Wait()
	d.mu.Lock()
	defer d.mu.Unlock()
	for _, s := range d.eps {
		if s.inflight != 0 {
			t.Errorf("%s in flight = %d after the calls ended", s.key, s.inflight)
		}
	}
}

func TestDoRetriesOnceOnAnother(t *testing.T) {
	d := newDisc(t, newFakeDiscovery(ep("a"), ep("b"), ep("c")), DiscovererOptions{Balancer: Random, EjectAfter: -1})
	for range 20 {
		var calls []string
		err := d.Do(context.Background(), func(_ context.Context, e api.Endpoint) error {
			calls = append(calls, e.ID)
			if len(calls) == 1 {
				return errors.New("first fails")
			}
			return nil
		})
		if err != nil {
			t.Fatalf("Do = %v, want the second call's nil", err)
		}
		if len(calls) != 2 || calls[0] == calls[1] {
			t.Fatalf("calls = %v, want two on different endpoints", calls)
		}
	}

	// Both fail: the second error comes back, and there is no third call.
	calls := 0
	second := errors.New("second")
	err := d.Do(context.Background(), func(context.Context, api.Endpoint) error {
		calls++
		if calls == 1 {
			return errors.New("first")
		}
		return second
	})
	if err != second || calls != 2 {
		t.Errorf("Do = %v after %d calls, want the second error after 2", err, calls)
	}
}

func TestDoSingleEndpointAndCanceled(t *testing.T) {
	d := newDisc(t, newFakeDiscovery(ep("a")), DiscovererOptions{EjectAfter: 1})
	calls := 0
	boom := errors.New("boom")
	ctx, cancel := context.WithCancel(context.Background())
	err := d.Do(ctx, func(context.Context, api.Endpoint) error { calls++; cancel(); return boom })
	if err != boom || calls != 1 {
		t.Errorf("Do = %v after %d calls, want boom after 1", err, calls)
	}
	// The caller's cancellation is not the endpoint's failure.
	if got := ids(d.Endpoints()); got != "a" {
		t.Errorf("endpoints = %q, want a still in", got)
	}
	calls = 0
	err = d.Do(context.Background(), func(context.Context, api.Endpoint) error { calls++; return boom })
	if err != boom || calls != 1 {
		t.Errorf("Do = %v after %d calls, want boom after 1 (no other endpoint)", err, calls)
	}
}

func TestEjectionAndReturn(t *testing.T) {
	d := newDisc(t, newFakeDiscovery(ep("a"), ep("b"), ep("c")), DiscovererOptions{EjectAfter: 3, EjectFor: time.Minute})
	var now atomic.Int64
	now.Store(time.Date(2025, 1, 1, 0, 0, 0, 0, time.UTC).UnixNano())
	d.now = func() time.Time { return time.Unix(0, now.Load()) }

	failB := func(_ context.Context, e api.Endpoint) error {
		if e.ID == "b" {
			return errors.New("b is down")
		}
		return nil
	}
	// Round robin sends every third call's first try to b; each fails over.
	for i := range 9 {
		if err := d.Do(context.Background(), failB); err != nil {
			t.Fatalf("Do %d = %v, want the retry's success", i, err)
		}
	}
	if got := ids(d.Endpoints()); got != "a,c" {
		t.Fatalf("after three failures: %q, want b ejected", got)
	}
	for range 30 {
		if e, _ := d.Pick(); e.ID == "b" {
			t.Fatal("picked the ejected b")
		}
	}
	now.Add(int64(59 * time.Second))
	if got := ids(d.Endpoints()); got != "a,c" {
		t.Fatalf("before EjectFor passed: %q, want b still out", got)
	}
	now.Add(int64(time.Second))
	if got := ids(d.Endpoints()); got != "a,b,c" {
		t.Fatalf("after EjectFor: %q, want b back", got)
	}
	// Back with a clean slate: it takes three more failures in a row, and a
	// success in between starts the count over.
	fails := 0
	flaky := func(_ context.Context, e api.Endpoint) error {
		if e.ID == "b" {
			fails++
			if fails == 3 {
				return nil
			}
			return errors.New("flaky")
		}
		return nil
	}
	for range 12 {
		_ = d.Do(context.Background(), flaky)
	}
	if got := ids(d.Endpoints()); got != "a,b,c" {
		t.Errorf("after fail, fail, ok, fail: %q, want b in", got)
	}
}

func TestPickEmptyAndAllEjected(t *testing.T) {
	f := newFakeDiscovery()
	d := newDisc(t, f, DiscovererOptions{EjectAfter: 1})
	if _, err := d.Pick(); !errors.Is(err, ErrNoEndpoints) {
		t.Errorf("Pick with none = %v, want ErrNoEndpoints", err)
	}
	called := false
	if err := d.Do(context.Background(), func(context.Context, api.Endpoint) error { called = true; return nil }); !errors.Is(err, ErrNoEndpoints) || called {
		t.Errorf("Do with none = %v (called %v), want ErrNoEndpoints", err, called)
	}
	f.put(ep("a"))
	waitIDs(t, d, "a")
	_ = d.Do(context.Background(), func(context.Context, api.Endpoint) error { return errors.New("down") })
	if _, err := d.Pick(); !errors.Is(err, ErrNoEndpoints) {
		t.Errorf("Pick with all ejected = %v, want ErrNoEndpoints", err)
	}
}

func TestAddrAndNamedPort(t *testing.T) {
	noGRPC := ep("b")
	noGRPC.Ports = map[string]int{"http": 80}
	v6 := ep("c")
	v6.Address = "fd00::3"
	d := newDisc(t, newFakeDiscovery(ep("a"), noGRPC, v6), DiscovererOptions{Port: "grpc"})
	if got := ids(d.Endpoints()); got != "a,c" {
		t.Errorf("endpoints with a grpc port: %q, want a,c", got)
	}
	if got := d.Addr(ep("a")); got != "10.0.0.a:9090" {
		t.Errorf("Addr = %q", got)
	}
	if got := d.Addr(v6); got != "[fd00::3]:9090" {
		t.Errorf("Addr(v6) = %q", got)
	}
	if got := d.Addr(noGRPC); got != "10.0.0.b:80" {
		t.Errorf("Addr without the named port = %q, want Endpoint.Port", got)
	}
	plain := newDisc(t, newFakeDiscovery(ep("a")), DiscovererOptions{})
	if got := plain.Addr(ep("a")); got != "10.0.0.a:80" {
		t.Errorf("Addr = %q", got)
	}
}

func TestNewDiscovererListError(t *testing.T) {
	rec := &recorder{status: http.StatusBadRequest, body: `{"code":"invalid","message":"bad name"}`}
	_, err := fake(t, rec).NewDiscoverer(context.Background(), "Web", DiscovererOptions{})
	var ae *api.Error
	if !errors.As(err, &ae) || ae.Status != http.StatusBadRequest {
		t.Errorf("NewDiscoverer = %v, want the 400", err)
	}
}

func TestDiscovererCloseLeavesNoGoroutine(t *testing.T) {
	before := runtime.NumGoroutine()
	f := newFakeDiscovery(ep("a"))
	ts := httptest.NewServer(f)
	tr := &http.Transport{}
	c, err := New(ts.URL, WithHTTPClient(&http.Client{Transport: tr}))
	if err != nil {
		t.Fatal(err)
	}
	var ds []*Discoverer
	for range 3 {
		d, err := c.NewDiscoverer(context.Background(), "web", DiscovererOptions{})
		if err != nil {
			t.Fatal(err)
		}
		ds = append(ds, d)
	}
	eventually(t, 3*time.Second, "the watches", func() bool { _, _, open := f.counts(); return open == 3 })
	f.drop() // one goes through a reconnect
	for _, d := range ds {
		if err := d.Close(); err != nil {
			t.Fatal(err)
		}
		_ = d.Close()
	}
	tr.CloseIdleConnections()
	ts.Close()
	var now int
	eventually(t, 5*time.Second, fmt.Sprintf("goroutines back to %d", before), func() bool {
		now = runtime.NumGoroutine()
		return now <= before
	})
}
