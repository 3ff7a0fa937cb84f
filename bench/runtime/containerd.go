package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	runcopts "github.com/containerd/containerd/api/types/runc/options"
	containerd "github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/pkg/cio"
	"github.com/containerd/containerd/v2/pkg/oci"
	"github.com/containerd/errdefs"

	"github.com/berth-dev/berth/internal/runtime"
)

// ctdSubject drives the bare containerd through internal/runtime: the
// calls berth's agent makes, with the same hardening.
type ctdSubject struct {
	l             layout
	r             *runtime.Containerd
	resolv, hosts string
	pids          pidMap
}

// pidMap keeps the main process of each container.
type pidMap struct {
	mu sync.Mutex
	m  map[string]int
}

func (p *pidMap) set(id string, pid int) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.m == nil {
		p.m = map[string]int{}
	}
	if pid > 0 {
		p.m[id] = pid
	} else {
		delete(p.m, id)
	}
}

// withPrefix returns the pids of the containers whose id starts with id.
func (p *pidMap) withPrefix(id string) []int {
	p.mu.Lock()
	defer p.mu.Unlock()
	var out []int
	for k, pid := range p.m {
		if strings.HasPrefix(k, id) {
			out = append(out, pid)
		}
	}
	return out
}

func (s *ctdSubject) Name() string { return "containerd (berth's calls)" }

// rawSubject drives the same containerd through plain client calls.
type rawSubject struct {
	l    layout
	c    *containerd.Client
	img  containerd.Image
	root string // runc root of its containers

	mu   sync.Mutex
	ctrs map[string]rawCtr
	pids pidMap
}

type rawCtr struct {
	c containerd.Container
	t containerd.Task
}

func (s *rawSubject) Name() string { return "containerd (raw client)" }

// startContainerd starts a second private containerd (internal/runtime,
// its own data dir) and imports the image into it. A non-nil subject is
// returned even on error, to be closed.
func startContainerd(ctx context.Context, l layout, log *slog.Logger) (*ctdSubject, *rawSubject, error) {
	r, err := runtime.New(ctx, l.ctdData, log)
	if err != nil {
		// runtime.New may have started containerd before failing to dial it.
		return &ctdSubject{l: l}, &rawSubject{l: l}, fmt.Errorf("start the bare containerd: %w", err)
	}
	s := &ctdSubject{l: l, r: r}
	p, _ := runtime.PathsFor(l.ctdData)
	raw := &rawSubject{l: l, c: r.Client(), root: filepath.Join(p.RuncRoot, "raw"), ctrs: map[string]rawCtr{}}
	f, err := os.Open(l.archive)
	if err != nil {
		return s, raw, err
	}
	defer f.Close()
	if _, err := r.Import(ctx, f); err != nil {
		return s, raw, fmt.Errorf("bare containerd: %w", err)
	}
	raw.img, err = r.Client().GetImage(ctx, runtime.NormalizeRef(imageRef))
	if err != nil {
		return s, raw, err
	}
	// The files berth's agent writes per instance and bind-mounts.
	s.resolv = filepath.Join(l.work, "resolv.conf")
	s.hosts = filepath.Join(l.work, "hosts")
	if err := os.WriteFile(s.resolv, nil, 0o644); err != nil {
		return s, raw, err
	}
	if err := os.WriteFile(s.hosts, []byte("127.0.0.1\tlocalhost\n"), 0o644); err != nil {
		return s, raw, err
	}
	return s, raw, nil
}

func (s *ctdSubject) Pids(_ context.Context, key string) ([]int, error) {
	return s.pids.withPrefix(s.id(key)), nil
}

func (s *rawSubject) Pids(_ context.Context, key string) ([]int, error) {
	return s.pids.withPrefix(s.id(key)), nil
}

func (s *ctdSubject) id(key string) string { return s.l.prefix + "-" + key }

func (s *ctdSubject) logPath(id string) string { return filepath.Join(s.l.ctdData, "logs", id+".log") }

func (s *ctdSubject) start(ctx context.Context, id string) error {
	spec := runtime.Spec{ID: id, Image: imageRef, Command: command, Hostname: id,
		ResolvConf: s.resolv, Hosts: s.hosts, LogPath: s.logPath(id),
		Labels: map[string]string{"berth.instance": id, "berth.service": "bench"}}
	if err := s.r.Create(ctx, spec); err != nil {
		return err
	}
	pid, err := s.r.Start(ctx, id, s.logPath(id), nil)
	s.pids.set(id, int(pid))
	return err
}

func (s *ctdSubject) stop(ctx context.Context, id string) error {
	s.pids.set(id, 0)
	err := s.r.Remove(ctx, id, 0)
	_ = os.Remove(s.logPath(id))
	return err
}

// Create is the agent's Create + Start: the task runs when Start returns.
func (s *ctdSubject) Create(ctx context.Context, key string) (time.Duration, error) {
	start := time.Now()
	err := s.start(ctx, s.id(key))
	return time.Since(start), err
}

// Remove is runtime.Remove: task delete with SIGKILL, container delete with
// its snapshot, the runc root removed.
func (s *ctdSubject) Remove(ctx context.Context, key string) (time.Duration, error) {
	start := time.Now()
	err := s.stop(ctx, s.id(key))
	return time.Since(start), err
}

func (s *ctdSubject) CreateMany(ctx context.Context, key string, n int) (time.Duration, error) {
	return parallel(n, func(i int) error { return s.start(ctx, s.id(fmt.Sprintf("%s%03d", key, i))) })
}

func (s *ctdSubject) RemoveMany(ctx context.Context, key string, n int) (time.Duration, error) {
	return parallel(n, func(i int) error { return s.stop(ctx, s.id(fmt.Sprintf("%s%03d", key, i))) })
}

// parallel runs f(0..n-1) in n goroutines and returns how long all took.
func parallel(n int, f func(int) error) (time.Duration, error) {
	start := time.Now()
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i := 0; i < n; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs[i] = f(i)
		}()
	}
	wg.Wait()
	return time.Since(start), errors.Join(errs...)
}

// Close stops the bare containerd with all it runs.
func (s *ctdSubject) Close(ctx context.Context) error {
	if s.r != nil {
		_ = s.r.Close()
	}
	p, err := runtime.PathsFor(s.l.ctdData)
	if err != nil {
		return err
	}
	return runtime.Shutdown(ctx, p, slog.New(slog.NewTextHandler(io.Discard, nil)))
}

func (s *rawSubject) id(key string) string { return s.l.prefix + "-" + key }

func (s *rawSubject) start(ctx context.Context, id string) error {
	c, err := s.c.NewContainer(ctx, id,
		containerd.WithNewSnapshot(id+"-rootfs", s.img),
		containerd.WithRuntime("io.containerd.runc.v2", &runcopts.Options{Root: s.root}),
		containerd.WithNewSpec(oci.WithImageConfig(s.img), oci.WithHostname(id), oci.WithProcessArgs(command...)),
	)
	if err != nil {
		return err
	}
	t, err := c.NewTask(ctx, cio.NullIO)
	if err != nil {
		_ = c.Delete(context.WithoutCancel(ctx), containerd.WithSnapshotCleanup)
		return err
	}
	s.mu.Lock()
	s.ctrs[id] = rawCtr{c, t}
	s.mu.Unlock()
	if err := t.Start(ctx); err != nil {
		return err
	}
	s.pids.set(id, int(t.Pid()))
	return nil
}

func (s *rawSubject) stop(ctx context.Context, id string) error {
	s.mu.Lock()
	rc, ok := s.ctrs[id]
	delete(s.ctrs, id)
	s.mu.Unlock()
	s.pids.set(id, 0)
	if !ok {
		return fmt.Errorf("no container %s", id)
	}
	exited, err := rc.t.Wait(ctx)
	if err != nil {
		return err
	}
	if err := rc.t.Kill(ctx, syscall.SIGKILL); err != nil && !errdefs.IsNotFound(err) {
		return err
	}
	select {
	case <-exited:
	case <-ctx.Done():
		return ctx.Err()
	}
	if _, err := rc.t.Delete(ctx); err != nil && !errdefs.IsNotFound(err) {
		return err
	}
	return rc.c.Delete(ctx, containerd.WithSnapshotCleanup)
}

// Create is NewContainer (snapshot + spec), NewTask (null IO) and Start.
func (s *rawSubject) Create(ctx context.Context, key string) (time.Duration, error) {
	start := time.Now()
	err := s.start(ctx, s.id(key))
	return time.Since(start), err
}

// Remove is Wait, Kill SIGKILL, the exit, task delete, container delete
// with its snapshot.
func (s *rawSubject) Remove(ctx context.Context, key string) (time.Duration, error) {
	start := time.Now()
	err := s.stop(ctx, s.id(key))
	return time.Since(start), err
}

func (s *rawSubject) CreateMany(ctx context.Context, key string, n int) (time.Duration, error) {
	return parallel(n, func(i int) error { return s.start(ctx, s.id(fmt.Sprintf("%s%03d", key, i))) })
}

func (s *rawSubject) RemoveMany(ctx context.Context, key string, n int) (time.Duration, error) {
	return parallel(n, func(i int) error { return s.stop(ctx, s.id(fmt.Sprintf("%s%03d", key, i))) })
}
