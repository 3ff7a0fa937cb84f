package server

import (
	"context"
	"errors"
	"log/slog"
	"math"
	"sync"
	"sync/atomic"
	"time"

	"github.com/berth-dev/berth/internal/store"
)

// leaseStore is what the lease pool needs of the store; tests fake it.
type leaseStore interface {
	Grant(ctx context.Context, ttl time.Duration) (int64, error)
	KeepAlive(ctx context.Context, lease int64) error
	Revoke(ctx context.Context, lease int64) error
}

// Tuning of the lease pool.
const (
	// poolHorizon is how much demand a pool keeps leases for: at n
	// registrations a second it holds about n×poolHorizon of them.
	poolHorizon = 50 * time.Millisecond
	poolMinSize = 4   // a pool in use holds at least this many
	poolMaxSize = 256 // and at most this many
	maxPools    = 16  // TTLs pooled at once; the least recently used goes
	// refillParallel grants are in flight at once per refill: raft commits
	// them together.
	refillParallel = 32
	grantTimeout   = 10 * time.Second
	// closeRevokeFor bounds how long close spends revoking unused leases;
	// those left expire on their own.
	closeRevokeFor = 2 * time.Second
)

// leasePool hands out etcd leases granted ahead of time, so that a
// registration costs one raft commit (its write) instead of two (a grant,
// then the write). There is a pool per TTL (in whole seconds, as etcd keeps
// them), sized by the recent rate of registrations of that TTL and refilled
// in the background by a goroutine that ends once the pool is full.
//
// A lease in the pool ages: take renews it (a keepalive: not a raft write),
// so the registration it goes to expires a whole TTL after it was taken,
// exactly as with a lease granted on the spot. A lease that sat unused for
// most of its TTL is dropped from the pool and left to expire; it has no
// keys.
type leasePool struct {
	st  leaseStore
	log *slog.Logger
	now func() time.Time

	ctx    context.Context // of the background grants; ended by close
	cancel context.CancelFunc
	wg     sync.WaitGroup // refills running

	mu     sync.Mutex
	pools  map[int64]*ttlPool // by TTL in seconds
	closed bool

	pooled, granted atomic.Int64 // leases taken from a pool, granted on the spot
}

// ttlPool is the pool of one TTL.
type ttlPool struct {
	secs      int64
	free      []pooledLease // oldest first
	refilling bool
	last      time.Time     // of the last take
	interval  time.Duration // between takes, a moving average; 0: unknown
}

// pooledLease is a lease in a pool and when its TTL last started.
type pooledLease struct {
	id    int64
	fresh time.Time
}

func newLeasePool(st leaseStore, log *slog.Logger) *leasePool {
	ctx, cancel := context.WithCancel(context.Background())
	return &leasePool{st: st, log: log, now: time.Now, ctx: ctx, cancel: cancel, pools: map[int64]*ttlPool{}}
}

// usable is how long a pooled lease of secs seconds may wait to be taken:
// taking it must renew it well before it expires (an expired lease etcd
// has not revoked yet would hold the renewal up).
func usable(secs int64) time.Duration {
	ttl := time.Duration(secs) * time.Second
	return ttl - max(time.Second, ttl/10)
}

// target is how many leases p should hold at its current rate of takes.
func (p *ttlPool) target() int {
	if p.interval <= 0 {
		return 0
	}
	// A lease that would wait longer than half its usable time on average
	// is more likely wasted than used: no pool at that rate.
	if 2*time.Duration(poolMinSize)*p.interval > usable(p.secs) {
		return 0
	}
	n := int(math.Ceil(float64(poolHorizon) / float64(p.interval)))
	return min(max(n, poolMinSize), poolMaxSize)
}

// take returns a lease of ttl (rounded up to whole seconds) whose TTL starts
// now and that no key uses: from the pool when it has one, else granted.
func (p *leasePool) take(ctx context.Context, ttl time.Duration) (int64, error) {
	secs := store.TTLSeconds(ttl)
	for {
		id, ok := p.pop(secs)
		if !ok {
			break
		}
		err := p.st.KeepAlive(ctx, id)
		if err == nil {
			p.pooled.Add(1)
			return id, nil
		}
		if !errors.Is(err, store.ErrNoLease) {
			return 0, err
		}
		// Gone meanwhile (revoked by hand, or etcd lost it): the next.
	}
	p.granted.Add(1)
	return p.st.Grant(ctx, time.Duration(secs)*time.Second)
}

// giveBack returns a lease taken but not used (no key was ever written on
// it, for sure) to its pool.
func (p *leasePool) giveBack(ttl time.Duration, id int64) {
	secs := store.TTLSeconds(ttl)
	p.mu.Lock()
	defer p.mu.Unlock()
	if tp := p.pools[secs]; tp != nil && !p.closed && len(tp.free) < poolMaxSize {
		// It was renewed when taken: as fresh as the newest.
		tp.free = append(tp.free, pooledLease{id: id, fresh: p.now()})
	}
}

// pop takes the oldest usable lease of the pool of secs, if any, and starts
// a refill when the pool runs low.
func (p *leasePool) pop(secs int64) (int64, bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	now := p.now()
	tp := p.pool(secs)
	if !tp.last.IsZero() {
		dt := now.Sub(tp.last)
		if tp.interval == 0 {
			tp.interval = max(dt, 1)
		} else {
			tp.interval = max((4*tp.interval+dt)/5, 1)
		}
	}
	tp.last = now
	old := 0
	for old < len(tp.free) && now.Sub(tp.free[old].fresh) >= usable(secs) {
		old++
	}
	tp.free = tp.free[old:]
	var id int64
	ok := len(tp.free) > 0
	if ok {
		id = tp.free[0].id
		tp.free = tp.free[1:]
	}
	if t := tp.target(); !p.closed && !tp.refilling && len(tp.free) < t*3/4 {
		tp.refilling = true
		p.wg.Add(1)
		go p.refill(tp)
	}
	return id, ok
}

// pool returns the pool of secs, making it; the caller holds p.mu.
func (p *leasePool) pool(secs int64) *ttlPool {
	if tp := p.pools[secs]; tp != nil {
		return tp
	}
	if len(p.pools) >= maxPools {
		// The least recently used goes; its leases expire unused.
		var lru *ttlPool
		for _, tp := range p.pools {
			if lru == nil || tp.last.Before(lru.last) {
				lru = tp
			}
		}
		delete(p.pools, lru.secs)
	}
	tp := &ttlPool{secs: secs}
	p.pools[secs] = tp
	return tp
}

// refill grants leases until tp holds its target, refillParallel at a time.
func (p *leasePool) refill(tp *ttlPool) {
	defer p.wg.Done()
	ttl := time.Duration(tp.secs) * time.Second
	for {
		p.mu.Lock()
		n := tp.target() - len(tp.free)
		if n <= 0 || p.closed {
			tp.refilling = false
			p.mu.Unlock()
			return
		}
		p.mu.Unlock()
		n = min(n, refillParallel)
		ids := make([]int64, n)
		errs := make([]error, n)
		start := p.now()
		var wg sync.WaitGroup
		for i := range n {
			wg.Go(func() {
				ctx, cancel := context.WithTimeout(p.ctx, grantTimeout)
				defer cancel()
				ids[i], errs[i] = p.st.Grant(ctx, ttl)
			})
		}
		wg.Wait()
		p.mu.Lock()
		var failed error
		for i, id := range ids {
			if errs[i] != nil {
				failed = errs[i]
				continue
			}
			// The TTL started at the latest when the grant was sent.
			tp.free = append(tp.free, pooledLease{id: id, fresh: start})
		}
		if failed != nil {
			tp.refilling = false
			p.mu.Unlock()
			// The next take tries again, and grants on the spot if need
			// be: a store that fails shows there (this also happens when
			// the store closes under a refill).
			p.log.Debug("lease pool: grant failed", "ttl", ttl, "err", failed)
			return
		}
		p.mu.Unlock()
	}
}

// close stops the refills and revokes the leases left in the pools (for at
// most closeRevokeFor; those left expire on their own). The pool still
// works after close, granting each lease on the spot.
func (p *leasePool) close() {
	p.mu.Lock()
	p.closed = true
	p.mu.Unlock()
	p.cancel()
	p.wg.Wait()
	p.mu.Lock()
	var ids []int64
	for _, tp := range p.pools {
		for _, l := range tp.free {
			ids = append(ids, l.id)
		}
		tp.free = nil
	}
	p.mu.Unlock()
	ctx, cancel := context.WithTimeout(context.Background(), closeRevokeFor)
	defer cancel()
	sem := make(chan struct{}, refillParallel)
	var wg sync.WaitGroup
	for _, id := range ids {
		select {
		case sem <- struct{}{}:
		case <-ctx.Done():
		}
		if ctx.Err() != nil {
			break
		}
		wg.Go(func() {
			defer func() { <-sem }()
			_ = p.st.Revoke(ctx, id)
		})
	}
	wg.Wait()
}

// size is how many leases the pool of ttl holds (tests).
func (p *leasePool) size(ttl time.Duration) int {
	p.mu.Lock()
	defer p.mu.Unlock()
	if tp := p.pools[store.TTLSeconds(ttl)]; tp != nil {
		return len(tp.free)
	}
	return 0
}
