package client

import (
	"fmt"
	"math/rand/v2"
)

// Balancer is how a Discoverer picks among a service's endpoints.
type Balancer int

const (
	// RoundRobin takes the endpoints in turn, in the order of their keys.
	RoundRobin Balancer = iota
	// Random takes an endpoint at random.
	Random
	// LeastOutstanding takes the less busy of two endpoints chosen at random
	// (the power of two choices), counting the calls in flight through Do.
	LeastOutstanding
)

// String names the balancer.
func (b Balancer) String() string {
	switch b {
	case RoundRobin:
		return "round-robin"
	case Random:
		return "random"
	case LeastOutstanding:
		return "least-outstanding"
	}
	return fmt.Sprintf("Balancer(%d)", int(b))
}

// pick chooses among the candidates (never empty); rr is the round-robin
// counter, advanced here.
func (b Balancer) pick(cands []*epState, rr *uint64) *epState {
	n := len(cands)
	switch b {
	case Random:
		return cands[rand.IntN(n)]
	case LeastOutstanding:
		if n == 1 {
			return cands[0]
		}
		i := rand.IntN(n)
		j := rand.IntN(n - 1)
		if j >= i {
			j++
		}
		a, c := cands[i], cands[j]
		if c.inflight < a.inflight {
			return c
		}
		return a
	default:
		e := cands[*rr%uint64(n)]
		*rr++
		return e
	}
}
