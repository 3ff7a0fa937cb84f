package server

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"reflect"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/berth-dev/berth/api"
	"github.com/berth-dev/berth/internal/cache"
	"github.com/berth-dev/berth/internal/store"
)

func TestDiscoveryViewAndWatch(t *testing.T) {
	e := startEnv(t)
	ctx := context.Background()
	put := func(id, state, health string, ips ...string) {
		t.Helper()
		in := api.Instance{ID: id, Service: "web", Generation: 1, Node: "n1", DesiredState: api.DesiredRunning,
			Status: api.InstanceStatus{State: state, Health: health, Ports: []api.PortBinding{{Name: "http", Port: 80, Protocol: "tcp"}}}}
		for i, ip := range ips {
			in.Status.VNICs = append(in.Status.VNICs, api.VNIC{Network: fmt.Sprintf("net%d", i), Interface: fmt.Sprintf("eth%d", i), IP: ip})
		}
		if _, err := e.st.Put(ctx, keyInstances+id, in, -1); err != nil {
			t.Fatal(err)
		}
	}
	put("web-a", api.InstanceRunning, "", "10.90.0.2", "10.91.0.2")
	put("web-b", api.InstanceFailed, api.HealthCritical, "10.90.0.3")
	put("webx-c", api.InstanceRunning, "", "10.90.0.9") // another service, same prefix
	if _, err := e.c.Register(ctx, "web", "ext-1", api.RegistrationSpec{Address: "192.0.2.10", Port: 8080, Meta: map[string]string{"zone": "a"}}); err != nil {
		t.Fatal(err)
	}
	get := func(q string) []api.Endpoint {
		t.Helper()
		var l api.List[api.Endpoint]
		e.rawInto("GET", "/v1/discovery/web"+q, "", http.StatusOK, &l)
		return l.Items
	}
	eventuallyLen := func(q string, n int) []api.Endpoint {
		t.Helper()
		deadline := time.Now().Add(5 * time.Second)
		for {
			eps := get(q)
			if len(eps) == n || time.Now().After(deadline) {
				if len(eps) != n {
					js, _ := json.Marshal(eps)
					t.Fatalf("%s: want %d endpoints, got %s", q, n, js)
				}
				return eps
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	all := eventuallyLen("", 4) // web-a on two networks, web-b, ext-1
	for _, ep := range all {
		if ep.Service != "web" {
			t.Fatalf("another service's endpoint: %+v", ep)
		}
	}
	healthy := eventuallyLen("?healthy=1", 3)
	for _, ep := range healthy {
		if ep.ID == "web-b" {
			t.Fatal("a critical endpoint in the healthy view")
		}
	}
	if eps := eventuallyLen("?healthy=1&network=net1", 2); eps[0].Address != "10.91.0.2" && eps[1].Address != "10.91.0.2" {
		t.Fatalf("network filter: %+v", eps)
	}
	if eps := eventuallyLen("?meta=zone:a", 1); !eps[0].External || eps[0].Port != 8080 {
		t.Fatalf("meta filter: %+v", eps)
	}
	if eps := eventuallyLen("?meta=node:n1&healthy=1", 2); eps[0].Ports["http"] != 80 || eps[0].Meta["network"] == "" {
		t.Fatalf("instance endpoint meta and ports: %+v", eps)
	}
	e.apiErr("GET", "/v1/discovery/Bad_Name", "", http.StatusBadRequest, api.CodeInvalid)
	e.apiErr("GET", "/v1/discovery/web?meta=nocolon", "", http.StatusBadRequest, api.CodeInvalid)

	// The watch: the view first, then changes of it.
	s, err := e.c.Watch(ctx, "/v1/discovery/web?healthy=1", 0)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	seen := map[string]string{}
	next := func() api.Event {
		t.Helper()
		for {
			ev, err := s.Next()
			if err != nil {
				t.Fatal(err)
			}
			if ev.Type != api.EventBookmark {
				seen[ev.Name] = ev.Type
				return ev
			}
		}
	}
	for range 3 {
		next()
	}
	// A new external instance appears; a failing one leaves the healthy view.
	if _, err := e.c.Register(ctx, "web", "ext-2", api.RegistrationSpec{Address: "192.0.2.11", Port: 8080}); err != nil {
		t.Fatal(err)
	}
	if ev := next(); ev.Type != api.EventPut || ev.Name != "ext-2@" {
		t.Fatalf("want put ext-2, got %+v", ev)
	}
	put("web-a", api.InstanceFailed, api.HealthCritical, "10.90.0.2", "10.91.0.2")
	for range 2 {
		if ev := next(); ev.Type != api.EventDelete {
			t.Fatalf("want the failed instance's endpoints deleted, got %+v", ev)
		}
	}
	if seen["web-a@net0"] != api.EventDelete || seen["web-a@net1"] != api.EventDelete {
		t.Fatalf("events: %v", seen)
	}
}

// TestDiscoveryIndexSeesEveryChange: the index the DNS source and the
// discovery view read is never behind the cache: each change is in the
// answer of the very next lookup once the cache has it, with no polling.
func TestDiscoveryIndexSeesEveryChange(t *testing.T) {
	e := startEnv(t)
	ctx := context.Background()
	put := func(key string, v any) {
		t.Helper()
		rev, err := e.st.Put(ctx, key, v, -1)
		if err != nil {
			t.Fatal(err)
		}
		e.waitCache(rev)
	}
	del := func(key string) {
		t.Helper()
		rev, err := e.st.Delete(ctx, key, -1)
		if err != nil {
			t.Fatal(err)
		}
		e.waitCache(rev)
	}
	inst := func(id, svc, ip, health string) api.Instance {
		return api.Instance{ID: id, Service: svc, Generation: 1, Node: "n1", DesiredState: api.DesiredRunning,
			Status: api.InstanceStatus{State: api.InstanceRunning, Health: health,
				VNICs: []api.VNIC{{Network: "default", Interface: "eth0", IP: ip}}}}
	}
	type want struct {
		known bool
		eps   string // id=address/health, sorted by key
	}
	check := func(step, service string, w want) {
		t.Helper()
		eps, known := e.srv.Endpoints(service)
		var got []string
		for _, ep := range eps {
			got = append(got, fmt.Sprintf("%s=%s/%s", ep.ID, ep.Address, ep.Health))
		}
		if g := strings.Join(got, " "); known != w.known || g != w.eps {
			t.Fatalf("%s: Endpoints(%s) = %q known=%v, want %q known=%v", step, service, g, known, w.eps, w.known)
		}
	}
	check("nothing stored", "api", want{})
	steps := []struct {
		name    string
		do      func()
		service string
		want    want
	}{
		{"service stored, no instance", func() { put(keyServices+"api", api.Service{Spec: api.ServiceSpec{Name: "api"}}) },
			"api", want{known: true}},
		{"an instance starts", func() { put(keyInstances+"api-a", inst("api-a", "api", "10.0.0.2", "")) },
			"api", want{true, "api-a=10.0.0.2/passing"}},
		{"a second one", func() { put(keyInstances+"api-b", inst("api-b", "api", "10.0.0.3", api.HealthPassing)) },
			"api", want{true, "api-a=10.0.0.2/passing api-b=10.0.0.3/passing"}},
		{"one turns critical", func() { put(keyInstances+"api-a", inst("api-a", "api", "10.0.0.2", api.HealthCritical)) },
			"api", want{true, "api-a=10.0.0.2/critical api-b=10.0.0.3/passing"}},
		{"another service sharing the prefix", func() { put(keyInstances+"api-x-1", inst("api-x-1", "api-x", "10.0.0.9", "")) },
			"api", want{true, "api-a=10.0.0.2/critical api-b=10.0.0.3/passing"}},
		{"the other service alone", func() {}, "api-x", want{true, "api-x-1=10.0.0.9/passing"}},
		{"an external registration", func() {
			put(regKey("api", "ext"), api.Registration{Service: "api", ID: "ext", RegistrationSpec: api.RegistrationSpec{Address: "192.0.2.1", Port: 80, Health: api.HealthPassing}})
		}, "api", want{true, "api-a=10.0.0.2/critical api-b=10.0.0.3/passing ext=192.0.2.1/passing"}},
		{"an instance removed", func() { del(keyInstances + "api-a") },
			"api", want{true, "api-b=10.0.0.3/passing ext=192.0.2.1/passing"}},
		{"the registration removed", func() { del(regKey("api", "ext")) },
			"api", want{true, "api-b=10.0.0.3/passing"}},
		{"the service object removed, an instance left", func() { del(keyServices + "api") },
			"api", want{true, "api-b=10.0.0.3/passing"}},
		{"the last instance removed", func() { del(keyInstances + "api-b") }, "api", want{}},
		{"the other service's instance removed", func() { del(keyInstances + "api-x-1") }, "api-x", want{}},
	}
	for _, s := range steps {
		s.do()
		check(s.name, s.service, s.want)
	}

	// Spec metadata labels the instances' endpoints, and follows the spec.
	put(keyServices+"meta", api.Service{Spec: api.ServiceSpec{Name: "meta", Meta: map[string]string{"tier": "a"}}})
	put(keyInstances+"meta-1", inst("meta-1", "meta", "10.0.1.2", ""))
	if eps, _ := e.srv.Endpoints("meta"); len(eps) != 1 || eps[0].Meta["tier"] != "a" {
		t.Fatalf("meta: %+v", eps)
	}
	put(keyServices+"meta", api.Service{Spec: api.ServiceSpec{Name: "meta", Meta: map[string]string{"tier": "b"}}})
	if eps, _ := e.srv.Endpoints("meta"); len(eps) != 1 || eps[0].Meta["tier"] != "b" {
		t.Fatalf("meta after a spec change: %+v", eps)
	}

	// Many quick changes, each read back at once.
	for i := range 50 {
		health := []string{api.HealthPassing, api.HealthWarning, api.HealthCritical}[i%3]
		put(keyInstances+"meta-1", inst("meta-1", "meta", fmt.Sprintf("10.0.1.%d", 2+i), health))
		check(fmt.Sprintf("change %d", i), "meta", want{true, fmt.Sprintf("meta-1=10.0.1.%d/%s", 2+i, health)})
	}
}

// TestDiscoveryIndexRebuilds: an index the cache can no longer bring up to
// date by events (they are gone from its ring) rebuilds from a snapshot.
func TestDiscoveryIndexRebuilds(t *testing.T) {
	e := startEnv(t)
	ctx := context.Background()
	in := api.Instance{ID: "web-1", Service: "web", Node: "n1", DesiredState: api.DesiredRunning,
		Status: api.InstanceStatus{State: api.InstanceRunning, VNICs: []api.VNIC{{Network: "default", IP: "10.0.0.5"}}}}
	rev, err := e.st.Put(ctx, keyInstances+"web-1", in, -1)
	if err != nil {
		t.Fatal(err)
	}
	e.waitCache(rev)
	// An index whose revision the cache holds no events after (as after a
	// relist), with a stale entry that a rebuild must drop.
	x := &registryIndex{built: true, rev: 1, services: map[string]*serviceIndex{
		"gone": {name: "gone", exists: true, regs: map[string]regEntry{"old": {address: "192.0.2.1"}}}}, owner: map[string]string{}}
	if _, _, _, err := e.srv.cache.Since(1, store.Prefix); err == nil {
		t.Skip("the cache still holds every event since revision 1")
	}
	eps, known, changed, at := x.lookup(e.srv.cache, "web")
	if !known || len(eps) != 1 || eps[0].Address != "10.0.0.5" || at < rev || changed < rev {
		t.Fatalf("after a rebuild: %+v known=%v changed=%d at %d (want >= %d)", eps, known, changed, at, rev)
	}
	if eps, known, changed, _ := x.lookup(e.srv.cache, "gone"); known || len(eps) != 0 || changed < rev {
		t.Fatalf("a service gone across a rebuild: %+v known=%v changed=%d", eps, known, changed)
	}
}

// TestDiscoveryIndexConcurrent: lookups from many goroutines while the
// store changes (run with -race).
func TestDiscoveryIndexConcurrent(t *testing.T) {
	e := startEnv(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var wg sync.WaitGroup
	for g := range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for ctx.Err() == nil {
				eps, _ := e.srv.Endpoints(fmt.Sprintf("s%d", g%2))
				for _, ep := range eps {
					if ep.Service != fmt.Sprintf("s%d", g%2) {
						t.Errorf("another service's endpoint %+v", ep)
						return
					}
				}
			}
		}()
	}
	var last int64
	for i := range 200 {
		svc := fmt.Sprintf("s%d", i%2)
		id := fmt.Sprintf("%s-%d", svc, i%7)
		in := api.Instance{ID: id, Service: svc, DesiredState: api.DesiredRunning,
			Status: api.InstanceStatus{State: api.InstanceRunning, VNICs: []api.VNIC{{Network: "default", IP: fmt.Sprintf("10.1.%d.%d", i%2, i%7+1)}}}}
		var err error
		if i%5 == 4 {
			last, err = e.st.Delete(ctx, keyInstances+id, -1)
		} else {
			last, err = e.st.Put(ctx, keyInstances+id, in, -1)
		}
		if err != nil {
			t.Fatal(err)
		}
	}
	e.waitCache(last)
	cancel()
	wg.Wait()
	// The answer matches a plain scan of the cache.
	for _, svc := range []string{"s0", "s1"} {
		eps, _ := e.srv.Endpoints(svc)
		snap, _ := e.srv.cache.Snapshot(keyInstances + svc + "-")
		if len(eps) != len(snap) {
			t.Fatalf("%s: %d endpoints, the cache holds %d instances", svc, len(eps), len(snap))
		}
	}
}

// seedDiscovery stores services × perService running instances (one
// network each) and starts a server's cache over them, without its
// controllers or HTTP API.
func seedDiscovery(b *testing.B, services, perService int) *Server {
	b.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	st, err := store.Open(ctx, store.Config{DataDir: b.TempDir()})
	if err != nil {
		cancel()
		b.Fatal(err)
	}
	var ws []store.Write
	flush := func() {
		if len(ws) > 0 {
			if _, err := st.Txn(ctx, ws...); err != nil {
				b.Fatal(err)
			}
			ws = ws[:0]
		}
	}
	for i := range services {
		name := fmt.Sprintf("svc%03d", i)
		ws = append(ws, store.Write{Key: keyServices + name, Expect: -1,
			Value: api.Service{Spec: api.ServiceSpec{Name: name, Meta: map[string]string{"team": "t"}}}})
		for j := range perService {
			if len(ws) >= 100 {
				flush() // etcd takes at most 128 operations in a transaction
			}
			id := fmt.Sprintf("%s-%04d", name, j)
			ws = append(ws, store.Write{Key: keyInstances + id, Expect: -1, Value: api.Instance{ID: id, Service: name,
				Generation: 1, Node: "n1", DesiredState: api.DesiredRunning, Status: api.InstanceStatus{State: api.InstanceRunning,
					Ports: []api.PortBinding{{Name: "http", Port: 80, Protocol: "tcp"}},
					VNICs: []api.VNIC{{Network: "default", Interface: "eth0", IP: fmt.Sprintf("10.%d.%d.%d", i, j/250, j%250+1)}}}}})
		}
	}
	flush()
	s := New(st, slog.New(slog.DiscardHandler), Options{NoDeployments: true})
	done := make(chan struct{})
	go func() {
		defer close(done)
		_ = s.cache.Run(ctx)
	}()
	b.Cleanup(func() {
		cancel()
		<-done
		_ = st.Close()
	})
	<-s.cache.Ready()
	return s
}

// BenchmarkDiscoveryLookup: one service's endpoints among 10,000 instances
// of 100 services, as the DNS source (Endpoints), GET /v1/discovery/NAME
// ?healthy=1 and a discovery watch get them; EndpointsAfterChange writes
// one instance (through etcd and the cache) before each lookup, ChangeOnly
// only writes.
func BenchmarkDiscoveryLookup(b *testing.B) {
	const services, per = 100, 100
	s := seedDiscovery(b, services, per)
	b.Run("Endpoints", func(b *testing.B) {
		for i := 0; b.Loop(); i++ {
			if eps, ok := s.Endpoints(fmt.Sprintf("svc%03d", i%services)); !ok || len(eps) != per {
				b.Fatalf("%d endpoints", len(eps))
			}
		}
	})
	b.Run("DiscoverHealthy", func(b *testing.B) {
		for i := 0; b.Loop(); i++ {
			if eps, _ := s.list(fmt.Sprintf("svc%03d", i%services), discoveryFilter{healthy: true}); len(eps) != per {
				b.Fatalf("%d endpoints", len(eps))
			}
		}
	})
	b.Run("WatchView", func(b *testing.B) {
		for i := 0; b.Loop(); i++ {
			if v, _ := s.filtered(fmt.Sprintf("svc%03d", i%services), discoveryFilter{healthy: true}); len(v.eps) != per {
				b.Fatalf("%d endpoints", len(v.eps))
			}
		}
	})
	// A change, then a lookup: ChangeOnly is the change's own cost (the
	// write through etcd into the cache) to subtract.
	for _, lookup := range []bool{false, true} {
		name := "ChangeOnly"
		if lookup {
			name = "EndpointsAfterChange"
		}
		b.Run(name, func(b *testing.B) {
			ctx := context.Background()
			in := api.Instance{ID: "svc000-0000", Service: "svc000", Generation: 1, Node: "n1", DesiredState: api.DesiredRunning,
				Status: api.InstanceStatus{State: api.InstanceRunning, VNICs: []api.VNIC{{Network: "default", Interface: "eth0", IP: "10.0.0.1"}}}}
			for i := 0; b.Loop(); i++ {
				in.Status.Restarts = i
				rev, err := s.st.Put(ctx, keyInstances+in.ID, in, -1)
				if err != nil {
					b.Fatal(err)
				}
				if err := s.cache.WaitFor(ctx, rev); err != nil {
					b.Fatal(err)
				}
				if !lookup {
					continue
				}
				if eps, _ := s.Endpoints("svc000"); len(eps) != per || eps[0].ID != in.ID {
					b.Fatalf("%d endpoints", len(eps))
				}
			}
		})
	}
}

// viewOf makes a view of eps as the index would.
func viewOf(eps ...api.Endpoint) *view {
	slices.SortFunc(eps, func(a, b api.Endpoint) int { return strings.Compare(endpointKey(a), endpointKey(b)) })
	v := newView(len(eps))
	for i, ep := range eps {
		v.eps[i], v.enc[i] = ep, encodeEndpoint(ep)
	}
	return v
}

// TestRenderDiff: the lines a watch step sends are what json.Encoder makes
// of the events the step is: puts of endpoints added or changed, in key
// order, deletes of those gone, in key order, and a bookmark.
func TestRenderDiff(t *testing.T) {
	a := api.Endpoint{Service: "web", ID: "a", Address: "10.0.0.1", Port: 80, Health: api.HealthPassing, External: true,
		Meta: map[string]string{"zone": "z1"}, Ports: map[string]int{"http": 80}}
	a2 := a
	a2.Meta = map[string]string{"zone": "z2"}
	b := api.Endpoint{Service: "web", ID: "b", Address: "10.0.0.2", Network: "n1", Node: "node-1", Health: api.HealthCritical}
	c := api.Endpoint{Service: "web", ID: "c<&>", Address: "fd00::1", Health: api.HealthWarning, Meta: map[string]string{"x": "<y>"}}
	type ev struct {
		typ string
		ep  api.Endpoint
	}
	tests := []struct {
		name      string
		prev, cur *view
		want      []ev
	}{
		{"from nothing", nil, viewOf(b, a, c), []ev{{api.EventPut, a}, {api.EventPut, b}, {api.EventPut, c}}},
		{"nothing to nothing", nil, emptyView, nil},
		{"unchanged", viewOf(a, b), viewOf(a, b), nil},
		{"one changed", viewOf(a, b), viewOf(a2, b), []ev{{api.EventPut, a2}}},
		{"added and gone", viewOf(a, b), viewOf(b, c), []ev{{api.EventPut, c}, {api.EventDelete, a}}},
		{"all gone", viewOf(c, a, b), emptyView, []ev{{api.EventDelete, a}, {api.EventDelete, b}, {api.EventDelete, c}}},
	}
	const rev = 42
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var want bytes.Buffer
			enc := json.NewEncoder(&want)
			for _, e := range tt.want {
				obj, _ := json.Marshal(e.ep)
				_ = enc.Encode(api.Event{Type: e.typ, Kind: "endpoint", Name: endpointKey(e.ep), Revision: rev, Object: obj})
			}
			_ = enc.Encode(api.Event{Type: api.EventBookmark, Revision: rev})
			got := tt.cur.linesFrom(tt.prev, rev)
			if string(got) != want.String() {
				t.Fatalf("lines\n%s\nwant\n%s", got, want.String())
			}
			// The same step again is the same bytes, rendered once.
			if again := tt.cur.linesFrom(tt.prev, rev); &again[0] != &got[0] {
				t.Fatal("the same step rendered twice")
			}
		})
	}
}

// TestWriteList: a discovery answer put together from the view's encodings
// is what writeJSON makes of the list.
func TestWriteList(t *testing.T) {
	a := api.Endpoint{Service: "web", ID: "a", Address: "10.0.0.1", Port: 80, Health: api.HealthPassing, External: true,
		Meta: map[string]string{"zone": "z1"}, Ports: map[string]int{"http": 80}}
	b := api.Endpoint{Service: "web", ID: "b", Address: "10.0.0.2", Network: "n1", Health: api.HealthCritical}
	for _, v := range []*view{emptyView, viewOf(a), viewOf(a, b)} {
		got, want := httptest.NewRecorder(), httptest.NewRecorder()
		writeList(got, v, 7)
		items := v.eps
		if items == nil {
			items = []api.Endpoint{}
		}
		writeJSON(want, http.StatusOK, api.List[api.Endpoint]{Items: items, Revision: 7})
		if got.Body.String() != want.Body.String() || got.Code != want.Code ||
			got.Header().Get("Content-Type") != want.Header().Get("Content-Type") {
			t.Fatalf("answer %d %q\n%s\nwant %d %q\n%s", got.Code, got.Header(), got.Body, want.Code, want.Header(), want.Body)
		}
		if cl := got.Header().Get("Content-Length"); cl != fmt.Sprint(got.Body.Len()) {
			t.Fatalf("Content-Length %s for %d bytes", cl, got.Body.Len())
		}
	}
}

// TestDiscoveryAnswersFollowChanges: the cached views, answers and watch
// lines are right after every change, for several filters at once: GET
// answers the new set at once, and every watch stream (two per filter)
// reaches it.
func TestDiscoveryAnswersFollowChanges(t *testing.T) {
	e := startEnv(t)
	ctx := e.ctx
	filters := []struct {
		query string
		f     discoveryFilter
	}{
		{"", discoveryFilter{}},
		{"?healthy=1", discoveryFilter{healthy: true}},
		{"?meta=zone:a", discoveryFilter{meta: map[string]string{"zone": "a"}}},
		{"?healthy=1&meta=zone:a", discoveryFilter{healthy: true, meta: map[string]string{"zone": "a"}}},
		{"?network=n1", discoveryFilter{network: "n1"}},
	}
	type stream struct {
		query string
		f     discoveryFilter
		mu    sync.Mutex
		state map[string]api.Endpoint
		rev   int64
	}
	var streams []*stream
	var wg sync.WaitGroup
	defer wg.Wait()
	for _, fl := range filters {
		for range 2 {
			st := &stream{query: fl.query, f: fl.f, state: map[string]api.Endpoint{}}
			streams = append(streams, st)
			w, err := e.c.Watch(ctx, "/v1/discovery/web"+fl.query, 0)
			if err != nil {
				t.Fatal(err)
			}
			defer w.Close()
			wg.Go(func() {
				for {
					ev, err := w.Next()
					if err != nil {
						return
					}
					st.mu.Lock()
					switch ev.Type {
					case api.EventPut:
						var ep api.Endpoint
						if err := json.Unmarshal(ev.Object, &ep); err != nil {
							t.Errorf("event object: %v", err)
						}
						st.state[ev.Name] = ep
					case api.EventDelete:
						delete(st.state, ev.Name)
					case api.EventBookmark:
						st.rev = ev.Revision
					}
					st.mu.Unlock()
				}
			})
		}
	}
	want := map[string]api.Endpoint{} // every endpoint of web
	reg := func(id, addr, health, zone string) int64 {
		t.Helper()
		r, err := e.c.Register(ctx, "web", id, api.RegistrationSpec{Address: addr, Port: 80, Health: health,
			Meta: map[string]string{"zone": zone}, Ports: map[string]int{"http": 80}})
		if err != nil {
			t.Fatal(err)
		}
		want[id+"@"] = api.Endpoint{Service: "web", ID: id, Address: addr, Port: 80, Health: r.Health,
			Meta: map[string]string{"zone": zone}, Ports: map[string]int{"http": 80}, External: true}
		return r.Revision
	}
	inst := func(id, ip, state string) int64 {
		t.Helper()
		in := api.Instance{ID: id, Service: "web", Generation: 1, Node: "n1", DesiredState: api.DesiredRunning,
			Status: api.InstanceStatus{State: state, VNICs: []api.VNIC{{Network: "n1", Interface: "eth0", IP: ip}}}}
		rev, err := e.st.Put(ctx, keyInstances+id, in, -1)
		if err != nil {
			t.Fatal(err)
		}
		for _, ep := range instanceEndpoints(in, nil) {
			want[endpointKey(ep)] = ep
		}
		return rev
	}
	steps := []struct {
		name string
		do   func() int64
	}{
		{"first registration", func() int64 { return reg("a", "10.0.0.1", "", "a") }},
		{"second, other zone", func() int64 { return reg("b", "10.0.0.2", "", "b") }},
		{"an instance", func() int64 { return inst("web-1", "10.1.0.1", api.InstanceRunning) }},
		{"first moves zone", func() int64 { return reg("a", "10.0.0.1", "", "b") }},
		{"first back, critical", func() int64 { return reg("a", "10.0.0.1", api.HealthCritical, "a") }},
		{"second in zone a", func() int64 { return reg("b", "10.0.0.2", api.HealthWarning, "a") }},
		{"the instance fails", func() int64 { return inst("web-1", "10.1.0.1", api.InstanceFailed) }},
		{"first deregistered", func() int64 {
			if err := e.c.Deregister(ctx, "web", "a"); err != nil {
				t.Fatal(err)
			}
			delete(want, "a@")
			_, rev, err := e.st.List(ctx, keyRegistrations+"web/")
			if err != nil {
				t.Fatal(err)
			}
			return rev
		}},
		{"the instance removed", func() int64 {
			rev, err := e.st.Delete(ctx, keyInstances+"web-1", -1)
			if err != nil {
				t.Fatal(err)
			}
			delete(want, "web-1@n1")
			return rev
		}},
	}
	for _, s := range steps {
		rev := s.do()
		e.waitCache(rev)
		for _, fl := range filters {
			exp := map[string]api.Endpoint{}
			for k, ep := range want {
				if fl.f.keep(ep) {
					exp[k] = ep
				}
			}
			var l api.List[api.Endpoint]
			e.rawInto("GET", "/v1/discovery/web"+fl.query, "", http.StatusOK, &l)
			got := map[string]api.Endpoint{}
			for _, ep := range l.Items {
				got[endpointKey(ep)] = ep
			}
			if !reflect.DeepEqual(got, exp) {
				t.Fatalf("%s: GET %s = %+v, want %+v", s.name, fl.query, got, exp)
			}
			if !slices.IsSortedFunc(l.Items, func(a, b api.Endpoint) int { return strings.Compare(endpointKey(a), endpointKey(b)) }) {
				t.Fatalf("%s: GET %s not sorted by key", s.name, fl.query)
			}
		}
		for _, st := range streams {
			exp := map[string]api.Endpoint{}
			for k, ep := range want {
				if st.f.keep(ep) {
					exp[k] = ep
				}
			}
			eventually(t, 5*time.Second, s.name+": stream "+st.query, func() bool {
				st.mu.Lock()
				defer st.mu.Unlock()
				return st.rev >= rev && reflect.DeepEqual(st.state, exp)
			})
		}
	}
}

// TestViewReusesEncodings: a new view of a service encodes only the
// endpoints that changed, and views of filters that keep everything are
// the view of every endpoint.
func TestViewReusesEncodings(t *testing.T) {
	e := startEnv(t)
	var last int64
	for i := range 5 {
		r, err := e.c.Register(e.ctx, "web", fmt.Sprintf("r%d", i), api.RegistrationSpec{Address: fmt.Sprintf("10.0.0.%d", i+1), Port: 80})
		if err != nil {
			t.Fatal(err)
		}
		last = r.Revision
	}
	e.waitCache(last)
	v1, _ := e.srv.filtered("web", discoveryFilter{})
	if h, _ := e.srv.filtered("web", discoveryFilter{healthy: true}); h != v1 {
		t.Fatal("a filter keeping every endpoint made a view of its own")
	}
	r, err := e.c.Register(e.ctx, "web", "r2", api.RegistrationSpec{Address: "10.0.0.99", Port: 80})
	if err != nil {
		t.Fatal(err)
	}
	e.waitCache(r.Revision)
	v2, _ := e.srv.filtered("web", discoveryFilter{})
	if v2 == v1 || len(v2.enc) != 5 {
		t.Fatalf("after a change: same view %v, %d endpoints", v2 == v1, len(v2.enc))
	}
	for i := range v2.enc {
		same := &v2.enc[i][0] == &v1.enc[i][0]
		if changed := v2.eps[i].ID == "r2"; same == changed {
			t.Fatalf("%s: encoding reused %v, changed %v", v2.eps[i].ID, same, changed)
		}
		if !bytes.Equal(v2.enc[i], encodeEndpoint(v2.eps[i])) {
			t.Fatalf("%s: encoding %s of %+v", v2.eps[i].ID, v2.enc[i], v2.eps[i])
		}
	}
}

// TestRegistrationMapsInterned: registrations with equal ports and
// metadata share the maps, counted, and none is left when they are gone.
func TestRegistrationMapsInterned(t *testing.T) {
	e := startEnv(t)
	spec := api.RegistrationSpec{Address: "10.0.0.1", Port: 80, Ports: map[string]int{"http": 80}, Meta: map[string]string{"zone": "a"}}
	var last int64
	for i := range 10 {
		r, err := e.c.Register(e.ctx, fmt.Sprintf("s%d", i%2), fmt.Sprintf("r%d", i), spec)
		if err != nil {
			t.Fatal(err)
		}
		last = r.Revision
	}
	e.waitCache(last)
	x := e.srv.index()
	eps0, _, _, _ := x.lookup(e.srv.cache, "s0")
	eps1, _, _, _ := x.lookup(e.srv.cache, "s1")
	if len(eps0) != 5 || len(eps1) != 5 {
		t.Fatalf("%d and %d endpoints", len(eps0), len(eps1))
	}
	x.mu.RLock()
	np, nm := len(x.ports), len(x.meta)
	var refs int
	for _, in := range x.meta {
		refs = in.refs
	}
	x.mu.RUnlock()
	if np != 1 || nm != 1 || refs != 10 {
		t.Fatalf("interned %d ports maps, %d meta maps (%d users), want 1, 1 (10)", np, nm, refs)
	}
	if reflect.ValueOf(eps0[0].Meta).UnsafePointer() != reflect.ValueOf(eps1[4].Meta).UnsafePointer() {
		t.Fatal("equal metadata not shared")
	}
	for i := range 10 {
		if err := e.c.Deregister(e.ctx, fmt.Sprintf("s%d", i%2), fmt.Sprintf("r%d", i)); err != nil {
			t.Fatal(err)
		}
	}
	eventually(t, 5*time.Second, "every registration gone from the index", func() bool {
		eps, _, _, _ := x.lookup(e.srv.cache, "s0")
		more, _, _, _ := x.lookup(e.srv.cache, "s1")
		return len(eps) == 0 && len(more) == 0
	})
	x.mu.RLock()
	defer x.mu.RUnlock()
	if len(x.ports) != 0 || len(x.meta) != 0 {
		t.Fatalf("%d ports and %d meta maps left interned", len(x.ports), len(x.meta))
	}
}

// TestCompareKeys: comparing endpoints' keys without making them orders
// them as their keys do, ids that are prefixes of others included.
func TestCompareKeys(t *testing.T) {
	ids := []string{"", "a", "a-b", "a.b", "a_b", "ab", "a0", "A", "b", "web-1", "web-10", "web-1-x", "a@", "a@n", "a@n1", "a@@"}
	nets := []string{"", "n", "n1", "default", "a-b"}
	var eps []api.Endpoint
	for _, id := range ids {
		for _, n := range nets {
			eps = append(eps, api.Endpoint{ID: id, Network: n})
		}
	}
	for _, a := range eps {
		for _, b := range eps {
			if got, want := compareKeys(&a, &b), strings.Compare(endpointKey(a), endpointKey(b)); got != want {
				t.Fatalf("compareKeys(%q, %q) = %d, want %d", endpointKey(a), endpointKey(b), got, want)
			}
		}
	}
}

// BenchmarkDiscoverHandler: GET /v1/discovery/NAME?healthy=1 of a service
// of 100 endpoints among 10,000, through the handler (no network).
func BenchmarkDiscoverHandler(b *testing.B) {
	const services, per = 100, 100
	s := seedDiscovery(b, services, per)
	h := s.Handler()
	reqs := make([]*http.Request, services)
	for i := range reqs {
		reqs[i] = httptest.NewRequest(http.MethodGet, fmt.Sprintf("/v1/discovery/svc%03d?healthy=1", i), nil)
	}
	w := &nopWriter{h: http.Header{}}
	b.ReportAllocs()
	for i := 0; b.Loop(); i++ {
		w.n, w.status = 0, 0
		h.ServeHTTP(w, reqs[i%services])
		if w.status != http.StatusOK || w.n < 100*per {
			b.Fatalf("status %d, %d bytes", w.status, w.n)
		}
	}
}

// nopWriter is a ResponseWriter that counts what is written.
type nopWriter struct {
	h      http.Header
	status int
	n      int
}

func (w *nopWriter) Header() http.Header { return w.h }
func (w *nopWriter) WriteHeader(s int)   { w.status = s }
func (w *nopWriter) Write(p []byte) (int, error) {
	if w.status == 0 {
		w.status = http.StatusOK
	}
	w.n += len(p)
	return len(p), nil
}

// BenchmarkIndexChange: one registration of a service of 100 changes, and
// the service is looked up again (the index's part of every change: decode,
// sort, encode what changed), without etcd.
func BenchmarkIndexChange(b *testing.B) {
	x := &registryIndex{built: true, services: map[string]*serviceIndex{}, owner: map[string]string{}}
	reg := func(i, seq int) cache.Event {
		r := api.Registration{Service: "svc", ID: fmt.Sprintf("r-%03d", i), RegistrationSpec: api.RegistrationSpec{
			Address: fmt.Sprintf("10.0.0.%d", i+1), Port: 8080, Ports: map[string]int{"http": 8080},
			Meta: map[string]string{"zone": "a", "seq": fmt.Sprint(seq)}, Health: api.HealthPassing}}
		v, _ := json.Marshal(r)
		return cache.Event{Key: regKey("svc", r.ID), Value: v, Revision: int64(seq)}
	}
	for i := range 100 {
		x.apply(reg(i, i+1))
	}
	evs := make([]cache.Event, 100)
	for i := range evs {
		evs[i] = reg(i, 1000+i)
	}
	b.ReportAllocs()
	for i := 0; b.Loop(); i++ {
		ev := evs[i%100]
		ev.Revision = int64(1000 + i)
		x.mu.Lock()
		x.apply(ev)
		x.mu.Unlock()
		x.mu.RLock()
		s, _ := x.current("svc")
		x.mu.RUnlock()
		if len(s.all().eps) != 100 {
			b.Fatal(len(s.all().eps))
		}
	}
}

// BenchmarkWatchFanOut: a change of a service reaching 1,000 discovery
// watch streams of it (GET ?healthy=1&watch=1 over loopback HTTP, clients
// that only look for the change in the lines): the time from the write
// sent until every stream has it, per change; p99-ms is over streams.
func BenchmarkWatchFanOut(b *testing.B) {
	const streams = 1000
	s := seedDiscovery(b, 10, 100)
	ts := httptest.NewServer(s.Handler())
	defer ts.Close()
	tr := &http.Transport{MaxIdleConnsPerHost: streams, MaxConnsPerHost: 0}
	defer tr.CloseIdleConnections()
	hc := &http.Client{Transport: tr}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var (
		mu      sync.Mutex
		want    string
		seen    int
		all     = make(chan struct{}, 1)
		started = time.Now()
		lat     []time.Duration
		ready   sync.WaitGroup
		wg      sync.WaitGroup
	)
	for range streams {
		ready.Add(1)
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, ts.URL+"/v1/discovery/svc000?healthy=1&watch=1", nil)
		resp, err := hc.Do(req)
		if err != nil {
			b.Fatal(err)
		}
		wg.Go(func() {
			defer resp.Body.Close()
			rd := bufio.NewReaderSize(resp.Body, 64<<10)
			synced := false
			for {
				line, err := rd.ReadSlice('\n')
				if err != nil {
					return
				}
				if !synced && bytes.HasPrefix(line, []byte(`{"type":"bookmark"`)) {
					synced = true
					ready.Done()
					continue
				}
				mu.Lock()
				if want != "" && bytes.Contains(line, []byte(want)) {
					lat = append(lat, time.Since(started))
					if seen++; seen == streams {
						all <- struct{}{}
					}
				}
				mu.Unlock()
			}
		})
	}
	ready.Wait()
	in := api.Instance{ID: "svc000-0000", Service: "svc000", Generation: 1, Node: "n1", DesiredState: api.DesiredRunning,
		Status: api.InstanceStatus{State: api.InstanceRunning, VNICs: []api.VNIC{{Network: "default", Interface: "eth0"}}}}
	var p99 []float64
	for i := 0; b.Loop(); i++ {
		ip := fmt.Sprintf("10.255.%d.%d", i/250%250, i%250+1)
		in.Status.VNICs[0].IP = ip
		mu.Lock()
		want, seen, lat, started = `"address":"`+ip+`"`, 0, lat[:0], time.Now()
		mu.Unlock()
		if _, err := s.st.Put(ctx, keyInstances+in.ID, in, -1); err != nil {
			b.Fatal(err)
		}
		select {
		case <-all:
		case <-time.After(10 * time.Second):
			b.Fatalf("%d of %d streams got the change", seen, streams)
		}
		mu.Lock()
		slices.Sort(lat)
		p99 = append(p99, float64(lat[len(lat)*99/100])/1e6)
		mu.Unlock()
	}
	slices.Sort(p99)
	b.ReportMetric(p99[len(p99)/2], "p99-ms")
	cancel()
	ts.CloseClientConnections()
	wg.Wait()
}
