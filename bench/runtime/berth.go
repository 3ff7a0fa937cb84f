package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	eventtypes "github.com/containerd/containerd/api/events"
	containerd "github.com/containerd/containerd/v2/client"
	"github.com/containerd/typeurl/v2"

	"github.com/berth-dev/berth/api"
	"github.com/berth-dev/berth/bench/internal/benchhost"
	"github.com/berth-dev/berth/bench/internal/hostclean"
	"github.com/berth-dev/berth/client"
	"github.com/berth-dev/berth/internal/runtime"
)

// apiAddr is berth's API: the namespace's own loopback.
const apiAddr = "127.0.0.1:7480"

// berthSubject drives a `berth dev` through its API.
type berthSubject struct {
	l        layout
	dev      *benchhost.Dev
	c        *client.Client
	cc       *containerd.Client // berth's own containerd, only to see deletes
	netnsDir string             // where berth's agent keeps the instances' network namespaces
	tr       *tracker
	cancel   context.CancelFunc

	mu  sync.Mutex
	ids map[string][]string // service -> its instances

	noNet bool // the services' networks are ["none"] (see noNetwork)
}

func (b *berthSubject) Name() string {
	if b.noNet {
		return "berth, network none"
	}
	return "berth (API, watch)"
}

// noNetwork is a second subject on the same berth dev whose services have
// networks ["none"]: the same start and removal path without the VNIC
// (no CNI call), which tells berth's own cost apart from the network
// setup that neither containerd subject does. Closing it closes nothing.
func (b *berthSubject) noNetwork() *berthSubject {
	return &berthSubject{l: b.l, c: b.c, cc: b.cc, netnsDir: b.netnsDir, tr: b.tr,
		ids: map[string][]string{}, noNet: true}
}

// startBerth starts `berth dev`, imports the image and opens the watches.
// A non-nil subject is returned even on error, to be closed.
func startBerth(ctx context.Context, l layout, bin string, timeout time.Duration) (*berthSubject, error) {
	b := &berthSubject{l: l, ids: map[string][]string{}, dev: &benchhost.Dev{
		Bin: bin, Data: l.berthData, API: apiAddr, Args: []string{"--node-name", "node1"},
		Log: filepath.Join(l.work, "berth-dev.log"), Archive: l.archive, Timeout: timeout,
	}}
	err := b.dev.Start(ctx)
	b.c = b.dev.Client
	if err != nil {
		return b, err
	}

	// Watch instances through the API, and container deletes on berth's
	// containerd: an instance is removed when both have happened.
	p, err := runtime.PathsFor(l.berthData)
	if err != nil {
		return b, err
	}
	b.netnsDir = filepath.Join(filepath.Dir(p.Socket), "netns")
	b.cc, err = containerd.New(p.Socket, containerd.WithDefaultNamespace(runtime.Namespace))
	if err != nil {
		return b, fmt.Errorf("connect to berth's containerd: %w", err)
	}
	wctx, wcancel := context.WithCancel(context.Background())
	b.cancel = wcancel
	b.tr = newTracker()
	evs, errs := b.cc.Subscribe(wctx, `topic=="/containers/delete"`)
	go func() {
		for {
			select {
			case env := <-evs:
				if env == nil || env.Namespace != runtime.Namespace {
					continue
				}
				v, err := typeurl.UnmarshalAny(env.Event)
				if err != nil {
					continue
				}
				if e, ok := v.(*eventtypes.ContainerDelete); ok {
					b.tr.containerGone(e.ID)
				}
			case err := <-errs:
				if wctx.Err() == nil {
					b.tr.fail(fmt.Errorf("containerd events: %w", err))
				}
				return
			case <-wctx.Done():
				return
			}
		}
	}()
	s, err := b.c.Watch(wctx, client.WatchInstances, 0)
	if err != nil {
		return b, fmt.Errorf("watch instances: %w", err)
	}
	synced := make(chan struct{})
	go b.tr.consume(wctx, b.c, s, synced)
	select {
	case <-synced:
	case <-time.After(timeout):
		return b, errors.New("the instance watch sent no bookmark")
	}
	return b, nil
}

func (b *berthSubject) service(key string) string {
	if b.noNet {
		return b.l.prefix + "-n" + key
	}
	return b.l.prefix + "-" + key
}

func (b *berthSubject) apply(ctx context.Context, name string, replicas int) error {
	svc := api.ServiceSpec{Name: name, Image: imageRef, Command: command, Replicas: &replicas}
	if b.noNet {
		svc.Networks = []string{api.NoNetwork}
	}
	spec, err := json.Marshal(svc)
	if err != nil {
		return err
	}
	_, err = b.c.ApplyServiceJSON(ctx, spec)
	return err
}

// CreateMany applies a service of n replicas and waits until the watch
// reports n of its instances running.
func (b *berthSubject) CreateMany(ctx context.Context, key string, n int) (time.Duration, error) {
	name := b.service(key)
	var ids []string
	w := b.tr.expect(func(t *tracker) bool {
		ids = ids[:0]
		for id, in := range t.inst {
			if in.Service == name && in.DesiredState == api.DesiredRunning && in.Status.State == api.InstanceRunning {
				ids = append(ids, id)
			}
		}
		return len(ids) == n
	})
	start := time.Now()
	if err := b.apply(ctx, name, n); err != nil {
		b.tr.drop(w)
		return 0, fmt.Errorf("apply %s: %w", name, err)
	}
	at, err := b.tr.wait(ctx, w)
	// Every instance of the service, running or not, for Remove.
	b.mu.Lock()
	b.ids[name] = b.tr.instancesOf(name)
	b.mu.Unlock()
	if err != nil {
		return 0, fmt.Errorf("%s: %w (instances: %s)", name, err, b.tr.describe(name))
	}
	if n > 1 {
		fmt.Fprintf(os.Stderr, "bench: berth's %d: %s\n", n, b.tr.timeline(name, start))
	}
	return at.Sub(start), nil
}

// timeline says when, after start, the watch showed the first and the last
// instance of service placed on a node and running.
func (t *tracker) timeline(service string, start time.Time) string {
	t.mu.Lock()
	defer t.mu.Unlock()
	span := func(m map[string]time.Time) string {
		var first, last time.Time
		for id, at := range m {
			if t.inst[id].Service != service {
				continue
			}
			if first.IsZero() || at.Before(first) {
				first = at
			}
			if at.After(last) {
				last = at
			}
		}
		if first.IsZero() {
			return "none"
		}
		return fmt.Sprintf("%.2f s to %.2f s", first.Sub(start).Seconds(), last.Sub(start).Seconds())
	}
	return "placed " + span(t.placed) + ", running " + span(t.running)
}

func (b *berthSubject) Create(ctx context.Context, key string) (time.Duration, error) {
	return b.CreateMany(ctx, key, 1)
}

// Remove deletes the service (so that nothing replaces the instance) and
// force-removes its instance (`berth service rm` + `berth rm -f`), and
// waits until the watch has dropped the instance and berth's containerd has
// deleted its container.
func (b *berthSubject) Remove(ctx context.Context, key string) (time.Duration, error) {
	return b.remove(ctx, key, true)
}

// RemoveMany deletes the service only (`berth service rm`): its instances
// go with it.
func (b *berthSubject) RemoveMany(ctx context.Context, key string, _ int) (time.Duration, error) {
	return b.remove(ctx, key, false)
}

func (b *berthSubject) remove(ctx context.Context, key string, rmInstances bool) (time.Duration, error) {
	name := b.service(key)
	b.mu.Lock()
	ids := b.ids[name]
	b.mu.Unlock()
	w := b.tr.expect(func(t *tracker) bool {
		for _, id := range ids {
			if _, ok := t.inst[id]; ok || !t.ctrGone[id] {
				return false
			}
		}
		return true
	})
	start := time.Now()
	if err := b.deleteService(ctx, name); err != nil {
		b.tr.drop(w)
		return 0, err
	}
	if rmInstances {
		for _, id := range ids {
			if err := b.c.RemoveInstance(ctx, id, true); err != nil && !client.IsNotFound(err) {
				b.tr.drop(w)
				return 0, fmt.Errorf("rm -f %s: %w", id, err)
			}
		}
	}
	at, err := b.tr.wait(ctx, w)
	if err != nil {
		return 0, fmt.Errorf("%s: %w (instances: %s)", name, err, b.tr.describe(name))
	}
	b.mu.Lock()
	delete(b.ids, name)
	b.mu.Unlock()
	// Untimed: the agent tears the instances' networking down after their
	// containers are deleted; wait for it, so that it does not run into
	// the next measurement (and its CPU time is counted here).
	for _, id := range ids {
		for hostclean.Exists(filepath.Join(b.netnsDir, id)) && ctx.Err() == nil {
			time.Sleep(2 * time.Millisecond)
		}
	}
	return at.Sub(start), nil
}

// Pids asks berth's containerd for the main processes of the service's
// instances.
func (b *berthSubject) Pids(ctx context.Context, key string) ([]int, error) {
	b.mu.Lock()
	ids := append([]string(nil), b.ids[b.service(key)]...)
	b.mu.Unlock()
	var pids []int
	for _, id := range ids {
		c, err := b.cc.LoadContainer(ctx, id)
		if err != nil {
			return nil, err
		}
		t, err := c.Task(ctx, nil)
		if err != nil {
			return nil, err
		}
		pids = append(pids, int(t.Pid()))
	}
	return pids, nil
}

// deleteService deletes a service, again when it changed between the
// server's read and its delete (a conflict).
func (b *berthSubject) deleteService(ctx context.Context, name string) error {
	for {
		err := b.c.DeleteService(ctx, name)
		var ae *api.Error
		switch {
		case err == nil || client.IsNotFound(err):
			return nil
		case errors.As(err, &ae) && ae.Code == api.CodeConflict && ctx.Err() == nil:
			continue
		default:
			return fmt.Errorf("delete service %s: %w", name, err)
		}
	}
}

// Close removes what is left, stops berth dev and then, with `berth agent
// cleanup`, its containerd, shims and containers.
func (b *berthSubject) Close(ctx context.Context) error {
	if b.c != nil {
		b.mu.Lock()
		left := len(b.ids)
		b.mu.Unlock()
		if left > 0 {
			// Not needed for the cleanup (agent cleanup removes every
			// container), but it lets berth stop its containers itself.
			dctx, cancel := context.WithTimeout(ctx, 5*time.Second)
			b.mu.Lock()
			for name := range b.ids {
				_ = b.deleteService(dctx, name)
			}
			b.mu.Unlock()
			cancel()
		}
	}
	if b.noNet {
		return nil // berth dev and the connections are the main subject's
	}
	if b.cancel != nil {
		b.cancel()
	}
	if b.cc != nil {
		_ = b.cc.Close()
	}
	return b.dev.Close(ctx)
}

// tracker keeps what the watches said: the instances as berth reports them
// and the containers berth's containerd deleted; waiters are told the
// moment their condition holds.
type tracker struct {
	mu      sync.Mutex
	inst    map[string]api.Instance
	placed  map[string]time.Time // when the watch first showed an instance on a node
	running map[string]time.Time // ... and running
	ctrGone map[string]bool
	waiters map[*waiter]bool
	err     error
}

type waiter struct {
	cond func(*tracker) bool
	done chan time.Time
}

func newTracker() *tracker {
	return &tracker{inst: map[string]api.Instance{}, placed: map[string]time.Time{}, running: map[string]time.Time{},
		ctrGone: map[string]bool{}, waiters: map[*waiter]bool{}}
}

// expect registers a condition before the action that should make it true.
func (t *tracker) expect(cond func(*tracker) bool) *waiter {
	w := &waiter{cond: cond, done: make(chan time.Time, 1)}
	t.mu.Lock()
	defer t.mu.Unlock()
	if cond(t) {
		w.done <- time.Now()
	} else {
		t.waiters[w] = true
	}
	return w
}

func (t *tracker) drop(w *waiter) {
	t.mu.Lock()
	delete(t.waiters, w)
	t.mu.Unlock()
}

// wait returns when the condition held.
func (t *tracker) wait(ctx context.Context, w *waiter) (time.Time, error) {
	defer t.drop(w)
	for {
		select {
		case at := <-w.done:
			return at, nil
		case <-ctx.Done():
			return time.Time{}, ctx.Err()
		case <-time.After(100 * time.Millisecond):
			t.mu.Lock()
			err := t.err
			t.mu.Unlock()
			if err != nil {
				return time.Time{}, err
			}
		}
	}
}

// notify runs with t.mu held.
func (t *tracker) notify() {
	now := time.Now()
	for w := range t.waiters {
		if w.cond(t) {
			w.done <- now
			delete(t.waiters, w)
		}
	}
}

func (t *tracker) fail(err error) {
	t.mu.Lock()
	t.err = err
	t.mu.Unlock()
}

func (t *tracker) containerGone(id string) {
	t.mu.Lock()
	t.ctrGone[id] = true
	t.notify()
	t.mu.Unlock()
}

func (t *tracker) instancesOf(service string) []string {
	t.mu.Lock()
	defer t.mu.Unlock()
	var ids []string
	for id, in := range t.inst {
		if in.Service == service {
			ids = append(ids, id)
		}
	}
	return ids
}

func (t *tracker) describe(service string) string {
	t.mu.Lock()
	defer t.mu.Unlock()
	var parts []string
	for id, in := range t.inst {
		if in.Service == service {
			parts = append(parts, fmt.Sprintf("%s %s %s %s", id, in.Status.State, in.Status.Reason, in.Status.Message))
		}
	}
	if len(parts) > 5 {
		parts = append(parts[:5], fmt.Sprintf("and %d more", len(parts)-5))
	}
	return strings.Join(parts, "; ")
}

// consume applies the instance watch, reconnecting from its revision when
// the stream breaks; synced closes at the first bookmark.
func (t *tracker) consume(ctx context.Context, c *client.Client, s *client.Stream, synced chan struct{}) {
	first := true
	for {
		for {
			ev, err := s.Next()
			if err != nil {
				if ctx.Err() == nil && !errors.Is(err, io.EOF) {
					fmt.Fprintln(os.Stderr, "bench: instance watch:", err)
				}
				break
			}
			switch ev.Type {
			case api.EventBookmark:
				if first {
					first = false
					close(synced)
				}
			case api.EventPut:
				var in api.Instance
				if json.Unmarshal(ev.Object, &in) == nil {
					t.mu.Lock()
					t.inst[in.ID] = in
					now := time.Now()
					if _, ok := t.placed[in.ID]; !ok && in.Node != "" {
						t.placed[in.ID] = now
					}
					if _, ok := t.running[in.ID]; !ok && in.Status.State == api.InstanceRunning {
						t.running[in.ID] = now
					}
					t.notify()
					t.mu.Unlock()
				}
			case api.EventDelete:
				t.mu.Lock()
				delete(t.inst, ev.Name)
				delete(t.placed, ev.Name)
				delete(t.running, ev.Name)
				t.notify()
				t.mu.Unlock()
			}
		}
		s.Close()
		if ctx.Err() != nil {
			return
		}
		rev := s.Revision()
		var err error
		for s, err = c.Watch(ctx, client.WatchInstances, rev); err != nil; s, err = c.Watch(ctx, client.WatchInstances, rev) {
			if ctx.Err() != nil {
				return
			}
			if client.IsGone(err) {
				t.fail(fmt.Errorf("instance watch: %w", err))
				return
			}
			time.Sleep(100 * time.Millisecond)
		}
	}
}
