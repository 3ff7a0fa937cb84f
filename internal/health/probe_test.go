package health

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/berth-dev/berth/api"
)

// localDial dials only 127.0.0.1, so that no check can leave the machine
// whatever a server redirects it to; it counts the bytes the client reads.
func localDial(read *atomic.Int64) func(ctx context.Context, network, addr string) (net.Conn, error) {
	return func(ctx context.Context, network, addr string) (net.Conn, error) {
		host, _, err := net.SplitHostPort(addr)
		if err != nil || host != "127.0.0.1" {
			return nil, fmt.Errorf("test dialer refuses %s", addr)
		}
		var d net.Dialer
		c, err := d.DialContext(ctx, network, addr)
		if err != nil {
			return nil, err
		}
		return &countConn{Conn: c, read: read}, nil
	}
}

type countConn struct {
	net.Conn
	read *atomic.Int64
}

func (c *countConn) Read(b []byte) (int, error) {
	n, err := c.Conn.Read(b)
	if c.read != nil {
		c.read.Add(int64(n))
	}
	return n, err
}

// serverPort starts srv on 127.0.0.1 and returns its port.
func serverPort(t *testing.T, h http.Handler) int {
	t.Helper()
	srv := httptest.NewServer(h)
	t.Cleanup(srv.Close)
	_, port, err := net.SplitHostPort(srv.Listener.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	p, _ := strconv.Atoi(port)
	return p
}

// closedPort returns a port on 127.0.0.1 nothing listens on.
func closedPort(t *testing.T) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := l.Addr().(*net.TCPAddr).Port
	l.Close()
	return port
}

func TestProbeHTTP(t *testing.T) {
	mux := http.NewServeMux()
	status := func(code int, body string) http.HandlerFunc {
		return func(w http.ResponseWriter, r *http.Request) {
			w.WriteHeader(code)
			fmt.Fprint(w, body)
		}
	}
	mux.Handle("/ok", status(200, "all good\n"))
	mux.Handle("/nocontent", status(204, ""))
	mux.Handle("/busy", status(429, "slow down"))
	mux.Handle("/down", status(503, "database down"))
	mux.Handle("/missing", status(404, ""))
	mux.HandleFunc("/query", func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Query().Get("deep") != "1" || r.UserAgent() != userAgent {
			w.WriteHeader(400)
		}
	})
	mux.Handle("/redirect", http.RedirectHandler("/ok", http.StatusFound))
	mux.Handle("/loop", http.RedirectHandler("/loop", http.StatusFound))
	mux.HandleFunc("/hop/", func(w http.ResponseWriter, r *http.Request) {
		n, _ := strconv.Atoi(strings.TrimPrefix(r.URL.Path, "/hop/"))
		if n == 0 {
			return
		}
		http.Redirect(w, r, "/hop/"+strconv.Itoa(n-1), http.StatusFound)
	})
	mux.HandleFunc("/elsewhere", func(w http.ResponseWriter, r *http.Request) {
		_, port, _ := net.SplitHostPort(r.Host)
		http.Redirect(w, r, "http://localhost:"+port+"/ok", http.StatusFound)
	})
	mux.HandleFunc("/big", func(w http.ResponseWriter, r *http.Request) {
		chunk := []byte(strings.Repeat("x", 64<<10))
		for range 160 { // 10 MiB
			if _, err := w.Write(chunk); err != nil {
				return
			}
		}
	})
	mux.HandleFunc("/slow", func(w http.ResponseWriter, r *http.Request) {
		select {
		case <-time.After(2 * time.Second):
		case <-r.Context().Done():
		}
	})
	port := serverPort(t, mux)

	tests := []struct {
		name    string
		path    string
		port    int
		timeout time.Duration
		state   string
		output  []string
	}{
		{name: "200", path: "/ok", state: api.HealthPassing, output: []string{"HTTP GET http://127.0.0.1:", "/ok: 200 OK: all good"}},
		{name: "204", path: "/nocontent", state: api.HealthPassing, output: []string{"204 No Content"}},
		{name: "429 warns", path: "/busy", state: api.HealthWarning, output: []string{"429 Too Many Requests: slow down"}},
		{name: "503", path: "/down", state: api.HealthCritical, output: []string{"/down: 503 Service Unavailable: database down"}},
		{name: "404", path: "/missing", state: api.HealthCritical, output: []string{"404 Not Found"}},
		{name: "query and user agent", path: "/query?deep=1", state: api.HealthPassing},
		{name: "empty path is /", path: "", state: api.HealthCritical, output: []string{":" + strconv.Itoa(port) + "/: 404"}},
		{name: "redirect followed", path: "/redirect", state: api.HealthPassing, output: []string{"/redirect: 200 OK"}},
		{name: "three redirects followed", path: "/hop/3", state: api.HealthPassing},
		{name: "four redirects too many", path: "/hop/4", state: api.HealthCritical, output: []string{"302 Found"}},
		{name: "redirect loop", path: "/loop", state: api.HealthCritical, output: []string{"302 Found"}},
		{name: "redirect to another host", path: "/elsewhere", state: api.HealthCritical, output: []string{"302 Found"}},
		{name: "big body", path: "/big", state: api.HealthPassing},
		{name: "timeout", path: "/slow", timeout: 50 * time.Millisecond, state: api.HealthCritical, output: []string{"timed out after 50ms"}},
		{name: "refused", path: "/", port: closedPort(t), state: api.HealthCritical, output: []string{"refused"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p := port
			if tt.port != 0 {
				p = tt.port
			}
			timeout := tt.timeout
			if timeout == 0 {
				timeout = 2 * time.Second
			}
			var read atomic.Int64
			c := api.CheckSpec{HTTP: &api.HTTPCheck{Port: p, Path: tt.path}, Timeout: api.Duration(timeout)}
			start := time.Now()
			state, out := Probe(context.Background(), c, Target{Address: "127.0.0.1", Dial: localDial(&read)})
			if state != tt.state {
				t.Errorf("state = %q (%s), want %q", state, out, tt.state)
			}
			for _, want := range tt.output {
				if !strings.Contains(out, want) {
					t.Errorf("output %q lacks %q", out, want)
				}
			}
			if len(out) > maxOutput+200 {
				t.Errorf("output is %d bytes long", len(out))
			}
			if n := read.Load(); n > 256<<10 {
				t.Errorf("the probe read %d bytes", n)
			}
			if tt.timeout != 0 && time.Since(start) > tt.timeout+time.Second {
				t.Errorf("the probe took %v with a timeout of %v", time.Since(start), tt.timeout)
			}
		})
	}
}

func TestProbeTCP(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	open := l.Addr().(*net.TCPAddr).Port
	hang := func(ctx context.Context, network, addr string) (net.Conn, error) {
		<-ctx.Done()
		return nil, ctx.Err()
	}

	tests := []struct {
		name   string
		port   int
		dial   func(ctx context.Context, network, addr string) (net.Conn, error)
		state  string
		output string
	}{
		{name: "open", port: open, state: api.HealthPassing, output: "TCP connect 127.0.0.1:" + strconv.Itoa(open) + ": success"},
		{name: "open through Dial", port: open, dial: localDial(nil), state: api.HealthPassing},
		{name: "closed", port: closedPort(t), state: api.HealthCritical, output: "refused"},
		{name: "timeout", port: open, dial: hang, state: api.HealthCritical, output: "timed out after 50ms"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := api.CheckSpec{TCP: &api.TCPCheck{Port: tt.port}, Timeout: api.Duration(50 * time.Millisecond)}
			state, out := Probe(context.Background(), c, Target{Address: "127.0.0.1", Dial: tt.dial})
			if state != tt.state || !strings.Contains(out, tt.output) {
				t.Errorf("Probe = %q, %q; want %q with %q", state, out, tt.state, tt.output)
			}
		})
	}
}

func TestProbeExec(t *testing.T) {
	fake := func(code int, output string, err error, delay time.Duration) Exec {
		return func(ctx context.Context, cmd []string) (int, string, error) {
			if strings.Join(cmd, " ") != "check --deep" {
				return 127, "", fmt.Errorf("unexpected command %q", cmd)
			}
			select {
			case <-time.After(delay):
				return code, output, err
			case <-ctx.Done():
				return -1, "", ctx.Err()
			}
		}
	}
	tests := []struct {
		name   string
		exec   Exec
		state  string
		output string
	}{
		{name: "exit 0", exec: fake(0, "fine\n", nil, 0), state: api.HealthPassing, output: "exec check --deep: exit 0: fine"},
		{name: "exit 1 warns", exec: fake(1, "disk 91% full", nil, 0), state: api.HealthWarning, output: "exit 1: disk 91% full"},
		{name: "exit 2", exec: fake(2, "", nil, 0), state: api.HealthCritical, output: "exec check --deep: exit 2"},
		{name: "error", exec: fake(0, "", errors.New("no such container"), 0), state: api.HealthCritical, output: "no such container"},
		{name: "timeout", exec: fake(0, "", nil, 2*time.Second), state: api.HealthCritical, output: "timed out after 50ms"},
		{name: "late answer", exec: func(ctx context.Context, cmd []string) (int, string, error) {
			<-ctx.Done()
			return 0, "ok", nil // ignores that it ran out of time
		}, state: api.HealthCritical, output: "timed out"},
		{name: "long output", exec: fake(0, strings.Repeat("é", 4000), nil, 0), state: api.HealthPassing, output: "…"},
		{name: "no exec", state: api.HealthCritical, output: "no exec"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := api.CheckSpec{Exec: &api.ExecCheck{Command: []string{"check", "--deep"}}, Timeout: api.Duration(50 * time.Millisecond)}
			state, out := Probe(context.Background(), c, Target{Address: "127.0.0.1", Exec: tt.exec})
			if state != tt.state || !strings.Contains(out, tt.output) {
				t.Errorf("Probe = %q, %q; want %q with %q", state, out, tt.state, tt.output)
			}
			if len(out) > maxOutput+100 {
				t.Errorf("output is %d bytes long", len(out))
			}
		})
	}
}

func TestProbeNothing(t *testing.T) {
	for _, c := range []api.CheckSpec{{TTL: api.Duration(time.Second)}, {}} {
		if state, out := Probe(context.Background(), c, Target{}); state != api.HealthCritical || out == "" {
			t.Errorf("Probe(%+v) = %q, %q; want critical", c, state, out)
		}
	}
}
