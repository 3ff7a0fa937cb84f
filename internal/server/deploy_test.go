package server

import (
	"context"
	"encoding/json"
	"fmt"
	"sort"
	"testing"
	"time"

	"github.com/berth-dev/berth/api"
	"github.com/berth-dev/berth/client"
)

func TestDeploymentsKeepReplicas(t *testing.T) {
	e := startEnvWith(t, Options{deployments: true}, nil)
	c := e.c
	ctx := context.Background()
	reg := api.NodeRegistration{Address: "127.0.0.1", Capacity: api.Resources{CPU: 2000, Memory: 1 << 30},
		Allocatable: api.Resources{CPU: 2000, Memory: 1 << 30}, TTL: api.Duration(time.Minute)}
	for _, n := range []string{"n1", "n2"} {
		if _, err := c.RegisterNode(ctx, n, reg); err != nil {
			t.Fatal(err)
		}
	}
	apply := func(js string) api.Service {
		t.Helper()
		res, err := c.ApplyServiceJSON(ctx, []byte(js))
		if err != nil {
			t.Fatal(err)
		}
		return res.Service
	}
	waitN := func(n int, gen int64) []api.Instance {
		t.Helper()
		var items []api.Instance
		deadline := time.Now().Add(10 * time.Second)
		for time.Now().Before(deadline) {
			l, err := c.ListInstances(ctx, client.InstanceFilter{Service: "web"})
			if err != nil {
				t.Fatal(err)
			}
			items = l.Items
			ok := len(items) == n
			for _, in := range items {
				ok = ok && in.Generation == gen && in.Node != ""
			}
			if ok {
				sort.Slice(items, func(i, j int) bool { return items[i].ID < items[j].ID })
				return items
			}
			time.Sleep(20 * time.Millisecond)
		}
		js, _ := json.Marshal(items)
		t.Fatalf("want %d placed instances of generation %d, got %s", n, gen, js)
		return nil
	}
	svc := apply(`{"name":"web","image":"busybox:1","replicas":3,"resources":{"memory":"32Mi"}}`)
	three := waitN(3, svc.Generation)
	perNode := map[string]int{}
	for _, in := range three {
		perNode[in.Node]++
	}
	if perNode["n1"] == 0 || perNode["n2"] == 0 {
		t.Fatalf("instances not spread over the two nodes: %v", perNode)
	}
	// Scale down removes the newest.
	svc = apply(`{"name":"web","image":"busybox:1","replicas":1,"resources":{"memory":"32Mi"}}`)
	one := waitN(1, svc.Generation)
	// A change of resources alone is taken in place: same instance.
	svc = apply(`{"name":"web","image":"busybox:1","replicas":1,"resources":{"memory":"64Mi"}}`)
	same := waitN(1, svc.Generation)
	if same[0].ID != one[0].ID || same[0].Resources.Memory != 64<<20 {
		t.Fatalf("resource change replaced the instance: %+v -> %+v", one[0], same[0])
	}
	// Any other change replaces it, by a rollout gated on the new instance
	// being healthy: this test plays the agent and reports it running.
	svc = apply(`{"name":"web","image":"busybox:2","replicas":1,"resources":{"memory":"64Mi"}}`)
	stopAgent := make(chan struct{})
	go func() {
		for {
			select {
			case <-stopAgent:
				return
			case <-time.After(20 * time.Millisecond):
			}
			l, _ := c.ListInstances(ctx, client.InstanceFilter{Service: "web"})
			for _, in := range l.Items {
				if in.Status.State == api.InstancePending && in.Node != "" {
					_, _ = c.PutInstanceStatus(ctx, in.ID, api.InstanceStatus{State: api.InstanceRunning})
				}
			}
		}
	}()
	defer close(stopAgent)
	repl := waitN(1, svc.Generation)
	if repl[0].ID == one[0].ID {
		t.Fatal("an image change should replace the instance")
	}
	// A stopped instance is not counted: a replacement comes.
	if _, err := c.StopInstance(ctx, repl[0].ID, time.Second); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		l, _ := c.ListInstances(ctx, client.InstanceFilter{Service: "web"})
		if len(l.Items) == 2 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no replacement for a stopped instance: %d instances", len(l.Items))
		}
		time.Sleep(20 * time.Millisecond)
	}
	// Deleting the service deletes its instances.
	if err := c.DeleteService(ctx, "web"); err != nil {
		t.Fatal(err)
	}
	deadline = time.Now().Add(10 * time.Second)
	for {
		l, _ := c.ListInstances(ctx, client.InstanceFilter{Service: "web"})
		if len(l.Items) == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal(fmt.Sprint("instances left after the service was deleted: ", len(l.Items)))
		}
		time.Sleep(20 * time.Millisecond)
	}
}
