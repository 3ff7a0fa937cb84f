package server

import (
	"context"
	"errors"
	"log/slog"
	"sync"
	"testing"
	"time"

	"github.com/berth-dev/berth/internal/store"
)

// fakeClock is a clock that moves only when told.
type fakeClock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *fakeClock) now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *fakeClock) advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.t = c.t.Add(d)
}

// fakeLeases is an etcd lessor on a fake clock.
type fakeLeases struct {
	clock *fakeClock
	mu    sync.Mutex
	next  int64
	ttl   map[int64]time.Duration
	until map[int64]time.Time
	// counts
	grants, renewals, revokes int
}

func newFakeLeases(c *fakeClock) *fakeLeases {
	return &fakeLeases{clock: c, ttl: map[int64]time.Duration{}, until: map[int64]time.Time{}}
}

func (f *fakeLeases) Grant(ctx context.Context, ttl time.Duration) (int64, error) {
	if err := ctx.Err(); err != nil {
		return 0, err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	f.next++
	f.grants++
	f.ttl[f.next], f.until[f.next] = ttl, f.clock.now().Add(ttl)
	return f.next, nil
}

func (f *fakeLeases) KeepAlive(_ context.Context, id int64) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if !f.aliveLocked(id) {
		return store.ErrNoLease
	}
	f.renewals++
	f.until[id] = f.clock.now().Add(f.ttl[id])
	return nil
}

func (f *fakeLeases) Revoke(_ context.Context, id int64) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.revokes++
	delete(f.ttl, id)
	delete(f.until, id)
	return nil
}

func (f *fakeLeases) aliveLocked(id int64) bool {
	u, ok := f.until[id]
	return ok && f.clock.now().Before(u)
}

// expiry is when lease id expires (zero when it is gone).
func (f *fakeLeases) expiry(id int64) time.Time {
	f.mu.Lock()
	defer f.mu.Unlock()
	if !f.aliveLocked(id) {
		return time.Time{}
	}
	return f.until[id]
}

func (f *fakeLeases) live() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	n := 0
	for id := range f.until {
		if f.aliveLocked(id) {
			n++
		}
	}
	return n
}

func newTestPool(t *testing.T) (*leasePool, *fakeLeases, *fakeClock) {
	t.Helper()
	c := &fakeClock{t: time.Unix(1e9, 0)}
	f := newFakeLeases(c)
	p := newLeasePool(f, slog.New(slog.DiscardHandler))
	p.now = c.now
	t.Cleanup(p.close)
	return p, f, c
}

// waitRefilled waits until no refill runs.
func waitRefilled(t *testing.T, p *leasePool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		p.mu.Lock()
		busy := false
		for _, tp := range p.pools {
			busy = busy || tp.refilling
		}
		p.mu.Unlock()
		if !busy {
			return
		}
		if time.Now().After(deadline) {
			t.Fatal("refill still running after 5s")
		}
		time.Sleep(time.Millisecond)
	}
}

func TestLeasePoolTarget(t *testing.T) {
	tests := []struct {
		name     string
		secs     int64
		interval time.Duration
		want     int
	}{
		{"no rate known", 600, 0, 0},
		{"10,000/s", 600, 100 * time.Microsecond, poolMaxSize},
		{"1,000/s", 600, time.Millisecond, 50},
		{"100/s", 600, 10 * time.Millisecond, 5},
		{"20/s", 600, 50 * time.Millisecond, poolMinSize},
		{"1/s, 10 min TTL", 600, time.Second, poolMinSize},
		{"1/s, 2s TTL: leases would age out", 2, time.Second, 0},
		{"10/s, 2s TTL", 2, 100 * time.Millisecond, poolMinSize},
		{"4/s, 2s TTL: leases would wait too long", 2, 250 * time.Millisecond, 0},
		{"100/s, 2s TTL", 2, 10 * time.Millisecond, 5},
		{"one a minute, 10 min TTL: used before they age", 600, time.Minute, poolMinSize},
		{"one in 10 minutes, 10 min TTL", 600, 10 * time.Minute, 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			tp := &ttlPool{secs: tt.secs, interval: tt.interval}
			if got := tp.target(); got != tt.want {
				t.Errorf("target = %d, want %d", got, tt.want)
			}
		})
	}
}

// TestLeasePoolRenewsOnTake: a lease that waited in the pool is renewed as
// it is taken, so its TTL starts at the take, not at the grant.
func TestLeasePoolRenewsOnTake(t *testing.T) {
	p, f, c := newTestPool(t)
	ctx := context.Background()
	const ttl = 10 * time.Second
	// Takes 1ms apart: the pool learns the rate and fills.
	first, err := p.take(ctx, ttl)
	if err != nil {
		t.Fatal(err)
	}
	c.advance(time.Millisecond)
	if _, err := p.take(ctx, ttl); err != nil {
		t.Fatal(err)
	}
	waitRefilled(t, p)
	if n := p.size(ttl); n < poolMinSize {
		t.Fatalf("pool holds %d leases after a refill, want >= %d", n, poolMinSize)
	}
	c.advance(5 * time.Second)
	id, err := p.take(ctx, ttl)
	if err != nil {
		t.Fatal(err)
	}
	if id == first {
		t.Fatal("a lease handed out twice")
	}
	if got, want := f.expiry(id), c.now().Add(ttl); !got.Equal(want) {
		t.Fatalf("pooled lease expires at %v, want %v (a whole TTL after the take)", got, want)
	}
}

// TestLeasePoolDropsOldLeases: a lease that sat in the pool for most of
// its TTL is not handed out (nor renewed): it expires unused.
func TestLeasePoolDropsOldLeases(t *testing.T) {
	p, f, c := newTestPool(t)
	ctx := context.Background()
	const ttl = 4 * time.Second
	for range 3 {
		if _, err := p.take(ctx, ttl); err != nil {
			t.Fatal(err)
		}
		c.advance(time.Millisecond)
	}
	waitRefilled(t, p)
	pooled := map[int64]bool{}
	p.mu.Lock()
	for _, l := range p.pools[4].free {
		pooled[l.id] = true
	}
	p.mu.Unlock()
	if len(pooled) == 0 {
		t.Fatal("nothing pooled")
	}
	c.advance(usable(4))
	renewals := f.renewals
	id, err := p.take(ctx, ttl)
	if err != nil {
		t.Fatal(err)
	}
	if pooled[id] {
		t.Fatalf("lease %d handed out after waiting %v in the pool", id, usable(4))
	}
	if f.renewals != renewals {
		t.Fatalf("%d old leases renewed", f.renewals-renewals)
	}
	// The interval since the last take is long now: no pool at that rate.
	waitRefilled(t, p)
	c.advance(2 * time.Second)
	if got := p.size(ttl); got != 0 {
		t.Fatalf("%d leases pooled at a rate they would age out at", got)
	}
}

// TestLeasePoolSkipsLostLeases: a pooled lease etcd no longer has is
// skipped; take goes on to the next one, or grants.
func TestLeasePoolSkipsLostLeases(t *testing.T) {
	p, f, c := newTestPool(t)
	ctx := context.Background()
	const ttl = time.Minute
	for range 3 {
		if _, err := p.take(ctx, ttl); err != nil {
			t.Fatal(err)
		}
		c.advance(time.Millisecond)
	}
	waitRefilled(t, p)
	p.mu.Lock()
	lost := p.pools[60].free[0].id
	p.mu.Unlock()
	_ = f.Revoke(ctx, lost)
	id, err := p.take(ctx, ttl)
	if err != nil {
		t.Fatal(err)
	}
	if id == lost || f.expiry(id).IsZero() {
		t.Fatalf("took lease %d (lost %d), alive: %v", id, lost, !f.expiry(id).IsZero())
	}
}

// TestLeasePoolGiveBackAndClose: a lease given back is handed out again;
// close revokes what the pools hold, and the pool then grants on the spot.
func TestLeasePoolGiveBackAndClose(t *testing.T) {
	p, f, c := newTestPool(t)
	ctx := context.Background()
	const ttl = time.Minute
	var taken []int64
	for range 20 {
		id, err := p.take(ctx, ttl)
		if err != nil {
			t.Fatal(err)
		}
		taken = append(taken, id)
		c.advance(time.Millisecond)
	}
	waitRefilled(t, p)
	p.giveBack(ttl, taken[len(taken)-1])
	p.mu.Lock()
	free := p.pools[60].free
	back := free[len(free)-1].id
	p.mu.Unlock()
	if back != taken[len(taken)-1] {
		t.Fatalf("last pooled lease %d, want the one given back %d", back, taken[len(taken)-1])
	}
	p.close()
	if got, want := f.live(), len(taken)-1; got != want {
		t.Fatalf("%d leases alive after close, want the %d taken", got, want)
	}
	grants := f.grants
	if _, err := p.take(ctx, ttl); err != nil {
		t.Fatal(err)
	}
	waitRefilled(t, p)
	if f.grants != grants+1 {
		t.Fatalf("%d grants for one take after close", f.grants-grants)
	}
}

// TestLeasePoolConcurrent: many takers at once never share a lease (run
// with -race).
func TestLeasePoolConcurrent(t *testing.T) {
	p, _, c := newTestPool(t)
	ctx := context.Background()
	var (
		mu   sync.Mutex
		seen = map[int64]bool{}
		wg   sync.WaitGroup
	)
	for range 8 {
		wg.Go(func() {
			for i := range 200 {
				ttl := time.Minute
				if i%3 == 0 {
					ttl = 2 * time.Minute
				}
				id, err := p.take(ctx, ttl)
				if err != nil {
					t.Error(err)
					return
				}
				c.advance(100 * time.Microsecond)
				mu.Lock()
				if seen[id] {
					t.Errorf("lease %d handed out twice", id)
				}
				seen[id] = true
				mu.Unlock()
			}
		})
	}
	wg.Wait()
}

// TestLeasePoolGrantErrors: a failing grant is the take's error, and a
// refill that fails stops without harm.
func TestLeasePoolGrantErrors(t *testing.T) {
	p, _, _ := newTestPool(t)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := p.take(ctx, time.Minute); !errors.Is(err, context.Canceled) {
		t.Fatalf("take with a cancelled context: %v", err)
	}
}
