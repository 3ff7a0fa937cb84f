package simulate

import (
	"context"
	"io"
	"log/slog"
	"net/http/httptest"
	"sync"
	"testing"
	"time"

	"github.com/berth-dev/berth/api"
	"github.com/berth-dev/berth/client"
	"github.com/berth-dev/berth/internal/server"
	"github.com/berth-dev/berth/internal/store"
)

// TestSimulatedNodes: simulated nodes register, get instances placed on
// them and report them running; stopping the simulation takes them down.
func TestSimulatedNodes(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	st, err := store.Open(ctx, store.Config{DataDir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	srv := server.New(st, log, server.Options{ID: "sim-test"})
	ts := httptest.NewServer(srv.Handler())
	defer ts.Close()
	var wg sync.WaitGroup
	defer wg.Wait()
	defer cancel()
	wg.Go(func() { _ = srv.Run(ctx) })
	c, err := client.New(ts.URL)
	if err != nil {
		t.Fatal(err)
	}
	if err := c.WaitReady(ctx, 10*time.Second); err != nil {
		t.Fatal(err)
	}
	sim, err := New(c, Config{Nodes: 20, Prefix: "s-", Seed: 1}, log)
	if err != nil {
		t.Fatal(err)
	}
	simCtx, stopSim := context.WithCancel(ctx)
	ready := make(chan struct{})
	simDone := make(chan error, 1)
	go func() { simDone <- sim.Run(simCtx, func() { close(ready) }) }()
	select {
	case <-ready:
	case err := <-simDone:
		t.Fatal(err)
	}
	nodes, err := c.ListNodes(ctx)
	if err != nil || len(nodes.Items) != 20 {
		t.Fatalf("nodes: %d, %v", len(nodes.Items), err)
	}
	for _, n := range nodes.Items {
		if n.Status.State != api.NodeReady || n.Labels["simulated"] != "true" || n.Allocatable.CPU <= 0 {
			t.Fatalf("node %+v", n)
		}
	}
	replicas := 100
	if _, err := c.ApplyService(ctx, api.ServiceSpec{Name: "web", Image: "x:1", Replicas: &replicas,
		Resources: api.ResourceSpec{CPU: 100, Memory: 64 << 20}}); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(20 * time.Second)
	for {
		svc, err := c.GetService(ctx, "web")
		if err == nil && svc.Status.Running == replicas && svc.Status.Healthy == replicas {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("not all running: %+v %v", svc.Status, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
	stopSim()
	if err := <-simDone; err != nil {
		t.Fatal(err)
	}
	nodes, _ = c.ListNodes(ctx)
	for _, n := range nodes.Items {
		if n.Status.State != api.NodeDown {
			t.Fatalf("node %s is %s after the simulation stopped", n.Name, n.Status.State)
		}
	}
}

func TestNewRefusesNoNodes(t *testing.T) {
	if _, err := New(nil, Config{}, slog.Default()); err == nil {
		t.Fatal("want an error for 0 nodes")
	}
}
