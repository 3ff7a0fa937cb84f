package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"slices"
	"sync"
	"time"

	eventtypes "github.com/containerd/containerd/api/events"
	containerd "github.com/containerd/containerd/v2/client"
	"github.com/containerd/typeurl/v2"
	"github.com/miekg/dns"
	"golang.org/x/sys/unix"

	"github.com/berth-dev/berth/api"
	"github.com/berth-dev/berth/client"
	"github.com/berth-dev/berth/internal/runtime"
	"github.com/berth-dev/berth/internal/testimage"
)

// imageRef names the test image.
const imageRef = testimage.DefaultRef

// pollGap is the pause of the GET and DNS pollers between an answer and
// their next question.
const pollGap = time.Millisecond

// failWait is how long a killed instance may take to leave a discovery
// path before the sample counts as missed.
const failWait = 10 * time.Second

// failoverSpec is the failover phase's service: busybox httpd serving the
// image's /www, with an HTTP check every second (as the Consul figures had),
// restarted 300ms after it dies (at a constant delay: the default backoff
// starts at 1s and doubles with every crash).
func failoverSpec(name string, replicas int) api.ServiceSpec {
	return api.ServiceSpec{
		Name:     name,
		Image:    imageRef,
		Command:  []string{"httpd", "-f", "-p", "8080", "-h", "/www"},
		Replicas: &replicas,
		Ports:    []api.PortSpec{{Name: "http", Port: 8080}},
		Check: &api.CheckSpec{HTTP: &api.HTTPCheck{Port: 8080, Path: "/index.html"},
			Interval: api.Duration(time.Second), Timeout: api.Duration(500 * time.Millisecond)},
		Restart: api.RestartPolicy{Policy: api.RestartAlways,
			Delay: api.Duration(300 * time.Millisecond), MaxDelay: api.Duration(300 * time.Millisecond)},
	}
}

// failoverResult is how long killed instances took to leave each path.
type failoverResult struct {
	kills    int
	watch    []time.Duration // kill → delete on a discovery watch stream
	get      []time.Duration // kill → first GET ?healthy=1 without it
	dns      []time.Duration // kill → first DNS A answer without its address
	missed   [3]int          // samples of watch, get, dns not gone within failWait
	recovery []time.Duration // kill → every path shows all replicas healthy again

	// Where the time goes, seen from outside berth: kill → berth's
	// containerd publishes the task's exit; kill → an instance watch shows
	// the instance no longer running (the agent's status report stored);
	// exit event → gone from the discovery watch stream.
	exit, status, berth []time.Duration
	dead                []time.Duration // kill → the process has exited (its pidfd readable)
}

// stamps keeps when something happened to each id.
type stamps struct {
	mu sync.Mutex
	at map[string][]time.Time
}

func (s *stamps) mark(id string, at time.Time) {
	s.mu.Lock()
	s.at[id] = append(s.at[id], at)
	s.mu.Unlock()
}

// since is how long after t0 it first happened to id; -1 if not since t0.
func (s *stamps) since(id string, t0 time.Time) time.Duration {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, at := range s.at[id] {
		if at.After(t0) {
			return at.Sub(t0)
		}
	}
	return -1
}

// viewTracker follows a discovery watch stream: the endpoints it currently
// holds, and when each one last left it.
type viewTracker struct {
	mu      sync.Mutex
	eps     map[string]api.Endpoint
	goneAt  map[string]time.Time
	changed chan struct{} // closed and replaced on every change
	err     error
}

func newViewTracker() *viewTracker {
	return &viewTracker{eps: map[string]api.Endpoint{}, goneAt: map[string]time.Time{}, changed: make(chan struct{})}
}

// run applies the stream's events until it ends.
func (t *viewTracker) run(st *client.Stream) {
	for {
		ev, err := st.Next()
		at := time.Now()
		t.mu.Lock()
		if err != nil {
			t.err = err
			close(t.changed)
			t.changed = make(chan struct{})
			t.mu.Unlock()
			return
		}
		switch ev.Type {
		case api.EventPut, api.EventDelete:
			var ep api.Endpoint
			if json.Unmarshal(ev.Object, &ep) == nil {
				if ev.Type == api.EventPut && ep.Health != api.HealthCritical {
					t.eps[ev.Name] = ep
				} else {
					delete(t.eps, ev.Name)
					t.goneAt[ev.Name] = at
				}
			}
		}
		close(t.changed)
		t.changed = make(chan struct{})
		t.mu.Unlock()
	}
}

// state returns the endpoints' ids, when key last left, a channel closed
// on the next change, and the error that ended the stream.
func (t *viewTracker) state(key string) (ids []string, gone time.Time, changed <-chan struct{}, err error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	for _, ep := range t.eps {
		ids = append(ids, ep.ID)
	}
	return ids, t.goneAt[key], t.changed, t.err
}

// failoverRig holds what the failover phase polls and kills with.
type failoverRig struct {
	service string
	name    string // the service's DNS name
	n       int    // replicas
	c       *client.Client
	cc      *containerd.Client
	tracker *viewTracker
	hc      *http.Client // GET poller
	dnsCl   *dns.Client
	dnsCo   *dns.Conn
	url     string
	exits   *stamps // containerd's /tasks/exit, by container id
	downs   *stamps // instance watch: status no longer running, by instance id
}

// failover runs the service, then kills one instance's process o.kills
// times, round-robin over the replicas, and times its way out of the
// discovery watch, GET ?healthy=1 and DNS.
func failover(ctx context.Context, b *berthDev, o options) (failoverResult, error) {
	var res failoverResult
	r := &failoverRig{service: b.l.prefix + "-fo", n: o.replicas, c: b.c}
	r.name = r.service + ".svc.berth."
	r.url = "http://" + apiAddr + client.DiscoveryPath(r.service, client.DiscoverOptions{Healthy: true})
	if _, err := b.c.ApplyService(ctx, failoverSpec(r.service, o.replicas)); err != nil {
		return res, fmt.Errorf("apply %s: %w", r.service, err)
	}
	defer func() {
		// Stop the containers through berth (the cleanup removes them
		// anyway).
		dctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
		defer cancel()
		if err := b.c.DeleteService(dctx, r.service); err != nil && !client.IsNotFound(err) {
			fmt.Fprintf(os.Stderr, "bench: delete %s: %v\n", r.service, err)
		}
	}()

	p, err := runtime.PathsFor(b.l.berthData)
	if err != nil {
		return res, err
	}
	r.cc, err = containerd.New(p.Socket, containerd.WithDefaultNamespace(runtime.Namespace))
	if err != nil {
		return res, fmt.Errorf("connect to berth's containerd: %w", err)
	}
	defer r.cc.Close()

	wctx, cancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	defer wg.Wait()
	defer cancel()
	st, err := b.c.Watch(wctx, client.DiscoveryPath(r.service, client.DiscoverOptions{Healthy: true}), 0)
	if err != nil {
		return res, fmt.Errorf("watch %s: %w", r.service, err)
	}
	r.tracker = newViewTracker()
	wg.Go(func() {
		defer st.Close()
		r.tracker.run(st)
	})
	wg.Go(func() {
		<-wctx.Done()
		st.Close() // unblocks Next
	})

	// The breakdown: containerd's exit events, and the instances' status.
	r.exits, r.downs = &stamps{at: map[string][]time.Time{}}, &stamps{at: map[string][]time.Time{}}
	evs, evErrs := r.cc.Subscribe(wctx, `topic=="/tasks/exit"`)
	wg.Go(func() {
		for {
			select {
			case env, ok := <-evs:
				if !ok {
					return
				}
				if env == nil || env.Namespace != runtime.Namespace {
					continue
				}
				at := time.Now()
				v, err := typeurl.UnmarshalAny(env.Event)
				if err != nil {
					continue
				}
				if e, ok := v.(*eventtypes.TaskExit); ok {
					r.exits.mark(e.ContainerID, at)
				}
			case <-evErrs:
				return
			case <-wctx.Done():
				return
			}
		}
	})
	ist, err := b.c.Watch(wctx, client.WatchInstances+"?service="+r.service, 0)
	if err != nil {
		return res, fmt.Errorf("watch the instances of %s: %w", r.service, err)
	}
	wg.Go(func() {
		defer ist.Close()
		for {
			ev, err := ist.Next()
			if err != nil {
				return
			}
			at := time.Now()
			var in api.Instance
			if ev.Type == api.EventPut && json.Unmarshal(ev.Object, &in) == nil && in.Status.State != api.InstanceRunning {
				r.downs.mark(in.ID, at)
			}
		}
	})
	wg.Go(func() {
		<-wctx.Done()
		ist.Close()
	})

	tr := newTransport(2)
	defer tr.CloseIdleConnections()
	r.hc = &http.Client{Transport: tr, Timeout: 5 * time.Second}
	r.dnsCl = &dns.Client{Net: "udp", Timeout: time.Second}
	if r.dnsCo, err = r.dnsCl.Dial(dnsAddr); err != nil {
		return res, fmt.Errorf("dns dial %s: %w", dnsAddr, err)
	}
	defer r.dnsCo.Close()

	eps, err := r.waitHealthy(ctx, o.timeout)
	if err != nil {
		return res, fmt.Errorf("%s: the first %d instances: %w", r.service, r.n, err)
	}
	start := time.Now()
	var killed time.Time
	type kill struct {
		id    string
		at    time.Time
		watch time.Duration
	}
	var kills []kill
	breakdown := func() {
		// The breakdown, once every event has had time to arrive: the
		// first exit event and status change of each victim after its kill.
		time.Sleep(100 * time.Millisecond)
		for _, k := range kills {
			exit := r.exits.since(k.id, k.at)
			if exit >= 0 {
				res.exit = append(res.exit, exit)
				if k.watch >= 0 {
					res.berth = append(res.berth, max(0, k.watch-exit))
				}
			}
			if d := r.downs.since(k.id, k.at); d >= 0 {
				res.status = append(res.status, d)
			}
		}
	}
	for k := range o.kills {
		if k > 0 {
			if eps, err = r.waitHealthy(ctx, o.timeout); err != nil {
				breakdown()
				return res, fmt.Errorf("%s after kill %d: %w", r.service, k, err)
			}
			res.recovery = append(res.recovery, time.Since(killed))
		}
		victim := eps[k%len(eps)]
		pid, err := r.pid(ctx, victim.ID)
		if err != nil {
			return res, err
		}
		killed = time.Now()
		smp, err := r.killAndTime(ctx, pid, victim)
		if err != nil {
			breakdown()
			return res, err
		}
		for i, x := range []struct {
			v   time.Duration
			out *[]time.Duration
		}{{smp.watch, &res.watch}, {smp.get, &res.get}, {smp.dns, &res.dns}} {
			if x.v < 0 {
				res.missed[i]++
			} else {
				*x.out = append(*x.out, x.v)
			}
		}
		if smp.dead >= 0 {
			res.dead = append(res.dead, smp.dead)
		}
		res.kills++
		kills = append(kills, kill{victim.ID, killed, smp.watch})
		if (k+1)%10 == 0 || k+1 == o.kills {
			fmt.Fprintf(os.Stderr, "bench: failover: %d/%d kills (%v)\n", k+1, o.kills, time.Since(start).Round(time.Millisecond))
		}
	}
	breakdown()
	return res, nil
}

// waitHealthy waits until the watch stream, GET ?healthy=1 and DNS all
// show r.n healthy endpoints, and returns them sorted by id.
func (r *failoverRig) waitHealthy(ctx context.Context, timeout time.Duration) ([]api.Endpoint, error) {
	deadline := time.Now().Add(timeout)
	for {
		ids, _, _, err := r.tracker.state("")
		if err != nil {
			return nil, fmt.Errorf("discovery watch: %w", err)
		}
		l, err := r.list(ctx)
		if err != nil {
			return nil, err
		}
		addrs, derr := dnsAddresses(r.dnsCl, r.dnsCo, r.name)
		if len(ids) == r.n && len(l) == r.n && derr == nil && len(addrs) == r.n {
			return l, nil
		}
		if time.Now().After(deadline) {
			slices.Sort(ids)
			why := fmt.Sprintf("the watch has %d %v, GET %d, DNS %d (err %v)", len(ids), ids, len(l), len(addrs), derr)
			if il, err := r.c.ListInstances(ctx, client.InstanceFilter{Service: r.service}); err == nil {
				for _, in := range il.Items {
					why += fmt.Sprintf("; instance %s: %s/%s %s %q restarts %d", in.ID, in.DesiredState, in.Status.State, in.Status.Health, in.Status.Message, in.Status.Restarts)
				}
			}
			return nil, fmt.Errorf("not %d healthy after %v: %s", r.n, timeout, why)
		}
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// list is GET /v1/discovery/{service}?healthy=1, sorted by id.
func (r *failoverRig) list(ctx context.Context) ([]api.Endpoint, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, r.url, nil)
	if err != nil {
		return nil, err
	}
	resp, err := r.hc.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
		return nil, fmt.Errorf("GET %s: %s %s", r.url, resp.Status, b)
	}
	var l api.List[api.Endpoint]
	if err := json.NewDecoder(resp.Body).Decode(&l); err != nil {
		return nil, fmt.Errorf("GET %s: %w", r.url, err)
	}
	slices.SortFunc(l.Items, func(a, b api.Endpoint) int {
		if a.ID < b.ID {
			return -1
		}
		if a.ID > b.ID {
			return 1
		}
		return 0
	})
	return l.Items, nil
}

// pid is the init process of the instance's container, from berth's
// containerd.
func (r *failoverRig) pid(ctx context.Context, id string) (int, error) {
	c, err := r.cc.LoadContainer(ctx, id)
	if err != nil {
		return 0, fmt.Errorf("container %s: %w", id, err)
	}
	t, err := c.Task(ctx, nil)
	if err != nil {
		return 0, fmt.Errorf("task of %s: %w", id, err)
	}
	return int(t.Pid()), nil
}

// sample is how long after the kill the victim's process was dead and the
// victim had left the watch stream, GET ?healthy=1 and DNS; -1 for what did
// not happen within failWait.
type sample struct{ dead, watch, get, dns time.Duration }

// killAndTime sends SIGKILL to pid and times the victim's way out.
func (r *failoverRig) killAndTime(ctx context.Context, pid int, victim api.Endpoint) (s sample, err error) {
	key := victim.ID + "@" + victim.Network
	// A pidfd: the signal goes to that very process, and it becomes
	// readable the moment the process has exited.
	pfd, err := unix.PidfdOpen(pid, 0)
	if err != nil {
		return s, fmt.Errorf("pidfd of %d (instance %s): %w", pid, victim.ID, err)
	}
	defer unix.Close(pfd)
	pctx, cancel := context.WithTimeout(ctx, failWait)
	defer cancel()
	var wg sync.WaitGroup
	defer wg.Wait()
	s = sample{watch: -1, get: -1, dns: -1, dead: -1}

	t0 := time.Now()
	if err := unix.PidfdSendSignal(pfd, unix.SIGKILL, nil, 0); err != nil {
		return s, fmt.Errorf("kill %d (instance %s): %w", pid, victim.ID, err)
	}
	wg.Go(func() {
		fds := []unix.PollFd{{Fd: int32(pfd), Events: unix.POLLIN}}
		for pctx.Err() == nil {
			n, err := unix.Poll(fds, 100)
			if errors.Is(err, unix.EINTR) {
				continue
			}
			if err != nil {
				return
			}
			if n > 0 {
				s.dead = time.Since(t0)
				return
			}
		}
	})
	// Both pollers ask again 1ms after each answer (busy polling would take
	// a core from what is being timed), one request in flight each.
	wg.Go(func() {
		for ; pctx.Err() == nil; time.Sleep(pollGap) {
			l, err := r.list(pctx)
			if err != nil {
				continue
			}
			if !slices.ContainsFunc(l, func(ep api.Endpoint) bool { return ep.ID == victim.ID }) {
				s.get = time.Since(t0)
				return
			}
		}
	})
	wg.Go(func() {
		cl := &dns.Client{Net: "udp", Timeout: time.Second}
		co, err := cl.Dial(dnsAddr)
		if err != nil {
			return
		}
		defer co.Close()
		for ; pctx.Err() == nil; time.Sleep(pollGap) {
			addrs, err := dnsAddresses(cl, co, r.name)
			if err != nil {
				continue
			}
			if !addrs[victim.Address] {
				s.dns = time.Since(t0)
				return
			}
		}
	})
	for s.watch < 0 && pctx.Err() == nil {
		_, gone, changed, err := r.tracker.state(key)
		if err != nil {
			return s, fmt.Errorf("discovery watch: %w", err)
		}
		if gone.After(t0) {
			s.watch = gone.Sub(t0)
			break
		}
		select {
		case <-changed:
		case <-pctx.Done():
		}
	}
	wg.Wait()
	return s, ctx.Err()
}
