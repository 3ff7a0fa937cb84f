// Package health owns running an instance's health check on its node and
// turning the results into a health state (passing, warning or critical) with
// the spec's thresholds. Probe runs an HTTP, TCP or exec check once; a Monitor
// runs it every interval, or keeps a TTL check's heartbeat, and reports each
// change of state. It knows nothing of containers or the registry: the agent
// wires monitors to its instances, supplying the instance's address, an exec
// into its container and, when needed, a dialer inside its network namespace.
package health

import (
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/berth-dev/berth/api"
)

// Exec runs a command inside the instance's container (the agent supplies the
// runtime's exec). It must stop the command and return when ctx ends: that is
// how a check's timeout bounds it.
type Exec func(ctx context.Context, cmd []string) (exitCode int, output string, err error)

// Target is where a check connects.
type Target struct {
	// Address is the instance's address (its VNIC IP), without a port.
	Address string
	// Exec runs exec checks; without it they are critical.
	Exec Exec
	// Dial opens HTTP and TCP checks' connections; nil means a net.Dialer.
	// It lets the agent dial inside the instance's network namespace, and
	// must return when ctx ends.
	Dial func(ctx context.Context, network, addr string) (net.Conn, error)
}

const (
	// maxRedirects is how many redirects an HTTP check follows.
	maxRedirects = 3
	// maxBody is how much of an HTTP answer's body a check reads.
	maxBody = 4 << 10
	// maxOutput bounds the output a check keeps from a body or a command.
	maxOutput = 512
	// userAgent identifies berth's HTTP checks.
	userAgent = "berth-health-check"
)

// Probe runs check c against t once, with c.Timeout (api.DefaultCheckTimeout
// when unset), and returns the state it found and a short output:
//
//   - HTTP: GET http://Address:Port/Path; 2xx passes, 429 warns, anything
//     else, an error or a timeout is critical. It follows at most 3 redirects,
//     and only to the same host; it reads at most 4 KiB of the body.
//   - TCP: a connection that opens within the timeout passes.
//   - Exec: exit 0 passes, exit 1 warns (like Consul), anything else, an
//     error or a timeout is critical.
//
// A TTL check has nothing to probe: Probe says critical, as it does for a
// check of no kind.
func Probe(ctx context.Context, c api.CheckSpec, t Target) (state, output string) {
	timeout := c.Timeout.D()
	if timeout <= 0 {
		timeout = api.DefaultCheckTimeout
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	switch {
	case c.HTTP != nil:
		return probeHTTP(ctx, c.HTTP, t, timeout)
	case c.TCP != nil:
		return probeTCP(ctx, c.TCP, t, timeout)
	case c.Exec != nil:
		return probeExec(ctx, c.Exec, t, timeout)
	case c.TTL != 0:
		return api.HealthCritical, "a TTL check is not probed: it is updated"
	default:
		return api.HealthCritical, "the check has no kind"
	}
}

func dialer(t Target) func(ctx context.Context, network, addr string) (net.Conn, error) {
	if t.Dial != nil {
		return t.Dial
	}
	var d net.Dialer
	return d.DialContext
}

func probeHTTP(ctx context.Context, c *api.HTTPCheck, t Target, timeout time.Duration) (string, string) {
	path := c.Path
	if path == "" {
		path = "/"
	} else if !strings.HasPrefix(path, "/") {
		path = "/" + path
	}
	target := "http://" + net.JoinHostPort(t.Address, strconv.Itoa(c.Port)) + path
	what := "HTTP GET " + target
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, target, nil)
	if err != nil {
		return api.HealthCritical, what + ": " + err.Error()
	}
	req.Header.Set("User-Agent", userAgent)
	req.Header.Set("Accept", "text/plain, text/*, */*")
	tr := &http.Transport{
		Proxy:                  nil, // a check goes straight to the instance
		DialContext:            dialer(t),
		DisableKeepAlives:      true,
		DisableCompression:     true,
		MaxResponseHeaderBytes: 64 << 10,
	}
	defer tr.CloseIdleConnections()
	host := req.URL.Hostname()
	client := &http.Client{
		Transport: tr,
		CheckRedirect: func(r *http.Request, via []*http.Request) error {
			// Another host's answer says nothing about this instance, and a
			// check should not wander: such a redirect is the answer.
			if len(via) > maxRedirects || r.URL.Hostname() != host {
				return http.ErrUseLastResponse
			}
			return nil
		},
	}
	resp, err := client.Do(req)
	if err != nil {
		var ue *url.Error
		if errors.As(err, &ue) {
			err = ue.Err
		}
		return api.HealthCritical, what + ": " + describe(ctx, err, timeout)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, maxBody))
	if err != nil && ctx.Err() != nil {
		return api.HealthCritical, what + ": " + resp.Status + ": reading the body: " + describe(ctx, err, timeout)
	}
	out := what + ": " + resp.Status
	if b := clip(string(body)); b != "" {
		out += ": " + b
	}
	switch {
	case resp.StatusCode >= 200 && resp.StatusCode < 300:
		return api.HealthPassing, out
	case resp.StatusCode == http.StatusTooManyRequests:
		return api.HealthWarning, out
	default:
		return api.HealthCritical, out
	}
}

func probeTCP(ctx context.Context, c *api.TCPCheck, t Target, timeout time.Duration) (string, string) {
	addr := net.JoinHostPort(t.Address, strconv.Itoa(c.Port))
	what := "TCP connect " + addr
	conn, err := dialer(t)(ctx, "tcp", addr)
	if err != nil {
		return api.HealthCritical, what + ": " + describe(ctx, err, timeout)
	}
	conn.Close()
	return api.HealthPassing, what + ": success"
}

func probeExec(ctx context.Context, c *api.ExecCheck, t Target, timeout time.Duration) (string, string) {
	what := "exec " + clip(strings.Join(c.Command, " "))
	if t.Exec == nil {
		return api.HealthCritical, what + ": no exec for this instance"
	}
	code, output, err := t.Exec(ctx, c.Command)
	if ctx.Err() != nil {
		// Whatever the command said, it outlived its time.
		return api.HealthCritical, what + ": " + describe(ctx, ctx.Err(), timeout)
	}
	if err != nil {
		return api.HealthCritical, what + ": " + clip(err.Error())
	}
	out := what + ": exit " + strconv.Itoa(code)
	if o := clip(output); o != "" {
		out += ": " + o
	}
	switch code {
	case 0:
		return api.HealthPassing, out
	case 1:
		return api.HealthWarning, out
	default:
		return api.HealthCritical, out
	}
}

// describe says why a probe failed, naming a timeout as one.
func describe(ctx context.Context, err error, timeout time.Duration) string {
	if errors.Is(ctx.Err(), context.DeadlineExceeded) || errors.Is(err, context.DeadlineExceeded) {
		return "timed out after " + timeout.String()
	}
	if errors.Is(ctx.Err(), context.Canceled) {
		return "canceled"
	}
	return clip(err.Error())
}

// clip trims s and cuts it to maxOutput bytes on a character boundary.
func clip(s string) string {
	s = strings.TrimSpace(s)
	if len(s) <= maxOutput {
		return s
	}
	cut := maxOutput
	for cut > 0 && !utf8.RuneStart(s[cut]) {
		cut--
	}
	return s[:cut] + "…"
}
