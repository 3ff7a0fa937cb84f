package store

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"

	"go.etcd.io/etcd/api/v3/mvccpb"
	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
)

// PutOnLease writes v at key attached to lease (0: none) if the key's mod
// revision is expect (0: the key must not exist; -1: whatever it holds), in
// one transaction that also reads the key. On success it returns the new
// revision and what the key held before (Value nil when nothing). When the
// guard fails it returns ErrConflict with what the key holds now (Value nil
// when nothing), read in the same transaction, so that the caller can retry
// against it without another round trip. It returns ErrNoLease when the
// lease does not exist (it expired or was revoked); nothing is written then.
func (s *Store) PutOnLease(ctx context.Context, key string, v any, lease, expect int64) (int64, KV, error) {
	b, err := json.Marshal(v)
	if err != nil {
		return 0, KV{}, fmt.Errorf("encode %s: %w", key, err)
	}
	var cmps []clientv3.Cmp
	switch {
	case expect == 0:
		cmps = append(cmps, clientv3.Compare(clientv3.CreateRevision(key), "=", 0))
	case expect > 0:
		cmps = append(cmps, clientv3.Compare(clientv3.ModRevision(key), "=", expect))
	}
	put := clientv3.OpPut(key, string(b), clientv3.WithLease(clientv3.LeaseID(lease)), clientv3.WithPrevKV())
	resp, err := s.kv.Txn(ctx).If(cmps...).Then(put).Else(clientv3.OpGet(key)).Commit()
	if err != nil {
		if errors.Is(err, rpctypes.ErrLeaseNotFound) {
			return 0, KV{}, ErrNoLease
		}
		return 0, KV{}, fmt.Errorf("put %s on lease %x: %w", key, lease, err)
	}
	if resp.Succeeded {
		var prev *mvccpb.KeyValue
		if p := resp.Responses[0].GetResponsePut(); p != nil {
			prev = p.PrevKv
		}
		return resp.Header.Revision, kvOf(key, prev), nil
	}
	var cur *mvccpb.KeyValue
	if r := resp.Responses[0].GetResponseRange(); r != nil && len(r.Kvs) > 0 {
		cur = r.Kvs[0]
	}
	return 0, kvOf(key, cur), ErrConflict
}

// kvOf converts an etcd key-value (nil: none) into a KV of key.
func kvOf(key string, kv *mvccpb.KeyValue) KV {
	if kv == nil {
		return KV{Key: key}
	}
	return KV{Key: string(kv.Key), Value: kv.Value, ModRevision: kv.ModRevision, CreateRev: kv.CreateRevision, Lease: kv.Lease}
}
