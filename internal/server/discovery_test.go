package server

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"testing"
	"time"

	"github.com/berth-dev/berth/api"
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
