package server

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"time"

	"github.com/berth-dev/berth/api"
	"github.com/berth-dev/berth/internal/store"
)

// --- registrations ---

// registerAttempts is how many guarded writes a registration racing other
// writers of its id tries before it writes unguarded.
const registerAttempts = 4

// revokeTimeout bounds revoking a replaced lease after the answer's write
// is committed (the client may be gone by then).
const revokeTimeout = 5 * time.Second

func regKey(service, id string) string { return keyRegistrations + service + "/" + id }

func (s *Server) listAllRegistrations(w http.ResponseWriter, r *http.Request) error {
	return s.serveList(w, r, keyRegistrations, api.KindRegistration, nil)
}

func (s *Server) listRegistrations(w http.ResponseWriter, r *http.Request) error {
	name := r.PathValue("name")
	if why := api.ValidName(name); why != "" {
		return invalid("registration", api.FieldErrors{{Field: "service", Reason: why}})
	}
	return s.serveList(w, r, keyRegistrations+name+"/", api.KindRegistration, nil)
}

func (s *Server) getRegistration(w http.ResponseWriter, r *http.Request) error {
	name, id := r.PathValue("name"), r.PathValue("id")
	return s.getOne(w, r, api.KindRegistration, regKey(name, id), name+"/"+id)
}

// register stores an external instance under a lease of its own TTL; the
// same id registered again is updated in place, never duplicated. It
// answers once the write is committed.
//
// A registration is one raft commit: the lease comes from the pool (renewed
// as it is taken, so that its TTL starts now), and the write is guarded by
// what the cache says the key holds. The write returns what the key held
// before, which tells a creation (201) from an update (200) and names the
// lease to revoke; an update keeps the creation time. When the cache's
// guess is wrong (it lags the store), the same transaction reads the key
// instead, and the write is tried again against that. Writers racing on
// one id give up guarding after a few rounds and write whatever the key
// holds (keeping the creation time last read).
func (s *Server) register(w http.ResponseWriter, r *http.Request) error {
	name, id := r.PathValue("name"), r.PathValue("id")
	var spec api.RegistrationSpec
	if err := decode(r, &spec, "registration", ""); err != nil {
		return err
	}
	spec.Normalize()
	if err := validated("registration", spec.Validate(name, id)); err != nil {
		return err
	}
	ctx := r.Context()
	key := regKey(name, id)
	now := time.Now().UTC()
	reg := api.Registration{Service: name, ID: id, RegistrationSpec: spec}
	reg.CreatedAt, reg.UpdatedAt = now, now
	expect := int64(0)
	if ev, ok := s.cache.Get(key); ok {
		expect, reg.CreatedAt = ev.Revision, createdAt(ev.Value, now)
	}
	ttl := spec.TTL.D()
	lease, err := s.leases.take(ctx, ttl)
	if err != nil {
		return err
	}
	var (
		rev  int64
		prev store.KV
	)
	for attempt := 1; ; attempt++ {
		if attempt >= registerAttempts {
			expect = -1
		}
		rev, prev, err = s.st.PutOnLease(ctx, key, reg, lease, expect)
		if err == nil {
			break
		}
		switch {
		case errors.Is(err, store.ErrConflict):
			// Nothing was written: the lease is still unused.
			expect, reg.CreatedAt = 0, now
			if prev.Value != nil {
				expect, reg.CreatedAt = prev.ModRevision, createdAt(prev.Value, now)
			}
		case errors.Is(err, store.ErrNoLease) && attempt < registerAttempts:
			// The lease vanished (it would have had to expire): another.
			if lease, err = s.leases.take(ctx, ttl); err != nil {
				return err
			}
		default:
			// Whether the write landed is not known: the lease is not
			// reused (it expires with whatever it holds).
			return err
		}
	}
	if prev.Lease != 0 && prev.Lease != lease {
		// The key now hangs on the new lease; ending the old one leaves it.
		rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), revokeTimeout)
		if err := s.st.Revoke(rctx, prev.Lease); err != nil {
			s.log.Warn("registration: revoking the replaced lease", "service", name, "id", id, "err", err)
		}
		cancel()
	}
	reg.Revision = rev
	status := http.StatusOK
	if prev.Value == nil {
		status = http.StatusCreated
	}
	writeJSON(w, status, reg)
	return nil
}

// createdAt is the creation time of a stored registration, or def.
func createdAt(raw []byte, def time.Time) time.Time {
	var r struct {
		CreatedAt time.Time `json:"createdAt"`
	}
	if json.Unmarshal(raw, &r) != nil || r.CreatedAt.IsZero() {
		return def
	}
	return r.CreatedAt
}

// renew is a registration's heartbeat: a lease keepalive, no write.
func (s *Server) renew(w http.ResponseWriter, r *http.Request) error {
	name, id := r.PathValue("name"), r.PathValue("id")
	kv, err := s.st.GetKV(r.Context(), regKey(name, id))
	if errors.Is(err, store.ErrNotFound) {
		return notFound("registration", name+"/"+id)
	}
	if err != nil {
		return err
	}
	if err := s.st.KeepAlive(r.Context(), kv.Lease); errors.Is(err, store.ErrNoLease) {
		return notFound("registration", name+"/"+id)
	} else if err != nil {
		return err
	}
	w.WriteHeader(http.StatusNoContent)
	return nil
}

// deregister removes a registration: it revokes the registration's own
// lease, which deletes the key with it in one commit. Had the id been
// registered again in between (on a new lease), that registration stays,
// as if it came after this one.
func (s *Server) deregister(w http.ResponseWriter, r *http.Request) error {
	name, id := r.PathValue("name"), r.PathValue("id")
	ctx := r.Context()
	kv, err := s.st.GetKV(ctx, regKey(name, id))
	if errors.Is(err, store.ErrNotFound) {
		return notFound("registration", name+"/"+id)
	}
	if err != nil {
		return err
	}
	if kv.Lease == 0 {
		if _, err := s.st.Delete(ctx, kv.Key, kv.ModRevision); err != nil {
			return err
		}
	} else if err := s.st.Revoke(ctx, kv.Lease); err != nil {
		return err
	}
	w.WriteHeader(http.StatusNoContent)
	return nil
}
