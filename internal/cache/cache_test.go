package cache

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"testing"
	"time"

	"github.com/berth-dev/berth/internal/store"
)

func quietLog() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

func openStore(t *testing.T) *store.Store {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	st, err := store.Open(ctx, store.Config{DataDir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = st.Close() })
	return st
}

// startCache runs c until the test ends and waits for its first list. The
// cache is stopped (and Run has returned) before the store is closed.
func startCache(t *testing.T, c *Cache) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- c.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			t.Error("cache.Run did not return after cancel")
		}
	})
	select {
	case <-c.Ready():
	case <-time.After(10 * time.Second):
		t.Fatal("cache not ready")
	}
}

func put(t *testing.T, st *store.Store, key string, v any) int64 {
	t.Helper()
	rev, err := st.Put(context.Background(), store.Prefix+key, v, -1)
	if err != nil {
		t.Fatal(err)
	}
	return rev
}

func del(t *testing.T, st *store.Store, key string) int64 {
	t.Helper()
	rev, err := st.Delete(context.Background(), store.Prefix+key, -1)
	if err != nil {
		t.Fatal(err)
	}
	return rev
}

func waitFor(t *testing.T, c *Cache, rev int64) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := c.WaitFor(ctx, rev); err != nil {
		t.Fatalf("cache not current to %d (at %d): %v", rev, c.Revision(), err)
	}
}

type ev struct {
	del bool
	key string
	val string
	rev int64
}

func simplify(evs []Event) []ev {
	out := make([]ev, len(evs))
	for i, e := range evs {
		out[i] = ev{e.Delete, e.Key, string(e.Value), e.Revision}
	}
	return out
}

func equal(a, b []ev) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

func TestSnapshot(t *testing.T) {
	st := openStore(t)
	// Objects written before Run are picked up by the first list.
	r1 := put(t, st, "things/a", 1)
	c := New(st, store.Prefix, quietLog())
	startCache(t, c)
	r2 := put(t, st, "things/c", 3)
	r3 := put(t, st, "things/b", 2)
	r4 := put(t, st, "other/x", "x")
	r5 := put(t, st, "things/a", 10) // overwrite
	r6 := put(t, st, "things/gone", 0)
	r7 := del(t, st, "things/gone")
	waitFor(t, c, r7)
	_ = r1

	tests := []struct {
		prefix string
		want   []ev
	}{
		{store.Prefix + "things/", []ev{
			{false, store.Prefix + "things/a", "10", r5},
			{false, store.Prefix + "things/b", "2", r3},
			{false, store.Prefix + "things/c", "3", r2},
		}},
		{store.Prefix + "other/", []ev{{false, store.Prefix + "other/x", `"x"`, r4}}},
		{store.Prefix + "things/b", []ev{{false, store.Prefix + "things/b", "2", r3}}},
		{store.Prefix + "nothing/", []ev{}},
		{store.Prefix, []ev{
			{false, store.Prefix + "other/x", `"x"`, r4},
			{false, store.Prefix + "things/a", "10", r5},
			{false, store.Prefix + "things/b", "2", r3},
			{false, store.Prefix + "things/c", "3", r2},
		}},
	}
	for _, tt := range tests {
		got, rev := c.Snapshot(tt.prefix)
		if rev != r7 {
			t.Errorf("Snapshot(%q) revision = %d, want %d", tt.prefix, rev, r7)
		}
		if !equal(simplify(got), tt.want) {
			t.Errorf("Snapshot(%q) = %+v, want %+v", tt.prefix, simplify(got), tt.want)
		}
	}
	if c.Revision() != r7 {
		t.Errorf("Revision() = %d, want %d", c.Revision(), r7)
	}
	_ = r6
}

func TestSince(t *testing.T) {
	st := openStore(t)
	c := New(st, store.Prefix, quietLog())
	startCache(t, c)
	start := c.Revision()
	r1 := put(t, st, "a/1", 1)
	r2 := put(t, st, "b/1", 2)
	r3 := put(t, st, "a/2", 3)
	r4 := del(t, st, "a/1")
	// One transaction: two events at one revision.
	r5, err := st.Txn(context.Background(),
		store.Write{Key: store.Prefix + "a/3", Value: 5, Expect: -1},
		store.Write{Key: store.Prefix + "b/2", Value: 6, Expect: -1})
	if err != nil {
		t.Fatal(err)
	}
	waitFor(t, c, r5)

	pa, pb := store.Prefix+"a/", store.Prefix+"b/"
	tests := []struct {
		name   string
		after  int64
		prefix string
		want   []ev
	}{
		{"all of a", start, pa, []ev{
			{false, pa + "1", "1", r1},
			{false, pa + "2", "3", r3},
			{true, pa + "1", "1", r4}, // a delete carries the value before
			{false, pa + "3", "5", r5},
		}},
		{"all of b", start, pb, []ev{{false, pb + "1", "2", r2}, {false, pb + "2", "6", r5}}},
		{"everything", start, store.Prefix, []ev{
			{false, pa + "1", "1", r1},
			{false, pb + "1", "2", r2},
			{false, pa + "2", "3", r3},
			{true, pa + "1", "1", r4},
			{false, pa + "3", "5", r5},
			{false, pb + "2", "6", r5},
		}},
		{"after r2", r2, pa, []ev{{false, pa + "2", "3", r3}, {true, pa + "1", "1", r4}, {false, pa + "3", "5", r5}}},
		{"after r3", r3, store.Prefix, []ev{{true, pa + "1", "1", r4}, {false, pa + "3", "5", r5}, {false, pb + "2", "6", r5}}},
		{"after r4", r4, pb, []ev{{false, pb + "2", "6", r5}}},
		{"current", r5, store.Prefix, nil},
		{"future", r5 + 100, store.Prefix, nil},
		{"no match", start, store.Prefix + "c/", nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, cur, wait, err := c.Since(tt.after, tt.prefix)
			if err != nil {
				t.Fatal(err)
			}
			if wait == nil {
				t.Error("no notify channel")
			}
			if want := max(tt.after, r5); cur != want {
				t.Errorf("cursor = %d, want %d", cur, want)
			}
			if !equal(simplify(got), tt.want) {
				t.Errorf("events = %+v\nwant %+v", simplify(got), tt.want)
			}
		})
	}
}

func TestSinceNotify(t *testing.T) {
	st := openStore(t)
	c := New(st, store.Prefix, quietLog())
	startCache(t, c)

	evs, cur, wait, err := c.Since(c.Revision(), store.Prefix+"n/")
	if err != nil || len(evs) != 0 {
		t.Fatalf("Since: %v %v", evs, err)
	}
	select {
	case <-wait:
		t.Fatal("notify channel closed before any change")
	case <-time.After(50 * time.Millisecond):
	}
	// A change under another prefix also wakes the watcher (it then finds
	// nothing of its own and waits again).
	rOther := put(t, st, "elsewhere/x", 1)
	select {
	case <-wait:
	case <-time.After(5 * time.Second):
		t.Fatal("notify channel not closed after a change")
	}
	evs, cur2, wait2, err := c.Since(cur, store.Prefix+"n/")
	if err != nil || len(evs) != 0 || cur2 < rOther {
		t.Fatalf("Since after another prefix changed: %v cursor %d (want >= %d) %v", evs, cur2, rOther, err)
	}
	r := put(t, st, "n/1", 1)
	select {
	case <-wait2:
	case <-time.After(5 * time.Second):
		t.Fatal("second notify channel not closed after a change")
	}
	evs, cur3, _, err := c.Since(cur2, store.Prefix+"n/")
	if err != nil {
		t.Fatal(err)
	}
	if want := []ev{{false, store.Prefix + "n/1", "1", r}}; !equal(simplify(evs), want) || cur3 != r {
		t.Fatalf("Since = %+v cursor %d, want %+v cursor %d", simplify(evs), cur3, want, r)
	}
}

func TestSinceGone(t *testing.T) {
	st := openStore(t)
	// Revisions before the cache's first list are gone: the cache never saw
	// their events.
	pre := put(t, st, "x/0", 0)
	put(t, st, "x/0", 1)
	c := New(st, store.Prefix, quietLog())
	c.size = 3
	startCache(t, c)
	listed := c.Revision()
	if _, _, _, err := c.Since(pre, store.Prefix); !errors.Is(err, ErrGone) {
		t.Fatalf("Since(%d) before the first list (%d): err = %v, want ErrGone", pre, listed, err)
	}
	if _, _, _, err := c.Since(listed, store.Prefix); err != nil {
		t.Fatalf("Since(list revision): %v", err)
	}

	var revs []int64
	for i := range 5 {
		revs = append(revs, put(t, st, "x/1", i))
	}
	waitFor(t, c, revs[4])
	// The ring holds the last 3 events: revs[2..4]; Since(revs[1]) still
	// has every later event, Since(revs[0]) does not.
	got, _, _, err := c.Since(revs[1], store.Prefix)
	if err != nil {
		t.Fatalf("Since(oldest kept - 1): %v", err)
	}
	if len(got) != 3 || got[0].Revision != revs[2] || got[2].Revision != revs[4] {
		t.Fatalf("Since(%d) = %+v", revs[1], simplify(got))
	}
	for _, after := range []int64{revs[0], listed, pre} {
		if _, _, _, err := c.Since(after, store.Prefix); !errors.Is(err, ErrGone) {
			t.Errorf("Since(%d) with ring %d..%d: err = %v, want ErrGone", after, revs[2], revs[4], err)
		}
	}

	// A transaction bigger than what must be dropped is dropped whole, so
	// that no cursor ever sits inside a revision.
	var writes []store.Write
	for _, k := range []string{"t/a", "t/b", "t/c"} {
		writes = append(writes, store.Write{Key: store.Prefix + k, Value: 1, Expect: -1})
	}
	rt, err := st.Txn(context.Background(), writes...)
	if err != nil {
		t.Fatal(err)
	}
	rn := put(t, st, "x/2", 1)
	waitFor(t, c, rn)
	got, _, _, err = c.Since(rt, store.Prefix)
	if err != nil {
		t.Fatalf("Since(%d): %v", rt, err)
	}
	if len(got) != 1 || got[0].Revision != rn {
		t.Fatalf("Since(%d) = %+v, want only the put at %d", rt, simplify(got), rn)
	}
	if _, _, _, err := c.Since(rt-1, store.Prefix); !errors.Is(err, ErrGone) {
		t.Fatalf("Since(%d) (inside the dropped transaction's past): err = %v, want ErrGone", rt-1, err)
	}
	if snap, _ := c.Snapshot(store.Prefix + "t/"); len(snap) != 3 {
		t.Fatalf("snapshot lost objects when the ring was cut: %+v", simplify(snap))
	}
}

func TestWaitFor(t *testing.T) {
	st := openStore(t)
	c := New(st, store.Prefix, quietLog())
	startCache(t, c)
	ctx := context.Background()

	// Already current: returns at once.
	if err := c.WaitFor(ctx, c.Revision()); err != nil {
		t.Fatal(err)
	}
	if err := c.WaitFor(ctx, 0); err != nil {
		t.Fatal(err)
	}

	// A revision not reached yet times out with the context's error.
	short, cancel := context.WithTimeout(ctx, 100*time.Millisecond)
	defer cancel()
	if err := c.WaitFor(short, c.Revision()+1000); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("WaitFor a future revision: %v, want DeadlineExceeded", err)
	}

	// A waiter blocked on the next revision is released by the write.
	next := c.Revision() + 1
	done := make(chan error, 1)
	go func() {
		wctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		defer cancel()
		done <- c.WaitFor(wctx, next)
	}()
	time.Sleep(20 * time.Millisecond)
	rev := put(t, st, "w/1", 1)
	if rev != next {
		t.Fatalf("put at %d, expected %d (something else wrote)", rev, next)
	}
	if err := <-done; err != nil {
		t.Fatalf("WaitFor(%d): %v", next, err)
	}
	if got, _ := c.Snapshot(store.Prefix + "w/"); len(got) != 1 {
		t.Fatalf("after WaitFor the write is not in the snapshot: %+v", simplify(got))
	}
}

func TestRunStopsOnCancel(t *testing.T) {
	st := openStore(t)
	c := New(st, store.Prefix, quietLog())
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- c.Run(ctx) }()
	<-c.Ready()
	cancel()
	select {
	case err := <-done:
		if !errors.Is(err, context.Canceled) {
			t.Fatalf("Run returned %v, want context.Canceled", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Run did not return")
	}
}
