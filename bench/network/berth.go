package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/berth-dev/berth/api"
	"github.com/berth-dev/berth/bench/internal/benchhost"
	"github.com/berth-dev/berth/bench/internal/hostclean"
	"github.com/berth-dev/berth/client"
	"github.com/berth-dev/berth/internal/runtime"
	"github.com/berth-dev/berth/internal/testimage"
)

// apiAddr is berth dev's API on node a's underlay address, where node b's
// agent reaches it.
const apiAddr = nodeA + ":7480"

// command is what every instance runs: `sleep 1000` under a shell that
// exits at once on SIGTERM, so that removing an instance is quick.
var command = []string{"sh", "-c", `trap "exit 0" TERM; sleep 1000 & wait`}

// daemon is a berth process: `berth dev` on node a or `berth agent` on b.
type daemon struct {
	name   string
	cmd    *exec.Cmd
	out    string
	exited chan struct{}
}

func (e *env) startDaemon(name string, cmd *exec.Cmd, ready string) (*daemon, error) {
	d := &daemon{name: name, cmd: cmd, out: filepath.Join(e.l.logs, name+".log"), exited: make(chan struct{})}
	f, err := os.Create(d.out)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	cmd.Stdout, cmd.Stderr = f, f
	// Its own process group: a terminal's Ctrl-C is for the benchmark,
	// which stops berth itself.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	go func() {
		_ = cmd.Wait()
		close(d.exited)
	}()
	e.daemons = append(e.daemons, d)
	deadline := time.Now().Add(e.o.timeout)
	for {
		b, _ := os.ReadFile(d.out)
		if strings.Contains(string(b), ready) {
			return d, nil
		}
		select {
		case <-d.exited:
			return d, fmt.Errorf("%s exited before it was ready:\n%s", name, tail(string(b)))
		default:
		}
		if time.Now().After(deadline) {
			return d, fmt.Errorf("%s not ready after %v:\n%s", name, e.o.timeout, tail(string(b)))
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// stop sends SIGTERM and waits; SIGKILL after 20s.
func (d *daemon) stop() error { return benchhost.Stop(d.cmd.Process, d.exited, d.name) }

func tail(s string) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	return strings.Join(lines[max(0, len(lines)-15):], "\n")
}

// startBerth starts node a (`berth dev`, serving the API on the underlay)
// and builds the test image. Node b is started by startNodeB.
func (e *env) startBerth(ctx context.Context) error {
	img, err := testimage.Build(testimage.Options{})
	if err != nil {
		return fmt.Errorf("build the test image: %w", err)
	}
	if err := testimage.WriteOCIArchive(img, testimage.DefaultRef, e.l.archive); err != nil {
		return err
	}
	dev := exec.Command(e.o.berth, "dev", "--data-dir", e.l.dataA, "--api-addr", apiAddr,
		"--node-name", "a", "--node-address", nodeA, "--label", "bench=a")
	if _, err := e.startDaemon("berth-dev-a", dev, "ready in"); err != nil {
		return err
	}
	hc := &http.Client{Timeout: e.o.timeout, Transport: &http.Transport{
		Proxy:       nil,
		DialContext: (&net.Dialer{Timeout: 5 * time.Second}).DialContext,
	}}
	if e.c, err = client.New(apiAddr, client.WithHTTPClient(hc)); err != nil {
		return err
	}
	return e.importImage(ctx, "a")
}

// startNodeB starts `berth agent` in node b's namespace, joined to node a.
func (e *env) startNodeB(ctx context.Context) error {
	agent := exec.Command("nsenter", "--net="+e.l.nsPath("b"), "--", e.o.berth, "agent",
		"--server", "http://"+apiAddr, "--node-name", "b", "--node-address", nodeB,
		"--data-dir", e.l.dataB, "--label", "bench=b")
	if _, err := e.startDaemon("berth-agent-b", agent, "registered with"); err != nil {
		return err
	}
	return e.importImage(ctx, "b")
}

// importImage imports the test image on one node; a node is ready before
// its runtime may be, so it tries until the runtime takes it.
func (e *env) importImage(ctx context.Context, node string) error {
	ictx, cancel := context.WithTimeout(ctx, e.o.timeout)
	defer cancel()
	for {
		_, err := e.c.ImportImage(ictx, e.l.archive, node)
		if err == nil {
			return nil
		}
		if ictx.Err() != nil {
			return fmt.Errorf("import the image on node %s: %w", node, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// service applies a service of the run on network net, placed by the node
// label bench=node.
func (e *env) service(ctx context.Context, key, netName, node string, replicas int) (string, error) {
	name := e.l.svcPrefix + "-" + key
	e.services = append(e.services, name)
	_, err := e.c.ApplyService(ctx, api.ServiceSpec{
		Name: name, Image: testimage.DefaultRef, Command: command, Replicas: &replicas,
		Networks:  []string{netName},
		Placement: api.Placement{Constraints: []string{"bench==" + node}},
	})
	if err != nil {
		return "", fmt.Errorf("apply %s: %w", name, err)
	}
	return name, nil
}

// endpoint is a running berth instance as the benchmark uses it: its
// namespace on its node and its address on one network.
type endpoint struct {
	id, node, netns, ip string
}

// running waits until the service has n running instances and returns
// them.
func (e *env) running(ctx context.Context, svc, netName string, n int, timeout time.Duration) ([]endpoint, error) {
	deadline := time.Now().Add(timeout)
	last := ""
	for {
		l, err := e.c.ListInstances(ctx, client.InstanceFilter{Service: svc})
		if err == nil {
			var eps []endpoint
			var states []string
			for _, in := range l.Items {
				states = append(states, fmt.Sprintf("%s on %q: %s %s %s", in.ID, in.Node, in.Status.State, in.Status.Reason, in.Status.Message))
				if in.DesiredState != api.DesiredRunning || in.Status.State != api.InstanceRunning {
					continue
				}
				ep := endpoint{id: in.ID, node: in.Node}
				for _, v := range in.Status.VNICs {
					if v.Network == netName {
						ep.ip = v.IP
					}
				}
				data := e.l.dataA
				if in.Node == "b" {
					data = e.l.dataB
				}
				p, perr := runtime.PathsFor(data)
				if perr != nil {
					return nil, perr
				}
				ep.netns = filepath.Join(filepath.Dir(p.Socket), "netns", in.ID)
				if ep.ip != "" && hostclean.Exists(ep.netns) {
					eps = append(eps, ep)
				}
			}
			if len(eps) >= n {
				return eps[:n], nil
			}
			last = strings.Join(states, "; ")
		} else {
			last = err.Error()
		}
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("%s: not %d instances running after %v: %s", svc, n, timeout, last)
		}
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// berthBridge makes row 3: two instances on a berth bridge network on node a.
func (e *env) berthBridge(ctx context.Context) (pair, error) {
	if _, err := e.c.CreateNetwork(ctx, api.NetworkSpec{Name: berthBridgeNet, Subnet: berthBridgeSubnet, Driver: api.DriverBridge}); err != nil {
		return pair{}, fmt.Errorf("network create %s: %w", berthBridgeNet, err)
	}
	svc, err := e.service(ctx, "br", berthBridgeNet, "a", 2)
	if err != nil {
		return pair{}, err
	}
	eps, err := e.running(ctx, svc, berthBridgeNet, 2, e.o.timeout)
	if err != nil {
		return pair{}, err
	}
	return pair{server: eps[0].netns, client: eps[1].netns, serverIP: eps[0].ip}, nil
}

// berthOverlay makes row 5: one instance on node a and one on node b, both
// on a berth overlay network. The overlay driver may not work yet: every
// step that fails says why.
//
// The instance on a is placed before node b joins, and the one on b after,
// when b is the node with the fewest instances: that puts them on the
// right nodes whether or not the placement honours the constraints
// bench==a and bench==b the services also carry.
func (e *env) berthOverlay(ctx context.Context) (pair, error) {
	if _, err := e.c.CreateNetwork(ctx, api.NetworkSpec{Name: berthOverlayNet, Subnet: berthOverlaySubnet, Driver: api.DriverOverlay}); err != nil {
		return pair{}, fmt.Errorf("network create %s --driver overlay: %w", berthOverlayNet, err)
	}
	const wait = 30 * time.Second
	sa, err := e.service(ctx, "ova", berthOverlayNet, "a", 1)
	if err != nil {
		return pair{}, err
	}
	a, err := e.running(ctx, sa, berthOverlayNet, 1, wait)
	if err != nil {
		return pair{}, err
	}
	if err := e.startNodeB(ctx); err != nil {
		return pair{}, fmt.Errorf("node b: %w", err)
	}
	sb, err := e.service(ctx, "ovb", berthOverlayNet, "b", 1)
	if err != nil {
		return pair{}, err
	}
	b, err := e.running(ctx, sb, berthOverlayNet, 1, wait)
	if err != nil {
		return pair{}, err
	}
	if a[0].node != "a" || b[0].node != "b" {
		return pair{}, fmt.Errorf("instances placed on %q and %q, want a and b", a[0].node, b[0].node)
	}
	if a[0].ip == b[0].ip {
		return pair{}, fmt.Errorf("both instances got %s: the nodes do not share the overlay's address space", a[0].ip)
	}
	// The server on node b, the client on node a: across the underlay.
	p := pair{server: b[0].netns, client: a[0].netns, serverIP: b[0].ip}
	if _, err := e.rtt(ctx, p, "overlay-probe", 10, 10*time.Second); err != nil {
		return pair{}, fmt.Errorf("%s (node a) cannot reach %s (node b): %w", a[0].ip, b[0].ip, err)
	}
	return p, nil
}

// stopBerth removes the run's services (berth stops the containers and
// tears their networking down), stops both berth processes, then their
// containerds with whatever they still run, and unmounts what is left.
func (e *env) stopBerth() error {
	var errs []error
	if e.c != nil && len(e.services) > 0 {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		for _, s := range e.services {
			if err := e.c.DeleteService(ctx, s); err != nil && !client.IsNotFound(err) {
				errs = append(errs, fmt.Errorf("delete service %s: %w", s, err))
			}
		}
		// Until the instances are gone (their networking torn down by the
		// agents), or the time is up: the runtime shutdown below removes
		// what is left either way.
		for ctx.Err() == nil {
			left := 0
			for _, s := range e.services {
				l, err := e.c.ListInstances(ctx, client.InstanceFilter{Service: s})
				if err != nil {
					left++
					break
				}
				left += len(l.Items)
			}
			if left == 0 {
				break
			}
			time.Sleep(100 * time.Millisecond)
		}
		cancel()
	}
	for i := len(e.daemons) - 1; i >= 0; i-- {
		if err := e.daemons[i].stop(); err != nil {
			errs = append(errs, err)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	for _, d := range []string{e.l.dataA, e.l.dataB} {
		p, err := runtime.PathsFor(d)
		if err != nil || !hostclean.Exists(filepath.Dir(p.Socket)) {
			continue
		}
		// Namespaces of instances berth did not get to tear down.
		if err := hostclean.UnmountUnder(filepath.Join(filepath.Dir(p.Socket), "netns")); err != nil {
			errs = append(errs, err)
		}
		if err := runtime.Shutdown(ctx, p, log); err != nil {
			errs = append(errs, fmt.Errorf("runtime shutdown of %s: %w", d, err))
		}
	}
	return errors.Join(errs...)
}
