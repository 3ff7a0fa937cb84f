package scheduler

import (
	"fmt"
	"math/rand/v2"
	"testing"

	"github.com/berth-dev/berth/api"
)

// benchCluster is 5,000 nodes of 2–16 cores and 4–64 GiB with rack and ssd
// labels, and 1,000 services of mixed requests, a tenth of them constrained.
func benchCluster() ([]api.Node, []Request) {
	rng := rand.New(rand.NewPCG(1, 2))
	nodes := make([]api.Node, 5000)
	for i := range nodes {
		cores := []int64{2, 4, 8, 16}[rng.IntN(4)]
		n := nd(fmt.Sprintf("node-%05d", i), api.CPU(cores*1000), cores*1024*(2+2*int64(rng.IntN(2))),
			fmt.Sprintf("rack=r%02d", rng.IntN(40)))
		if rng.IntN(10) < 3 {
			n.Labels["ssd"] = "true"
		}
		nodes[i] = n
	}
	reqs := make([]Request, 1000)
	for i := range reqs {
		cpu := []api.CPU{50, 100, 250, 500}[rng.IntN(4)]
		reqs[i] = Request{Service: fmt.Sprintf("svc-%04d", i), Resources: api.Resources{CPU: cpu, Memory: api.Bytes(cpu) * 2 * mi}}
		switch rng.IntN(20) {
		case 0:
			reqs[i].Constraints = []api.Constraint{{Key: "ssd", Op: "exists"}}
		case 1:
			reqs[i].Constraints = []api.Constraint{{Key: "rack", Op: "!=", Value: "r00"}}
		}
	}
	return nodes, reqs
}

func benchPlace(b *testing.B, strategy string, perCall int) {
	nodes, reqs := benchCluster()
	for i := range reqs {
		reqs[i].Strategy = strategy
	}
	s := NewSnapshot(nodes, nil)
	b.ReportAllocs()
	b.ResetTimer()
	placed := 0
	for i := 0; placed < b.N; i++ {
		r := reqs[i%len(reqs)]
		n := min(perCall, b.N-placed)
		var ok bool
		if perCall == 1 {
			res, _ := s.Place(r)
			ok = res.Node != ""
		} else {
			rs, _ := s.PlaceN(r, n)
			ok = rs[n-1].Node != ""
		}
		if !ok { // full: start again on an empty cluster
			b.StopTimer()
			s = NewSnapshot(nodes, nil)
			b.StartTimer()
			continue
		}
		placed += n
	}
}

func BenchmarkPlaceBinpack(b *testing.B)  { benchPlace(b, api.StrategyBinpack, 1) }
func BenchmarkPlaceSpread(b *testing.B)   { benchPlace(b, api.StrategySpread, 1) }
func BenchmarkPlaceNBinpack(b *testing.B) { benchPlace(b, api.StrategyBinpack, 100) }
func BenchmarkPlaceNSpread(b *testing.B)  { benchPlace(b, api.StrategySpread, 100) }

// BenchmarkPlaceFailure is the cost of a placement that fits nowhere: a
// full explanation over every node.
func BenchmarkPlaceFailure(b *testing.B) {
	nodes, _ := benchCluster()
	s := NewSnapshot(nodes, nil)
	r := Request{Service: "huge", Resources: api.Resources{CPU: 64000}}
	b.ReportAllocs()
	for b.Loop() {
		if res, _ := s.Place(r); res.Node != "" {
			b.Fatal("placed")
		}
	}
}

func BenchmarkNewSnapshot(b *testing.B) {
	nodes, _ := benchCluster()
	b.ReportAllocs()
	for b.Loop() {
		NewSnapshot(nodes, nil)
	}
}
