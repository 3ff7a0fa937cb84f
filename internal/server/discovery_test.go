package server

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/berth-dev/berth/api"
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
		"gone": {exists: true, eps: []api.Endpoint{{ID: "old"}}}}, owner: map[string]string{}}
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
			if v, _ := s.view(fmt.Sprintf("svc%03d", i%services), discoveryFilter{healthy: true}); len(v) != per {
				b.Fatalf("%d endpoints", len(v))
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
