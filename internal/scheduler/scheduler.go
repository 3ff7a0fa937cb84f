// Package scheduler owns placement: choosing the node each instance of a
// service runs on. It is a pure function over an in-memory Snapshot of the
// cluster (nodes, and the resources, host ports and replica counts already
// taken on them); it does no I/O, takes no locks and keeps no clock, so the
// server calls it with whatever state it read from the store and writes the
// decisions back itself.
//
// Placement is modelled on Nomad's iterator chain, feasibility → rank →
// select:
//
//   - Feasibility is split in two. Static checks (the node is ready, its
//     labels satisfy the constraints, it has the networks) depend only on
//     the request's constraints and networks, so their result is computed
//     once per distinct (constraints, networks) pair, a "class", and kept as
//     the class's member list. Dynamic checks (free CPU and memory, max per
//     node, host ports) are evaluated on candidates only.
//   - Every class keeps a max segment tree of its members' free CPU and free
//     memory in a fixed node order, so nodes without room are skipped a
//     whole subtree at a time instead of being scanned.
//   - Ranking looks at a bounded number of feasible candidates,
//     K = max(8, ⌊log2(ready nodes)⌋), and selects the best score; ties go
//     to the earlier candidate. Nomad's binpack limit is max(2, log2(n));
//     the floor of 8 costs little and lets small clusters rank (nearly)
//     every node.
//
// Binpack (the default) ranks the first K feasible nodes in the snapshot's
// node order, which is a seeded shuffle of the nodes: a first-fit window.
// Nomad instead ranks K random feasible nodes; at low cluster load that
// spreads instances over every node and packs poorly. A fixed order makes the
// leading nodes fill up first (first fit), and best-fit ranking inside the
// window (the highest mean of CPU and memory utilisation after placement, as
// in Nomad's BestFit) picks among them.
//
// Spread prefers the nodes holding the fewest replicas of the service, then
// the lowest utilisation. Each service keeps its nodes grouped by replica
// count ("levels"); a placement takes the lowest level that has a feasible
// node and ranks up to K feasible nodes of that level, scanned from a seeded
// random offset. Because the lowest feasible level is always used, the
// replicas of a service differ by at most one per node among the nodes that
// had room.
//
// While replicas of one request are added, feasibility only shrinks, so the
// search resumes where the previous one found its first candidate (binpack)
// or its level (spread). PlaceN does this across its n placements, and a
// service remembers its cursor across Place calls with the same request
// until the next Release. A placement that fails costs a scan of the class's
// members to explain it.
//
// Results are deterministic for a given seed (WithSeed) and the same
// sequence of calls: nodes are sorted by name before the seeded shuffle, so
// the order of the nodes given to NewSnapshot does not matter.
//
// A Snapshot is not safe for concurrent use.
package scheduler

import (
	"cmp"
	"fmt"
	"math"
	"math/bits"
	"math/rand/v2"
	"slices"
	"strconv"
	"strings"

	"github.com/berth-dev/berth/api"
)

// Reasons a node is filtered, as they appear in an Explanation. Constraint,
// network and host port reasons name the constraint, network or port:
// "constraint rack == a unmet", "network backend missing", "host port 8080
// in use".
const (
	ReasonNodeDown           = "node down"
	ReasonInsufficientCPU    = "insufficient cpu"
	ReasonInsufficientMemory = "insufficient memory"
	ReasonMaxPerNode         = "max per node reached"
)

func reasonConstraint(c api.Constraint) string {
	if c.Op == "exists" {
		return "constraint " + c.Key + " unmet"
	}
	return "constraint " + c.Key + " " + c.Op + " " + c.Value + " unmet"
}

func reasonNetwork(n string) string { return "network " + n + " missing" }

func reasonPort(p int) string { return "host port " + strconv.Itoa(p) + " in use" }

// DefaultMaxClasses bounds the classes (distinct constraint and network sets)
// whose candidate index a Snapshot keeps; the least recently used one is
// dropped beyond it and rebuilt when needed again.
const DefaultMaxClasses = 64

// Request is what one instance needs from a node.
type Request struct {
	// Service names the service; replica counts (max per node, spread) are
	// per service.
	Service string
	// Resources are the requests reserved on the node.
	Resources api.Resources
	// Constraints must all match the node's labels.
	Constraints []api.Constraint
	// Strategy is api.StrategyBinpack (also for "") or api.StrategySpread;
	// any other value is treated as binpack.
	Strategy string
	// MaxPerNode bounds the service's instances on one node (0: no limit).
	MaxPerNode int
	// HostPorts must each be free on the node (0 entries are ignored). The
	// protocol is not considered: tcp and udp on one port conflict.
	HostPorts []int
	// Networks must all be present on the node (see WithNetworks).
	Networks []string
}

// RequestFor builds the request of one instance of a service spec.
func RequestFor(spec api.ServiceSpec) (Request, error) {
	r := Request{
		Service:    spec.Name,
		Resources:  api.Resources{CPU: spec.Resources.CPU, Memory: spec.Resources.Memory},
		Strategy:   spec.Placement.Strategy,
		MaxPerNode: spec.Placement.MaxPerNode,
		Networks:   spec.Networks,
	}
	for _, s := range spec.Placement.Constraints {
		c, err := api.ParseConstraint(s)
		if err != nil {
			return Request{}, err
		}
		r.Constraints = append(r.Constraints, c)
	}
	for _, p := range spec.Ports {
		if p.HostPort != 0 {
			r.HostPorts = append(r.HostPorts, p.HostPort)
		}
	}
	return r, nil
}

// Result is the outcome of one placement.
type Result struct {
	// Node is the chosen node, "" when no node is feasible.
	Node string
	// Score is the chosen node's score, higher is better, in [0, 1] for
	// nodes within their allocatable: binpack, the mean of the CPU and
	// memory utilisation after placement; spread, one minus that mean
	// (among the nodes with the fewest replicas of the service).
	Score float64
}

// Explanation says why nodes were ruled out.
//
// When a placement fails it covers every node of the snapshot, each counted
// once under the first filter it fails, in this order: node down,
// constraints, networks, max per node, host ports, cpu, memory. When a
// placement succeeds it covers only the nodes that were examined (nodes the
// index skipped for lack of CPU or memory are not counted).
type Explanation struct {
	// Considered is the number of nodes the explanation covers.
	Considered int
	// Filtered counts nodes ruled out, by reason.
	Filtered map[string]int
}

// Feasible is the number of considered nodes that passed every filter.
func (e Explanation) Feasible() int {
	n := e.Considered
	for _, c := range e.Filtered {
		n -= c
	}
	return n
}

// String reads like "0/5 nodes: 3 insufficient memory, 2 constraint rack ==
// a unmet": feasible/considered, then the reasons by count, most first, ties
// by reason.
func (e Explanation) String() string {
	var b strings.Builder
	fmt.Fprintf(&b, "%d/%d nodes", e.Feasible(), e.Considered)
	type rc struct {
		r string
		n int
	}
	rs := make([]rc, 0, len(e.Filtered))
	for r, n := range e.Filtered {
		if n != 0 {
			rs = append(rs, rc{r, n})
		}
	}
	slices.SortFunc(rs, func(a, b rc) int {
		if c := cmp.Compare(b.n, a.n); c != 0 {
			return c
		}
		return strings.Compare(a.r, b.r)
	})
	for i, x := range rs {
		if i == 0 {
			b.WriteString(": ")
		} else {
			b.WriteString(", ")
		}
		b.WriteString(strconv.Itoa(x.n))
		b.WriteByte(' ')
		b.WriteString(x.r)
	}
	return b.String()
}

// Option configures a Snapshot.
type Option func(*config)

type config struct {
	seed       uint64
	hasNetwork func(node, network string) bool
	maxClasses int
	rankLimit  int
}

// WithSeed sets the seed of the node order and of spread's sampling
// (default 0).
func WithSeed(seed uint64) Option { return func(c *config) { c.seed = seed } }

// WithNetworks tells which networks a node has. Without it every node has
// every network.
func WithNetworks(has func(node, network string) bool) Option {
	return func(c *config) { c.hasNetwork = has }
}

// WithRankLimit sets how many feasible candidates are ranked per placement
// (default max(8, ⌊log2(ready nodes)⌋)).
func WithRankLimit(k int) Option {
	return func(c *config) {
		if k > 0 {
			c.rankLimit = k
		}
	}
}

// WithMaxClasses sets how many class indexes are kept (default
// DefaultMaxClasses).
func WithMaxClasses(n int) Option {
	return func(c *config) {
		if n > 0 {
			c.maxClasses = n
		}
	}
}

type node struct {
	name               string
	labels             map[string]string
	ready              bool
	allocCPU, allocMem int64
	usedCPU, usedMem   int64
	ports              map[int]int32 // host port → instances using it
}

// Snapshot is a working copy of the cluster's placement state. Place and
// PlaceN reserve what they place; Release gives it back.
type Snapshot struct {
	nodes  []node // in placement order: a seeded shuffle of the nodes by name
	byName map[string]int32
	ready  int
	k      int // candidates ranked per placement
	rng    *rand.Rand
	cfg    config

	classes map[string]*class
	live    []*class
	tick    uint64

	services map[string]*service
	// releases counts Release calls: search cursors kept across calls are
	// valid only while nothing was freed.
	releases uint64

	cands []cand // scratch
}

// NewSnapshot builds a snapshot of nodes with the usage of instances: every
// instance with a Node and DesiredState running reserves its
// Resources, its Status.Ports' host ports and a replica of its Service on
// that node. Nodes not ready are kept (explanations count them as "node
// down") but never chosen. Instances on unknown nodes are ignored, as are
// later nodes with an already seen name.
func NewSnapshot(nodes []api.Node, instances []api.Instance, opts ...Option) *Snapshot {
	cfg := config{maxClasses: DefaultMaxClasses}
	for _, o := range opts {
		o(&cfg)
	}
	s := &Snapshot{
		byName:   make(map[string]int32, len(nodes)),
		rng:      rand.New(rand.NewPCG(cfg.seed, cfg.seed^0x9e3779b97f4a7c15)),
		cfg:      cfg,
		classes:  map[string]*class{},
		services: map[string]*service{},
	}
	s.nodes = make([]node, 0, len(nodes))
	seen := make(map[string]bool, len(nodes))
	for i := range nodes {
		n := &nodes[i]
		if seen[n.Name] {
			continue
		}
		seen[n.Name] = true
		s.nodes = append(s.nodes, node{
			name:     n.Name,
			labels:   n.Labels,
			ready:    n.Status.State == api.NodeReady,
			allocCPU: int64(n.Allocatable.CPU),
			allocMem: int64(n.Allocatable.Memory),
		})
	}
	slices.SortFunc(s.nodes, func(a, b node) int { return strings.Compare(a.name, b.name) })
	s.rng.Shuffle(len(s.nodes), func(i, j int) { s.nodes[i], s.nodes[j] = s.nodes[j], s.nodes[i] })
	for i := range s.nodes {
		s.byName[s.nodes[i].name] = int32(i)
		if s.nodes[i].ready {
			s.ready++
		}
	}
	s.k = max(8, bits.Len(uint(s.ready))-1)
	if cfg.rankLimit > 0 {
		s.k = cfg.rankLimit
	}
	for i := range instances {
		in := &instances[i]
		if in.Node == "" || in.DesiredState != api.DesiredRunning {
			continue
		}
		id, ok := s.byName[in.Node]
		if !ok {
			continue
		}
		var ports []int
		for _, p := range in.Status.Ports {
			if p.HostPort != 0 {
				ports = append(ports, p.HostPort)
			}
		}
		s.reserve(id, in.Service, int64(in.Resources.CPU), int64(in.Resources.Memory), ports)
	}
	return s
}

// Reserve records an instance of req on a node without any check, as
// NewSnapshot does for running instances (use it when the host ports are
// known from the spec rather than the instance status). It reports whether
// the node is known.
func (s *Snapshot) Reserve(nodeName string, req Request) bool {
	id, ok := s.byName[nodeName]
	if !ok {
		return false
	}
	s.reserve(id, req.Service, int64(req.Resources.CPU), int64(req.Resources.Memory), nonZero(req.HostPorts))
	return true
}

// Release gives back what one instance of req holds on a node: an undone
// placement or an instance that stopped. req must carry the resources and
// host ports the instance reserved. It reports false, changing nothing, when
// the node holds no instance of req.Service.
func (s *Snapshot) Release(nodeName string, req Request) bool {
	id, ok := s.byName[nodeName]
	if !ok {
		return false
	}
	svc := s.services[req.Service]
	if svc == nil || svc.count(id) == 0 {
		return false
	}
	svc.remove(id)
	s.releases++
	n := &s.nodes[id]
	n.usedCPU -= int64(req.Resources.CPU)
	n.usedMem -= int64(req.Resources.Memory)
	for _, p := range req.HostPorts {
		if p == 0 || n.ports == nil {
			continue
		}
		if c := n.ports[p]; c > 1 {
			n.ports[p] = c - 1
		} else {
			delete(n.ports, p)
		}
	}
	s.updateTrees(id)
	return true
}

// Usage reports what is reserved on a node and its allocatable resources.
func (s *Snapshot) Usage(nodeName string) (used, allocatable api.Resources, ok bool) {
	id, ok := s.byName[nodeName]
	if !ok {
		return used, allocatable, false
	}
	n := &s.nodes[id]
	return api.Resources{CPU: api.CPU(n.usedCPU), Memory: api.Bytes(n.usedMem)},
		api.Resources{CPU: api.CPU(n.allocCPU), Memory: api.Bytes(n.allocMem)}, true
}

// Count is the number of instances of a service on a node.
func (s *Snapshot) Count(service, nodeName string) int {
	id, ok := s.byName[nodeName]
	svc := s.services[service]
	if !ok || svc == nil {
		return 0
	}
	return int(svc.count(id))
}

// RankLimit is the number of feasible candidates ranked per placement.
func (s *Snapshot) RankLimit() int { return s.k }

func nonZero(ports []int) []int {
	for _, p := range ports {
		if p == 0 {
			out := make([]int, 0, len(ports))
			for _, q := range ports {
				if q != 0 {
					out = append(out, q)
				}
			}
			return out
		}
	}
	return ports
}

func (s *Snapshot) service(name string) *service {
	svc := s.services[name]
	if svc == nil {
		svc = &service{at: map[int32]slot{}}
		s.services[name] = svc
	}
	return svc
}

func (s *Snapshot) reserve(id int32, service string, cpu, mem int64, ports []int) {
	n := &s.nodes[id]
	n.usedCPU += cpu
	n.usedMem += mem
	for _, p := range ports {
		if n.ports == nil {
			n.ports = map[int]int32{}
		}
		n.ports[p]++
	}
	s.service(service).add(id)
	s.updateTrees(id)
}

// utilAfter is the mean of the CPU and memory utilisation of a node after
// adding cpu and mem; a resource with nothing allocatable counts as full.
func (n *node) utilAfter(cpu, mem int64) float64 {
	fc, fm := 1.0, 1.0
	if n.allocCPU > 0 {
		fc = float64(n.usedCPU+cpu) / float64(n.allocCPU)
	}
	if n.allocMem > 0 {
		fm = float64(n.usedMem+mem) / float64(n.allocMem)
	}
	return (fc + fm) / 2
}

// service holds one service's replicas per node, grouped by count.
type service struct {
	at     map[int32]slot // node → its count and index in levels[count]
	levels [][]int32      // levels[c]: nodes with exactly c replicas (c ≥ 1)
	track  *class         // the class occ is counted for
	occ    int            // members of track with at least one replica
	memo   memo           // where the last search for this service ended
}

type slot struct{ n, i int32 }

func (v *service) count(id int32) int32 { return v.at[id].n }

func (v *service) unlink(id int32, sl slot) {
	lv := v.levels[sl.n]
	last := lv[len(lv)-1]
	lv[sl.i] = last
	v.levels[sl.n] = lv[:len(lv)-1]
	if last != id {
		ls := v.at[last]
		ls.i = sl.i
		v.at[last] = ls
	}
}

func (v *service) link(id int32, n int32) {
	for int(n) >= len(v.levels) {
		v.levels = append(v.levels, nil)
	}
	v.levels[n] = append(v.levels[n], id)
	v.at[id] = slot{n: n, i: int32(len(v.levels[n]) - 1)}
}

func (v *service) add(id int32) {
	sl, ok := v.at[id]
	if ok {
		v.unlink(id, sl)
	} else if v.track != nil && v.track.pos[id] >= 0 {
		v.occ++
	}
	v.link(id, sl.n+1)
}

func (v *service) remove(id int32) {
	sl := v.at[id]
	v.unlink(id, sl)
	if sl.n > 1 {
		v.link(id, sl.n-1)
		return
	}
	delete(v.at, id)
	if v.track != nil && v.track.pos[id] >= 0 {
		v.occ--
	}
}

// trackClass makes occ count the members of c holding a replica.
func (v *service) trackClass(c *class) {
	if v.track == c {
		return
	}
	v.track, v.occ = c, 0
	for id := range v.at {
		if c.pos[id] >= 0 {
			v.occ++
		}
	}
}

// class is the static feasibility of one (constraints, networks) pair: its
// members in node order, a max segment tree of their free CPU and memory,
// and the reasons the other nodes fail.
type class struct {
	members    []int32 // node ids, ascending (node order)
	pos        []int32 // node id → index in members, or -1
	size       int     // leaves of the tree, a power of two
	fcpu, fmem []int64 // tree, 1-based; leaves at size+i
	static     map[string]int
	key        string
	lastUse    uint64
}

const empty = math.MinInt64

func (c *class) set(i int, cpu, mem int64) {
	j := c.size + i
	c.fcpu[j], c.fmem[j] = cpu, mem
	for j >>= 1; j >= 1; j >>= 1 {
		c.fcpu[j] = max(c.fcpu[2*j], c.fcpu[2*j+1])
		c.fmem[j] = max(c.fmem[2*j], c.fmem[2*j+1])
	}
}

func (s *Snapshot) updateTrees(id int32) {
	n := &s.nodes[id]
	fc, fm := n.allocCPU-n.usedCPU, n.allocMem-n.usedMem
	for _, c := range s.live {
		if p := c.pos[id]; p >= 0 {
			c.set(int(p), fc, fm)
		}
	}
}

// staticReason is why a node is outside a class, or "".
func (s *Snapshot) staticReason(n *node, cons []api.Constraint, nets []string) string {
	if !n.ready {
		return ReasonNodeDown
	}
	for _, c := range cons {
		if !c.Match(n.labels) {
			return reasonConstraint(c)
		}
	}
	if s.cfg.hasNetwork != nil {
		for _, nw := range nets {
			if !s.cfg.hasNetwork(n.name, nw) {
				return reasonNetwork(nw)
			}
		}
	}
	return ""
}

func (s *Snapshot) buildClass(key string, cons []api.Constraint, nets []string) *class {
	c := &class{key: key, pos: make([]int32, len(s.nodes)), static: map[string]int{}}
	for id := range s.nodes {
		if r := s.staticReason(&s.nodes[id], cons, nets); r != "" {
			c.static[r]++
			c.pos[id] = -1
			continue
		}
		c.pos[id] = int32(len(c.members))
		c.members = append(c.members, int32(id))
	}
	c.size = 1
	for c.size < len(c.members) {
		c.size <<= 1
	}
	c.fcpu = make([]int64, 2*c.size)
	c.fmem = make([]int64, 2*c.size)
	for i := range c.size {
		if i < len(c.members) {
			n := &s.nodes[c.members[i]]
			c.fcpu[c.size+i], c.fmem[c.size+i] = n.allocCPU-n.usedCPU, n.allocMem-n.usedMem
		} else {
			c.fcpu[c.size+i], c.fmem[c.size+i] = empty, empty
		}
	}
	for j := c.size - 1; j >= 1; j-- {
		c.fcpu[j] = max(c.fcpu[2*j], c.fcpu[2*j+1])
		c.fmem[j] = max(c.fmem[2*j], c.fmem[2*j+1])
	}
	return c
}

// classFor returns the class of a request's constraints and networks,
// building it (and dropping the least recently used one) if needed.
func (s *Snapshot) classFor(cons []api.Constraint, nets []string) *class {
	var key string
	if len(cons) > 0 || len(nets) > 0 {
		if !slices.IsSortedFunc(cons, compareConstraint) {
			cons = slices.Clone(cons)
			slices.SortFunc(cons, compareConstraint)
		}
		if !slices.IsSorted(nets) {
			nets = slices.Clone(nets)
			slices.Sort(nets)
		}
		var b strings.Builder
		for _, c := range cons {
			b.WriteString(c.Key)
			b.WriteByte(0)
			b.WriteString(c.Op)
			b.WriteByte(0)
			b.WriteString(c.Value)
			b.WriteByte(1)
		}
		b.WriteByte(2)
		for _, n := range nets {
			b.WriteString(n)
			b.WriteByte(1)
		}
		key = b.String()
	}
	s.tick++
	if c := s.classes[key]; c != nil {
		c.lastUse = s.tick
		return c
	}
	if len(s.live) >= s.cfg.maxClasses {
		old := 0
		for i, c := range s.live {
			if c.lastUse < s.live[old].lastUse {
				old = i
			}
		}
		delete(s.classes, s.live[old].key)
		s.live[old] = s.live[len(s.live)-1]
		s.live = s.live[:len(s.live)-1]
	}
	c := s.buildClass(key, cons, nets)
	c.lastUse = s.tick
	s.classes[key] = c
	s.live = append(s.live, c)
	return c
}

func compareConstraint(a, b api.Constraint) int {
	if c := strings.Compare(a.Key, b.Key); c != 0 {
		return c
	}
	if c := strings.Compare(a.Op, b.Op); c != 0 {
		return c
	}
	return strings.Compare(a.Value, b.Value)
}
