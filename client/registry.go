package client

import (
	"context"
	"errors"
	"sync"
	"time"

	"github.com/berth-dev/berth/api"
)

// ErrClosed is returned by a Registry or Discoverer used after Close.
var ErrClosed = errors.New("berth client: closed")

// Registry registers this process's own instances of services in berth's
// registry and keeps them alive: after Register it renews each registration
// in the background every third of its TTL, and registers it again when a
// renewal finds it gone (expired, or removed by someone else). Close stops
// the renewals and deregisters everything. A Registry is safe for
// concurrent use.
type Registry struct {
	c *Client

	mu     sync.Mutex
	regs   map[regID]*keeper
	closed bool
}

type regID struct{ service, id string }

// keeper is the renewal goroutine of one registration.
type keeper struct {
	cancel context.CancelFunc
	done   chan struct{}
}

func (k *keeper) stop() {
	k.cancel()
	<-k.done
}

// NewRegistry returns an empty Registry that uses c.
func (c *Client) NewRegistry() *Registry {
	return &Registry{c: c, regs: map[regID]*keeper{}}
}

// Register registers (or updates) the instance id of service, then renews it
// in the background every TTL/3 (the TTL the server answers with, which
// defaults to api.DefaultRegistrationTTL) until Deregister or Close. When a
// renewal finds the registration gone (404) it registers spec again. ctx
// bounds only the first registration, not the renewals. Registering the same
// service and id again replaces the spec that renewals re-register with.
func (r *Registry) Register(ctx context.Context, service, id string, spec api.RegistrationSpec) error {
	r.mu.Lock()
	closed := r.closed
	r.mu.Unlock()
	if closed {
		return ErrClosed
	}
	reg, err := r.c.Register(ctx, service, id, spec)
	if err != nil {
		return err
	}
	ttl := reg.TTL.D()
	if ttl <= 0 {
		ttl = spec.TTL.D()
	}
	if ttl <= 0 {
		ttl = api.DefaultRegistrationTTL
	}
	kctx, cancel := context.WithCancel(context.Background())
	k := &keeper{cancel: cancel, done: make(chan struct{})}

	key := regID{service, id}
	r.mu.Lock()
	if r.closed {
		r.mu.Unlock()
		cancel()
		// Close ran while we registered: leave nothing behind.
		dctx, dcancel := context.WithTimeout(context.Background(), closeTimeout)
		defer dcancel()
		_ = r.c.Deregister(dctx, service, id)
		return ErrClosed
	}
	old := r.regs[key]
	r.regs[key] = k
	r.mu.Unlock()
	if old != nil {
		old.stop()
	}
	go r.keep(kctx, k, service, id, spec, ttl)
	return nil
}

// closeTimeout bounds each deregistration Close makes.
const closeTimeout = 5 * time.Second

// keep renews one registration until ctx ends.
func (r *Registry) keep(ctx context.Context, k *keeper, service, id string, spec api.RegistrationSpec, ttl time.Duration) {
	defer close(k.done)
	every := ttl / 3
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		// A renewal may not outlast the next one's turn.
		rctx, cancel := context.WithTimeout(ctx, every)
		err := r.c.Renew(rctx, service, id)
		if IsNotFound(err) {
			if reg, rerr := r.c.Register(rctx, service, id, spec); rerr == nil && reg.TTL.D() > 0 && reg.TTL.D() != ttl {
				ttl = reg.TTL.D()
				every = ttl / 3
				t.Reset(every)
			}
		}
		// Any other failure (the server unreachable, say) is tried again
		// at the next tick; the TTL leaves room for two more tries.
		cancel()
	}
}

// Deregister stops renewing the instance id of service and removes its
// registration. The renewals stop even when the removal fails.
func (r *Registry) Deregister(ctx context.Context, service, id string) error {
	key := regID{service, id}
	r.mu.Lock()
	k := r.regs[key]
	delete(r.regs, key)
	r.mu.Unlock()
	if k != nil {
		// Stopped first, so that no renewal registers it again afterwards.
		k.stop()
	}
	return r.c.Deregister(ctx, service, id)
}

// Close stops every renewal and deregisters everything the Registry
// registered (a registration already gone counts as deregistered). Later
// calls to Register fail with ErrClosed; Close again does nothing.
func (r *Registry) Close() error {
	r.mu.Lock()
	if r.closed {
		r.mu.Unlock()
		return nil
	}
	r.closed = true
	regs := r.regs
	r.regs = map[regID]*keeper{}
	r.mu.Unlock()

	var errs []error
	for key, k := range regs {
		k.stop()
		ctx, cancel := context.WithTimeout(context.Background(), closeTimeout)
		if err := r.c.Deregister(ctx, key.service, key.id); err != nil && !IsNotFound(err) {
			errs = append(errs, err)
		}
		cancel()
	}
	return errors.Join(errs...)
}
