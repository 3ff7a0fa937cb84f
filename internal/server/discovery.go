package server

import (
	"fmt"
	"maps"
	"net/http"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/berth-dev/berth/api"
)

// instanceEndpoints are an orchestrated instance's endpoints: one per
// network it has an address on.
func instanceEndpoints(in api.Instance, spec *api.ServiceSpec) []api.Endpoint {
	health := api.HealthCritical
	if in.Status.State == api.InstanceRunning && in.DesiredState == api.DesiredRunning {
		health = in.Status.Health
		if health == "" {
			health = api.HealthPassing
		}
	}
	ports := map[string]int{}
	first := 0
	for i, p := range in.Status.Ports {
		ports[p.Name] = p.Port
		if i == 0 {
			first = p.Port
		}
	}
	var out []api.Endpoint
	for _, v := range in.Status.VNICs {
		if v.IP == "" {
			continue
		}
		meta := map[string]string{"service": in.Service, "generation": strconv.FormatInt(in.Generation, 10),
			"node": in.Node, "network": v.Network}
		if spec != nil {
			for k, val := range spec.Meta {
				meta[k] = val
			}
		}
		ep := api.Endpoint{Service: in.Service, ID: in.ID, Address: v.IP, Port: first, Network: v.Network,
			Node: in.Node, Health: health, Meta: meta}
		if len(ports) > 0 {
			ep.Ports = ports
		}
		out = append(out, ep)
	}
	return out
}

// discoveryFilter is what a discovery request asks for.
type discoveryFilter struct {
	healthy bool
	network string
	meta    map[string]string
}

func parseDiscoveryFilter(q url.Values) (discoveryFilter, error) {
	f := discoveryFilter{healthy: isTrue(q.Get("healthy")), network: q.Get("network")}
	for _, m := range q["meta"] {
		k, v, ok := strings.Cut(m, ":")
		if !ok || k == "" {
			return f, invalid("discovery", api.FieldErrors{{Field: "meta", Reason: fmt.Sprintf("%q: expected key:value", m)}})
		}
		if f.meta == nil {
			f.meta = map[string]string{}
		}
		f.meta[k] = v
	}
	return f, nil
}

// isTrue is a boolean query parameter's value, as boolParam reads it.
func isTrue(v string) bool { return v == "1" || v == "true" || v == "yes" }

func (f discoveryFilter) keep(ep api.Endpoint) bool {
	if f.healthy && ep.Health == api.HealthCritical {
		return false
	}
	if f.network != "" && !ep.External && ep.Network != f.network {
		return false
	}
	for k, v := range f.meta {
		if ep.Meta[k] != v {
			return false
		}
	}
	return true
}

// key names the filter: equal keys keep the same endpoints ("" keeps all).
func (f discoveryFilter) key() string {
	switch {
	case !f.healthy && f.network == "" && len(f.meta) == 0:
		return ""
	case len(f.meta) == 0 && f.network == "":
		return "h\x00" // the usual one: healthy only
	}
	var b strings.Builder
	if f.healthy {
		b.WriteString("h")
	}
	b.WriteString("\x00")
	b.WriteString(f.network)
	for _, k := range slices.Sorted(maps.Keys(f.meta)) {
		b.WriteString("\x00")
		b.WriteString(k)
		b.WriteString("=")
		b.WriteString(f.meta[k])
	}
	return b.String()
}

// endpointKey identifies an endpoint within a service's view.
func endpointKey(ep api.Endpoint) string { return ep.ID + "@" + ep.Network }

// filtered is the view of a service's endpoints that f keeps, and the
// revision of the cache it is current at.
func (s *Server) filtered(service string, f discoveryFilter) (*view, int64) {
	x := s.index()
	x.sync(s.cache)
	x.mu.RLock()
	snap, rev := x.current(service)
	x.mu.RUnlock()
	return snap.filtered(f, f.key()), rev
}

// list is a service's endpoints that f keeps, sorted by key (shared: not to
// be modified), and the revision of the cache they are current at.
func (s *Server) list(service string, f discoveryFilter) ([]api.Endpoint, int64) {
	v, rev := s.filtered(service, f)
	return v.eps, rev
}

// discover answers GET /v1/discovery/{name}: the service's endpoints, or
// with ?watch=1 a stream of the view's changes (put for an endpoint added
// or changed, delete for one gone), resumable by revision.
func (s *Server) discover(w http.ResponseWriter, r *http.Request) error {
	name := r.PathValue("name")
	if why := api.ValidName(name); why != "" {
		return invalid("discovery", api.FieldErrors{{Field: "service", Reason: why}})
	}
	q := r.URL.Query()
	f, err := parseDiscoveryFilter(q)
	if err != nil {
		return err
	}
	select {
	case <-s.cache.Ready():
	case <-r.Context().Done():
		return r.Context().Err()
	}
	if !isTrue(q.Get("watch")) {
		v, rev := s.filtered(name, f)
		writeList(w, v, rev)
		return nil
	}
	return s.watchDiscovery(w, r, q, name, f)
}

// watchDiscovery streams the changes of a service's view. The stream waits
// on the service's own channel, closed by its changes only; after one, the
// lines that take a stream from the view it last sent to the new one are
// rendered once and written by every stream that makes the same step.
func (s *Server) watchDiscovery(w http.ResponseWriter, r *http.Request, q url.Values, name string, f discoveryFilter) error {
	ctx := r.Context()
	flusher, _ := w.(http.Flusher)
	if v := q.Get("revision"); v != "" {
		from, err := strconv.ParseInt(v, 10, 64)
		if err != nil || from < 0 {
			return invalid("watch", api.FieldErrors{{Field: "revision", Reason: "must be a non-negative integer"}})
		}
		// A client resuming holds the view as of its revision: the first
		// diff is against an empty view, so it gets every endpoint again
		// as a put and reconciles (puts are idempotent).
		if _, _, _, err := s.cache.Since(from, keyInstances); err != nil {
			return err
		}
	}
	w.Header().Set("Content-Type", "application/x-ndjson")
	w.WriteHeader(http.StatusOK)
	x := s.index()
	release := x.watch(s.cache, name)
	defer release()
	x.sync(s.cache)
	write := func(b []byte) bool {
		if _, err := w.Write(b); err != nil {
			return false
		}
		if flusher != nil {
			flusher.Flush()
		}
		return true
	}
	fkey := f.key()
	tick := time.NewTicker(bookmarkEvery)
	defer tick.Stop()
	var (
		prev *view
		snap *snapshot
		bm   []byte
	)
	for {
		wait, cur, rev := x.changes(name)
		if cur != snap {
			// A new snapshot of the service: what the filter keeps may or
			// may not differ; a bookmark goes out either way.
			v := cur.filtered(f, fkey)
			if !write(v.linesFrom(prev, rev)) {
				return nil
			}
			prev, snap = v, cur
		}
		select {
		case <-ctx.Done():
			return nil
		case <-wait:
		case <-tick.C:
			bm = appendBookmark(bm[:0], x.revision())
			if !write(bm) {
				return nil
			}
		}
	}
}

// Endpoints is the DNS server's source: every endpoint of a service, sorted
// by key (the DNS handler keeps the healthy ones), and whether the service
// exists. It answers from the cache as it is when called, in O(1) unless
// the service changed since the last lookup. The slice is shared: callers
// must not modify it.
func (s *Server) Endpoints(service string) ([]api.Endpoint, bool) {
	eps, known, _ := s.EndpointsAt(service)
	return eps, known
}

// EndpointsAt is Endpoints and the revision of the service's last change:
// equal revisions of a service mean equal endpoints, so the DNS server
// can keep what it makes of them until the revision moves.
func (s *Server) EndpointsAt(service string) ([]api.Endpoint, bool, int64) {
	eps, known, changed, _ := s.index().lookup(s.cache, service)
	return eps, known, changed
}
