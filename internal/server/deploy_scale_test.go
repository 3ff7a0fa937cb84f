package server

import (
	"context"
	"encoding/json"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/berth-dev/berth/api"
	"github.com/berth-dev/berth/client"
	"github.com/berth-dev/berth/internal/store"
)

func TestWriteBatchFallsBackPerWrite(t *testing.T) {
	e := startEnvWith(t, Options{}, nil)
	ctx := context.Background()
	revs := map[string]int64{}
	for _, k := range []string{"a", "b", "c"} {
		rev, err := e.st.Put(ctx, "/test/"+k, map[string]string{"v": "0"}, 0)
		if err != nil {
			t.Fatal(err)
		}
		revs[k] = rev
	}
	undone := map[string]bool{}
	b := newWriteBatch(e.st)
	b.put("/test/a", map[string]string{"v": "1"}, revs["a"], func() { undone["a"] = true })
	b.put("/test/b", map[string]string{"v": "1"}, revs["b"]-1, func() { undone["b"] = true }) // stale guard
	b.del("/test/c", revs["c"], func() { undone["c"] = true })
	b.put("/test/d", map[string]string{"v": "1"}, 0, func() { undone["d"] = true })
	b.put("/test/a", map[string]string{"v": "2"}, revs["a"], nil) // same key: replaces the value
	rev, err := b.flush(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if rev == 0 || len(undone) != 1 || !undone["b"] {
		t.Fatalf("rev %d, undone %v: want only b undone", rev, undone)
	}
	var v map[string]string
	if _, err := e.st.Get(ctx, "/test/a", &v); err != nil || v["v"] != "2" {
		t.Fatalf("a = %v, %v", v, err)
	}
	if _, err := e.st.Get(ctx, "/test/b", &v); err != nil || v["v"] != "0" {
		t.Fatalf("b = %v, %v: a write with a stale guard landed", v, err)
	}
	if _, err := e.st.Get(ctx, "/test/c", &v); err == nil {
		t.Fatal("c not deleted")
	}
	if _, err := e.st.Get(ctx, "/test/d", &v); err != nil {
		t.Fatal("d not created:", err)
	}
	// More writes than one transaction holds.
	b = newWriteBatch(e.st)
	for i := range 3*txnOps + 5 {
		b.put("/test/many/"+string(rune('a'+i%26))+strings.Repeat("x", i/26), i, 0, func() { t.Errorf("write %d undone", i) })
	}
	if _, err := b.flush(ctx); err != nil {
		t.Fatal(err)
	}
	if n, _ := e.st.Count(ctx, "/test/many/"); n != 3*txnOps+5 {
		t.Fatalf("%d keys written, want %d", n, 3*txnOps+5)
	}
}

func instanceEvent(t *testing.T, in api.Instance, rev int64) store.Event {
	t.Helper()
	b, err := json.Marshal(in)
	if err != nil {
		t.Fatal(err)
	}
	return store.Event{Key: keyInstances + in.ID, Value: b, Revision: rev}
}

func TestDeployStateAccounting(t *testing.T) {
	node := api.Node{Name: "n1", NodeRegistration: api.NodeRegistration{Allocatable: api.Resources{CPU: 4000, Memory: 4 << 30}},
		Status: api.NodeStatus{State: api.NodeReady}}
	nb, _ := json.Marshal(node)
	svc := api.Service{Name: "web", Spec: api.ServiceSpec{Name: "web", Ports: []api.PortSpec{{Name: "http", Port: 80, HostPort: 8080}}}, Generation: 1}
	sb, _ := json.Marshal(svc)
	d := newDeployState()
	d.load([]store.Event{{Key: keyNodes + "n1", Value: nb, Revision: 1}, {Key: keyServices + "web", Value: sb, Revision: 2}})
	usage := func() api.Resources {
		used, _, _ := d.snap.Usage("n1")
		return used
	}
	in := api.Instance{ID: "web-1", Service: "web", Generation: 1, Node: "n1", DesiredState: api.DesiredRunning,
		Resources: api.ResourceSpec{CPU: 500, Memory: 1 << 30}}
	steps := []struct {
		name string
		ev   store.Event
		want api.Resources
	}{
		{"placed", instanceEvent(t, in, 3), api.Resources{CPU: 500, Memory: 1 << 30}},
		{"same again (status change)", instanceEvent(t, func() api.Instance {
			x := in
			x.Status.State = api.InstanceRunning
			return x
		}(), 4), api.Resources{CPU: 500, Memory: 1 << 30}},
		{"resized", instanceEvent(t, func() api.Instance {
			x := in
			x.Resources.Memory = 2 << 30
			return x
		}(), 5), api.Resources{CPU: 500, Memory: 2 << 30}},
		{"stopped on request", instanceEvent(t, func() api.Instance {
			x := in
			x.DesiredState = api.DesiredStopped
			return x
		}(), 6), api.Resources{}},
		{"desired running again", instanceEvent(t, in, 7), api.Resources{CPU: 500, Memory: 1 << 30}},
		{"deleted", store.Event{Key: keyInstances + in.ID, Delete: true, Revision: 8}, api.Resources{}},
	}
	for _, s := range steps {
		d.apply(s.ev)
		if got := usage(); got != s.want {
			t.Fatalf("%s: used %+v, want %+v", s.name, got, s.want)
		}
		if _, ok := d.dirty["web"]; !ok {
			t.Fatalf("%s: service not marked dirty", s.name)
		}
	}
	// The host port of the spec is held before the instance runs: a
	// second instance does not fit on the node.
	d.apply(instanceEvent(t, in, 9))
	req := d.acct["web-1"].req
	if len(req.HostPorts) != 1 || req.HostPorts[0] != 8080 {
		t.Fatalf("reservation %+v does not hold host port 8080", req)
	}
	if res, _ := d.snap.Place(req); res.Node != "" {
		t.Fatalf("a second instance with host port 8080 was placed on %s", res.Node)
	}
	// A rebuild gives the same usage.
	before := usage()
	d.rebuild()
	if got := usage(); got != before {
		t.Fatalf("after rebuild used %+v, want %+v", got, before)
	}
}

// TestDeploymentsMoveOnResize: new resources that no longer fit the node
// move the instance to a node where they do; ones that fit stay in place.
func TestDeploymentsMoveOnResize(t *testing.T) {
	e := startEnvWith(t, Options{deployments: true}, nil)
	c := e.c
	ctx := context.Background()
	reg := func(name string, mem api.Bytes) {
		t.Helper()
		r := api.NodeRegistration{Address: "127.0.0.1", Capacity: api.Resources{CPU: 4000, Memory: mem},
			Allocatable: api.Resources{CPU: 4000, Memory: mem}, TTL: api.Duration(time.Minute)}
		if _, err := c.RegisterNode(ctx, name, r); err != nil {
			t.Fatal(err)
		}
	}
	// Plays the agents: reports placed instances running.
	agentCtx, stopAgent := context.WithCancel(ctx)
	defer stopAgent()
	go func() {
		for agentCtx.Err() == nil {
			l, _ := c.ListInstances(agentCtx, client.InstanceFilter{Service: "web"})
			for _, in := range l.Items {
				if in.Status.State == api.InstancePending && in.Node != "" {
					_, _ = c.PutInstanceStatus(agentCtx, in.ID, api.InstanceStatus{State: api.InstanceRunning, StartedAt: time.Now()})
				}
			}
			time.Sleep(20 * time.Millisecond)
		}
	}()
	waitOne := func(what string, ok func(api.Instance) bool) api.Instance {
		t.Helper()
		deadline := time.Now().Add(15 * time.Second)
		var items []api.Instance
		for time.Now().Before(deadline) {
			l, err := c.ListInstances(ctx, client.InstanceFilter{Service: "web"})
			if err != nil {
				t.Fatal(err)
			}
			items = l.Items
			if len(items) == 1 && ok(items[0]) && items[0].Status.State == api.InstanceRunning {
				return items[0]
			}
			time.Sleep(20 * time.Millisecond)
		}
		js, _ := json.Marshal(items)
		t.Fatalf("%s: got %s", what, js)
		return api.Instance{}
	}
	reg("small", 1<<30)
	spec := `{"name":"web","image":"busybox:1","replicas":1,"resources":{"memory":"%s"},"update":{"minHealthyTime":"0s"}}`
	apply := func(mem string) {
		t.Helper()
		if _, err := c.ApplyServiceJSON(ctx, []byte(strings.Replace(spec, "%s", mem, 1))); err != nil {
			t.Fatal(err)
		}
	}
	apply("512Mi")
	first := waitOne("placed on the small node", func(in api.Instance) bool { return in.Node == "small" })
	reg("big", 4<<30)
	apply("768Mi") // still fits: in place
	same := waitOne("resized in place", func(in api.Instance) bool { return in.Resources.Memory == 768<<20 })
	if same.ID != first.ID || same.Node != "small" {
		t.Fatalf("a resize that fits replaced the instance: %s on %s", same.ID, same.Node)
	}
	apply("2Gi") // does not fit the small node any more: moves
	moved := waitOne("moved to the big node", func(in api.Instance) bool { return in.Node == "big" && in.Resources.Memory == 2<<30 })
	if moved.ID == first.ID {
		t.Fatal("the instance was not replaced")
	}
}

func TestInstanceStatusBatch(t *testing.T) {
	e := startEnvWith(t, Options{}, nil)
	ctx := context.Background()
	for _, id := range []string{"web-1", "web-2"} {
		in := api.Instance{ID: id, Service: "web", Generation: 1, Node: "n1", DesiredState: api.DesiredRunning,
			Status: api.InstanceStatus{State: api.InstancePending}}
		if _, err := e.st.Put(ctx, keyInstances+id, in, 0); err != nil {
			t.Fatal(err)
		}
	}
	// Invalid items are refused with their field, and nothing changes.
	_, err := e.c.PutInstanceStatuses(ctx, []api.InstanceStatusUpdate{
		{ID: "web-1", Status: api.InstanceStatus{State: api.InstanceRunning}},
		{ID: "web-2", Status: api.InstanceStatus{State: "dancing"}},
		{ID: "", Status: api.InstanceStatus{State: api.InstanceRunning}},
	})
	var ae *api.Error
	if !errors.As(err, &ae) || ae.Status != 400 {
		t.Fatalf("want 400, got %v", err)
	}
	fields := map[string]bool{}
	for _, f := range ae.Fields {
		fields[f.Field] = true
	}
	if !fields["items[1].status.state"] || !fields["items[2].id"] || len(fields) != 2 {
		t.Fatalf("fields %v", ae.Fields)
	}
	if in, _ := e.c.GetInstance(ctx, "web-1"); in.Status.State != api.InstancePending {
		t.Fatalf("a refused batch changed web-1: %s", in.Status.State)
	}
	// Good items are recorded; an unknown instance is reported per item.
	res, err := e.c.PutInstanceStatuses(ctx, []api.InstanceStatusUpdate{
		{ID: "web-1", Status: api.InstanceStatus{State: api.InstanceRunning}},
		{ID: "web-9", Status: api.InstanceStatus{State: api.InstanceRunning}},
		{ID: "web-2", Status: api.InstanceStatus{State: api.InstanceExited}},
	})
	if err != nil {
		t.Fatal(err)
	}
	if len(res.Results) != 3 || res.Results[0].Error != "" || res.Results[2].Error != "" || !strings.Contains(res.Results[1].Error, "not found") {
		t.Fatalf("results %+v", res.Results)
	}
	for id, want := range map[string]string{"web-1": api.InstanceRunning, "web-2": api.InstanceExited} {
		if in, err := e.c.GetInstance(ctx, id); err != nil || in.Status.State != want {
			t.Fatalf("%s: %s, %v; want %s", id, in.Status.State, err, want)
		}
	}
}
