package e2e

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/berth-dev/berth/api"
	"github.com/berth-dev/berth/e2e/testhost"
)

// TestTTLCheck: an instance whose service has a TTL check is critical (out
// of the healthy discovery view) until `berth check pass` feeds the check,
// healthy right after it returns, and critical again once the TTL runs out
// with no further update. Probed checks, stopped and unknown instances are
// refused with a clear message.
func TestTTLCheck(t *testing.T) {
	testhost.SkipIfUnsupported(t)
	h := testhost.New(t)
	b := startDevRuntime(t, h, t.TempDir())
	importTestImage(t, b)
	const ttl = 2 * time.Second
	dir := t.TempDir()
	for name, check := range map[string]string{
		"web":    fmt.Sprintf(`{"ttl":%q}`, ttl),
		"probed": `{"tcp":{"port":8080},"interval":"500ms"}`,
	} {
		spec := filepath.Join(dir, name+".json")
		os.WriteFile(spec, []byte(fmt.Sprintf(`{"name":%q,"image":%q,"replicas":2,"command":["httpd","-f","-p","8080","-h","/www"],
			"ports":[{"name":"http","port":8080}],"restart":{"policy":"never"},"check":%s}`, name, testImage, check)), 0o644)
		b.mustCLI("apply", "-f", spec)
	}
	ins := b.waitInstances("web", 2, 30*time.Second, "2 running", running)
	healthy := func() map[string]string {
		t.Helper()
		var eps []api.Endpoint
		if err := json.Unmarshal([]byte(b.mustCLI("discover", "web", "--healthy", "-o", "json")), &eps); err != nil {
			t.Fatal(err)
		}
		out := map[string]string{}
		for _, ep := range eps {
			out[ep.ID] = ep.Health
		}
		return out
	}
	// Nothing fed the checks yet: critical, and stays so.
	time.Sleep(500 * time.Millisecond)
	if got := healthy(); len(got) != 0 {
		t.Fatalf("instances healthy before any update: %v", got)
	}
	for _, in := range ins {
		if in.Status.Health != api.HealthCritical {
			t.Fatalf("instance %s starts %q, want critical", in.ID, in.Status.Health)
		}
	}

	// pass: healthy as soon as the command returns.
	id := ins[0].ID
	out := b.mustCLI("check", "pass", id, "--output", "ready to serve")
	if !strings.Contains(out, "passing") {
		t.Fatalf("berth check pass: %q", out)
	}
	if got := healthy(); got[id] != api.HealthPassing || len(got) != 1 {
		t.Fatalf("right after berth check pass: healthy view %v, want %s passing", got, id)
	}
	// warn: still healthy (discovery keeps warning endpoints), then the TTL
	// runs out with no further update: critical, out of the view.
	fed := time.Now() // the TTL runs from the update, which is in the call below
	b.mustCLI("check", "warn", id)
	if got := healthy(); got[id] != api.HealthWarning {
		t.Fatalf("after berth check warn: %v", got)
	}
	for time.Since(fed) < ttl/2 {
		if got := healthy(); got[id] != api.HealthWarning {
			t.Fatalf("%v after the last update, within the TTL: %v", time.Since(fed).Round(time.Millisecond), got)
		}
		time.Sleep(100 * time.Millisecond)
	}
	eventually(t, ttl+5*time.Second, "the check critical once its TTL ran out", func() (bool, string) {
		got := healthy()
		return len(got) == 0, fmt.Sprint(got)
	})
	expired := time.Since(fed)
	if expired < ttl {
		t.Fatalf("critical %v after the last update, before the TTL of %v", expired, ttl)
	}
	t.Logf("critical %v after the last update (TTL %v)", expired.Round(10*time.Millisecond), ttl)
	in, err := b.client().GetInstance(ctxT(t), id)
	if err != nil || in.Status.Health != api.HealthCritical {
		t.Fatalf("instance after the TTL: %+v %v", in.Status, err)
	}
	// fail, then pass again.
	b.mustCLI("check", "fail", id, "--output", "draining")
	b.mustCLI("check", "pass", id)
	if got := healthy(); got[id] != api.HealthPassing {
		t.Fatalf("passing again: %v", got)
	}

	// Refusals.
	probed := b.waitInstances("probed", 2, 30*time.Second, "2 running", running)
	b.mustCLI("stop", "--grace", "1s", ins[1].ID)
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"check", "pass", probed[0].ID}, "not a TTL check"},
		{[]string{"check", "pass", ins[1].ID}, "is not running"},
		{[]string{"check", "pass", "web-nosuch"}, "not found"},
	} {
		_, errOut, err := b.cli(tc.args...)
		if err == nil || !strings.Contains(errOut, tc.want) {
			t.Fatalf("berth %s: %v %q, want an error saying %q", strings.Join(tc.args, " "), err, errOut, tc.want)
		}
	}
	status, body := rawPut(t, b, "/v1/instances/"+id+"/check", `{"state":"great"}`)
	if status != 400 || !strings.Contains(body, `"field":"state"`) {
		t.Fatalf("an unknown state: %d %s", status, body)
	}
}

// rawPut sends a JSON body to the API from inside the host.
func rawPut(t *testing.T, b *berth, path, body string) (int, string) {
	t.Helper()
	req, err := http.NewRequestWithContext(ctxT(t), http.MethodPut, "http://"+b.addr+path, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := b.h.HTTPClient().Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	out, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(out)
}
