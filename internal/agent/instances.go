package agent

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"sync"
	"time"

	"github.com/berth-dev/berth/api"
	"github.com/berth-dev/berth/client"
	"github.com/berth-dev/berth/internal/health"
	"github.com/berth-dev/berth/internal/network"
	"github.com/berth-dev/berth/internal/runtime"
)

// Container labels berth sets.
const (
	LabelInstance = "berth.instance"
	LabelService  = "berth.service"
)

// runtimeAPI is what the agent needs of the container runtime.
type runtimeAPI interface {
	Create(ctx context.Context, s runtime.Spec) error
	Start(ctx context.Context, id, logPath string, gate func() error) (uint32, error)
	Stop(ctx context.Context, id string, grace time.Duration) (int, error)
	Remove(ctx context.Context, id string, grace time.Duration) error
	Update(ctx context.Context, id string, res api.ResourceSpec) error
	Inspect(ctx context.Context, id string) (runtime.State, error)
	List(ctx context.Context) ([]runtime.State, error)
	Events(ctx context.Context) <-chan runtime.Event
}

// instances runs this node's instances: one worker per instance.
type instances struct {
	a  *Agent
	rt runtimeAPI

	mu      sync.Mutex
	workers map[string]*worker
	wg      sync.WaitGroup
	specs   specCache
	nets    networks
}

func (a *Agent) logPath(id string) string { return filepath.Join(a.cfg.DataDir, "logs", id+".log") }
func (a *Agent) instDir(id string) string { return filepath.Join(a.cfg.DataDir, "instances", id) }

// run watches this node's instances and reconciles containers to them.
func (m *instances) run(ctx context.Context) {
	defer m.wg.Wait()
	m.wg.Add(1)
	go func() {
		defer m.wg.Done()
		m.nets.run(ctx, m.a.c)
	}()
	go func() {
		for ev := range m.rt.Events(ctx) {
			m.mu.Lock()
			w := m.workers[ev.ID]
			m.mu.Unlock()
			if w != nil {
				w.exited(ev)
			}
		}
	}()
	path := client.WatchInstances + "?node=" + m.a.cfg.Name
	var from int64
	for ctx.Err() == nil {
		s, err := m.a.c.Watch(ctx, path, from)
		if err != nil {
			if client.IsGone(err) {
				from = 0
				continue
			}
			if ctx.Err() == nil {
				m.a.log.Warn("agent: watch instances", "err", err)
				sleep(ctx, time.Second)
			}
			continue
		}
		m.consume(ctx, s, from == 0)
		from = s.Revision()
		s.Close()
	}
}

// consume applies a watch stream. A stream from a snapshot first lists
// every instance; at its first bookmark, anything not listed is gone.
func (m *instances) consume(ctx context.Context, s *client.Stream, snapshot bool) {
	seen := map[string]bool{}
	for {
		ev, err := s.Next()
		if err != nil {
			if ctx.Err() == nil && !errors.Is(err, io.EOF) {
				m.a.log.Warn("agent: instance watch ended", "err", err)
			}
			return
		}
		switch ev.Type {
		case api.EventBookmark:
			if snapshot {
				m.specs.forget("")
				m.sweep(ctx, seen)
				snapshot = false
			}
		case api.EventPut, api.EventDelete:
			var in api.Instance
			if err := jsonUnmarshal(ev.Object, &in); err != nil {
				continue
			}
			seen[in.ID] = true
			if ev.Type == api.EventDelete || in.Node != m.a.cfg.Name {
				m.specs.forget(in.Service)
				m.update(ctx, in.ID, nil, false)
			} else {
				m.update(ctx, in.ID, &in, !snapshot)
			}
		}
	}
}

// sweep ends workers and removes containers of instances that no longer exist.
func (m *instances) sweep(ctx context.Context, listed map[string]bool) {
	m.mu.Lock()
	var gone []string
	for id := range m.workers {
		if !listed[id] {
			gone = append(gone, id)
		}
	}
	m.mu.Unlock()
	for _, id := range gone {
		m.update(ctx, id, nil, false)
	}
	m.a.net.Sweep(func(id string) bool {
		if listed[id] {
			return true
		}
		m.mu.Lock()
		defer m.mu.Unlock()
		_, has := m.workers[id]
		return has
	})
	states, err := m.rt.List(ctx)
	if err != nil {
		m.a.log.Warn("agent: list containers", "err", err)
		return
	}
	for _, st := range states {
		id := st.Labels[LabelInstance]
		if id == "" || listed[id] {
			continue
		}
		m.mu.Lock()
		_, has := m.workers[id]
		m.mu.Unlock()
		if !has {
			m.a.log.Info("agent: removing the container of a deleted instance", "instance", id)
			m.update(ctx, id, nil, false)
		}
	}
}

// update hands an instance (nil: gone from this node) to its worker,
// starting one if it has none. live says the instance comes from the watch
// after its first snapshot, not from a listing of what may already exist.
func (m *instances) update(ctx context.Context, id string, in *api.Instance, live bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	w := m.workers[id]
	if w == nil {
		w = &worker{m: m, id: id, kick: make(chan struct{}, 1)}
		if in != nil {
			w.status = in.Status
			// Placed here while this agent watched, and never started by
			// any agent: only this worker can make its container.
			w.fresh = live && (in.Status.State == "" || in.Status.State == api.InstancePending)
		}
		m.workers[id] = w
		m.wg.Add(1)
		go func() {
			defer m.wg.Done()
			w.loop(ctx)
			m.mu.Lock()
			if m.workers[id] == w {
				delete(m.workers, id)
			}
			m.mu.Unlock()
		}()
	}
	w.set(in)
}

// worker keeps one instance's container as desired.
type worker struct {
	m    *instances
	id   string
	kick chan struct{}

	mu      sync.Mutex
	desired *api.Instance // nil: the instance is gone
	exit    *runtime.Event

	// Owned by the loop.
	status      api.InstanceStatus
	spec        *api.ServiceSpec
	specGen     int64
	applied     api.ResourceSpec
	created     bool
	fresh       bool // no container can exist yet: no need to look
	restartAt   time.Time
	consecutive int
	gone        bool
	gateways    map[string]string  // network → the gateway its VNIC uses
	checkStop   context.CancelFunc // stops the running health monitor
	health      *string            // a state the monitor reported, not yet applied
}

func (w *worker) set(in *api.Instance) {
	w.mu.Lock()
	if in == nil {
		w.gone = true
	}
	// An update that changes nothing the worker acts on (most often the
	// echo of the status it reported itself) needs no pass of its own.
	same := in != nil && w.desired != nil && sameIntent(w.desired, in)
	w.desired = in
	w.mu.Unlock()
	if !same {
		w.poke()
	}
}

// sameIntent says whether two versions of an instance ask for the same
// container: they differ at most in status and bookkeeping.
func sameIntent(a, b *api.Instance) bool {
	return a.Service == b.Service && a.Generation == b.Generation && a.Node == b.Node &&
		a.DesiredState == b.DesiredState && a.StopGrace == b.StopGrace && reflect.DeepEqual(a.Resources, b.Resources)
}

func (w *worker) exited(ev runtime.Event) {
	if !ev.Exit {
		return
	}
	w.mu.Lock()
	w.exit = &ev
	w.mu.Unlock()
	w.poke()
}

func (w *worker) poke() {
	select {
	case w.kick <- struct{}{}:
	default:
	}
}

func (w *worker) loop(ctx context.Context) {
	for {
		var timer *time.Timer
		var fire <-chan time.Time
		if !w.restartAt.IsZero() {
			timer = time.NewTimer(time.Until(w.restartAt))
			fire = timer.C
		}
		select {
		case <-ctx.Done():
		case <-w.kick:
		case <-fire:
		}
		if timer != nil {
			timer.Stop()
		}
		if ctx.Err() != nil {
			return
		}
		if done := w.reconcile(ctx); done {
			return
		}
	}
}

func (w *worker) log() *loggerT { return &loggerT{w} }

type loggerT struct{ w *worker }

func (l *loggerT) warn(msg string, args ...any) {
	l.w.m.a.log.Warn(msg, append([]any{"instance", l.w.id}, args...)...)
}

// report writes the instance's status through the API.
func (w *worker) report(ctx context.Context) {
	if _, err := w.m.a.c.PutInstanceStatus(ctx, w.id, w.status); err != nil && !client.IsNotFound(err) && ctx.Err() == nil {
		w.log().warn("agent: report status", "err", err)
	}
}

func exitReason(ev runtime.Event) (state, reason, msg string) {
	switch {
	case ev.OOM:
		return api.InstanceFailed, api.ReasonOOMKilled, "killed: the container went over its memory limit"
	case ev.ExitCode > 128:
		return api.InstanceFailed, api.ReasonKilled, fmt.Sprintf("killed by signal %d", ev.ExitCode-128)
	case ev.ExitCode != 0:
		return api.InstanceFailed, api.ReasonExited, fmt.Sprintf("exited with code %d", ev.ExitCode)
	}
	return api.InstanceExited, api.ReasonExited, "exited with code 0"
}

// reconcile does one step toward the desired state; true ends the worker.
func (w *worker) reconcile(ctx context.Context) bool {
	w.mu.Lock()
	in, ev, gone, health := w.desired, w.exit, w.gone, w.health
	w.exit, w.health = nil, nil
	w.mu.Unlock()
	rt := w.m.rt

	if ev != nil || gone || (in != nil && in.DesiredState == api.DesiredStopped) {
		w.stopCheck()
	}
	if health != nil && ev == nil && w.status.State == api.InstanceRunning && w.status.Health != *health {
		w.status.Health = *health
		w.report(ctx)
	}

	if ev != nil && w.status.State == api.InstanceRunning {
		code := ev.ExitCode
		w.status.State, w.status.Reason, w.status.Message = exitReason(*ev)
		w.status.ExitCode = &code
		w.status.FinishedAt = ev.At
		w.status.Health = api.HealthCritical
		if !gone {
			w.report(ctx)
		}
	}
	if gone || in == nil {
		grace := api.DefaultStopGrace
		if err := rt.Remove(ctx, w.id, grace); err != nil {
			w.log().warn("agent: remove", "err", err)
		}
		if err := w.m.a.net.Teardown(ctx, w.id, w.attachmentsFromStatus(ctx)); err != nil {
			w.log().warn("agent: network teardown", "err", err)
		}
		_ = os.RemoveAll(w.m.a.instDir(w.id))
		for _, p := range []string{"", ".1", ".2"} {
			_ = os.Remove(w.m.a.logPath(w.id) + p)
		}
		return true
	}

	var st runtime.State
	err := runtime.ErrNotFound
	if !w.fresh {
		st, err = rt.Inspect(ctx, w.id)
	}
	w.fresh = false
	exists := err == nil
	if err != nil && !errors.Is(err, runtime.ErrNotFound) {
		w.log().warn("agent: inspect", "err", err)
		return false
	}

	if in.DesiredState == api.DesiredStopped {
		if exists && st.Running {
			code, err := rt.Stop(ctx, w.id, in.StopGrace.D())
			if err != nil {
				w.log().warn("agent: stop", "err", err)
				return false
			}
			w.status.ExitCode = &code
			w.status.FinishedAt = time.Now().UTC()
		}
		if w.status.State != api.InstanceStopped {
			w.status.State, w.status.Reason, w.status.Message = api.InstanceStopped, api.ReasonStopped, "stopped on request"
			w.status.Health = api.HealthCritical
			w.report(ctx)
		}
		w.restartAt = time.Time{}
		return false
	}

	spec, err := w.serviceSpec(ctx, in)
	if err != nil {
		w.fail(ctx, api.ReasonStartFailed, err.Error())
		return false
	}
	switch {
	case !exists:
		w.restartAt = time.Time{}
		atts, err := w.attachments(ctx, spec)
		if err != nil {
			w.netFailed(ctx, err)
			return false
		}
		// The namespace and then the VNICs are made while containerd
		// creates the container (which needs only the namespace's path)
		// and its task (which needs the namespace); the process runs once
		// the VNICs are ready.
		net := w.setupNetwork(ctx, atts)
		w.status.Ports = portBindings(spec)
		rs := w.runtimeSpec(in, spec)
		rs.NetnsPath = w.m.a.net.NetnsPath(w.id)
		if err := rt.Create(ctx, rs); err != nil {
			net.wait()
			reason := api.ReasonStartFailed
			if errors.Is(err, runtime.ErrImageNotFound) {
				reason = api.ReasonImageNotFound
			}
			w.fail(ctx, reason, err.Error())
			return false
		}
		if err := net.prepared(); err != nil {
			if err := rt.Remove(ctx, w.id, 0); err != nil {
				w.log().warn("agent: remove", "err", err)
			}
			w.netFailed(ctx, err)
			return false
		}
		applied := false
		applyNet := func() error {
			vnics, err := net.wait()
			if err != nil || applied {
				return err
			}
			applied = true
			w.status.VNICs = vnics
			w.writeNameFiles()
			for _, a := range atts {
				w.m.a.dns.ensure(ctx, network.Gateway(a))
			}
			return nil
		}
		w.startGated(ctx, in, applyNet)
		// Also when the start failed before its gate: the VNICs are
		// recorded for a restart, or the networks' failure is handled.
		if err := applyNet(); err != nil {
			// Start over from no container, with the networks, shortly
			// (the failure is reported: by startGated when its gate
			// failed, or the start's own error).
			if err := rt.Remove(ctx, w.id, 0); err != nil {
				w.log().warn("agent: remove", "err", err)
			}
			w.restartAt = time.Now().Add(2 * time.Second)
		}
	case st.Running:
		if w.status.State != api.InstanceRunning {
			// Found running (an agent restart): report it as it is.
			w.status.State, w.status.Reason, w.status.Message = api.InstanceRunning, "", ""
			w.status.ExitCode = nil
			if w.status.StartedAt.IsZero() {
				w.status.StartedAt = time.Now().UTC()
			}
			w.report(ctx)
		}
		if w.checkStop == nil && spec.Check != nil {
			w.startCheck(ctx)
		}
		if !w.created {
			w.applied, w.created = in.Resources, true
		}
		if !reflect.DeepEqual(w.applied, in.Resources) {
			if err := rt.Update(ctx, w.id, in.Resources); err != nil {
				w.status.Message = "resource update refused: " + err.Error()
				w.report(ctx)
			} else {
				w.applied = in.Resources
				if strings.HasPrefix(w.status.Message, "resource update refused") {
					w.status.Message = ""
					w.report(ctx)
				}
			}
		}
	default:
		// The container exists and its process has ended.
		if w.status.State == api.InstanceRunning || w.status.State == "" || w.status.State == api.InstancePending || w.status.State == api.InstanceStarting {
			// Ended while nobody watched (the agent was down).
			if st.HasTask {
				code := st.ExitCode
				w.status.State, w.status.Reason, w.status.Message = exitReason(runtime.Event{ExitCode: code, OOM: st.OOMKilled})
				w.status.ExitCode = &code
				w.status.FinishedAt = st.ExitedAt
			} else {
				w.status.State, w.status.Reason, w.status.Message = api.InstanceExited, api.ReasonExited, "exited while the agent was down; exit code unknown"
				w.status.ExitCode = nil
			}
			w.status.Health = api.HealthCritical
			w.report(ctx)
		}
		if !w.shouldRestart(spec) {
			w.restartAt = time.Time{}
			return false
		}
		if w.restartAt.IsZero() {
			w.restartAt = time.Now().Add(w.backoff(spec))
			return false
		}
		if time.Now().Before(w.restartAt) {
			return false
		}
		w.restartAt = time.Time{}
		w.status.Restarts++
		w.start(ctx, in)
	}
	return false
}

func (w *worker) shouldRestart(spec api.ServiceSpec) bool {
	code := 0
	if w.status.ExitCode != nil {
		code = *w.status.ExitCode
	}
	switch spec.Restart.Policy {
	case api.RestartNever:
		return false
	case api.RestartOnFailure:
		return code != 0 && (spec.Restart.MaxRestarts == 0 || w.status.Restarts < spec.Restart.MaxRestarts)
	}
	return true
}

// backoff doubles from the policy's delay up to its max; a container that
// ran long enough starts again from the base delay.
func (w *worker) backoff(spec api.ServiceSpec) time.Duration {
	base, maxD := spec.Restart.Delay.D(), spec.Restart.MaxDelay.D()
	if base <= 0 {
		base = api.DefaultRestartDelay
	}
	if maxD < base {
		maxD = base
	}
	if !w.status.StartedAt.IsZero() && !w.status.FinishedAt.IsZero() && w.status.FinishedAt.Sub(w.status.StartedAt) > 2*maxD {
		w.consecutive = 0
	}
	d := base
	for i := 0; i < w.consecutive && d < maxD; i++ {
		d *= 2
	}
	w.consecutive++
	return min(d, maxD)
}

// netFailed reports that the instance's networks could not be set up.
// They may just not be ready here yet (an overlay slice being assigned):
// it is tried again shortly.
func (w *worker) netFailed(ctx context.Context, err error) {
	w.fail(ctx, api.ReasonStartFailed, err.Error())
	w.restartAt = time.Now().Add(2 * time.Second)
}

// netSetup is the network setup of one start, running beside it: first
// the instance's namespace, then its VNICs.
type netSetup struct {
	nsDone chan struct{} // the namespace is made, or nsErr says why not
	nsErr  error
	done   chan struct{}
	vnics  []api.VNIC
	err    error
}

// setupNetwork makes the instance's namespace and gives it its VNICs in
// the background; prepared waits for the namespace, wait for the VNICs.
func (w *worker) setupNetwork(ctx context.Context, atts []network.Attachment) *netSetup {
	n := &netSetup{nsDone: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(n.done)
		path, err := w.m.a.net.Prepare(w.id)
		n.nsErr = err
		close(n.nsDone)
		if err != nil {
			n.err = err
			return
		}
		n.vnics, n.err = w.m.a.net.Attach(ctx, w.id, path, atts)
	}()
	return n
}

func (n *netSetup) prepared() error {
	<-n.nsDone
	return n.nsErr
}

func (n *netSetup) wait() ([]api.VNIC, error) {
	<-n.done
	return n.vnics, n.err
}

func (w *worker) start(ctx context.Context, in *api.Instance) { w.startGated(ctx, in, nil) }

// startGated starts the instance's process; gate (when not nil) must
// return nil before it runs (runtime.Containerd.Start).
func (w *worker) startGated(ctx context.Context, in *api.Instance, gate func() error) {
	w.status.State, w.status.Reason, w.status.Message = api.InstanceStarting, "", ""
	if _, err := w.m.rt.Start(ctx, w.id, w.m.a.logPath(w.id), gate); err != nil {
		w.fail(ctx, api.ReasonStartFailed, err.Error())
		return
	}
	w.applied, w.created = in.Resources, true
	w.status.State = api.InstanceRunning
	w.status.StartedAt = time.Now().UTC()
	w.status.FinishedAt = time.Time{}
	w.status.ExitCode = nil
	w.status.Health = ""
	if w.spec != nil && w.spec.Check != nil {
		w.status.Health = api.HealthCritical // until the check passes
	}
	w.report(ctx)
	w.startCheck(ctx)
}

// startCheck runs the spec's health check against the instance, feeding
// each change of state back into the worker's loop.
func (w *worker) startCheck(ctx context.Context) {
	w.stopCheck()
	if w.spec == nil || w.spec.Check == nil {
		return
	}
	var addr string
	if len(w.status.VNICs) > 0 {
		addr = w.status.VNICs[0].IP
	} else if c := w.spec.Check; c.HTTP != nil || c.TCP != nil {
		return // no address to probe (yet)
	}
	cctx, cancel := context.WithCancel(ctx)
	w.checkStop = cancel
	target := health.Target{
		Address: addr,
		Exec: func(ctx context.Context, cmd []string) (int, string, error) {
			var out bytes.Buffer
			code, err := w.m.a.rt.Exec(ctx, w.id, cmd, &out, &out)
			return code, out.String(), err
		},
	}
	mon := health.NewMonitor(*w.spec.Check, target, func(state, output string) {
		w.mu.Lock()
		w.health = &state
		w.mu.Unlock()
		w.m.a.log.Info("agent: health", "instance", w.id, "state", state, "output", output)
		w.poke()
	})
	// Start from the state last reported: after an agent restart the
	// container kept running, and a probe that now fails must be reported.
	mon.Seed(w.status.Health)
	w.m.a.checks.set(w.id, mon)
	w.m.wg.Add(1)
	go func() {
		defer w.m.wg.Done()
		mon.Run(cctx)
	}()
}

func (w *worker) stopCheck() {
	if w.checkStop != nil {
		w.checkStop()
		w.checkStop = nil
		w.m.a.checks.set(w.id, nil)
	}
}

func (w *worker) fail(ctx context.Context, reason, msg string) {
	if w.status.State == api.InstanceFailed && w.status.Reason == reason && w.status.Message == msg {
		return
	}
	w.status.State, w.status.Reason, w.status.Message = api.InstanceFailed, reason, msg
	w.status.Health = api.HealthCritical
	w.m.a.log.Warn("agent: instance failed", "instance", w.id, "reason", reason, "err", msg)
	w.report(ctx)
}

// serviceSpec fetches the spec of the instance's generation.
func (w *worker) serviceSpec(ctx context.Context, in *api.Instance) (api.ServiceSpec, error) {
	if w.spec != nil && w.specGen == in.Generation {
		return *w.spec, nil
	}
	spec, err := w.m.specs.get(ctx, in.Service, in.Generation, func(ctx context.Context) (api.ServiceSpec, error) {
		svc, err := w.m.a.c.GetService(ctx, in.Service)
		if err != nil {
			return api.ServiceSpec{}, fmt.Errorf("service %s: %w", in.Service, err)
		}
		spec, ok := svc.SpecOf(in.Generation)
		if !ok {
			return api.ServiceSpec{}, fmt.Errorf("service %s has no generation %d", in.Service, in.Generation)
		}
		return spec, nil
	})
	if err != nil {
		return api.ServiceSpec{}, err
	}
	w.spec, w.specGen = &spec, in.Generation
	return spec, nil
}

// specCache shares services' specs among the workers, so that a burst of
// new instances of one service (a scale-up, a rollout) fetches the spec
// once instead of once per instance. A generation's spec never changes,
// but a service deleted and created again numbers its generations anew:
// entries are kept only for specTTL, and an instance of the service
// leaving this node drops them.
type specCache struct {
	mu sync.Mutex
	m  map[specKey]*specEntry
}

type specKey struct {
	service string
	gen     int64
}

type specEntry struct {
	done chan struct{} // closed once spec and err are set
	spec api.ServiceSpec
	err  error
	at   time.Time
}

const specTTL = 2 * time.Second

// get returns the spec of a service's generation, calling fetch unless a
// recent or concurrent call already did.
func (c *specCache) get(ctx context.Context, service string, gen int64, fetch func(context.Context) (api.ServiceSpec, error)) (api.ServiceSpec, error) {
	k := specKey{service, gen}
	c.mu.Lock()
	if c.m == nil {
		c.m = map[specKey]*specEntry{}
	}
	e := c.m[k]
	if e != nil {
		select {
		case <-e.done:
			if time.Since(e.at) > specTTL {
				e = nil
			}
		default: // being fetched: wait for it
		}
	}
	if e == nil {
		e = &specEntry{done: make(chan struct{})}
		c.m[k] = e
		c.mu.Unlock()
		e.spec, e.err = fetch(ctx)
		e.at = time.Now()
		c.mu.Lock()
		if e.err != nil && c.m[k] == e {
			delete(c.m, k) // the next caller tries again
		}
		for k2, e2 := range c.m {
			if e2 != e && isDone(e2.done) && time.Since(e2.at) > specTTL {
				delete(c.m, k2)
			}
		}
		c.mu.Unlock()
		close(e.done)
		return e.spec, e.err
	}
	c.mu.Unlock()
	select {
	case <-e.done:
		return e.spec, e.err
	case <-ctx.Done():
		return api.ServiceSpec{}, ctx.Err()
	}
}

// forget drops the entries of a service, or all of them for "".
func (c *specCache) forget(service string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for k := range c.m {
		if service == "" || k.service == service {
			delete(c.m, k)
		}
	}
}

func isDone(ch chan struct{}) bool {
	select {
	case <-ch:
		return true
	default:
		return false
	}
}

func (w *worker) runtimeSpec(in *api.Instance, spec api.ServiceSpec) runtime.Spec {
	resolv, hosts := w.writeNameFiles()
	return runtime.Spec{
		ID: w.id, Image: spec.Image, Command: spec.Command, Args: spec.Args, Env: spec.Env,
		Resources: in.Resources, User: spec.Security.User, ReadOnly: spec.Security.ReadOnlyRootFilesystem,
		Allow32Bit: spec.Security.Allow32Bit,
		Hostname:   w.id, ResolvConf: resolv, Hosts: hosts, LogPath: w.m.a.logPath(w.id),
		Labels: map[string]string{LabelInstance: w.id, LabelService: in.Service},
	}
}

// writeNameFiles writes the instance's /etc/resolv.conf and /etc/hosts
// from its VNICs and returns their paths. They are rewritten in place (the
// container's bind mounts keep seeing them) once the VNICs are known.
func (w *worker) writeNameFiles() (resolv, hosts string) {
	dir := w.m.a.instDir(w.id)
	_ = os.MkdirAll(dir, 0o755)
	resolv = filepath.Join(dir, "resolv.conf")
	hosts = filepath.Join(dir, "hosts")
	_ = os.WriteFile(resolv, []byte(w.resolvConf()), 0o644)
	self := "127.0.1.1"
	if len(w.status.VNICs) > 0 && w.status.VNICs[0].IP != "" {
		self = w.status.VNICs[0].IP
	}
	_ = os.WriteFile(hosts, []byte(fmt.Sprintf("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n%s\t%s\n", self, w.id)), 0o644)
	return resolv, hosts
}

// resolvConf points the container at berth's DNS on its networks: the
// gateway of each network it joins (where the node serves names), searching
// svc.berth. Without networks it falls back to the node's resolvers.
func (w *worker) resolvConf() string {
	var b strings.Builder
	for _, v := range w.status.VNICs {
		if gw := w.gateways[v.Network]; gw != "" {
			fmt.Fprintf(&b, "nameserver %s\n", gw)
		}
	}
	if b.Len() == 0 {
		return nodeResolvConf()
	}
	b.WriteString("search svc.berth\noptions ndots:1 timeout:2\n")
	return b.String()
}

// nodeResolvConf is the node's resolver configuration without loopback
// nameservers, which mean nothing inside a container's own network.
func nodeResolvConf() string {
	b, err := os.ReadFile("/etc/resolv.conf")
	if err != nil {
		return ""
	}
	var out []string
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) >= 2 && f[0] == "nameserver" && (strings.HasPrefix(f[1], "127.") || f[1] == "::1") {
			continue
		}
		out = append(out, line)
	}
	return strings.Join(out, "\n")
}

// attachments resolves the spec's networks (and the ports published on the
// first) for the network manager.
func (w *worker) attachments(ctx context.Context, spec api.ServiceSpec) ([]network.Attachment, error) {
	if spec.HasNoNetwork() {
		return nil, nil // a namespace with loopback only
	}
	names := spec.Networks
	if len(names) == 0 {
		names = []string{api.DefaultNetwork}
	}
	var atts []network.Attachment
	for i, name := range names {
		n, err := w.network(ctx, name)
		if err != nil {
			return nil, fmt.Errorf("network %s: %w", name, err)
		}
		a := network.Attachment{Network: n, Slice: n.Status.NodeSubnets[w.m.a.cfg.Name]}
		if i == 0 {
			a.Ports = spec.Ports
		}
		if w.gateways == nil {
			w.gateways = map[string]string{}
		}
		w.gateways[name] = network.Gateway(a)
		atts = append(atts, a)
	}
	return atts, nil
}

// attachmentsFromStatus rebuilds the attachments of the VNICs the instance
// reported, for a teardown after the spec may be gone.
func (w *worker) attachmentsFromStatus(ctx context.Context) []network.Attachment {
	var atts []network.Attachment
	for _, v := range w.status.VNICs {
		n, err := w.network(ctx, v.Network)
		if err != nil {
			n = api.Network{NetworkSpec: api.NetworkSpec{Name: v.Network}}
		}
		a := network.Attachment{Network: n, Slice: n.Status.NodeSubnets[w.m.a.cfg.Name]}
		if len(atts) == 0 {
			for _, p := range w.status.Ports {
				a.Ports = append(a.Ports, api.PortSpec(p))
			}
		}
		atts = append(atts, a)
	}
	return atts
}

func portBindings(spec api.ServiceSpec) []api.PortBinding {
	var out []api.PortBinding
	for _, p := range spec.Ports {
		out = append(out, api.PortBinding(p))
	}
	return out
}

// network returns a network as the agent's watch last saw it, or from the
// server when the watch has not seen it (yet) or has not seen this node's
// slice of an overlay.
func (w *worker) network(ctx context.Context, name string) (api.Network, error) {
	if n, ok := w.m.nets.get(name); ok && (n.Driver != api.DriverOverlay || n.Status.NodeSubnets[w.m.a.cfg.Name] != "") {
		return n, nil
	}
	return w.m.a.c.GetNetwork(ctx, name)
}

// networks is the agent's view of the networks, kept by a watch, so that
// starting or removing an instance does not ask the server for them (a
// network read there also collects every instance's addresses). Only a
// watch that is in step answers; otherwise callers ask the server.
type networks struct {
	mu     sync.Mutex
	m      map[string]api.Network
	synced bool
}

// run keeps the view until ctx ends; every (re)connection starts from a
// full list, so that nothing deleted in between stays.
func (n *networks) run(ctx context.Context, c *client.Client) {
	for ctx.Err() == nil {
		s, err := c.Watch(ctx, client.WatchNetworks, 0)
		if err != nil {
			sleep(ctx, time.Second)
			continue
		}
		n.consume(s)
		s.Close()
		n.mu.Lock()
		n.synced = false
		n.mu.Unlock()
	}
}

func (n *networks) consume(s *client.Stream) {
	fresh := map[string]api.Network{} // the list, until its bookmark
	for {
		ev, err := s.Next()
		if err != nil {
			return
		}
		n.mu.Lock()
		switch ev.Type {
		case api.EventBookmark:
			if fresh != nil {
				n.m, n.synced, fresh = fresh, true, nil
			}
		case api.EventPut:
			var nw api.Network
			if jsonUnmarshal(ev.Object, &nw) == nil {
				if fresh != nil {
					fresh[nw.Name] = nw
				} else {
					n.m[nw.Name] = nw
				}
			}
		case api.EventDelete:
			if fresh != nil {
				delete(fresh, ev.Name)
			} else {
				delete(n.m, ev.Name)
			}
		}
		n.mu.Unlock()
	}
}

func (n *networks) get(name string) (api.Network, bool) {
	n.mu.Lock()
	defer n.mu.Unlock()
	nw, ok := n.m[name]
	return nw, ok && n.synced
}
