package health

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"runtime"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/berth-dev/berth/api"
)

// recorder keeps a monitor's reports.
type recorder struct {
	mu      sync.Mutex
	states  []string
	outputs []string
	at      []time.Time
	changed chan struct{}
}

func newRecorder() *recorder { return &recorder{changed: make(chan struct{}, 100)} }

func (r *recorder) report(state, output string) {
	r.mu.Lock()
	r.states = append(r.states, state)
	r.outputs = append(r.outputs, output)
	r.at = append(r.at, time.Now())
	r.mu.Unlock()
	select {
	case r.changed <- struct{}{}:
	default:
	}
}

func (r *recorder) got() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return slices.Clone(r.states)
}

func (r *recorder) last() (state, output string, at time.Time) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if len(r.states) == 0 {
		return "", "", time.Time{}
	}
	n := len(r.states) - 1
	return r.states[n], r.outputs[n], r.at[n]
}

// waitFor waits until the recorder has n reports.
func (r *recorder) waitFor(t *testing.T, n int, within time.Duration) []string {
	t.Helper()
	deadline := time.After(within)
	for {
		if got := r.got(); len(got) >= n {
			return got
		}
		select {
		case <-r.changed:
		case <-deadline:
			t.Fatalf("after %v: reports %q, want %d of them", within, r.got(), n)
		}
	}
}

var short = map[byte]string{'P': api.HealthPassing, 'W': api.HealthWarning, 'C': api.HealthCritical}

func states(s string) []string {
	var out []string
	for _, f := range strings.Fields(s) {
		out = append(out, short[f[0]])
	}
	return out
}

func TestThresholds(t *testing.T) {
	tests := []struct {
		name         string
		pass, fail   int
		results      string
		want         string // reports
		final        string
		finalOutputN int // which result set the final output (1-based)
	}{
		{name: "defaults follow every result", results: "P C W W P", want: "P C W P", final: "P", finalOutputN: 5},
		{name: "critical from the start", results: "C C", want: "", final: "C", finalOutputN: 2},
		{name: "a new monitor warns at once", pass: 2, fail: 3, results: "W", want: "W", final: "W", finalOutputN: 1},
		{name: "3 passes, 2 failures, flapping", pass: 3, fail: 2,
			results: "P P C P P P C P C C P P P W W C W P",
			want:    "P C P W C W", final: "W", finalOutputN: 17},
		{name: "one pass, three failures", pass: 1, fail: 3, results: "P C C P C C C", want: "P C", final: "C", finalOutputN: 7},
		{name: "never enough passes", pass: 3, fail: 1, results: "P P C P P W P P", want: "W", final: "W", finalOutputN: 6},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			rec := newRecorder()
			m := NewMonitor(api.CheckSpec{Exec: &api.ExecCheck{Command: []string{"true"}},
				SuccessBeforePassing: tt.pass, FailuresBeforeCritical: tt.fail}, Target{}, rec.report)
			if state, out := m.State(); state != api.HealthCritical || out != noResult {
				t.Fatalf("new monitor: %q, %q", state, out)
			}
			for i, s := range states(tt.results) {
				m.observe(s, fmt.Sprintf("result %d", i+1))
			}
			if got := rec.got(); !slices.Equal(got, states(tt.want)) {
				t.Errorf("reports %q, want %q", got, states(tt.want))
			}
			state, out := m.State()
			if want := fmt.Sprintf("result %d", tt.finalOutputN); state != short[tt.final[0]] || out != want {
				t.Errorf("State = %q, %q; want %q, %q", state, out, short[tt.final[0]], want)
			}
		})
	}
}

// scripted serves answers in order: 'P' 200, 'W' 429, 'C' 503; past the
// script, it hangs until the request ends.
func scripted(t *testing.T, script string) (port int, served *atomic.Int64) {
	codes := map[byte]int{'P': 200, 'W': 429, 'C': 503}
	answers := strings.Fields(script)
	served = new(atomic.Int64)
	port = serverPort(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		i := served.Add(1) - 1
		if int(i) >= len(answers) {
			<-r.Context().Done()
			return
		}
		w.WriteHeader(codes[answers[i][0]])
	}))
	return port, served
}

// runMonitor runs m until the test ends, checking that Run returns.
func runMonitor(t *testing.T, m *Monitor) (stop func()) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		m.Run(ctx)
	}()
	stop = func() {
		cancel()
		select {
		case <-done:
		case <-time.After(time.Second):
			t.Error("Run did not return within 1s of its context ending")
		}
	}
	t.Cleanup(stop)
	return stop
}

func TestMonitorFlapping(t *testing.T) {
	const script = "P P C P P P C P C C P P P W W C W"
	port, served := scripted(t, script)
	rec := newRecorder()
	m := NewMonitor(api.CheckSpec{
		HTTP:                 &api.HTTPCheck{Port: port, Path: "/health"},
		Interval:             api.Duration(10 * time.Millisecond),
		Timeout:              api.Duration(time.Second),
		SuccessBeforePassing: 3, FailuresBeforeCritical: 2,
	}, Target{Address: "127.0.0.1", Dial: localDial(nil)}, rec.report)
	stop := runMonitor(t, m)
	want := states("P C P W C W")
	rec.waitFor(t, len(want), 5*time.Second)
	for served.Load() <= int64(len(strings.Fields(script))) {
		time.Sleep(5 * time.Millisecond) // the hanging request is in
	}
	stop() // interrupts the hanging probe, which must decide nothing
	if got := rec.got(); !slices.Equal(got, want) {
		t.Errorf("reports %q, want %q", got, want)
	}
	if state, out := m.State(); state != api.HealthWarning || !strings.Contains(out, "429 Too Many Requests") {
		t.Errorf("State = %q, %q", state, out)
	}
}

func TestMonitorReports(t *testing.T) {
	t.Run("at once", func(t *testing.T) {
		rec := newRecorder()
		m := NewMonitor(api.CheckSpec{TCP: &api.TCPCheck{Port: listen(t)}, Interval: api.Duration(time.Hour)},
			Target{Address: "127.0.0.1"}, rec.report)
		start := time.Now()
		runMonitor(t, m)
		rec.waitFor(t, 1, time.Second)
		if _, _, at := rec.last(); at.Sub(start) > 500*time.Millisecond {
			t.Errorf("first report after %v", at.Sub(start))
		}
	})
	t.Run("only on change", func(t *testing.T) {
		var calls atomic.Int64
		exec := func(ctx context.Context, cmd []string) (int, string, error) {
			n := calls.Add(1)
			return 0, fmt.Sprintf("call %d", n), nil
		}
		rec := newRecorder()
		m := NewMonitor(api.CheckSpec{Exec: &api.ExecCheck{Command: []string{"check"}},
			Interval: api.Duration(10 * time.Millisecond)}, Target{Exec: exec}, rec.report)
		stop := runMonitor(t, m)
		for calls.Load() < 10 {
			time.Sleep(5 * time.Millisecond)
		}
		stop()
		if got := rec.got(); !slices.Equal(got, []string{api.HealthPassing}) {
			t.Errorf("reports %q, want one passing", got)
		}
		if _, out := m.State(); out == "exec check: exit 0: call 1" {
			t.Errorf("State's output %q is not the latest", out)
		}
	})
	t.Run("timeouts are critical", func(t *testing.T) {
		var slow atomic.Bool
		port := serverPort(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if slow.Load() {
				select {
				case <-time.After(time.Second):
				case <-r.Context().Done():
				}
			}
		}))
		rec := newRecorder()
		m := NewMonitor(api.CheckSpec{HTTP: &api.HTTPCheck{Port: port},
			Interval: api.Duration(30 * time.Millisecond), Timeout: api.Duration(20 * time.Millisecond)},
			Target{Address: "127.0.0.1", Dial: localDial(nil)}, rec.report)
		runMonitor(t, m)
		rec.waitFor(t, 1, time.Second)
		slow.Store(true)
		rec.waitFor(t, 2, time.Second)
		if state, out, _ := rec.last(); state != api.HealthCritical || !strings.Contains(out, "timed out after 20ms") {
			t.Errorf("report %q, %q; want a critical timeout", state, out)
		}
	})
}

// listen accepts and closes connections on 127.0.0.1 until the test ends.
func listen(t *testing.T) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	t.Cleanup(func() {
		l.Close()
		<-done
	})
	go func() {
		defer close(done)
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	return l.Addr().(*net.TCPAddr).Port
}

func TestMonitorTTL(t *testing.T) {
	const ttl = 60 * time.Millisecond
	rec := newRecorder()
	m := NewMonitor(api.CheckSpec{TTL: api.Duration(ttl)}, Target{}, rec.report)
	if err := m.TTLUpdate("healthy", ""); err == nil {
		t.Error("TTLUpdate took an unknown state")
	}
	if err := m.TTLUpdate("", ""); err == nil {
		t.Error("TTLUpdate took an empty state")
	}
	runMonitor(t, m)
	time.Sleep(2 * ttl)
	if got := rec.got(); len(got) != 0 {
		t.Fatalf("reports %q before any update", got)
	}

	// An update is reported before TTLUpdate returns.
	if err := m.TTLUpdate(api.HealthPassing, "registered"); err != nil {
		t.Fatal(err)
	}
	if got := rec.got(); !slices.Equal(got, []string{api.HealthPassing}) {
		t.Fatalf("reports %q after an update", got)
	}
	// Renewals within the TTL keep it passing.
	var last time.Time
	for end := time.Now().Add(5 * ttl); time.Now().Before(end); time.Sleep(ttl / 4) {
		last = time.Now()
		if err := m.TTLUpdate(api.HealthPassing, "renewed"); err != nil {
			t.Fatal(err)
		}
	}
	if got := rec.got(); len(got) != 1 {
		t.Fatalf("reports %q while renewed", got)
	}
	// Without them it expires.
	rec.waitFor(t, 2, time.Second)
	state, out, at := rec.last()
	if state != api.HealthCritical || !strings.Contains(out, "TTL expired") || !strings.Contains(out, "renewed") {
		t.Errorf("report %q, %q; want critical, expired", state, out)
	}
	if d := at.Sub(last); d < ttl || d > ttl+500*time.Millisecond {
		t.Errorf("expired %v after the last update, TTL %v", d, ttl)
	}
	if s, o := m.State(); s != state || o != out {
		t.Errorf("State = %q, %q; last report %q, %q", s, o, state, out)
	}
	// Any state can be set, and a new update revives it.
	if err := m.TTLUpdate(api.HealthWarning, "degraded"); err != nil {
		t.Fatal(err)
	}
	if s, o := m.State(); s != api.HealthWarning || o != "degraded" {
		t.Errorf("State = %q, %q after a warning", s, o)
	}
	rec.waitFor(t, 4, time.Second)
	if got, want := rec.got(), states("P C W C"); !slices.Equal(got, want) {
		t.Errorf("reports %q, want %q", got, want)
	}
}

func TestTTLBeforeRun(t *testing.T) {
	rec := newRecorder()
	m := NewMonitor(api.CheckSpec{TTL: api.Duration(30 * time.Millisecond)}, Target{}, rec.report)
	if err := m.TTLUpdate(api.HealthPassing, "early"); err != nil {
		t.Fatal(err)
	}
	time.Sleep(50 * time.Millisecond)
	if s, _ := m.State(); s != api.HealthPassing {
		t.Fatalf("State = %q without Run; want passing kept", s)
	}
	runMonitor(t, m) // already past its TTL: expires at once
	rec.waitFor(t, 2, 500*time.Millisecond)
}

func TestTTLUpdateOnProbedCheck(t *testing.T) {
	m := NewMonitor(api.CheckSpec{TCP: &api.TCPCheck{Port: 1}}, Target{}, nil)
	if err := m.TTLUpdate(api.HealthPassing, ""); err != ErrNotTTL {
		t.Errorf("TTLUpdate = %v, want ErrNotTTL", err)
	}
}

func TestNewMonitorDefaults(t *testing.T) {
	c := api.CheckSpec{HTTP: &api.HTTPCheck{Port: 80}}
	m := NewMonitor(c, Target{}, nil)
	if c.Interval != 0 || c.Timeout != 0 {
		t.Errorf("NewMonitor changed its spec: %+v", c)
	}
	if m.interval != api.DefaultCheckInterval || m.spec.Timeout.D() != api.DefaultCheckTimeout {
		t.Errorf("interval %v, timeout %v", m.interval, m.spec.Timeout)
	}
	m = NewMonitor(api.CheckSpec{HTTP: &api.HTTPCheck{Port: 80}, Interval: api.Duration(time.Second)}, Target{}, nil)
	if m.spec.Timeout.D() != time.Second {
		t.Errorf("timeout %v with a 1s interval", m.spec.Timeout)
	}
}

// TestRunStops checks that Run returns promptly when its context ends, even
// in the middle of a probe, and leaves no goroutine behind.
func TestRunStops(t *testing.T) {
	hung := make(chan struct{}, 1)
	port := serverPort(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		select {
		case hung <- struct{}{}:
		default:
		}
		<-r.Context().Done()
	}))
	tcpPort := listen(t)
	exec := func(ctx context.Context, cmd []string) (int, string, error) {
		<-ctx.Done()
		return -1, "", ctx.Err()
	}
	tests := []struct {
		name string
		spec api.CheckSpec
	}{
		{"http in flight", api.CheckSpec{HTTP: &api.HTTPCheck{Port: port}}},
		{"tcp", api.CheckSpec{TCP: &api.TCPCheck{Port: tcpPort}}},
		{"exec in flight", api.CheckSpec{Exec: &api.ExecCheck{Command: []string{"sleep"}}}},
		{"ttl", api.CheckSpec{TTL: api.Duration(20 * time.Millisecond)}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			tt.spec.Interval = api.Duration(10 * time.Millisecond)
			if tt.spec.TTL == 0 {
				tt.spec.Timeout = api.Duration(10 * time.Second)
			}
			before := runtime.NumGoroutine()
			rec := newRecorder()
			m := NewMonitor(tt.spec, Target{Address: "127.0.0.1", Exec: exec, Dial: localDial(nil)}, rec.report)
			if tt.spec.TTL > 0 {
				if err := m.TTLUpdate(api.HealthPassing, ""); err != nil {
					t.Fatal(err)
				}
			}
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			done := make(chan struct{})
			go func() {
				defer close(done)
				m.Run(ctx)
			}()
			for !m.running.Load() {
				time.Sleep(time.Millisecond)
			}
			// A second Run while one runs returns at once.
			second := make(chan struct{})
			go func() {
				defer close(second)
				m.Run(ctx)
			}()
			select {
			case <-second:
			case <-time.After(time.Second):
				t.Fatal("a second Run did not return")
			}
			time.Sleep(50 * time.Millisecond)
			reports := len(rec.got())
			cancel()
			select {
			case <-done:
			case <-time.After(time.Second):
				t.Fatal("Run did not return within 1s of its context ending")
			}
			if got := rec.got(); len(got) != reports {
				t.Errorf("reports %q after cancel", got[reports:])
			}
			deadline := time.Now().Add(2 * time.Second)
			for runtime.NumGoroutine() > before {
				if time.Now().After(deadline) {
					buf := make([]byte, 1<<16)
					t.Fatalf("%d goroutines, %d before Run:\n%s", runtime.NumGoroutine(), before, buf[:runtime.Stack(buf, true)])
				}
				time.Sleep(10 * time.Millisecond)
			}
		})
	}
	select {
	case <-hung:
	default:
		t.Error("the HTTP probe never reached the server")
	}
}

// TestMonitorSeed: a monitor made again for an instance last reported
// passing (an agent restart) reports a failing probe; a seeded TTL check
// runs out one TTL later.
func TestMonitorSeed(t *testing.T) {
	t.Run("probe", func(t *testing.T) {
		rec := newRecorder()
		m := NewMonitor(api.CheckSpec{TCP: &api.TCPCheck{Port: 1}, Interval: api.Duration(time.Hour)},
			Target{Address: "127.0.0.1"}, rec.report)
		m.Seed(api.HealthPassing)
		if state, _ := m.State(); state != api.HealthPassing {
			t.Fatalf("seeded state %q", state)
		}
		runMonitor(t, m)
		rec.waitFor(t, 1, 5*time.Second)
		if state, _, _ := rec.last(); state != api.HealthCritical {
			t.Fatalf("report %q, want critical", state)
		}
	})
	t.Run("ttl", func(t *testing.T) {
		const ttl = 60 * time.Millisecond
		rec := newRecorder()
		m := NewMonitor(api.CheckSpec{TTL: api.Duration(ttl)}, Target{}, rec.report)
		m.Seed(api.HealthPassing)
		runMonitor(t, m)
		rec.waitFor(t, 1, time.Second)
		if state, out, _ := rec.last(); state != api.HealthCritical || !strings.Contains(out, "TTL expired") {
			t.Fatalf("report %q %q, want critical, expired", state, out)
		}
	})
	t.Run("unknown state ignored", func(t *testing.T) {
		m := NewMonitor(api.CheckSpec{TTL: api.Duration(time.Second)}, Target{}, nil)
		m.Seed("")
		if state, _ := m.State(); state != api.HealthCritical {
			t.Fatalf("state %q after an empty seed", state)
		}
	})
}
