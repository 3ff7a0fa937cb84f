package scheduler

import (
	"slices"

	"github.com/berth-dev/berth/api"
)

// plan is a request prepared for placement.
type plan struct {
	service  string
	cpu, mem int64
	ports    []int
	maxPer   int32
	spread   bool
	c        *class
	svc      *service
}

// cursor carries what stays true between the placements of one PlaceN:
// feasibility only shrinks while replicas of one request are added, so the
// leftmost feasible leaf (binpack) and the lowest feasible level (spread)
// never move back.
type cursor struct {
	from  int
	level int
}

// memo keeps a service's cursor between Place calls, so that n calls cost
// what one PlaceN does. It applies to the same request (class, resources,
// max per node, host ports, strategy) while no Release happened since:
// placements, of any service, only make nodes less feasible.
type memo struct {
	c        *class
	cpu, mem int64
	maxPer   int32
	spread   bool
	ports    []int
	releases uint64
	cur      cursor
}

func (m *memo) matches(p *plan, releases uint64) bool {
	return m.c == p.c && m.cpu == p.cpu && m.mem == p.mem && m.maxPer == p.maxPer &&
		m.spread == p.spread && m.releases == releases && slices.Equal(m.ports, p.ports)
}

// cursorFor returns the cursor a search for p may start from.
func (s *Snapshot) cursorFor(p *plan) cursor {
	if p.svc.memo.matches(p, s.releases) {
		return p.svc.memo.cur
	}
	return cursor{}
}

// remember keeps the cursor a search for p ended with.
func (s *Snapshot) remember(p *plan, cur cursor) {
	m := &p.svc.memo
	if !m.matches(p, s.releases) {
		*m = memo{c: p.c, cpu: p.cpu, mem: p.mem, maxPer: p.maxPer, spread: p.spread,
			ports: slices.Clone(p.ports), releases: s.releases}
	}
	m.cur = cur
}

type cand struct {
	id   int32
	leaf int
}

// tally counts the reasons of examined nodes during a successful search.
type tally struct {
	considered int
	cpu, mem   int
	maxPer     int
	ports      map[int]int
}

func (t *tally) explanation() Explanation {
	e := Explanation{Considered: t.considered}
	add := func(r string, n int) {
		if n == 0 {
			return
		}
		if e.Filtered == nil {
			e.Filtered = map[string]int{}
		}
		e.Filtered[r] += n
	}
	add(ReasonInsufficientCPU, t.cpu)
	add(ReasonInsufficientMemory, t.mem)
	add(ReasonMaxPerNode, t.maxPer)
	for p, n := range t.ports {
		add(reasonPort(p), n)
	}
	return e
}

func (s *Snapshot) prepare(req Request) *plan {
	p := &plan{
		service: req.Service,
		cpu:     int64(req.Resources.CPU),
		mem:     int64(req.Resources.Memory),
		ports:   nonZero(req.HostPorts),
		maxPer:  int32(max(0, req.MaxPerNode)),
		spread:  req.Strategy == api.StrategySpread,
		c:       s.classFor(req.Constraints, req.Networks),
		svc:     s.service(req.Service),
	}
	return p
}

// dynamic is the first dynamic filter node id fails for p: 0 (none), or
// one of the reasons below; port is the port in use.
const (
	okFit = iota
	failMaxPer
	failPort
	failCPU
	failMem
)

func (s *Snapshot) dynamic(id int32, p *plan) (why int, port int) {
	n := &s.nodes[id]
	if p.maxPer > 0 && p.svc.count(id) >= p.maxPer {
		return failMaxPer, 0
	}
	if n.ports != nil {
		for _, hp := range p.ports {
			if n.ports[hp] > 0 {
				return failPort, hp
			}
		}
	}
	if n.allocCPU-n.usedCPU < p.cpu {
		return failCPU, 0
	}
	if n.allocMem-n.usedMem < p.mem {
		return failMem, 0
	}
	return okFit, 0
}

func (t *tally) add(why, port int) {
	switch why {
	case failMaxPer:
		t.maxPer++
	case failPort:
		if t.ports == nil {
			t.ports = map[int]int{}
		}
		t.ports[port]++
	case failCPU:
		t.cpu++
	case failMem:
		t.mem++
	}
}

// Place chooses a node for one instance of req and reserves it there.
func (s *Snapshot) Place(req Request) (Result, Explanation) {
	p := s.prepare(req)
	cur := s.cursorFor(p)
	var t tally
	r, ok := s.placeOne(p, &cur, &t)
	if !ok {
		return Result{}, s.explainFailure(p)
	}
	s.remember(p, cur)
	return r, t.explanation()
}

// PlaceN places n instances of req, one after the other, with the same
// outcome as n calls of Place but sharing the preparation and search state.
// The results are in placement order; once one fails, it and every later one
// have Node "" (nothing freed up in between). The explanation is that of the
// first failure, or of the last placement when all succeeded.
func (s *Snapshot) PlaceN(req Request, n int) ([]Result, Explanation) {
	if n <= 0 {
		return nil, Explanation{}
	}
	out := make([]Result, n)
	p := s.prepare(req)
	cur := s.cursorFor(p)
	defer func() { s.remember(p, cur) }()
	var t tally
	for i := range n {
		t = tally{}
		r, ok := s.placeOne(p, &cur, &t)
		if !ok {
			if p.spread {
				// Keep the random stream where n Place calls leave it.
				for range n - i - 1 {
					s.rng.Uint64()
				}
			}
			return out, s.explainFailure(p)
		}
		out[i] = r
	}
	return out, t.explanation()
}

func (s *Snapshot) placeOne(p *plan, cur *cursor, t *tally) (Result, bool) {
	var (
		c  cand
		sc float64
		ok bool
	)
	if p.spread {
		c, sc, ok = s.spread(p, cur, t)
	} else {
		c, sc, ok = s.binpack(p, cur, t)
	}
	if !ok {
		return Result{}, false
	}
	s.reserve(c.id, p.service, p.cpu, p.mem, p.ports)
	return Result{Node: s.nodes[c.id].name, Score: sc}, true
}

// AntiAffinity is what each replica of the same service already on a node
// takes off that node's binpack score (utilisation, in [0, 1]).
const AntiAffinity = 1.0

// binpack ranks the first K feasible members of the class in node order.
func (s *Snapshot) binpack(p *plan, cur *cursor, t *tally) (cand, float64, bool) {
	f := finder{s: s, p: p, c: p.c, from: cur.from, cands: s.cands[:0], t: t}
	f.walk(1, 0, p.c.size)
	s.cands = f.cands
	if len(f.cands) == 0 {
		return cand{}, 0, false
	}
	cur.from = f.cands[0].leaf
	best, bestScore := f.cands[0], -1.0
	svc := s.services[p.service]
	for i, c := range f.cands {
		sc := s.nodes[c.id].utilAfter(p.cpu, p.mem)
		if svc != nil {
			// Job anti-affinity, as Nomad's: replicas of one service go to
			// different nodes before they share one.
			sc -= AntiAffinity * float64(svc.count(c.id))
		}
		if i == 0 || sc > bestScore {
			best, bestScore = c, sc
		}
	}
	return best, bestScore, true
}

// finder walks a class's tree for the first K feasible leaves at or after
// from, skipping subtrees without enough free CPU or memory.
type finder struct {
	s     *Snapshot
	p     *plan
	c     *class
	from  int
	cands []cand
	t     *tally
}

func (f *finder) walk(j, lo, hi int) bool {
	c := f.c
	if hi <= f.from || c.fcpu[j] < f.p.cpu || c.fmem[j] < f.p.mem {
		return false
	}
	if j >= c.size {
		leaf := j - c.size
		id := c.members[leaf]
		f.t.considered++
		if why, port := f.s.dynamic(id, f.p); why != okFit {
			f.t.add(why, port)
			return false
		}
		f.cands = append(f.cands, cand{id: id, leaf: leaf})
		return len(f.cands) >= f.s.k
	}
	mid := (lo + hi) / 2
	return f.walk(2*j, lo, mid) || f.walk(2*j+1, mid, hi)
}

// spread ranks up to K feasible nodes among those with the fewest replicas
// of the service, scanning each level from a seeded random offset.
func (s *Snapshot) spread(p *plan, cur *cursor, t *tally) (cand, float64, bool) {
	r := s.rng.Uint64()
	c, svc := p.c, p.svc
	svc.trackClass(c)
	cands := s.cands[:0]
	defer func() { s.cands = cands[:0] }()
	for lvl := cur.level; ; lvl++ {
		if lvl == 0 {
			m := len(c.members)
			if svc.occ >= m {
				continue
			}
			off := int(r % uint64(m))
			for j := 0; j < m && len(cands) < s.k; j++ {
				i := off + j
				if i >= m {
					i -= m
				}
				id := c.members[i]
				if svc.count(id) != 0 {
					continue
				}
				t.considered++
				if why, port := s.dynamic(id, p); why != okFit {
					t.add(why, port)
					continue
				}
				cands = append(cands, cand{id: id})
			}
		} else {
			if lvl >= len(svc.levels) {
				return cand{}, 0, false
			}
			set := svc.levels[lvl]
			m := len(set)
			if m == 0 {
				continue
			}
			off := int((r ^ uint64(lvl)*0x9e3779b97f4a7c15) % uint64(m))
			for j := 0; j < m && len(cands) < s.k; j++ {
				i := off + j
				if i >= m {
					i -= m
				}
				id := set[i]
				if c.pos[id] < 0 {
					continue
				}
				t.considered++
				if why, port := s.dynamic(id, p); why != okFit {
					t.add(why, port)
					continue
				}
				cands = append(cands, cand{id: id})
			}
		}
		if len(cands) == 0 {
			continue
		}
		cur.level = lvl
		best, bestU := cands[0], 0.0
		for i, cd := range cands {
			u := s.nodes[cd.id].utilAfter(p.cpu, p.mem)
			if i == 0 || u < bestU {
				best, bestU = cd, u
			}
		}
		return best, 1 - bestU, true
	}
}

// explainFailure accounts for every node: the class's static reasons, then
// the first dynamic filter each member fails.
func (s *Snapshot) explainFailure(p *plan) Explanation {
	e := Explanation{Considered: len(s.nodes), Filtered: make(map[string]int, len(p.c.static)+2)}
	for r, n := range p.c.static {
		e.Filtered[r] += n
	}
	var t tally
	for _, id := range p.c.members {
		why, port := s.dynamic(id, p)
		t.add(why, port)
	}
	for r, n := range t.explanation().Filtered {
		e.Filtered[r] += n
	}
	return e
}
