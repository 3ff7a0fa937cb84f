package health

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/berth-dev/berth/api"
)

// noResult is a new monitor's output, before anything decided its state.
const noResult = "no result yet"

// Monitor runs one instance's check and keeps its health state.
//
// A new monitor is critical (an instance is not healthy until a check says
// so); that initial state is not reported, only changes from it are. Probed
// checks (HTTP, TCP, exec) run at once when Run starts, then every Interval,
// each bounded by Timeout; unset, both take the api defaults. Thresholds, as
// in Consul:
//
//   - a passing result turns the state passing only after
//     SuccessBeforePassing consecutive passes (0 counts as 1);
//   - a warning or critical result counts as a failure, and sets the state
//     to itself only after FailuresBeforeCritical consecutive failures (0
//     counts as 1). Once there, each further failure sets the state at once,
//     so it moves between warning and critical without waiting. A new monitor
//     starts there.
//
// A result held back by a threshold changes nothing, not even the output:
// State's output is the one of the result that last set the state.
//
// A TTL check is not probed: it is critical unless TTLUpdate was called
// within the TTL. Updates apply at once, without thresholds; when the TTL
// passes with no update, the state turns critical.
//
// report is called on every change of state, at once, from the goroutine
// that made it (Run's, or TTLUpdate's caller's), one call at a time and in
// order. It may call State but not TTLUpdate.
type Monitor struct {
	spec     api.CheckSpec
	target   Target
	report   func(state, output string)
	interval time.Duration
	ttl      time.Duration
	needPass int
	needFail int

	running atomic.Bool
	kick    chan struct{} // wakes a TTL Run when an update moved the expiry

	// update serializes changes and their reports, and guards the fields
	// below it.
	update    sync.Mutex
	successes int
	failures  int
	expires   time.Time // TTL checks: when the last update runs out; zero: none pending

	mu     sync.Mutex // guards state and output, for State
	state  string
	output string
}

// NewMonitor returns a monitor of check c against t, which calls report on
// each change of state (report may be nil). It does not change c, and
// applies api's default interval and timeout when c has none.
func NewMonitor(c api.CheckSpec, t Target, report func(state, output string)) *Monitor {
	if report == nil {
		report = func(string, string) {}
	}
	m := &Monitor{
		spec:     c,
		target:   t,
		report:   report,
		interval: c.Interval.D(),
		ttl:      c.TTL.D(),
		needPass: max(c.SuccessBeforePassing, 1),
		needFail: max(c.FailuresBeforeCritical, 1),
		kick:     make(chan struct{}, 1),
		state:    api.HealthCritical,
		output:   noResult,
	}
	if m.interval <= 0 {
		m.interval = max(api.DefaultCheckInterval, c.Timeout.D())
	}
	if m.spec.Timeout <= 0 {
		m.spec.Timeout = api.Duration(min(api.DefaultCheckTimeout, m.interval))
	}
	// Critical from the start, as if the failure threshold were reached.
	m.failures = m.needFail
	return m
}

// Seed sets the state the monitor starts from, before Run: the state last
// reported for the instance, when a monitor is made again for a container
// that kept running (an agent restart). A failing probe then reports the
// change instead of finding the monitor already critical; a TTL check
// seeded passing or warning runs out one TTL later unless updated.
func (m *Monitor) Seed(state string) {
	switch state {
	case api.HealthPassing, api.HealthWarning, api.HealthCritical:
	default:
		return
	}
	m.update.Lock()
	defer m.update.Unlock()
	m.mu.Lock()
	m.state = state
	m.mu.Unlock()
	if state == api.HealthCritical {
		m.successes, m.failures = 0, m.needFail
		return
	}
	m.successes, m.failures = m.needPass, 0
	if m.ttl > 0 {
		m.expires = time.Now().Add(m.ttl)
	}
}

// Run runs the check until ctx ends, and returns once everything it started
// has stopped. A probe that ctx interrupts decides nothing. Run may be called
// again after it returned (state and counters carry over); a call while
// another runs returns at once.
func (m *Monitor) Run(ctx context.Context) {
	if !m.running.CompareAndSwap(false, true) {
		return
	}
	defer m.running.Store(false)
	if m.ttl > 0 {
		m.runTTL(ctx)
		return
	}
	tick := time.NewTicker(m.interval)
	defer tick.Stop()
	for {
		state, output := Probe(ctx, m.spec, m.target)
		if ctx.Err() != nil {
			return
		}
		m.observe(state, output)
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
	}
}

// observe applies one probe's result through the thresholds.
func (m *Monitor) observe(state, output string) {
	m.update.Lock()
	defer m.update.Unlock()
	if state == api.HealthPassing {
		m.failures = 0
		m.successes = min(m.successes+1, m.needPass)
		if m.successes >= m.needPass {
			m.set(state, output)
		}
		return
	}
	m.successes = 0
	m.failures = min(m.failures+1, m.needFail)
	if m.failures >= m.needFail {
		m.set(state, output)
	}
}

// set records a state, reporting it when it changed. The caller holds update.
func (m *Monitor) set(state, output string) {
	m.mu.Lock()
	changed := m.state != state
	m.state, m.output = state, output
	m.mu.Unlock()
	if changed {
		m.report(state, output)
	}
}

func (m *Monitor) runTTL(ctx context.Context) {
	timer := time.NewTimer(time.Hour)
	defer timer.Stop()
	for {
		m.update.Lock()
		expires := m.expires
		m.update.Unlock()
		var fired <-chan time.Time
		if !expires.IsZero() {
			timer.Reset(time.Until(expires))
			fired = timer.C
		}
		select {
		case <-ctx.Done():
			return
		case <-m.kick:
		case <-fired:
			m.expire()
		}
	}
}

// expire turns a TTL check critical when its last update ran out.
func (m *Monitor) expire() {
	m.update.Lock()
	defer m.update.Unlock()
	if m.expires.IsZero() || time.Now().Before(m.expires) {
		return // renewed meanwhile
	}
	m.expires = time.Time{}
	m.mu.Lock()
	last := m.output
	m.mu.Unlock()
	out := fmt.Sprintf("TTL expired: no update in %v", m.ttl)
	if last != "" {
		out += "; last output: " + last
	}
	m.set(api.HealthCritical, out)
}

// ErrNotTTL is TTLUpdate's error on a probed check.
var ErrNotTTL = errors.New("not a TTL check: its state comes from its probes")

// TTLUpdate sets a TTL check's state and output (the heartbeat of whatever
// keeps the instance registered) until the TTL runs out, reporting the state
// at once if it changed. It fails on a probed check or an unknown state.
// Without Run the state is kept but never expires.
func (m *Monitor) TTLUpdate(state, output string) error {
	if m.ttl <= 0 {
		return ErrNotTTL
	}
	switch state {
	case api.HealthPassing, api.HealthWarning, api.HealthCritical:
	default:
		return fmt.Errorf("%q is not a health state (passing, warning or critical)", state)
	}
	m.update.Lock()
	m.expires = time.Now().Add(m.ttl)
	m.set(state, clip(output))
	m.update.Unlock()
	select {
	case m.kick <- struct{}{}:
	default:
	}
	return nil
}

// State returns the current state and the output that set it.
func (m *Monitor) State() (state, output string) {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.state, m.output
}
