// Package client is berth's public Go client for the HTTP+JSON API: typed
// calls for every object, and watch streams that resume by revision.
package client

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"

	"github.com/berth-dev/berth/api"
)

// DefaultAddr is where the CLI and client look for the API when told nothing.
const DefaultAddr = "http://127.0.0.1:7480"

// Client talks to one berth API endpoint.
type Client struct {
	base string
	hc   *http.Client
}

// Option configures a Client.
type Option func(*Client)

// WithHTTPClient replaces the HTTP client (timeouts, TLS).
func WithHTTPClient(hc *http.Client) Option { return func(c *Client) { c.hc = hc } }

// New returns a client for addr ("127.0.0.1:7480" or "http://host:port").
func New(addr string, opts ...Option) (*Client, error) {
	if addr == "" {
		addr = DefaultAddr
	}
	if !strings.Contains(addr, "://") {
		addr = "http://" + addr
	}
	u, err := url.Parse(addr)
	if err != nil || u.Host == "" {
		return nil, fmt.Errorf("berth address %q is not a URL like http://127.0.0.1:7480", addr)
	}
	c := &Client{base: strings.TrimRight(u.String(), "/"), hc: &http.Client{}}
	for _, o := range opts {
		o(c)
	}
	return c, nil
}

// Addr is the API's base URL.
func (c *Client) Addr() string { return c.base }

// IsNotFound reports whether err is the API's 404.
func IsNotFound(err error) bool {
	var ae *api.Error
	return errors.As(err, &ae) && ae.Status == http.StatusNotFound
}

// IsGone reports whether a watch asked for a revision the server no longer holds.
func IsGone(err error) bool {
	var ae *api.Error
	return errors.As(err, &ae) && ae.Status == http.StatusGone
}

func (c *Client) request(ctx context.Context, method, path string, in any) (*http.Response, error) {
	var body io.Reader
	if in != nil {
		switch v := in.(type) {
		case readerBody:
			body = v.Reader
		case []byte:
			body = bytes.NewReader(v)
		case json.RawMessage:
			body = bytes.NewReader(v)
		default:
			b, err := json.Marshal(in)
			if err != nil {
				return nil, fmt.Errorf("encode request: %w", err)
			}
			body = bytes.NewReader(b)
		}
	}
	req, err := http.NewRequestWithContext(ctx, method, c.base+path, body)
	if err != nil {
		return nil, err
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := c.hc.Do(req)
	if err != nil {
		return nil, fmt.Errorf("berth API at %s: %w", c.base, err)
	}
	if resp.StatusCode >= 400 {
		defer resp.Body.Close()
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
		ae := &api.Error{}
		if json.Unmarshal(b, ae) != nil || ae.Message == "" {
			ae = &api.Error{Code: api.CodeInternal, Message: strings.TrimSpace(string(b))}
		}
		ae.Status = resp.StatusCode
		return nil, ae
	}
	return resp, nil
}

// do sends in (a value, or raw JSON bytes) and decodes the answer into out.
func (c *Client) do(ctx context.Context, method, path string, in, out any) error {
	resp, err := c.request(ctx, method, path, in)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if out == nil || resp.StatusCode == http.StatusNoContent {
		_, _ = io.Copy(io.Discard, resp.Body)
		return nil
	}
	if err := json.NewDecoder(resp.Body).Decode(out); err != nil {
		return fmt.Errorf("decode %s %s: %w", method, path, err)
	}
	return nil
}

func pe(s string) string { return url.PathEscape(s) }

// Health answers when the server is ready.
func (c *Client) Health(ctx context.Context) error {
	return c.do(ctx, http.MethodGet, "/v1/health", nil, nil)
}

// ListNodes lists nodes.
func (c *Client) ListNodes(ctx context.Context) (api.List[api.Node], error) {
	var l api.List[api.Node]
	return l, c.do(ctx, http.MethodGet, "/v1/nodes", nil, &l)
}

// GetNode reads one node.
func (c *Client) GetNode(ctx context.Context, name string) (api.Node, error) {
	var n api.Node
	return n, c.do(ctx, http.MethodGet, "/v1/nodes/"+pe(name), nil, &n)
}

// RegisterNode registers (or refreshes) a node; agents call it.
func (c *Client) RegisterNode(ctx context.Context, name string, reg api.NodeRegistration) (api.Node, error) {
	var n api.Node
	return n, c.do(ctx, http.MethodPut, "/v1/nodes/"+pe(name), reg, &n)
}

// Heartbeat renews a node's lease.
func (c *Client) Heartbeat(ctx context.Context, name string) (api.HeartbeatResponse, error) {
	var h api.HeartbeatResponse
	return h, c.do(ctx, http.MethodPost, "/v1/nodes/"+pe(name)+"/heartbeat", nil, &h)
}

// ReleaseNode ends a node's lease at once; its agent is stopping.
func (c *Client) ReleaseNode(ctx context.Context, name string) error {
	return c.do(ctx, http.MethodDelete, "/v1/nodes/"+pe(name)+"/lease", nil, nil)
}

// DeleteNode removes a node's record (force: even while it is ready).
func (c *Client) DeleteNode(ctx context.Context, name string, force bool) error {
	q := ""
	if force {
		q = "?force=1"
	}
	return c.do(ctx, http.MethodDelete, "/v1/nodes/"+pe(name)+q, nil, nil)
}

// ListNetworks lists networks.
func (c *Client) ListNetworks(ctx context.Context) (api.List[api.Network], error) {
	var l api.List[api.Network]
	return l, c.do(ctx, http.MethodGet, "/v1/networks", nil, &l)
}

// GetNetwork reads one network.
func (c *Client) GetNetwork(ctx context.Context, name string) (api.Network, error) {
	var n api.Network
	return n, c.do(ctx, http.MethodGet, "/v1/networks/"+pe(name), nil, &n)
}

// CreateNetwork creates a network.
func (c *Client) CreateNetwork(ctx context.Context, spec api.NetworkSpec) (api.Network, error) {
	var n api.Network
	return n, c.do(ctx, http.MethodPost, "/v1/networks", spec, &n)
}

// DeleteNetwork removes a network that nothing uses.
func (c *Client) DeleteNetwork(ctx context.Context, name string) error {
	return c.do(ctx, http.MethodDelete, "/v1/networks/"+pe(name), nil, nil)
}

// ListServices lists services.
func (c *Client) ListServices(ctx context.Context) (api.List[api.Service], error) {
	var l api.List[api.Service]
	return l, c.do(ctx, http.MethodGet, "/v1/services", nil, &l)
}

// GetService reads one service.
func (c *Client) GetService(ctx context.Context, name string) (api.Service, error) {
	var s api.Service
	return s, c.do(ctx, http.MethodGet, "/v1/services/"+pe(name), nil, &s)
}

// ApplyService creates or updates a service from a spec.
func (c *Client) ApplyService(ctx context.Context, spec api.ServiceSpec) (api.ApplyResult, error) {
	var res api.ApplyResult
	return res, c.do(ctx, http.MethodPost, "/v1/services", spec, &res)
}

// ApplyServiceJSON applies a spec given as JSON, so that the server checks
// it field by field exactly as written.
func (c *Client) ApplyServiceJSON(ctx context.Context, spec []byte) (api.ApplyResult, error) {
	var res api.ApplyResult
	return res, c.do(ctx, http.MethodPost, "/v1/services", spec, &res)
}

// DeleteService removes a service.
func (c *Client) DeleteService(ctx context.Context, name string) error {
	return c.do(ctx, http.MethodDelete, "/v1/services/"+pe(name), nil, nil)
}

// InstanceFilter narrows ListInstances.
type InstanceFilter struct{ Service, Node string }

func (f InstanceFilter) query() string {
	v := url.Values{}
	if f.Service != "" {
		v.Set("service", f.Service)
	}
	if f.Node != "" {
		v.Set("node", f.Node)
	}
	if len(v) == 0 {
		return ""
	}
	return "?" + v.Encode()
}

// ListInstances lists instances.
func (c *Client) ListInstances(ctx context.Context, f InstanceFilter) (api.List[api.Instance], error) {
	var l api.List[api.Instance]
	return l, c.do(ctx, http.MethodGet, "/v1/instances"+f.query(), nil, &l)
}

// GetInstance reads one instance.
func (c *Client) GetInstance(ctx context.Context, id string) (api.Instance, error) {
	var in api.Instance
	return in, c.do(ctx, http.MethodGet, "/v1/instances/"+pe(id), nil, &in)
}

// PutInstanceStatus records an agent's observation of an instance.
func (c *Client) PutInstanceStatus(ctx context.Context, id string, st api.InstanceStatus) (api.Instance, error) {
	var in api.Instance
	return in, c.do(ctx, http.MethodPut, "/v1/instances/"+pe(id)+"/status", st, &in)
}

func regPath(service, id string) string {
	return "/v1/registry/services/" + pe(service) + "/instances/" + pe(id)
}

// Register adds or updates an external instance of a service.
func (c *Client) Register(ctx context.Context, service, id string, spec api.RegistrationSpec) (api.Registration, error) {
	var r api.Registration
	return r, c.do(ctx, http.MethodPut, regPath(service, id), spec, &r)
}

// Renew is a registration's heartbeat.
func (c *Client) Renew(ctx context.Context, service, id string) error {
	return c.do(ctx, http.MethodPut, regPath(service, id)+"/renew", nil, nil)
}

// Deregister removes a registration.
func (c *Client) Deregister(ctx context.Context, service, id string) error {
	return c.do(ctx, http.MethodDelete, regPath(service, id), nil, nil)
}

// ListRegistrations lists a service's external instances ("" for all).
func (c *Client) ListRegistrations(ctx context.Context, service string) (api.List[api.Registration], error) {
	var l api.List[api.Registration]
	p := "/v1/registry/services"
	if service != "" {
		p += "/" + pe(service) + "/instances"
	}
	return l, c.do(ctx, http.MethodGet, p, nil, &l)
}

// Watch paths of the object kinds.
const (
	WatchNodes         = "/v1/nodes"
	WatchNetworks      = "/v1/networks"
	WatchServices      = "/v1/services"
	WatchInstances     = "/v1/instances"
	WatchRegistrations = "/v1/registry/services"
)

// Stream is an open watch. Next returns events in revision order.
type Stream struct {
	body io.ReadCloser
	sc   *bufio.Scanner
	rev  int64
}

// Watch opens a watch of a list path (one of the Watch* constants, or a
// list path with its query). With from > 0 the stream carries every change
// after that revision; with 0 it starts with the current objects.
func (c *Client) Watch(ctx context.Context, path string, from int64) (*Stream, error) {
	sep := "?"
	if strings.Contains(path, "?") {
		sep = "&"
	}
	p := path + sep + "watch=1"
	if from > 0 {
		p += "&revision=" + strconv.FormatInt(from, 10)
	}
	hc := *c.hc
	hc.Timeout = 0 // a watch lasts as long as its context
	cc := *c
	cc.hc = &hc
	resp, err := cc.request(ctx, http.MethodGet, p, nil)
	if err != nil {
		return nil, err
	}
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 64<<10), api.MaxBodyBytes*4)
	return &Stream{body: resp.Body, sc: sc, rev: from}, nil
}

// Next blocks for the next event. An error event from the server comes back
// as an *api.Error (IsGone: list again).
func (s *Stream) Next() (api.Event, error) {
	if s.sc.Scan() {
		var ev api.Event
		if err := json.Unmarshal(s.sc.Bytes(), &ev); err != nil {
			return api.Event{}, fmt.Errorf("watch: bad event: %w", err)
		}
		if ev.Type == api.EventError {
			if ev.Error != nil {
				return ev, ev.Error
			}
			return ev, errors.New("watch: error event")
		}
		s.rev = max(s.rev, ev.Revision)
		return ev, nil
	}
	if err := s.sc.Err(); err != nil {
		return api.Event{}, fmt.Errorf("watch: %w", err)
	}
	return api.Event{}, io.EOF
}

// Revision is the last revision the stream delivered: reconnect from it.
func (s *Stream) Revision() int64 { return s.rev }

// Close ends the stream.
func (s *Stream) Close() error { return s.body.Close() }

// WaitReady polls Health until the server answers or timeout passes.
func (c *Client) WaitReady(ctx context.Context, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	var last error
	for time.Now().Before(deadline) {
		if last = c.Health(ctx); last == nil {
			return nil
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(20 * time.Millisecond):
		}
	}
	return fmt.Errorf("berth API not ready after %v: %w", timeout, last)
}
