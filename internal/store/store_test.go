package store

import (
	"context"
	"errors"
	"testing"
	"time"
)

func openTest(t *testing.T, dir string) *Store {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	s, err := Open(ctx, Config{DataDir: dir})
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func TestEmbeddedPutGetWatchReopen(t *testing.T) {
	dir := t.TempDir()
	start := time.Now()
	s := openTest(t, dir)
	t.Logf("embedded etcd ready in %v", time.Since(start))
	ctx := context.Background()

	rev, err := s.Put(ctx, Prefix+"things/a", map[string]int{"x": 1}, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.Put(ctx, Prefix+"things/a", map[string]int{"x": 2}, 0); !errors.Is(err, ErrExists) {
		t.Fatalf("create twice: got %v, want ErrExists", err)
	}
	if _, err := s.Put(ctx, Prefix+"things/a", map[string]int{"x": 2}, rev+100); !errors.Is(err, ErrConflict) {
		t.Fatalf("stale CAS: got %v, want ErrConflict", err)
	}
	if _, err := s.Put(ctx, Prefix+"things/missing", map[string]int{"x": 2}, 5); !errors.Is(err, ErrNotFound) {
		t.Fatalf("CAS on missing: got %v, want ErrNotFound", err)
	}

	wctx, cancel := context.WithCancel(ctx)
	defer cancel()
	ch := s.Watch(wctx, Prefix+"things/", rev)
	rev2, err := s.Put(ctx, Prefix+"things/a", map[string]int{"x": 3}, rev)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.Delete(ctx, Prefix+"things/a", rev2); err != nil {
		t.Fatal(err)
	}
	var got []Event
	for len(got) < 2 {
		select {
		case b := <-ch:
			if b.Err != nil {
				t.Fatal(b.Err)
			}
			got = append(got, b.Events...)
		case <-time.After(5 * time.Second):
			t.Fatalf("watch: got %d events, want 2", len(got))
		}
	}
	if got[0].Delete || got[0].Revision != rev2 || !got[1].Delete || string(got[1].Value) != `{"x":3}` {
		t.Fatalf("unexpected events %+v", got)
	}
	cancel()

	if _, err := s.Put(ctx, Prefix+"things/b", "kept", 0); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	s = openTest(t, dir)
	defer s.Close()
	var v string
	if _, err := s.Get(ctx, Prefix+"things/b", &v); err != nil || v != "kept" {
		t.Fatalf("after reopen: %q %v", v, err)
	}
}

func TestLease(t *testing.T) {
	s := openTest(t, t.TempDir())
	defer s.Close()
	ctx := context.Background()
	id, err := s.Grant(ctx, 2*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.PutLease(ctx, Prefix+"l/x", 1, id); err != nil {
		t.Fatal(err)
	}
	if err := s.KeepAlive(ctx, id); err != nil {
		t.Fatal(err)
	}
	if err := s.Revoke(ctx, id); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Get(ctx, Prefix+"l/x", nil); !errors.Is(err, ErrNotFound) {
		t.Fatalf("key of revoked lease: %v", err)
	}
	if err := s.KeepAlive(ctx, id); !errors.Is(err, ErrNoLease) {
		t.Fatalf("keepalive of revoked lease: %v", err)
	}
	if _, err := s.PutLease(ctx, Prefix+"l/y", 1, id); !errors.Is(err, ErrNoLease) {
		t.Fatalf("put with revoked lease: %v", err)
	}
}
