package e2e

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/berth-dev/berth/api"
	"github.com/berth-dev/berth/client"
	"github.com/berth-dev/berth/e2e/testhost"
)

const syscallTERM = syscall.SIGTERM

// TestDevNodeReady: `berth dev` starts fast in an isolated host and lists its
// own node as ready, in every output format.
func TestDevNodeReady(t *testing.T) {
	testhost.SkipIfUnsupported(t)
	h := testhost.New(t)
	b := startDev(t, h, t.TempDir())
	if m := regexp.MustCompile(`ready in (\S+)`).FindStringSubmatch(b.proc.Stdout()); m != nil {
		t.Logf("berth dev start-up to ready: %s", m[1])
	}
	if !strings.Contains(b.proc.Stdout(), "API listening on http://"+apiAddr) {
		t.Fatalf("dev does not say where its API listens: %q", b.proc.Stdout())
	}

	var nodes []api.Node
	if err := json.Unmarshal([]byte(b.mustCLI("node", "ls", "-o", "json")), &nodes); err != nil {
		t.Fatal(err)
	}
	if len(nodes) != 1 || nodes[0].Name != "node1" || nodes[0].Status.State != api.NodeReady {
		t.Fatalf("node ls: want node1 ready, got %+v", nodes)
	}
	n := nodes[0]
	if n.Capacity.CPU <= 0 || n.Capacity.Memory <= 0 || n.Allocatable.CPU > n.Capacity.CPU || n.Allocatable.Memory > n.Capacity.Memory {
		t.Fatalf("node resources look wrong: %+v", n)
	}
	table := b.mustCLI("node", "ls")
	if !regexp.MustCompile(`(?m)^node1\s+ready\s+`).MatchString(table) {
		t.Fatalf("node ls table:\n%s", table)
	}
	if y := b.mustCLI("node", "inspect", "node1", "-o", "yaml"); !strings.Contains(y, "state: ready") {
		t.Fatalf("node inspect -o yaml:\n%s", y)
	}
	if out := b.mustCLI("node", "inspect", "node1"); !strings.Contains(out, "Status:") {
		t.Fatalf("node inspect:\n%s", out)
	}
	if _, errOut, err := b.cli("node", "inspect", "nope"); err == nil || !strings.Contains(errOut, `node "nope" not found`) {
		t.Fatalf("inspect of a missing node: err=%v stderr=%q", err, errOut)
	}
	if _, errOut, err := b.cli("node", "ls", "-o", "xml"); err == nil || !strings.Contains(errOut, "table, json or yaml") {
		t.Fatalf("-o xml: err=%v stderr=%q", err, errOut)
	}
	if code := b.stop(); code != 0 {
		t.Fatalf("berth dev exit code after SIGTERM: %d\n%s", code, b.proc.Stderr())
	}
}

// TestBadInputRefused: every kind of bad input gets a 400 naming the field,
// the CLI prints it and exits non-zero, and nothing stored changes.
func TestBadInputRefused(t *testing.T) {
	testhost.SkipIfUnsupported(t)
	h := testhost.New(t)
	b := startDev(t, h, t.TempDir())
	c := b.client()
	ctx := ctxT(t)
	if _, err := c.CreateNetwork(ctx, api.NetworkSpec{Name: "front", Subnet: "10.90.0.0/24"}); err != nil {
		t.Fatal(err)
	}
	good := []byte(`{"name":"web","image":"busybox:1","replicas":2}`)
	if _, err := c.ApplyServiceJSON(ctx, good); err != nil {
		t.Fatal(err)
	}
	snapshot := func() string {
		var parts []string
		for _, p := range []string{"/v1/services", "/v1/networks", "/v1/nodes", "/v1/registry/services"} {
			resp, err := b.h.HTTPClient().Get("http://" + b.addr + p)
			if err != nil {
				t.Fatal(err)
			}
			var l struct{ Items []json.RawMessage }
			_ = json.NewDecoder(resp.Body).Decode(&l)
			resp.Body.Close()
			for _, it := range l.Items {
				// lastHeartbeat moves by itself; everything else must not.
				parts = append(parts, regexp.MustCompile(`"lastHeartbeat":"[^"]*"`).ReplaceAllString(string(it), ""))
			}
		}
		return strings.Join(parts, "\n")
	}
	before := snapshot()

	cases := []struct {
		name, method, path, body, field, reason string
	}{
		{"malformed json", "POST", "/v1/services", `{"name":"web",`, "spec", "malformed JSON"},
		{"not json", "POST", "/v1/services", `replicas: 3`, "spec", "malformed JSON"},
		{"empty body", "POST", "/v1/services", ``, "spec", "empty body"},
		{"unknown field", "POST", "/v1/services", `{"name":"web","image":"busybox:1","replica":3}`, "spec.replica", "unknown field"},
		{"unknown nested field", "POST", "/v1/services", `{"name":"web","image":"busybox:1","check":{"http":{"port":80,"pth":"/"}}}`, "spec.check.http.pth", "unknown field"},
		{"wrong type", "POST", "/v1/services", `{"name":"web","image":"busybox:1","replicas":"3"}`, "spec.replicas", "must be an integer"},
		{"negative replicas", "POST", "/v1/services", `{"name":"web","image":"busybox:1","replicas":-1}`, "spec.replicas", "must be >= 0"},
		{"bad quantity", "POST", "/v1/services", `{"name":"web","image":"busybox:1","resources":{"memory":"lots"}}`, "spec.resources.memory", "not a memory quantity"},
		{"bad name", "POST", "/v1/services", `{"name":"Web_1","image":"busybox:1"}`, "spec.name", "not a DNS label"},
		{"port out of range", "POST", "/v1/services", `{"name":"web","image":"busybox:1","ports":[{"name":"http","port":70000}]}`, "spec.ports[0].port", "from 1 to 65535"},
		{"missing network", "POST", "/v1/services", `{"name":"web","image":"busybox:1","networks":["nope"]}`, "spec.networks[0]", `network "nope" does not exist`},
		{"trailing data", "POST", "/v1/services", `{"name":"web","image":"busybox:1"} {}`, "spec", "unexpected data"},
		{"bad subnet", "POST", "/v1/networks", `{"name":"back","subnet":"10.1.2.3/33"}`, "subnet", "not a CIDR"},
		{"overlapping subnet", "POST", "/v1/networks", `{"name":"back","subnet":"10.90.0.128/25"}`, "subnet", `overlaps network "front"`},
		{"subnet too small", "POST", "/v1/networks", `{"name":"back","subnet":"10.91.0.0/30"}`, "subnet", "too small"},
		{"bad driver", "POST", "/v1/networks", `{"name":"back","subnet":"10.91.0.0/24","driver":"wifi"}`, "driver", "must be"},
		{"node bad address", "PUT", "/v1/nodes/n2", `{"address":"not-an-ip","capacity":{"cpu":"1","memory":"1Gi"},"allocatable":{"cpu":"1","memory":"1Gi"}}`, "address", "not an IP address"},
		{"node bad ttl", "PUT", "/v1/nodes/n2", `{"address":"127.0.0.1","capacity":{"cpu":"1","memory":"1Gi"},"allocatable":{"cpu":"1","memory":"1Gi"},"ttl":"1s"}`, "ttl", "between 2s and 10m"},
		{"registration bad port", "PUT", "/v1/registry/services/db/instances/db-1", `{"address":"127.0.0.1","port":0}`, "port", "from 1 to 65535"},
		{"registration bad address", "PUT", "/v1/registry/services/db/instances/db-1", `{"address":"300.1.1.1","port":5432}`, "address", "not an IP address"},
		{"registration bad ttl", "PUT", "/v1/registry/services/db/instances/db-1", `{"address":"127.0.0.1","port":5432,"ttl":"1ms"}`, "ttl", "between"},
		{"registration bad health", "PUT", "/v1/registry/services/db/instances/db-1", `{"address":"127.0.0.1","port":5432,"health":"fine"}`, "health", "passing, warning or critical"},
		{"registration bad service name", "PUT", "/v1/registry/services/DB_x/instances/db-1", `{"address":"127.0.0.1","port":5432}`, "service", "not a DNS label"},
	}
	hc := b.h.HTTPClient()
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			req, _ := http.NewRequest(tc.method, "http://"+b.addr+tc.path, strings.NewReader(tc.body))
			resp, err := hc.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode != http.StatusBadRequest {
				t.Fatalf("status %d, want 400: %s", resp.StatusCode, body)
			}
			var ae api.Error
			if err := json.Unmarshal(body, &ae); err != nil {
				t.Fatalf("error body is not JSON: %s", body)
			}
			if ae.Code != api.CodeInvalid || len(ae.Fields) == 0 {
				t.Fatalf("error body: %s", body)
			}
			found := false
			for _, f := range ae.Fields {
				if f.Field == tc.field && strings.Contains(f.Reason, tc.reason) {
					found = true
				}
			}
			if !found || !strings.Contains(ae.Message, tc.field+": ") {
				t.Fatalf("want field %q with reason containing %q; got %s", tc.field, tc.reason, body)
			}
		})
	}

	// The CLI prints the same error plainly and exits non-zero.
	dir := t.TempDir()
	bad := filepath.Join(dir, "bad.yaml")
	if err := os.WriteFile(bad, []byte("name: web\nimage: busybox:1\nreplicas: -1\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	_, errOut, err := b.cli("apply", "-f", bad)
	if err == nil || !strings.Contains(errOut, "spec.replicas: must be >= 0") {
		t.Fatalf("apply of a bad spec: err=%v stderr=%q", err, errOut)
	}
	if strings.Contains(errOut, "Usage:") {
		t.Fatalf("a refused write should not print usage: %q", errOut)
	}
	_, errOut, err = b.cli("network", "create", "x", "--subnet", "banana")
	if err == nil || !strings.Contains(errOut, `subnet: "banana" is not a CIDR`) {
		t.Fatalf("network create with a bad subnet: err=%v stderr=%q", err, errOut)
	}
	if after := snapshot(); after != before {
		t.Fatalf("a refused write changed the store:\nbefore:\n%s\nafter:\n%s", before, after)
	}
}

// TestAcknowledgedWritesSurviveKill9: every write acknowledged before a
// kill -9 of `berth dev` is there after the restart.
func TestAcknowledgedWritesSurviveKill9(t *testing.T) {
	testhost.SkipIfUnsupported(t)
	h := testhost.New(t)
	dir := t.TempDir()
	b := startDev(t, h, dir)
	c := b.client()
	ctx := ctxT(t)

	// Writers keep applying until the kill; only acknowledged writes count.
	var mu sync.Mutex
	acked := map[string]int{} // service → replicas acknowledged last
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for w := range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				name := fmt.Sprintf("svc-%d-%d", w, i%25)
				spec := []byte(fmt.Sprintf(`{"name":%q,"image":"busybox:1","replicas":%d}`, name, i))
				if _, err := c.ApplyServiceJSON(ctx, spec); err != nil {
					return // the server died under us: this write was never acknowledged
				}
				mu.Lock()
				acked[name] = i
				mu.Unlock()
			}
		}()
	}
	time.Sleep(700 * time.Millisecond)
	b.proc.Kill()
	close(stop)
	wg.Wait()
	mu.Lock()
	defer mu.Unlock()
	if len(acked) == 0 {
		t.Fatal("no write was acknowledged before the kill")
	}
	t.Logf("%d services acknowledged before kill -9", len(acked))

	b2 := startDev(t, h, dir)
	l, err := b2.client().ListServices(ctx)
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]int{}
	for _, s := range l.Items {
		got[s.Name] = *s.Spec.Replicas
	}
	for name, r := range acked {
		// A write in flight at the kill may have landed without its answer:
		// the stored value is the acknowledged one or the one after it.
		if g, ok := got[name]; !ok || (g != r && g != r+25) {
			t.Errorf("service %s: acknowledged replicas %d, stored %d (present %v)", name, r, g, ok)
		}
	}
	var nodes []api.Node
	if err := json.Unmarshal([]byte(b2.mustCLI("node", "ls", "-o", "json")), &nodes); err != nil || len(nodes) != 1 || nodes[0].Status.State != api.NodeReady {
		t.Fatalf("after restart the node is not ready: %v %+v", err, nodes)
	}
}

// TestGracefulStopReleasesLease: SIGTERM stops berth dev with exit 0 and
// releases the node's lease, so the node reads down at once.
func TestGracefulStopReleasesLease(t *testing.T) {
	testhost.SkipIfUnsupported(t)
	h := testhost.New(t)
	dir := t.TempDir()
	b := startDev(t, h, dir)
	if code := b.stop(); code != 0 {
		t.Fatalf("exit code %d after SIGTERM\n%s", code, b.proc.Stderr())
	}
	// A server alone on the same data (no agent) shows what was left.
	s := startBerth(t, h, "server", "--data-dir", dir, "--api-addr", apiAddr)
	n, err := s.client().GetNode(ctxT(t), "node1")
	if err != nil {
		t.Fatal(err)
	}
	if n.Status.State != api.NodeDown || n.Status.Message != "agent stopped" {
		t.Fatalf("after a graceful stop the node should be down (agent stopped): %+v", n.Status)
	}
	if code := s.stop(); code != 0 {
		t.Fatalf("server exit code %d after SIGTERM", code)
	}
}

// TestServerAndAgentsWithExternalEtcd: `berth server --etcd-endpoints` on one
// isolated host uses a real etcd member started by the test, agents on two
// other hosts join it over the test underlay, and a killed agent's node goes
// down when its lease lapses.
func TestServerAndAgentsWithExternalEtcd(t *testing.T) {
	testhost.SkipIfUnsupported(t)
	hosts := testhost.NewCluster(t, 3)
	srvHost := hosts[0]
	etcdDir := t.TempDir()
	etcd := srvHost.Start(t, etcdBin, "--data-dir", etcdDir,
		"--listen-client", "http://127.0.0.1:23790", "--listen-peer", "http://127.0.0.1:23800")
	if _, ok := etcd.WaitOutput("etcd member ready", 30*time.Second); !ok {
		t.Fatalf("etcd member did not start: %s", etcd.Stderr())
	}
	srvAddr := srvHost.Addr + ":7480"
	srvDir := t.TempDir()
	s := startBerth(t, srvHost, "server", "--data-dir", srvDir, "--api-addr", srvAddr,
		"--etcd-endpoints", "http://127.0.0.1:23790")
	if _, err := os.Stat(filepath.Join(srvDir, "etcd")); err == nil {
		t.Fatal("the server started an embedded etcd despite --etcd-endpoints")
	}
	var agents []*berth
	for i, h := range hosts[1:] {
		agents = append(agents, startBerth(t, h, "agent", "--server", "http://"+srvAddr,
			"--node-name", fmt.Sprintf("node%d", i+1), "--node-address", h.Addr, "--node-ttl", "2s",
			"--label", fmt.Sprintf("rack=r%d", i+1)))
	}
	c := s.client()
	ctx := ctxT(t)
	l, err := c.ListNodes(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(l.Items) != 2 {
		t.Fatalf("want 2 nodes, got %+v", l.Items)
	}
	for i, n := range l.Items {
		if n.Status.State != api.NodeReady || n.Address != hosts[i+1].Addr || n.Labels["rack"] != fmt.Sprintf("r%d", i+1) {
			t.Fatalf("node %d: %+v", i, n)
		}
	}
	// The CLI on an agent's host reaches the server over the underlay.
	out, _, err := runCLI(hosts[1], srvAddr, "node", "ls")
	if err != nil || !strings.Contains(out, "node2") {
		t.Fatalf("node ls from an agent host: %v\n%s", err, out)
	}

	// kill -9 of an agent: no release, the lease lapses, the node goes down.
	killed := time.Now()
	agents[0].proc.Kill()
	eventually(t, 10*time.Second, "node1 down after its agent was killed", func() (bool, string) {
		n, err := c.GetNode(ctx, "node1")
		return err == nil && n.Status.State == api.NodeDown, fmt.Sprintf("%+v %v", n.Status, err)
	})
	t.Logf("node down %v after kill -9 of its agent (ttl 2s)", time.Since(killed).Round(10*time.Millisecond))
	if n, _ := c.GetNode(ctx, "node2"); n.Status.State != api.NodeReady {
		t.Fatalf("node2 should stay ready: %+v", n.Status)
	}
	// A restarted agent brings its node back.
	startBerth(t, hosts[1], "agent", "--server", "http://"+srvAddr, "--node-name", "node1",
		"--node-address", hosts[1].Addr, "--node-ttl", "2s")
	if n, _ := c.GetNode(ctx, "node1"); n.Status.State != api.NodeReady {
		t.Fatalf("node1 should be ready again: %+v", n.Status)
	}

	// State lives in the external etcd: a new server process finds it.
	if _, err := c.ApplyServiceJSON(ctx, []byte(`{"name":"kept","image":"busybox:1"}`)); err != nil {
		t.Fatal(err)
	}
	if code := s.stop(); code != 0 {
		t.Fatalf("server exit code %d", code)
	}
	s2 := startBerth(t, srvHost, "server", "--data-dir", t.TempDir(), "--api-addr", srvAddr,
		"--etcd-endpoints", "http://127.0.0.1:23790")
	if _, err := s2.client().GetService(ctx, "kept"); err != nil {
		t.Fatalf("service stored through the first server: %v", err)
	}
}

// TestWatchResumes: a watch streams changes in revision order, and a client
// that reconnects from the last revision it saw misses nothing.
func TestWatchResumes(t *testing.T) {
	testhost.SkipIfUnsupported(t)
	h := testhost.New(t)
	b := startDev(t, h, t.TempDir())
	c := b.client()
	ctx := ctxT(t)
	apply := func(name string, r int) {
		t.Helper()
		if _, err := c.ApplyServiceJSON(ctx, []byte(fmt.Sprintf(`{"name":%q,"image":"busybox:1","replicas":%d}`, name, r))); err != nil {
			t.Fatal(err)
		}
	}
	apply("a", 1)
	s, err := c.Watch(ctx, client.WatchServices, 0)
	if err != nil {
		t.Fatal(err)
	}
	next := func(s *client.Stream) api.Event {
		t.Helper()
		for {
			ev, err := s.Next()
			if err != nil {
				t.Fatal(err)
			}
			if ev.Type != api.EventBookmark {
				return ev
			}
		}
	}
	if ev := next(s); ev.Type != api.EventPut || ev.Name != "a" {
		t.Fatalf("first event should be the snapshot of a: %+v", ev)
	}
	apply("b", 1)
	ev := next(s)
	for ev.Name == "a" { // the controller's status writes of a
		ev = next(s)
	}
	if ev.Type != api.EventPut || ev.Name != "b" {
		t.Fatalf("want put b, got %+v", ev)
	}
	resumeFrom := ev.Revision
	s.Close()

	// Changes while no one watches.
	apply("c", 1)
	apply("b", 2)
	if err := c.DeleteService(ctx, "a"); err != nil {
		t.Fatal(err)
	}
	s2, err := c.Watch(ctx, client.WatchServices, resumeFrom)
	if err != nil {
		t.Fatal(err)
	}
	defer s2.Close()
	// The controller also writes services' status; only spec changes (a
	// new generation) and deletes are this test's own writes.
	gens := map[string]int64{"a": 1, "b": 1} // as at the resume point
	nextChange := func() api.Event {
		t.Helper()
		for {
			ev := next(s2)
			var svc api.Service
			_ = json.Unmarshal(ev.Object, &svc)
			if ev.Type == api.EventPut && gens[ev.Name] == svc.Generation {
				continue
			}
			gens[ev.Name] = svc.Generation
			return ev
		}
	}
	var got []string
	last := resumeFrom
	for len(got) < 3 {
		ev := nextChange()
		if ev.Revision <= last {
			t.Fatalf("revisions must increase: %d after %d", ev.Revision, last)
		}
		last = ev.Revision
		got = append(got, ev.Type+" "+ev.Name)
	}
	if want := []string{"put c", "put b", "delete a"}; fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("resumed watch: got %v, want %v", got, want)
	}
	// The object in an event carries its revision.
	var svc api.Service
	apply("d", 1)
	ev = nextChange()
	if err := json.NewDecoder(bytes.NewReader(ev.Object)).Decode(&svc); err != nil || svc.Revision != ev.Revision || svc.Name != "d" {
		t.Fatalf("event object: %v %+v", err, svc)
	}
}
