package store

import (
	"context"
	"errors"
	"testing"
	"time"
)

func TestPutOnLease(t *testing.T) {
	s := openTest(t, t.TempDir())
	defer s.Close()
	ctx := context.Background()
	lease, err := s.Grant(ctx, time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	other, err := s.Grant(ctx, time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	const key = Prefix + "leased/a"
	var last int64 // mod revision of key, 0 while absent
	steps := []struct {
		name     string
		value    string
		lease    int64
		expect   func() int64
		err      error
		prevHeld string // value before (on success) or now (on a conflict); "" none
		prevOn   int64  // lease of the value before or now
	}{
		{"create on a lease", "v1", lease, func() int64 { return 0 }, nil, "", 0},
		{"create again: conflict, reads what is there", "v2", other, func() int64 { return 0 }, ErrConflict, `"v1"`, lease},
		{"stale revision: conflict", "v2", other, func() int64 { return last - 1 }, ErrConflict, `"v1"`, lease},
		{"right revision: moves to the other lease", "v2", other, func() int64 { return last }, nil, `"v1"`, lease},
		{"any revision", "v3", lease, func() int64 { return -1 }, nil, `"v2"`, other},
		{"a lease that does not exist", "v4", 12345, func() int64 { return -1 }, ErrNoLease, "", 0},
	}
	for _, st := range steps {
		rev, kv, err := s.PutOnLease(ctx, key, st.value, st.lease, st.expect())
		if !errors.Is(err, st.err) {
			t.Fatalf("%s: err %v, want %v", st.name, err, st.err)
		}
		if st.err == nil {
			if rev <= last {
				t.Fatalf("%s: revision %d after %d", st.name, rev, last)
			}
			last = rev
			got, err := s.GetKV(ctx, key)
			if err != nil || string(got.Value) != `"`+st.value+`"` || got.Lease != st.lease || got.ModRevision != rev {
				t.Fatalf("%s: stored %+v %v", st.name, got, err)
			}
		}
		if errors.Is(st.err, ErrNoLease) {
			continue
		}
		if string(kv.Value) != st.prevHeld || kv.Lease != st.prevOn {
			t.Fatalf("%s: previous %q on %x, want %q on %x", st.name, kv.Value, kv.Lease, st.prevHeld, st.prevOn)
		}
		if kv.Value != nil && kv.ModRevision == 0 {
			t.Fatalf("%s: previous value without its revision", st.name)
		}
	}
	// Revoking the lease deletes the key with it.
	if err := s.Revoke(ctx, lease); err != nil {
		t.Fatal(err)
	}
	if _, err := s.GetKV(ctx, key); !errors.Is(err, ErrNotFound) {
		t.Fatalf("key after its lease was revoked: %v", err)
	}
}
