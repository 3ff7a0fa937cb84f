package server

import (
	"context"
	"errors"
	"sync"

	"github.com/berth-dev/berth/internal/store"
)

// Batching of the controller's writes: a pass collects its instance writes
// and commits them in transactions of up to txnOps operations, several at a
// time, instead of one round trip per instance.
const (
	txnOps      = 128 // etcd's default limit of operations per transaction
	txnParallel = 8
)

// writeBatch collects guarded writes. Each may carry an undo, run (by the
// caller's goroutine, in flush) when its write did not land.
type writeBatch struct {
	st     *store.Store
	writes []store.Write
	undo   []func()
	at     map[string]int // key → index in writes
}

func newWriteBatch(st *store.Store) *writeBatch {
	return &writeBatch{st: st, at: map[string]int{}}
}

// put adds a guarded write of v at key (v nil deletes). A second write of a
// key in one batch replaces the first's value and keeps its guard.
func (b *writeBatch) put(key string, v any, expect int64, undo func()) {
	if i, ok := b.at[key]; ok {
		b.writes[i].Value = v
		if undo != nil {
			prev := b.undo[i]
			b.undo[i] = func() {
				if prev != nil {
					prev()
				}
				undo()
			}
		}
		return
	}
	b.at[key] = len(b.writes)
	b.writes = append(b.writes, store.Write{Key: key, Value: v, Expect: expect})
	b.undo = append(b.undo, undo)
}

// del adds a guarded delete (expect -1: whatever the key holds).
func (b *writeBatch) del(key string, expect int64, undo func()) {
	if expect == 0 {
		expect = -1
	}
	b.put(key, nil, expect, undo)
}

// flush commits the writes and returns the highest revision written (0 when
// nothing was). A transaction that fails its guards is retried write by
// write, so one conflicting key does not hold back the others; writes that
// still fail are undone. Errors other than guard failures are returned after
// every write was tried.
func (b *writeBatch) flush(ctx context.Context) (int64, error) {
	n := len(b.writes)
	if n == 0 {
		return 0, nil
	}
	failed := make([]bool, n)
	var (
		mu     sync.Mutex
		maxRev int64
		first  error
		wg     sync.WaitGroup
	)
	note := func(rev int64, err error) {
		mu.Lock()
		defer mu.Unlock()
		maxRev = max(maxRev, rev)
		if err != nil && first == nil && !guardFailed(err) {
			first = err
		}
	}
	sem := make(chan struct{}, txnParallel)
	for lo := 0; lo < n; lo += txnOps {
		hi := min(lo+txnOps, n)
		sem <- struct{}{}
		wg.Add(1)
		go func(lo, hi int) {
			defer wg.Done()
			defer func() { <-sem }()
			rev, err := b.st.Txn(ctx, b.writes[lo:hi]...)
			if err == nil {
				note(rev, nil)
				return
			}
			if hi-lo == 1 || !guardFailed(err) {
				for i := lo; i < hi; i++ {
					failed[i] = true
				}
				note(0, err)
				return
			}
			for i := lo; i < hi; i++ {
				rev, err := b.st.Txn(ctx, b.writes[i])
				if err != nil {
					failed[i] = true
				}
				note(rev, err)
			}
		}(lo, hi)
	}
	wg.Wait()
	for i, f := range failed {
		if f && b.undo[i] != nil {
			b.undo[i]()
		}
	}
	b.writes, b.undo, b.at = nil, nil, map[string]int{}
	return maxRev, first
}

// guardFailed reports an error of a write whose expected revision did not
// hold: someone else wrote first; the next pass sees their change.
func guardFailed(err error) bool {
	return errors.Is(err, store.ErrConflict) || errors.Is(err, store.ErrExists) || errors.Is(err, store.ErrNotFound)
}
