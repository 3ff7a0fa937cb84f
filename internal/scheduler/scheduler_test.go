package scheduler

import (
	"fmt"
	"math/rand/v2"
	"slices"
	"strings"
	"testing"

	"github.com/berth-dev/berth/api"
)

const mi = api.Bytes(1 << 20)

// propertySeeds is the number of random clusters TestProperties runs.
const propertySeeds = 40

// nd builds a ready node with cpu millicores and mem MiB allocatable and
// labels given as "k=v" or "k".
func nd(name string, cpu api.CPU, memMi int64, labels ...string) api.Node {
	n := api.Node{Name: name, Status: api.NodeStatus{State: api.NodeReady}}
	n.Allocatable = api.Resources{CPU: cpu, Memory: api.Bytes(memMi) * mi}
	n.Capacity = n.Allocatable
	if len(labels) > 0 {
		n.Labels = map[string]string{}
		for _, l := range labels {
			k, v, _ := strings.Cut(l, "=")
			n.Labels[k] = v
		}
	}
	return n
}

func down(n api.Node) api.Node {
	n.Status.State = api.NodeDown
	return n
}

func req(svc string, cpu api.CPU, memMi int64) Request {
	return Request{Service: svc, Resources: api.Resources{CPU: cpu, Memory: api.Bytes(memMi) * mi}}
}

func cons(t *testing.T, exprs ...string) []api.Constraint {
	t.Helper()
	var out []api.Constraint
	for _, e := range exprs {
		c, err := api.ParseConstraint(e)
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, c)
	}
	return out
}

// TestFeasibility: one placement on a small cluster, by filter.
func TestFeasibility(t *testing.T) {
	withPort := Request{Service: "web", Resources: api.Resources{CPU: 100, Memory: 64 * mi}, HostPorts: []int{8080}}
	for _, tc := range []struct {
		name    string
		nodes   []api.Node
		insts   []api.Instance
		req     Request
		opts    []Option
		want    []string // acceptable nodes; none: must fail
		explain string   // failure explanation
	}{
		{
			name:  "fits by cpu",
			nodes: []api.Node{nd("a", 500, 4096), nd("b", 2000, 4096)},
			req:   req("x", 1000, 100),
			want:  []string{"b"},
		},
		{
			name:  "fits by memory",
			nodes: []api.Node{nd("a", 4000, 512), nd("b", 4000, 2048)},
			req:   req("x", 100, 1024),
			want:  []string{"b"},
		},
		{
			name:  "exact fit",
			nodes: []api.Node{nd("a", 1000, 1024)},
			req:   req("x", 1000, 1024),
			want:  []string{"a"},
		},
		{
			name:    "too big everywhere",
			nodes:   []api.Node{nd("a", 500, 4096), nd("b", 4000, 512)},
			req:     req("x", 1000, 1024),
			explain: "0/2 nodes: 1 insufficient cpu, 1 insufficient memory",
		},
		{
			name:  "existing instances use capacity",
			nodes: []api.Node{nd("a", 2000, 4096), nd("b", 2000, 4096)},
			insts: []api.Instance{
				{Service: "old", Node: "a", DesiredState: api.DesiredRunning, Resources: api.ResourceSpec{CPU: 1500}},
				{Service: "old", Node: "b", DesiredState: api.DesiredStopped, Resources: api.ResourceSpec{CPU: 1500}},
				{Service: "old", Node: "zz", DesiredState: api.DesiredRunning, Resources: api.ResourceSpec{CPU: 1500}},
			},
			req:  req("x", 1000, 100),
			want: []string{"b"},
		},
		{
			name:  "constraint ==",
			nodes: []api.Node{nd("a", 2000, 4096, "rack=a"), nd("b", 2000, 4096, "rack=b"), nd("c", 2000, 4096)},
			req:   Request{Service: "x", Constraints: cons(t, "rack == b")},
			want:  []string{"b"},
		},
		{
			name:  "constraint !=",
			nodes: []api.Node{nd("a", 2000, 4096, "rack=a"), nd("b", 2000, 4096, "rack=b"), nd("c", 2000, 4096)},
			req:   Request{Service: "x", Constraints: cons(t, "rack != a")},
			want:  []string{"b", "c"},
		},
		{
			name:  "constraint exists",
			nodes: []api.Node{nd("a", 2000, 4096, "ssd"), nd("b", 2000, 4096, "rack=b"), nd("c", 2000, 4096)},
			req:   Request{Service: "x", Constraints: cons(t, "ssd")},
			want:  []string{"a"},
		},
		{
			name:  "constraints combined",
			nodes: []api.Node{nd("a", 2000, 4096, "ssd", "rack=a"), nd("b", 2000, 4096, "ssd", "rack=b"), nd("c", 2000, 4096, "rack=b")},
			req:   Request{Service: "x", Constraints: cons(t, "ssd", "rack == b")},
			want:  []string{"b"},
		},
		{
			name:    "constraint unmet everywhere",
			nodes:   []api.Node{nd("a", 2000, 4096, "rack=a"), nd("b", 2000, 4096)},
			req:     Request{Service: "x", Constraints: cons(t, "gpu")},
			explain: "0/2 nodes: 2 constraint gpu unmet",
		},
		{
			name:  "host port in use by an instance",
			nodes: []api.Node{nd("a", 2000, 4096), nd("b", 2000, 4096)},
			insts: []api.Instance{{Service: "other", Node: "a", DesiredState: api.DesiredRunning,
				Status: api.InstanceStatus{Ports: []api.PortBinding{{Name: "http", Port: 80, HostPort: 8080}}}}},
			req:  withPort,
			want: []string{"b"},
		},
		{
			name:  "other host port is fine",
			nodes: []api.Node{nd("a", 2000, 4096)},
			insts: []api.Instance{{Service: "other", Node: "a", DesiredState: api.DesiredRunning,
				Status: api.InstanceStatus{Ports: []api.PortBinding{{Name: "http", Port: 80, HostPort: 9090}}}}},
			req:  withPort,
			want: []string{"a"},
		},
		{
			name:  "host port in use everywhere",
			nodes: []api.Node{nd("a", 2000, 4096), nd("b", 2000, 4096)},
			insts: []api.Instance{
				{Service: "o", Node: "a", DesiredState: api.DesiredRunning, Status: api.InstanceStatus{Ports: []api.PortBinding{{HostPort: 8080}}}},
				{Service: "o", Node: "b", DesiredState: api.DesiredRunning, Status: api.InstanceStatus{Ports: []api.PortBinding{{HostPort: 8080}}}},
			},
			req:     withPort,
			explain: "0/2 nodes: 2 host port 8080 in use",
		},
		{
			name:  "max per node",
			nodes: []api.Node{nd("a", 2000, 4096), nd("b", 2000, 4096)},
			insts: []api.Instance{{Service: "x", Node: "a", DesiredState: api.DesiredRunning}},
			req:   Request{Service: "x", MaxPerNode: 1},
			want:  []string{"b"},
		},
		{
			name:  "max per node counts only the service",
			nodes: []api.Node{nd("a", 2000, 4096)},
			insts: []api.Instance{{Service: "y", Node: "a", DesiredState: api.DesiredRunning}},
			req:   Request{Service: "x", MaxPerNode: 1},
			want:  []string{"a"},
		},
		{
			name:  "max per node reached everywhere",
			nodes: []api.Node{nd("a", 2000, 4096), nd("b", 2000, 4096)},
			insts: []api.Instance{
				{Service: "x", Node: "a", DesiredState: api.DesiredRunning},
				{Service: "x", Node: "a", DesiredState: api.DesiredRunning},
				{Service: "x", Node: "b", DesiredState: api.DesiredRunning},
				{Service: "x", Node: "b", DesiredState: api.DesiredRunning},
			},
			req:     Request{Service: "x", MaxPerNode: 2},
			explain: "0/2 nodes: 2 max per node reached",
		},
		{
			name:  "networks",
			nodes: []api.Node{nd("a", 2000, 4096), nd("b", 2000, 4096), nd("c", 2000, 4096)},
			opts: []Option{WithNetworks(func(node, network string) bool {
				return network == "front" || node == "c"
			})},
			req:  Request{Service: "x", Networks: []string{"front", "back"}},
			want: []string{"c"},
		},
		{
			name:    "network missing everywhere",
			nodes:   []api.Node{nd("a", 2000, 4096), nd("b", 2000, 4096)},
			opts:    []Option{WithNetworks(func(node, network string) bool { return network == "front" })},
			req:     Request{Service: "x", Networks: []string{"back", "front"}},
			explain: "0/2 nodes: 2 network back missing",
		},
		{
			name:  "every node has every network by default",
			nodes: []api.Node{nd("a", 2000, 4096)},
			req:   Request{Service: "x", Networks: []string{"back"}},
			want:  []string{"a"},
		},
		{
			name:  "node down",
			nodes: []api.Node{down(nd("a", 8000, 8192)), nd("b", 1000, 1024)},
			req:   req("x", 500, 100),
			want:  []string{"b"},
		},
		{
			name:    "all nodes down",
			nodes:   []api.Node{down(nd("a", 8000, 8192)), down(nd("b", 1000, 1024))},
			req:     req("x", 500, 100),
			explain: "0/2 nodes: 2 node down",
		},
		{
			name:    "no nodes",
			req:     req("x", 500, 100),
			explain: "0/0 nodes",
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := NewSnapshot(tc.nodes, tc.insts, tc.opts...)
			r, e := s.Place(tc.req)
			if len(tc.want) == 0 {
				if r.Node != "" {
					t.Fatalf("placed on %s, want no placement", r.Node)
				}
				if got := e.String(); got != tc.explain {
					t.Fatalf("explanation %q, want %q", got, tc.explain)
				}
				return
			}
			if !slices.Contains(tc.want, r.Node) {
				t.Fatalf("placed on %q (%v), want one of %v", r.Node, e, tc.want)
			}
		})
	}
}

// TestExplanationMixed: the exact text for a mix of reasons, by count then
// by reason.
func TestExplanationMixed(t *testing.T) {
	nodes := []api.Node{
		nd("n1", 4000, 512, "rack=a"),
		nd("n2", 4000, 512, "rack=a"),
		nd("n3", 4000, 256, "rack=a"),
		nd("n4", 4000, 8192, "rack=b"),
		nd("n5", 4000, 8192),
	}
	s := NewSnapshot(nodes, nil)
	r, e := s.Place(Request{Service: "db", Resources: api.Resources{CPU: 500, Memory: 1024 * mi}, Constraints: cons(t, "rack == a")})
	if r.Node != "" {
		t.Fatalf("placed on %s", r.Node)
	}
	const want = "0/5 nodes: 3 insufficient memory, 2 constraint rack == a unmet"
	if got := e.String(); got != want {
		t.Fatalf("got %q\nwant %q", got, want)
	}
	if e.Considered != 5 || e.Feasible() != 0 {
		t.Fatalf("considered %d feasible %d", e.Considered, e.Feasible())
	}

	// More reasons, with a tie ordered by reason.
	nodes = append(nodes, down(nd("n6", 4000, 8192, "rack=a")), nd("n7", 100, 8192, "rack=a"))
	s = NewSnapshot(nodes, []api.Instance{{Service: "db", Node: "n7", DesiredState: api.DesiredRunning}})
	_, e = s.Place(Request{Service: "db", Resources: api.Resources{CPU: 500, Memory: 1024 * mi}, Constraints: cons(t, "rack == a"), MaxPerNode: 1})
	const want2 = "0/7 nodes: 3 insufficient memory, 2 constraint rack == a unmet, 1 max per node reached, 1 node down"
	if got := e.String(); got != want2 {
		t.Fatalf("got %q\nwant %q", got, want2)
	}

	if got := (Explanation{Considered: 3}).String(); got != "3/3 nodes" {
		t.Fatalf("empty explanation %q", got)
	}
}

// TestSuccessExplanation: a success counts the nodes examined.
func TestSuccessExplanation(t *testing.T) {
	s := NewSnapshot([]api.Node{nd("a", 1000, 1024), nd("b", 1000, 1024), nd("c", 1000, 1024)},
		[]api.Instance{{Service: "x", Node: "a", DesiredState: api.DesiredRunning}, {Service: "x", Node: "b", DesiredState: api.DesiredRunning}})
	r, e := s.Place(Request{Service: "x", MaxPerNode: 1})
	if r.Node != "c" {
		t.Fatalf("placed on %q", r.Node)
	}
	if e.Considered != 3 || e.Filtered[ReasonMaxPerNode] != 2 || e.String() != "1/3 nodes: 2 max per node reached" {
		t.Fatalf("explanation %+v %q", e, e)
	}
}

// TestBinpackFillsNodes: binpack fills a node before it starts the next
// (twelve services of one instance each: replicas of one service spread).
func TestBinpackFillsNodes(t *testing.T) {
	var nodes []api.Node
	for i := range 6 {
		nodes = append(nodes, nd(fmt.Sprintf("n%d", i), 4000, 8192))
	}
	for seed := range uint64(5) {
		s := NewSnapshot(nodes, nil, WithSeed(seed))
		var rs []Result
		var e Explanation
		for i := range 12 { // 4 per node by cpu
			var r Result
			r, e = s.Place(req(fmt.Sprintf("svc%d", i), 1000, 1024))
			rs = append(rs, r)
		}
		perNode := map[string]int{}
		var order []string
		for _, r := range rs {
			if r.Node == "" {
				t.Fatalf("seed %d: unplaced: %v", seed, e)
			}
			if perNode[r.Node] == 0 {
				order = append(order, r.Node)
			}
			perNode[r.Node]++
		}
		if len(perNode) != 3 {
			t.Fatalf("seed %d: used %d nodes (%v), want 3", seed, len(perNode), perNode)
		}
		// Each node is full before the next one starts.
		for i, r := range rs {
			if r.Node != order[i/4] {
				t.Fatalf("seed %d: placement %d on %s, want %s: %v", seed, i, r.Node, order[i/4], rs)
			}
		}
		// A second service with another shape packs into the same nodes'
		// leftover memory? No: cpu is full. It opens one more node.
		r, _ := s.Place(req("y", 500, 512))
		if perNode[r.Node] != 0 {
			t.Fatalf("seed %d: y on full node %s", seed, r.Node)
		}
		r2, _ := s.Place(req("z", 500, 512))
		if r2.Node != r.Node {
			t.Fatalf("seed %d: z on %s, want the partly used %s", seed, r2.Node, r.Node)
		}
		if r2.Score <= r.Score {
			t.Fatalf("seed %d: scores %v then %v, want increasing", seed, r.Score, r2.Score)
		}
	}
}

// TestBinpackPrefersFullerNode: among feasible nodes the fullest after
// placement wins, across services.
func TestBinpackPrefersFullerNode(t *testing.T) {
	nodes := []api.Node{nd("a", 4000, 4096), nd("b", 4000, 4096), nd("c", 4000, 4096)}
	insts := []api.Instance{
		{Service: "o", Node: "a", DesiredState: api.DesiredRunning, Resources: api.ResourceSpec{CPU: 1000, Memory: 1024 * mi}},
		{Service: "o", Node: "b", DesiredState: api.DesiredRunning, Resources: api.ResourceSpec{CPU: 3000, Memory: 3072 * mi}},
	}
	for seed := range uint64(5) {
		s := NewSnapshot(nodes, insts, WithSeed(seed))
		r, _ := s.Place(req("x", 500, 512))
		if r.Node != "b" {
			t.Fatalf("seed %d: placed on %s, want b", seed, r.Node)
		}
		if want := (3500.0/4000 + 3584.0/4096) / 2; r.Score != want {
			t.Fatalf("score %v, want %v", r.Score, want)
		}
	}
}

// TestSpreadBalances: spread keeps a service's replicas within one of each
// other per node, and prefers the least used node.
func TestSpreadBalances(t *testing.T) {
	var nodes []api.Node
	for i := range 7 {
		nodes = append(nodes, nd(fmt.Sprintf("n%d", i), 16000, 16384))
	}
	for _, n := range []int{1, 5, 7, 8, 20, 49, 50} {
		for seed := range uint64(3) {
			s := NewSnapshot(nodes, nil, WithSeed(seed))
			r := req("x", 100, 64)
			r.Strategy = api.StrategySpread
			rs, e := s.PlaceN(r, n)
			per := map[string]int{}
			for _, x := range rs {
				if x.Node == "" {
					t.Fatalf("unplaced: %v", e)
				}
				per[x.Node]++
			}
			lo, hi := n, 0
			for _, node := range nodes {
				lo, hi = min(lo, per[node.Name]), max(hi, per[node.Name])
			}
			if hi-lo > 1 {
				t.Fatalf("n=%d seed %d: per node %v", n, seed, per)
			}
		}
	}

	// Equal counts: the emptier node wins.
	insts := []api.Instance{
		{Service: "o", Node: "a", DesiredState: api.DesiredRunning, Resources: api.ResourceSpec{CPU: 3000}},
		{Service: "o", Node: "c", DesiredState: api.DesiredRunning, Resources: api.ResourceSpec{CPU: 2000}},
		{Service: "x", Node: "b", DesiredState: api.DesiredRunning},
	}
	s := NewSnapshot([]api.Node{nd("a", 4000, 4096), nd("b", 4000, 4096), nd("c", 4000, 4096)}, insts)
	r, _ := s.Place(Request{Service: "x", Strategy: api.StrategySpread, Resources: api.Resources{CPU: 100}})
	if r.Node != "c" {
		t.Fatalf("placed on %s, want c (b has a replica, a is fuller)", r.Node)
	}
}

// TestSpreadAroundFullNodes: nodes without room are passed over; the rest
// stay balanced.
func TestSpreadAroundFullNodes(t *testing.T) {
	nodes := []api.Node{nd("small", 1000, 1024), nd("b1", 8000, 8192), nd("b2", 8000, 8192), nd("b3", 8000, 8192)}
	s := NewSnapshot(nodes, nil, WithSeed(3))
	r := req("x", 500, 256)
	r.Strategy = api.StrategySpread
	rs, _ := s.PlaceN(r, 20)
	per := map[string]int{}
	for _, x := range rs {
		per[x.Node]++
	}
	if per["small"] != 2 || per["b1"] != 6 || per["b2"] != 6 || per["b3"] != 6 {
		t.Fatalf("per node %v", per)
	}
}

// TestRelease: a release frees capacity, ports and the replica count.
func TestRelease(t *testing.T) {
	s := NewSnapshot([]api.Node{nd("a", 1000, 1024)}, nil)
	r := Request{Service: "x", Resources: api.Resources{CPU: 1000, Memory: 512 * mi}, HostPorts: []int{80}, MaxPerNode: 1}
	if p, e := s.Place(r); p.Node != "a" {
		t.Fatalf("first: %v", e)
	}
	other := Request{Service: "y", Resources: api.Resources{CPU: 10}, HostPorts: []int{80}}
	if p, e := s.Place(other); p.Node != "" || e.String() != "0/1 nodes: 1 host port 80 in use" {
		t.Fatalf("second: %q %v", p.Node, e)
	}
	if p, e := s.Place(r); p.Node != "" || e.String() != "0/1 nodes: 1 max per node reached" {
		t.Fatalf("third: %q %v", p.Node, e)
	}
	if !s.Release("a", r) {
		t.Fatal("release failed")
	}
	if s.Release("a", r) {
		t.Fatal("second release of one instance succeeded")
	}
	if s.Release("nope", r) {
		t.Fatal("release on unknown node succeeded")
	}
	used, alloc, ok := s.Usage("a")
	if !ok || used != (api.Resources{}) || alloc.CPU != 1000 {
		t.Fatalf("usage %v %v %v", used, alloc, ok)
	}
	if p, e := s.Place(r); p.Node != "a" {
		t.Fatalf("after release: %v", e)
	}
	if s.Count("x", "a") != 1 {
		t.Fatalf("count %d", s.Count("x", "a"))
	}

	// Releasing an instance the snapshot was built with.
	s = NewSnapshot([]api.Node{nd("a", 1000, 1024)}, []api.Instance{{Service: "old", Node: "a", DesiredState: api.DesiredRunning,
		Resources: api.ResourceSpec{CPU: 800}, Status: api.InstanceStatus{Ports: []api.PortBinding{{HostPort: 80}}}}})
	if p, _ := s.Place(Request{Service: "x", Resources: api.Resources{CPU: 500}, HostPorts: []int{80}}); p.Node != "" {
		t.Fatal("placed on a busy node")
	}
	s.Release("a", Request{Service: "old", Resources: api.Resources{CPU: 800}, HostPorts: []int{80}})
	if p, e := s.Place(Request{Service: "x", Resources: api.Resources{CPU: 500}, HostPorts: []int{80}}); p.Node != "a" {
		t.Fatalf("after release: %v", e)
	}
}

// TestReleaseSpread: releases keep spread's levels right.
func TestReleaseSpread(t *testing.T) {
	nodes := []api.Node{nd("a", 8000, 8192), nd("b", 8000, 8192), nd("c", 8000, 8192)}
	s := NewSnapshot(nodes, nil)
	r := req("x", 100, 64)
	r.Strategy = api.StrategySpread
	s.PlaceN(r, 6) // 2, 2, 2
	s.Release("b", r)
	s.Release("b", r)
	s.Release("c", r) // 2, 0, 1
	p, _ := s.Place(r)
	if p.Node != "b" {
		t.Fatalf("placed on %s, want b", p.Node)
	}
	p, _ = s.Place(r)
	if p.Node != "b" && p.Node != "c" {
		t.Fatalf("placed on %s, want b or c", p.Node)
	}
}

// TestPlaceNEqualsPlace: PlaceN and n Place calls decide the same, for both
// strategies, with failures, on a snapshot already in use.
func TestPlaceNEqualsPlace(t *testing.T) {
	rng := rand.New(rand.NewPCG(7, 7))
	nodes := randomNodes(rng, 60)
	reqs := randomRequests(rng, 40)
	for _, strategy := range []string{api.StrategyBinpack, api.StrategySpread} {
		a := NewSnapshot(nodes, nil, WithSeed(11))
		b := NewSnapshot(nodes, nil, WithSeed(11))
		for i, r := range reqs {
			r.Strategy = strategy
			n := 1 + i%13
			got, ge := a.PlaceN(r, n)
			var want []Result
			var we Explanation
			for range n {
				x, e := b.Place(r)
				want = append(want, x)
				if x.Node == "" && we.Considered == 0 {
					we = e
				}
			}
			if !slices.Equal(got, want) {
				t.Fatalf("%s request %d: PlaceN %v\nPlace %v", strategy, i, got, want)
			}
			if we.Considered != 0 && ge.String() != we.String() {
				t.Fatalf("%s request %d: explanations %q and %q", strategy, i, ge, we)
			}
		}
	}
}

// TestDeterminism: the same seed gives the same placements whatever the
// order of the nodes; another seed may not.
func TestDeterminism(t *testing.T) {
	rng := rand.New(rand.NewPCG(3, 3))
	nodes := randomNodes(rng, 80)
	reqs := randomRequests(rng, 60)
	run := func(seed uint64, nodes []api.Node) []string {
		s := NewSnapshot(nodes, nil, WithSeed(seed))
		var out []string
		for i, r := range reqs {
			if i%2 == 1 {
				r.Strategy = api.StrategySpread
			}
			rs, _ := s.PlaceN(r, 1+i%5)
			for _, x := range rs {
				out = append(out, fmt.Sprintf("%s@%.6f", x.Node, x.Score))
			}
		}
		return out
	}
	first := run(42, nodes)
	rev := slices.Clone(nodes)
	slices.Reverse(rev)
	if again := run(42, rev); !slices.Equal(first, again) {
		t.Fatal("same seed, different placements")
	}
	differs := false
	for seed := range uint64(5) {
		if !slices.Equal(first, run(seed, nodes)) {
			differs = true
		}
	}
	if !differs {
		t.Fatal("the seed changes nothing")
	}
}

// TestClassEviction: with room for one class index only, alternating
// requests still see each other's reservations.
func TestClassEviction(t *testing.T) {
	nodes := []api.Node{nd("a", 1000, 1024, "ssd"), nd("b", 1000, 1024)}
	s := NewSnapshot(nodes, nil, WithMaxClasses(1))
	ssd := Request{Service: "x", Resources: api.Resources{CPU: 400}, Constraints: cons(t, "ssd")}
	any := Request{Service: "y", Resources: api.Resources{CPU: 400}}
	for range 2 {
		if p, e := s.Place(ssd); p.Node != "a" {
			t.Fatalf("ssd: %v", e)
		}
	}
	// a has 200m left: y goes to b twice, then fails.
	for range 2 {
		if p, e := s.Place(any); p.Node != "b" {
			t.Fatalf("any: %q %v", p.Node, e)
		}
	}
	if p, e := s.Place(any); p.Node != "" || e.String() != "0/2 nodes: 2 insufficient cpu" {
		t.Fatalf("any: %q %v", p.Node, e)
	}
	if p, e := s.Place(ssd); p.Node != "" || e.String() != "0/2 nodes: 1 constraint ssd unmet, 1 insufficient cpu" {
		t.Fatalf("ssd: %q %v", p.Node, e)
	}
	if len(s.live) != 1 {
		t.Fatalf("%d classes kept", len(s.live))
	}
}

// TestRequestFor reads a service spec.
func TestRequestFor(t *testing.T) {
	spec := api.ServiceSpec{
		Name:      "web",
		Resources: api.ResourceSpec{CPU: 250, Memory: 128 * mi},
		Networks:  []string{"front"},
		Ports:     []api.PortSpec{{Name: "http", Port: 80, HostPort: 8080}, {Name: "admin", Port: 9000}},
		Placement: api.Placement{Strategy: api.StrategySpread, Constraints: []string{"rack == a", "ssd"}, MaxPerNode: 2},
	}
	r, err := RequestFor(spec)
	if err != nil {
		t.Fatal(err)
	}
	if r.Service != "web" || r.Resources.CPU != 250 || r.Resources.Memory != 128*mi || r.Strategy != "spread" ||
		r.MaxPerNode != 2 || !slices.Equal(r.HostPorts, []int{8080}) || !slices.Equal(r.Networks, []string{"front"}) ||
		len(r.Constraints) != 2 || r.Constraints[0] != (api.Constraint{Key: "rack", Op: "==", Value: "a"}) {
		t.Fatalf("%+v", r)
	}
	spec.Placement.Constraints = []string{"=="}
	if _, err := RequestFor(spec); err == nil {
		t.Fatal("bad constraint accepted")
	}
}

func randomNodes(rng *rand.Rand, n int) []api.Node {
	var nodes []api.Node
	for i := range n {
		node := nd(fmt.Sprintf("n%03d", i), api.CPU(500*(1+rng.IntN(8))), int64(256*(1+rng.IntN(16))),
			fmt.Sprintf("rack=r%d", rng.IntN(4)))
		if rng.IntN(3) == 0 {
			node.Labels["ssd"] = ""
		}
		if rng.IntN(15) == 0 {
			node = down(node)
		}
		nodes = append(nodes, node)
	}
	return nodes
}

func randomRequests(rng *rand.Rand, n int) []Request {
	var reqs []Request
	for range n {
		r := req(fmt.Sprintf("s%d", rng.IntN(n/2+1)), api.CPU(50*rng.IntN(20)), int64(32*rng.IntN(24)))
		switch rng.IntN(6) {
		case 0:
			r.Constraints = []api.Constraint{{Key: "rack", Op: "==", Value: fmt.Sprintf("r%d", rng.IntN(4))}}
		case 1:
			r.Constraints = []api.Constraint{{Key: "ssd", Op: "exists"}}
		case 2:
			r.Constraints = []api.Constraint{{Key: "rack", Op: "!=", Value: "r0"}, {Key: "ssd", Op: "exists"}}
		}
		if rng.IntN(5) == 0 {
			r.MaxPerNode = 1 + rng.IntN(3)
		}
		if rng.IntN(8) == 0 {
			r.HostPorts = []int{8000 + rng.IntN(3)}
		}
		if rng.IntN(6) == 0 {
			r.Networks = []string{"back"}
		}
		if rng.IntN(2) == 0 {
			r.Strategy = api.StrategySpread
		}
		reqs = append(reqs, r)
	}
	return reqs
}

// model is an independent account of a cluster, to check the scheduler
// against.
type model struct {
	nodes  map[string]api.Node
	used   map[string]api.Resources
	ports  map[string]map[int]int
	counts map[string]map[string]int // service → node → count
	hasNet func(node, network string) bool
}

func newModel(nodes []api.Node, hasNet func(node, network string) bool) *model {
	m := &model{nodes: map[string]api.Node{}, used: map[string]api.Resources{}, ports: map[string]map[int]int{},
		counts: map[string]map[string]int{}, hasNet: hasNet}
	for _, n := range nodes {
		m.nodes[n.Name] = n
		m.ports[n.Name] = map[int]int{}
	}
	return m
}

func (m *model) feasible(name string, r Request) bool {
	n := m.nodes[name]
	if n.Status.State != api.NodeReady {
		return false
	}
	for _, c := range r.Constraints {
		if !c.Match(n.Labels) {
			return false
		}
	}
	for _, nw := range r.Networks {
		if !m.hasNet(name, nw) {
			return false
		}
	}
	if r.MaxPerNode > 0 && m.counts[r.Service][name] >= r.MaxPerNode {
		return false
	}
	for _, p := range r.HostPorts {
		if m.ports[name][p] > 0 {
			return false
		}
	}
	u := m.used[name]
	return u.CPU+r.Resources.CPU <= n.Allocatable.CPU && u.Memory+r.Resources.Memory <= n.Allocatable.Memory
}

func (m *model) add(name string, r Request, sign int) {
	u := m.used[name]
	u.CPU += api.CPU(sign) * r.Resources.CPU
	u.Memory += api.Bytes(sign) * r.Resources.Memory
	m.used[name] = u
	for _, p := range r.HostPorts {
		m.ports[name][p] += sign
	}
	if m.counts[r.Service] == nil {
		m.counts[r.Service] = map[string]int{}
	}
	m.counts[r.Service][name] += sign
}

// TestProperties: over random clusters and request sequences (with
// releases), every placement is feasible, never exceeds allocatable, a
// failure means no node was feasible, and spread always picks a node with
// the fewest replicas among the feasible ones.
func TestProperties(t *testing.T) {
	for seed := range uint64(propertySeeds) {
		rng := rand.New(rand.NewPCG(seed, 99))
		nodes := randomNodes(rng, 1+rng.IntN(70))
		hasNet := func(node, network string) bool {
			return network != "back" || node[len(node)-1] != '3'
		}
		s := NewSnapshot(nodes, nil, WithSeed(seed), WithNetworks(hasNet), WithMaxClasses(1+int(seed%4)))
		m := newModel(nodes, hasNet)
		reqs := randomRequests(rng, 30)
		type placed struct {
			node string
			r    Request
		}
		var live []placed
		for step := range 600 {
			if len(live) > 0 && rng.IntN(5) == 0 {
				i := rng.IntN(len(live))
				p := live[i]
				live[i] = live[len(live)-1]
				live = live[:len(live)-1]
				if !s.Release(p.node, p.r) {
					t.Fatalf("seed %d step %d: release failed", seed, step)
				}
				m.add(p.node, p.r, -1)
				continue
			}
			r := reqs[rng.IntN(len(reqs))]
			var feasible []string
			minCount := 1 << 30
			for _, n := range nodes {
				if m.feasible(n.Name, r) {
					feasible = append(feasible, n.Name)
					minCount = min(minCount, m.counts[r.Service][n.Name])
				}
			}
			var results []Result
			var e Explanation
			if rng.IntN(4) == 0 {
				results, e = s.PlaceN(r, 1+rng.IntN(6))
			} else {
				x, ex := s.Place(r)
				results, e = []Result{x}, ex
			}
			for k, x := range results {
				if x.Node == "" {
					if k == 0 && len(feasible) > 0 {
						t.Fatalf("seed %d step %d: failed with %d feasible nodes: %v", seed, step, len(feasible), e)
					}
					if e.Considered != len(nodes) || e.Feasible() != 0 {
						t.Fatalf("seed %d step %d: failure explanation %v over %d nodes", seed, step, e, len(nodes))
					}
					continue
				}
				if !m.feasible(x.Node, r) {
					t.Fatalf("seed %d step %d: %s is not feasible for %+v", seed, step, x.Node, r)
				}
				if k == 0 && r.Strategy == api.StrategySpread && m.counts[r.Service][x.Node] != minCount {
					t.Fatalf("seed %d step %d: spread chose a node with %d replicas, min %d", seed, step, m.counts[r.Service][x.Node], minCount)
				}
				m.add(x.Node, r, 1)
				live = append(live, placed{x.Node, r})
			}
			for _, n := range nodes {
				u := m.used[n.Name]
				if u.CPU > n.Allocatable.CPU || u.Memory > n.Allocatable.Memory {
					t.Fatalf("seed %d step %d: %s over allocatable", seed, step, n.Name)
				}
				su, _, _ := s.Usage(n.Name)
				if su != u {
					t.Fatalf("seed %d step %d: %s usage %v, model %v", seed, step, n.Name, su, u)
				}
			}
		}
	}
}

// TestReserveAndOptions: Reserve accounts without checks; port 0 is no
// port; a duplicate node name is ignored; the rank limit is settable.
func TestReserveAndOptions(t *testing.T) {
	nodes := []api.Node{nd("a", 1000, 1024), nd("b", 1000, 1024), nd("a", 9000, 9999)}
	s := NewSnapshot(nodes, nil, WithRankLimit(1))
	if s.RankLimit() != 1 {
		t.Fatalf("rank limit %d", s.RankLimit())
	}
	if _, alloc, _ := s.Usage("a"); alloc.CPU != 1000 {
		t.Fatalf("duplicate node replaced the first: %v", alloc)
	}
	r := Request{Service: "x", Resources: api.Resources{CPU: 600}, HostPorts: []int{0, 443}}
	if !s.Reserve("a", r) || s.Reserve("zz", r) {
		t.Fatal("Reserve on known/unknown node")
	}
	if p, _ := s.Place(r); p.Node != "b" {
		t.Fatalf("placed on %q, want b", p.Node)
	}
	if p, e := s.Place(Request{Service: "y", HostPorts: []int{0}}); p.Node == "" {
		t.Fatalf("port 0 conflicts: %v", e)
	}
	if _, e := s.Place(r); e.String() != "0/2 nodes: 2 host port 443 in use" {
		t.Fatalf("explanation %v", e)
	}
	if s.Count("x", "a") != 1 || s.Count("x", "zz") != 0 || s.Count("nope", "a") != 0 {
		t.Fatal("counts")
	}
	if _, _, ok := s.Usage("zz"); ok {
		t.Fatal("usage of unknown node")
	}
	if NewSnapshot(nodes, nil).RankLimit() != 8 {
		t.Fatal("default rank limit")
	}
}

// TestBinpackSpreadsReplicasOfOneService: binpack's job anti-affinity puts
// a service's replicas on different nodes before two share one.
func TestBinpackSpreadsReplicasOfOneService(t *testing.T) {
	var nodes []api.Node
	for i := range 3 {
		nodes = append(nodes, nd(fmt.Sprintf("n%d", i), 4000, 8192))
	}
	s := NewSnapshot(nodes, nil, WithSeed(1))
	rs, _ := s.PlaceN(req("web", 500, 256), 6)
	per := map[string]int{}
	for _, r := range rs {
		per[r.Node]++
	}
	if len(per) != 3 || per["n0"] != 2 || per["n1"] != 2 || per["n2"] != 2 {
		t.Fatalf("6 replicas on 3 nodes: %v", per)
	}
}
