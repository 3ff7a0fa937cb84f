// Command scheduler benchmarks internal/scheduler: it builds a synthetic
// cluster of nodes of mixed sizes and labels, places the instances of about
// a thousand services of mixed requests on it, once with binpack and once
// with spread, and prints the placement rate and the quality of the result.
//
//	go run ./bench/scheduler                     # -nodes 5000 -instances 100000 -seed 1
//	go run ./bench/scheduler -single             # one Place call per instance instead of PlaceN
package main

import (
	"flag"
	"fmt"
	"math"
	"math/rand/v2"
	"os"
	"runtime"
	"time"

	"github.com/berth-dev/berth/api"
	"github.com/berth-dev/berth/internal/scheduler"
)

const (
	mi = int64(1) << 20
	gi = int64(1) << 30
)

var verbose bool

type svc struct {
	req      scheduler.Request
	replicas int
}

func main() {
	nNodes := flag.Int("nodes", 5000, "number of nodes")
	nInst := flag.Int("instances", 100000, "number of instances to place")
	nSvc := flag.Int("services", 1000, "number of services")
	seed := flag.Uint64("seed", 1, "seed of the cluster, the services and the scheduler")
	single := flag.Bool("single", false, "place with one Place call per instance instead of one PlaceN per service")
	e2e := flag.Bool("e2e", true, "also run the end-to-end part: a real berth server and simulated nodes")
	bin := flag.String("berth", "", "berth binary for the end-to-end part (default: build it)")
	e2eNodes := flag.Int("e2e-nodes", 5000, "simulated nodes of the end-to-end part")
	e2eInst := flag.Int("e2e-instances", 100000, "instances of the end-to-end part")
	e2eSvc := flag.Int("e2e-services", 1000, "services of the end-to-end part")
	flag.BoolVar(&verbose, "v", false, "print the explanation of every service with unplaceable replicas, and spread outliers")
	flag.Parse()
	if *nNodes <= 0 || *nInst <= 0 || *nSvc <= 0 {
		fmt.Fprintln(os.Stderr, "-nodes, -instances and -services must be > 0")
		os.Exit(2)
	}

	rng := rand.New(rand.NewPCG(*seed, 42))
	nodes, nets := makeNodes(rng, *nNodes)
	svcs := makeServices(rng, *nSvc, *nInst)
	hasNet := func(node, network string) bool { return nets[node][network] }

	describe(nodes, svcs, *single)
	for _, strategy := range []string{api.StrategyBinpack, api.StrategySpread} {
		for i := range svcs {
			svcs[i].req.Strategy = strategy
		}
		run(strategy, nodes, svcs, hasNet, *seed, *single)
	}
	if *e2e {
		fmt.Println()
		if err := endToEnd(*bin, *e2eNodes, *e2eInst, *e2eSvc, *seed); err != nil {
			fmt.Fprintln(os.Stderr, "end to end:", err)
			os.Exit(1)
		}
	}
}

func pick[T any](rng *rand.Rand, vals []T, weights []int) T {
	total := 0
	for _, w := range weights {
		total += w
	}
	x := rng.IntN(total)
	for i, w := range weights {
		if x < w {
			return vals[i]
		}
		x -= w
	}
	return vals[len(vals)-1]
}

// makeNodes builds nodes of 2/4/8/16 cores with 2 or 4 GiB per core (4–64
// GiB), labelled with a rack (40), a zone (3), ssd (30%) and gpu (5%); 1% are
// down. 80% of the nodes have the "backend" network.
func makeNodes(rng *rand.Rand, n int) ([]api.Node, map[string]map[string]bool) {
	nodes := make([]api.Node, n)
	nets := make(map[string]map[string]bool, n)
	for i := range nodes {
		cores := pick(rng, []int64{2, 4, 8, 16}, []int{30, 35, 25, 10})
		mem := cores * pick(rng, []int64{2, 4}, []int{50, 50}) * gi
		labels := map[string]string{
			"rack": fmt.Sprintf("r%02d", rng.IntN(40)),
			"zone": fmt.Sprintf("z%d", rng.IntN(3)),
		}
		if rng.IntN(100) < 30 {
			labels["ssd"] = "true"
		}
		if rng.IntN(100) < 5 {
			labels["gpu"] = "true"
		}
		state := api.NodeReady
		if rng.IntN(100) < 1 {
			state = api.NodeDown
		}
		name := fmt.Sprintf("node-%05d", i)
		nodes[i] = api.Node{
			Name: name,
			NodeRegistration: api.NodeRegistration{
				Labels:      labels,
				Capacity:    api.Resources{CPU: api.CPU(cores * 1000), Memory: api.Bytes(mem)},
				Allocatable: api.Resources{CPU: api.CPU(cores*1000 - 100), Memory: api.Bytes(mem - 512*mi)},
			},
			Status: api.NodeStatus{State: state},
		}
		nets[name] = map[string]bool{"frontend": true, "backend": rng.IntN(100) < 80}
	}
	return nodes, nets
}

// makeServices builds services with heavy-tailed replica counts summing to
// total, CPU requests of 50m–2 cores with 1–8 GiB of memory per core, and a
// mix of constraints, networks, max per node and host ports.
func makeServices(rng *rand.Rand, n, total int) []svc {
	w := make([]float64, n)
	sum := 0.0
	for i := range w {
		w[i] = math.Exp(rng.NormFloat64() * 1.2)
		sum += w[i]
	}
	svcs := make([]svc, n)
	left := total
	for i := range svcs {
		r := max(1, int(math.Round(w[i]/sum*float64(total))))
		if i == n-1 || r > left-(n-1-i) {
			r = left - (n - 1 - i)
		}
		if i == n-1 {
			r = left
		}
		left -= r
		svcs[i].replicas = r
	}
	for i := range svcs {
		s := &svcs[i]
		cpu := pick(rng, []int64{50, 100, 250, 500, 1000, 2000}, []int{45, 30, 15, 7, 2, 1})
		perCore := pick(rng, []int64{1, 2, 4, 8}, []int{30, 35, 25, 10})
		mem := (cpu * perCore * gi / 1000) / mi * mi
		s.req = scheduler.Request{
			Service:   fmt.Sprintf("svc-%04d", i),
			Resources: api.Resources{CPU: api.CPU(cpu), Memory: api.Bytes(mem)},
		}
		small := s.replicas <= 50
		switch x := rng.IntN(100); {
		case x < 8 && small:
			s.req.Constraints = []api.Constraint{{Key: "rack", Op: "==", Value: fmt.Sprintf("r%02d", rng.IntN(40))}}
		case x < 16:
			s.req.Constraints = []api.Constraint{{Key: "ssd", Op: "exists"}}
		case x < 21:
			s.req.Constraints = []api.Constraint{{Key: "zone", Op: "!=", Value: "z1"}}
		case x < 24 && small:
			s.req.Constraints = []api.Constraint{{Key: "gpu", Op: "==", Value: "true"}}
		case x < 28:
			s.req.Constraints = []api.Constraint{{Key: "zone", Op: "==", Value: "z2"}, {Key: "ssd", Op: "exists"}}
		}
		if rng.IntN(100) < 20 {
			s.req.Networks = []string{"backend"}
		} else if rng.IntN(100) < 30 {
			s.req.Networks = []string{"frontend"}
		}
		if rng.IntN(100) < 10 {
			s.req.MaxPerNode = 1 + rng.IntN(3)
		}
		if rng.IntN(100) < 2 && s.replicas <= 30 {
			s.req.HostPorts = []int{8000 + i}
		}
	}
	rng.Shuffle(len(svcs), func(i, j int) { svcs[i], svcs[j] = svcs[j], svcs[i] })
	return svcs
}

func describe(nodes []api.Node, svcs []svc, single bool) {
	var cpu, mem, dcpu, dmem int64
	ready := 0
	for _, n := range nodes {
		if n.Status.State == api.NodeReady {
			ready++
			cpu += int64(n.Allocatable.CPU)
			mem += int64(n.Allocatable.Memory)
		}
	}
	inst := 0
	for _, s := range svcs {
		inst += s.replicas
		dcpu += int64(s.replicas) * int64(s.req.Resources.CPU)
		dmem += int64(s.replicas) * int64(s.req.Resources.Memory)
	}
	mode := "PlaceN per service"
	if single {
		mode = "Place per instance"
	}
	fmt.Printf("cluster: %d nodes (%d ready), allocatable %.0f cores, %.0f GiB\n", len(nodes), ready, float64(cpu)/1000, float64(mem)/float64(gi))
	fmt.Printf("load:    %d instances of %d services, requesting %.1f%% of cpu, %.1f%% of memory\n",
		inst, len(svcs), 100*float64(dcpu)/float64(cpu), 100*float64(dmem)/float64(mem))
	fmt.Printf("mode:    %s, GOMAXPROCS %d, %s\n", mode, runtime.GOMAXPROCS(0), runtime.Version())
}

func run(strategy string, nodes []api.Node, svcs []svc, hasNet func(node, network string) bool, seed uint64, single bool) {
	runtime.GC()
	t0 := time.Now()
	snap := scheduler.NewSnapshot(nodes, nil, scheduler.WithSeed(seed), scheduler.WithNetworks(hasNet))
	build := time.Since(t0)

	placed := make([][]string, len(svcs)) // node of each placed replica
	var failures []string
	total, failed := 0, 0
	t1 := time.Now()
	for i := range svcs {
		s := &svcs[i]
		total += s.replicas
		var why scheduler.Explanation
		nf := 0
		if single {
			for range s.replicas {
				r, e := snap.Place(s.req)
				if r.Node == "" {
					nf++
					why = e
					continue
				}
				placed[i] = append(placed[i], r.Node)
			}
		} else {
			rs, e := snap.PlaceN(s.req, s.replicas)
			for _, r := range rs {
				if r.Node == "" {
					nf++
					why = e
					continue
				}
				placed[i] = append(placed[i], r.Node)
			}
		}
		failed += nf
		if nf > 0 {
			failures = append(failures, fmt.Sprintf("%s: %d of %d unplaceable (%s, %s, %v, %v, max %d/node, ports %v): %s",
				s.req.Service, nf, s.replicas, s.req.Resources.CPU, s.req.Resources.Memory.Human(), s.req.Constraints, s.req.Networks, s.req.MaxPerNode, s.req.HostPorts, why))
		}
	}
	elapsed := time.Since(t1)

	// Quality, recomputed from the results alone.
	idx := make(map[string]int, len(nodes))
	for i, n := range nodes {
		idx[n.Name] = i
	}
	usedCPU := make([]int64, len(nodes))
	usedMem := make([]int64, len(nodes))
	count := make([]int, len(nodes))
	for i, ps := range placed {
		for _, name := range ps {
			j := idx[name]
			usedCPU[j] += int64(svcs[i].req.Resources.CPU)
			usedMem[j] += int64(svcs[i].req.Resources.Memory)
			count[j]++
		}
	}
	var aCPU, aMem, uCPU, uMem int64
	usedNodes, over := 0, 0
	fullest := 0.0
	for j, n := range nodes {
		if usedCPU[j] > int64(n.Allocatable.CPU) || usedMem[j] > int64(n.Allocatable.Memory) {
			over++
		}
		if count[j] == 0 {
			continue
		}
		usedNodes++
		aCPU += int64(n.Allocatable.CPU)
		aMem += int64(n.Allocatable.Memory)
		uCPU += usedCPU[j]
		uMem += usedMem[j]
		fullest += max(float64(usedCPU[j])/float64(n.Allocatable.CPU), float64(usedMem[j])/float64(n.Allocatable.Memory))
	}

	fmt.Printf("\n== %s ==\n", strategy)
	fmt.Printf("placements/s:   %.0f\n", float64(total)/elapsed.Seconds())
	fmt.Printf("total time:     %s for %d placements (snapshot build %s)\n", elapsed.Round(time.Millisecond), total, build.Round(time.Microsecond))
	fmt.Printf("unplaceable:    %d\n", failed)
	fmt.Printf("nodes used:     %d of %d\n", usedNodes, len(nodes))
	fmt.Printf("packing:        %.1f%% cpu, %.1f%% memory allocated on the used nodes\n",
		100*float64(uCPU)/float64(max(aCPU, 1)), 100*float64(uMem)/float64(max(aMem, 1)))
	fmt.Printf("fullest:        %.1f%% mean over the used nodes of the more allocated of cpu and memory\n", 100*fullest/float64(max(usedNodes, 1)))
	fmt.Printf("over-allocated: %d nodes\n", over)
	if verbose {
		for _, f := range failures {
			fmt.Println("  " + f)
		}
	}
	if strategy == api.StrategySpread {
		spreadStats(nodes, svcs, placed, idx, hasNet, usedCPU, usedMem)
	}
}

// spreadStats prints, over services with at least one placed replica, the
// mean of (max - min) replicas per node, where the nodes are those the
// service may run on (ready, constraints, networks). A spread above 1 is
// justified when the nodes with fewer replicas had no room; it counts as a
// violation when a node with at most max-2 replicas could still take one at
// the end of the run (resources only shrink during the run, so it could
// then at every placement too).
func spreadStats(nodes []api.Node, svcs []svc, placed [][]string, idx map[string]int, hasNet func(node, network string) bool, usedCPU, usedMem []int64) {
	per := make([]int, len(nodes))
	ports := make([]map[int]bool, len(nodes))
	for i, ps := range placed {
		for _, name := range ps {
			for _, p := range svcs[i].req.HostPorts {
				j := idx[name]
				if ports[j] == nil {
					ports[j] = map[int]bool{}
				}
				ports[j][p] = true
			}
		}
	}
	sum, n, worst, above1, violations := 0, 0, 0, 0, 0
	for i, ps := range placed {
		if len(ps) == 0 {
			continue
		}
		r := svcs[i].req
		for _, name := range ps {
			per[idx[name]]++
		}
		lo, hi := math.MaxInt, 0
		for j, nd := range nodes {
			if !eligible(nd, r, hasNet) {
				continue
			}
			lo, hi = min(lo, per[j]), max(hi, per[j])
		}
		violated := false
		for j, nd := range nodes {
			if per[j] > hi-2 || !eligible(nd, r, hasNet) || (r.MaxPerNode > 0 && per[j] >= r.MaxPerNode) {
				continue
			}
			if usedCPU[j]+int64(r.Resources.CPU) > int64(nd.Allocatable.CPU) || usedMem[j]+int64(r.Resources.Memory) > int64(nd.Allocatable.Memory) {
				continue
			}
			free := true
			for _, p := range r.HostPorts {
				if ports[j][p] {
					free = false
				}
			}
			violated = violated || free
		}
		for _, name := range ps {
			per[idx[name]] = 0
		}
		d := hi - lo
		if verbose && d > 1 {
			fmt.Printf("  %s: %d replicas, %d placed, per-node min %d max %d, violation %v (%s, %s, %v, %v, max %d/node)\n", r.Service, svcs[i].replicas, len(ps), lo, hi,
				violated, r.Resources.CPU, r.Resources.Memory.Human(), r.Constraints, r.Networks, r.MaxPerNode)
		}
		sum += d
		n++
		worst = max(worst, d)
		if d > 1 {
			above1++
		}
		if violated {
			violations++
		}
	}
	fmt.Printf("spread:         max-min replicas per eligible node %.3f on average over %d services (worst %d; %d services above 1, %d of them while a less used node had room)\n",
		float64(sum)/float64(max(n, 1)), n, worst, above1, violations)
}

func eligible(n api.Node, r scheduler.Request, hasNet func(node, network string) bool) bool {
	if n.Status.State != api.NodeReady {
		return false
	}
	for _, c := range r.Constraints {
		if !c.Match(n.Labels) {
			return false
		}
	}
	for _, nw := range r.Networks {
		if !hasNet(n.Name, nw) {
			return false
		}
	}
	return true
}
