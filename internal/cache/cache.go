// Package cache keeps the server's in-memory copy of everything under the
// store prefix, current through one etcd watch, and fans changes out to any
// number of API watchers. Watchers never open etcd watches of their own: they
// read a shared ring of recent events from their own cursor, so a slow
// watcher costs nothing to the others and resumes by revision.
package cache

import (
	"context"
	"errors"
	"log/slog"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/berth-dev/berth/internal/store"
)

// ErrGone means the revision asked for is older than the events the cache
// still holds: the caller lists again and watches from the list's revision.
var ErrGone = errors.New("revision is too old: list again and watch from the list's revision")

// Event is one change of one key.
type Event = store.Event

// DefaultRingSize is how many recent events are kept for watchers to resume
// (up to a tenth more, as the ring is trimmed in chunks).
const DefaultRingSize = 50000

// Cache mirrors the store under one prefix.
type Cache struct {
	st     *store.Store
	prefix string
	log    *slog.Logger
	size   int

	mu      sync.Mutex
	objects map[string]Event // current value of each key (never Delete)
	rev     int64            // revision the cache is current to
	ring    []Event          // recent events in revision order, at most size
	oldest  int64            // the ring holds every event with revision > oldest
	notify  chan struct{}    // closed and replaced on every advance
	ready   chan struct{}
}

// New returns a cache of everything under prefix; Run fills it.
func New(st *store.Store, prefix string, log *slog.Logger) *Cache {
	return &Cache{st: st, prefix: prefix, log: log, size: DefaultRingSize,
		objects: map[string]Event{}, notify: make(chan struct{}), ready: make(chan struct{})}
}

// Ready is closed once the cache holds a full copy.
func (c *Cache) Ready() <-chan struct{} { return c.ready }

// Run lists and watches until ctx ends, listing again after a compaction or
// a broken watch.
func (c *Cache) Run(ctx context.Context) error {
	backoff := 50 * time.Millisecond
	for ctx.Err() == nil {
		rev, err := c.relist(ctx)
		if err != nil {
			c.log.Warn("cache: list failed", "err", err)
			if !sleep(ctx, backoff) {
				break
			}
			backoff = min(backoff*2, 2*time.Second)
			continue
		}
		backoff = 50 * time.Millisecond
		for b := range c.st.Watch(ctx, c.prefix, rev) {
			if b.Err != nil {
				c.log.Warn("cache: watch ended, listing again", "err", b.Err)
				break
			}
			c.apply(b)
		}
	}
	return ctx.Err()
}

func sleep(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-ctx.Done():
		return false
	}
}

func (c *Cache) relist(ctx context.Context) (int64, error) {
	kvs, rev, err := c.st.List(ctx, c.prefix)
	if err != nil {
		return 0, err
	}
	objs := make(map[string]Event, len(kvs))
	for _, kv := range kvs {
		objs[kv.Key] = Event{Key: kv.Key, Value: kv.Value, Revision: kv.ModRevision}
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	// Events between the old and the new revision are not known: watchers
	// behind this point must list again.
	c.objects, c.rev, c.ring, c.oldest = objs, rev, nil, rev
	c.wake()
	select {
	case <-c.ready:
	default:
		close(c.ready)
	}
	return rev, nil
}

func (c *Cache) apply(b store.Batch) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, ev := range b.Events {
		if ev.Delete {
			delete(c.objects, ev.Key)
		} else {
			c.objects[ev.Key] = ev
		}
		c.ring = append(c.ring, ev)
		c.rev = max(c.rev, ev.Revision)
	}
	c.rev = max(c.rev, b.Revision)
	// Trim in chunks of a tenth of the ring, so that a full ring is not
	// copied on every batch.
	if over := len(c.ring) - c.size; over > c.size/10 {
		// Drop whole revisions only, so a cursor never splits a transaction.
		cut := over
		for cut < len(c.ring) && c.ring[cut].Revision == c.ring[cut-1].Revision {
			cut++
		}
		c.oldest = c.ring[cut-1].Revision
		c.ring = append([]Event(nil), c.ring[cut:]...)
	}
	c.wake()
}

func (c *Cache) wake() {
	close(c.notify)
	c.notify = make(chan struct{})
}

// Revision is the revision the cache is current to.
func (c *Cache) Revision() int64 {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.rev
}

// Snapshot returns the current value of every key under prefix, sorted by
// key, and the revision they are current at.
func (c *Cache) Snapshot(prefix string) ([]Event, int64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	var out []Event
	for k, ev := range c.objects {
		if strings.HasPrefix(k, prefix) {
			out = append(out, ev)
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Key < out[j].Key })
	return out, c.rev
}

// Get returns the current value of one key.
func (c *Cache) Get(key string) (Event, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	ev, ok := c.objects[key]
	return ev, ok
}

// Since returns the events under prefix with revision > after, the revision
// the caller is then current to, and a channel closed on the next change.
func (c *Cache) Since(after int64, prefix string) ([]Event, int64, <-chan struct{}, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if after < c.oldest {
		return nil, 0, nil, ErrGone
	}
	i := sort.Search(len(c.ring), func(i int) bool { return c.ring[i].Revision > after })
	var out []Event
	for _, ev := range c.ring[i:] {
		if strings.HasPrefix(ev.Key, prefix) {
			out = append(out, ev)
		}
	}
	return out, max(after, c.rev), c.notify, nil
}

// WaitFor blocks until the cache is current to at least rev.
func (c *Cache) WaitFor(ctx context.Context, rev int64) error {
	for {
		c.mu.Lock()
		cur, ch := c.rev, c.notify
		c.mu.Unlock()
		if cur >= rev {
			return nil
		}
		select {
		case <-ch:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}
