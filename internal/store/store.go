// Package store owns berth's state in etcd: it starts the embedded
// single-member etcd (or connects to an external cluster) and offers typed,
// revisioned reads, compare-and-swap writes, leases and watches over one key
// prefix. Only the server uses it; everything else goes through the API.
package store

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"time"

	"go.etcd.io/etcd/api/v3/mvccpb"
	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
)

// Prefix is the root of every key berth writes.
const Prefix = "/berth/"

// Errors returned by the store.
var (
	ErrNotFound  = errors.New("not found")
	ErrExists    = errors.New("already exists")
	ErrConflict  = errors.New("changed concurrently")
	ErrCompacted = errors.New("revision compacted")
	ErrNoLease   = errors.New("lease not found")
)

// Store is berth's typed view of etcd.
type Store struct {
	kv      *clientv3.Client // reads, writes, transactions, leases
	watcher *clientv3.Client // watches
	closeFn func() error
}

func newStore(kv, watcher *clientv3.Client, closeFn func() error) *Store {
	return &Store{kv: kv, watcher: watcher, closeFn: closeFn}
}

// Close stops the clients and, when embedded, etcd itself.
func (s *Store) Close() error { return s.closeFn() }

// Client exposes the etcd client for concurrency primitives (elections).
func (s *Store) Client() *clientv3.Client { return s.kv }

// KV is one stored value with its revisions.
type KV struct {
	Key         string
	Value       []byte
	ModRevision int64
	CreateRev   int64
	Lease       int64
}

// Get reads one key into v and returns its mod revision.
func (s *Store) Get(ctx context.Context, key string, v any) (int64, error) {
	resp, err := s.kv.Get(ctx, key)
	if err != nil {
		return 0, fmt.Errorf("get %s: %w", key, err)
	}
	if len(resp.Kvs) == 0 {
		return 0, ErrNotFound
	}
	if v != nil {
		if err := json.Unmarshal(resp.Kvs[0].Value, v); err != nil {
			return 0, fmt.Errorf("decode %s: %w", key, err)
		}
	}
	return resp.Kvs[0].ModRevision, nil
}

// GetKV reads one key with its revisions and lease.
func (s *Store) GetKV(ctx context.Context, key string) (KV, error) {
	resp, err := s.kv.Get(ctx, key)
	if err != nil {
		return KV{}, fmt.Errorf("get %s: %w", key, err)
	}
	if len(resp.Kvs) == 0 {
		return KV{}, ErrNotFound
	}
	kv := resp.Kvs[0]
	return KV{Key: string(kv.Key), Value: kv.Value, ModRevision: kv.ModRevision, CreateRev: kv.CreateRevision, Lease: kv.Lease}, nil
}

// List reads every key under prefix, and the revision it was read at.
func (s *Store) List(ctx context.Context, prefix string) ([]KV, int64, error) {
	resp, err := s.kv.Get(ctx, prefix, clientv3.WithPrefix())
	if err != nil {
		return nil, 0, fmt.Errorf("list %s: %w", prefix, err)
	}
	out := make([]KV, len(resp.Kvs))
	for i, kv := range resp.Kvs {
		out[i] = KV{Key: string(kv.Key), Value: kv.Value, ModRevision: kv.ModRevision, CreateRev: kv.CreateRevision, Lease: kv.Lease}
	}
	return out, resp.Header.Revision, nil
}

// Count returns how many keys are under prefix.
func (s *Store) Count(ctx context.Context, prefix string) (int64, error) {
	resp, err := s.kv.Get(ctx, prefix, clientv3.WithPrefix(), clientv3.WithCountOnly())
	if err != nil {
		return 0, fmt.Errorf("count %s: %w", prefix, err)
	}
	return resp.Count, nil
}

// Write is one put or delete in a transaction.
type Write struct {
	Key    string
	Value  any // nil deletes
	Lease  int64
	Expect int64 // mod revision the key must have: 0 must not exist, -1 any
	// Check only compares Expect; nothing is written to Key.
	Check bool
}

// Put writes v at key if the key's mod revision is expect (0: the key must not
// exist; -1: whatever it is). It returns the new revision.
func (s *Store) Put(ctx context.Context, key string, v any, expect int64) (int64, error) {
	return s.Txn(ctx, Write{Key: key, Value: v, Expect: expect})
}

// PutLease writes v at key attached to a lease, unconditionally.
func (s *Store) PutLease(ctx context.Context, key string, v any, lease int64) (int64, error) {
	return s.Txn(ctx, Write{Key: key, Value: v, Lease: lease, Expect: -1})
}

// Delete removes key if its mod revision is expect (-1: whatever it is).
func (s *Store) Delete(ctx context.Context, key string, expect int64) (int64, error) {
	if expect == 0 {
		expect = -1
	}
	return s.Txn(ctx, Write{Key: key, Expect: expect})
}

// Txn applies writes atomically, each guarded by its expected revision.
func (s *Store) Txn(ctx context.Context, writes ...Write) (int64, error) {
	var cmps []clientv3.Cmp
	var ops []clientv3.Op
	for _, w := range writes {
		switch {
		case w.Expect == 0:
			cmps = append(cmps, clientv3.Compare(clientv3.CreateRevision(w.Key), "=", 0))
		case w.Expect > 0:
			cmps = append(cmps, clientv3.Compare(clientv3.ModRevision(w.Key), "=", w.Expect))
		}
		if w.Check {
			continue
		}
		if w.Value == nil {
			ops = append(ops, clientv3.OpDelete(w.Key))
			continue
		}
		b, err := json.Marshal(w.Value)
		if err != nil {
			return 0, fmt.Errorf("encode %s: %w", w.Key, err)
		}
		var opts []clientv3.OpOption
		if w.Lease != 0 {
			opts = append(opts, clientv3.WithLease(clientv3.LeaseID(w.Lease)))
		}
		ops = append(ops, clientv3.OpPut(w.Key, string(b), opts...))
	}
	resp, err := s.kv.Txn(ctx).If(cmps...).Then(ops...).Commit()
	if err != nil {
		if errors.Is(err, rpctypes.ErrLeaseNotFound) {
			return 0, ErrNoLease
		}
		return 0, fmt.Errorf("transaction on %s: %w", writes[0].Key, err)
	}
	if !resp.Succeeded {
		if len(writes) == 1 && writes[0].Expect == 0 {
			return 0, ErrExists
		}
		if len(writes) == 1 && writes[0].Expect > 0 {
			if n, _ := s.Count(ctx, writes[0].Key); n == 0 {
				return 0, ErrNotFound
			}
		}
		return 0, ErrConflict
	}
	return resp.Header.Revision, nil
}

// TTLSeconds is a lease TTL as etcd keeps it: whole seconds, rounded up.
func TTLSeconds(ttl time.Duration) int64 { return int64((ttl + time.Second - 1) / time.Second) }

// Grant creates a lease of ttl.
func (s *Store) Grant(ctx context.Context, ttl time.Duration) (int64, error) {
	resp, err := s.kv.Grant(ctx, TTLSeconds(ttl))
	if err != nil {
		return 0, fmt.Errorf("grant lease: %w", err)
	}
	return int64(resp.ID), nil
}

// LeaseTTL returns the TTL a live lease was granted, in seconds.
func (s *Store) LeaseTTL(ctx context.Context, lease int64) (int64, error) {
	resp, err := s.kv.TimeToLive(ctx, clientv3.LeaseID(lease))
	if errors.Is(err, rpctypes.ErrLeaseNotFound) || (err == nil && resp.TTL <= 0) {
		return 0, ErrNoLease
	}
	if err != nil {
		return 0, fmt.Errorf("lease ttl: %w", err)
	}
	return resp.GrantedTTL, nil
}

// KeepAlive renews a lease once.
func (s *Store) KeepAlive(ctx context.Context, lease int64) error {
	_, err := s.kv.KeepAliveOnce(ctx, clientv3.LeaseID(lease))
	if errors.Is(err, rpctypes.ErrLeaseNotFound) {
		return ErrNoLease
	}
	if err != nil {
		return fmt.Errorf("renew lease: %w", err)
	}
	return nil
}

// Revoke ends a lease and deletes its keys.
func (s *Store) Revoke(ctx context.Context, lease int64) error {
	_, err := s.kv.Revoke(ctx, clientv3.LeaseID(lease))
	if err != nil && !errors.Is(err, rpctypes.ErrLeaseNotFound) {
		return fmt.Errorf("revoke lease: %w", err)
	}
	return nil
}

// Event is one change seen by a watch.
type Event struct {
	Delete   bool
	Key      string
	Value    []byte // for a delete: the value before
	Revision int64
}

// Batch is what a watch delivers: events of one or more revisions in order,
// a progress revision, or an error that ends the watch.
type Batch struct {
	Events   []Event
	Revision int64
	Err      error
}

// Watch streams every change under prefix after revision from (exclusive).
// The channel closes when ctx ends or after a Batch with Err.
func (s *Store) Watch(ctx context.Context, prefix string, from int64) <-chan Batch {
	out := make(chan Batch, 64)
	go func() {
		defer close(out)
		// Cancelling on return ends the etcd watch too, after an error or
		// compaction as well as when ctx ends.
		wctx, cancel := context.WithCancel(clientv3.WithRequireLeader(ctx))
		defer cancel()
		wch := s.watcher.Watch(wctx, prefix, clientv3.WithPrefix(), clientv3.WithRev(from+1),
			clientv3.WithPrevKV(), clientv3.WithProgressNotify())
		for resp := range wch {
			var b Batch
			switch {
			case resp.CompactRevision != 0:
				b.Err = fmt.Errorf("%w: watch from %d, compacted at %d", ErrCompacted, from, resp.CompactRevision)
			case resp.Err() != nil:
				b.Err = fmt.Errorf("watch %s: %w", prefix, resp.Err())
			default:
				b.Revision = resp.Header.Revision
				for _, ev := range resp.Events {
					e := Event{Key: string(ev.Kv.Key), Revision: ev.Kv.ModRevision, Value: ev.Kv.Value}
					if ev.Type == mvccpb.DELETE {
						e.Delete = true
						e.Value = nil
						if ev.PrevKv != nil {
							e.Value = ev.PrevKv.Value
						}
					}
					b.Events = append(b.Events, e)
				}
			}
			select {
			case out <- b:
			case <-ctx.Done():
				return
			}
			if b.Err != nil {
				return
			}
		}
		if ctx.Err() == nil {
			select {
			case out <- Batch{Err: fmt.Errorf("watch %s: closed", prefix)}:
			case <-ctx.Done():
			}
		}
	}()
	return out
}

// Name returns the last path element of a key.
func Name(key string) string {
	if i := strings.LastIndexByte(key, '/'); i >= 0 {
		return key[i+1:]
	}
	return key
}
