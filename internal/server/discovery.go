package server

import (
	"encoding/json"
	"fmt"
	"net/http"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/berth-dev/berth/api"
	"github.com/berth-dev/berth/internal/cache"
	"github.com/berth-dev/berth/internal/store"
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

func registrationEndpoint(r api.Registration) api.Endpoint {
	ep := api.Endpoint{Service: r.Service, ID: r.ID, Address: r.Address, Port: r.Port, Health: r.Health,
		Meta: r.RegistrationSpec.Meta, External: true}
	if len(r.Ports) > 0 {
		ep.Ports = r.Ports
	}
	return ep
}

// discoveryFilter is what a discovery request asks for.
type discoveryFilter struct {
	healthy bool
	network string
	meta    map[string]string
}

func parseDiscoveryFilter(r *http.Request) (discoveryFilter, error) {
	q := r.URL.Query()
	f := discoveryFilter{healthy: boolParam(r, "healthy"), network: q.Get("network"), meta: map[string]string{}}
	for _, m := range q["meta"] {
		k, v, ok := strings.Cut(m, ":")
		if !ok || k == "" {
			return f, invalid("discovery", api.FieldErrors{{Field: "meta", Reason: fmt.Sprintf("%q: expected key:value", m)}})
		}
		f.meta[k] = v
	}
	return f, nil
}

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

// endpointKey identifies an endpoint within a service's view.
func endpointKey(ep api.Endpoint) string { return ep.ID + "@" + ep.Network }

// view computes a service's endpoints from the cache, keyed and filtered.
func (s *Server) view(service string, f discoveryFilter) (map[string]api.Endpoint, int64) {
	out := map[string]api.Endpoint{}
	svcs, _ := s.cache.Snapshot(keyServices + service)
	var spec *api.ServiceSpec
	for _, ev := range svcs {
		var svc api.Service
		if ev.Key == keyServices+service && json.Unmarshal(ev.Value, &svc) == nil {
			spec = &svc.Spec
		}
	}
	ins, rev := s.cache.Snapshot(keyInstances + service + "-")
	for _, ev := range ins {
		var in api.Instance
		if json.Unmarshal(ev.Value, &in) != nil || in.Service != service {
			continue
		}
		for _, ep := range instanceEndpoints(in, spec) {
			if f.keep(ep) {
				out[endpointKey(ep)] = ep
			}
		}
	}
	regs, rrev := s.cache.Snapshot(keyRegistrations + service + "/")
	for _, ev := range regs {
		var r api.Registration
		if json.Unmarshal(ev.Value, &r) == nil {
			if ep := registrationEndpoint(r); f.keep(ep) {
				out[endpointKey(ep)] = ep
			}
		}
	}
	return out, max(rev, rrev)
}

func sortedEndpoints(m map[string]api.Endpoint) []api.Endpoint {
	out := make([]api.Endpoint, 0, len(m))
	for _, ep := range m {
		out = append(out, ep)
	}
	sort.Slice(out, func(i, j int) bool { return endpointKey(out[i]) < endpointKey(out[j]) })
	return out
}

// discover answers GET /v1/discovery/{name}: the service's endpoints, or
// with ?watch=1 a stream of the view's changes (put for an endpoint added
// or changed, delete for one gone), resumable by revision.
func (s *Server) discover(w http.ResponseWriter, r *http.Request) error {
	name := r.PathValue("name")
	if why := api.ValidName(name); why != "" {
		return invalid("discovery", api.FieldErrors{{Field: "service", Reason: why}})
	}
	f, err := parseDiscoveryFilter(r)
	if err != nil {
		return err
	}
	select {
	case <-s.cache.Ready():
	case <-r.Context().Done():
		return r.Context().Err()
	}
	if !boolParam(r, "watch") {
		view, rev := s.view(name, f)
		writeJSON(w, http.StatusOK, api.List[api.Endpoint]{Items: sortedEndpoints(view), Revision: rev})
		return nil
	}
	return s.watchDiscovery(w, r, name, f)
}

func (s *Server) watchDiscovery(w http.ResponseWriter, r *http.Request, name string, f discoveryFilter) error {
	ctx := r.Context()
	flusher, _ := w.(http.Flusher)
	cursor := s.cache.Revision()
	var prev map[string]api.Endpoint
	if v := r.URL.Query().Get("revision"); v != "" {
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
	enc := json.NewEncoder(w)
	emit := func(cur map[string]api.Endpoint, rev int64) bool {
		for _, ep := range sortedEndpoints(cur) {
			old, ok := prev[endpointKey(ep)]
			if ok && endpointEqual(old, ep) {
				continue
			}
			b, _ := json.Marshal(ep)
			if enc.Encode(api.Event{Type: api.EventPut, Kind: "endpoint", Name: endpointKey(ep), Revision: rev, Object: b}) != nil {
				return false
			}
		}
		for k, ep := range prev {
			if _, ok := cur[k]; !ok {
				b, _ := json.Marshal(ep)
				if enc.Encode(api.Event{Type: api.EventDelete, Kind: "endpoint", Name: k, Revision: rev, Object: b}) != nil {
					return false
				}
			}
		}
		prev = cur
		if enc.Encode(api.Event{Type: api.EventBookmark, Revision: rev}) != nil {
			return false
		}
		if flusher != nil {
			flusher.Flush()
		}
		return true
	}
	cur, _ := s.view(name, f)
	if !emit(cur, cursor) {
		return nil
	}
	tick := time.NewTicker(bookmarkEvery)
	defer tick.Stop()
	for {
		evs, next, wait, err := s.cache.Since(cursor, store.Prefix)
		if err != nil {
			_ = enc.Encode(api.Event{Type: api.EventError, Revision: cursor, Error: apiError(http.StatusGone, api.CodeGone, "%v", err)})
			return nil
		}
		cursor = next
		if touches(evs, name) {
			cur, _ := s.view(name, f)
			if !emit(cur, cursor) {
				return nil
			}
		}
		select {
		case <-ctx.Done():
			return nil
		case <-wait:
		case <-tick.C:
			if enc.Encode(api.Event{Type: api.EventBookmark, Revision: cursor}) != nil {
				return nil
			}
			if flusher != nil {
				flusher.Flush()
			}
		}
	}
}

// touches reports whether events concern a service's endpoints.
func touches(evs []cache.Event, service string) bool {
	for _, e := range evs {
		if strings.HasPrefix(e.Key, keyInstances+service+"-") || strings.HasPrefix(e.Key, keyRegistrations+service+"/") ||
			e.Key == keyServices+service {
			return true
		}
	}
	return false
}

func endpointEqual(a, b api.Endpoint) bool {
	ja, _ := json.Marshal(a)
	jb, _ := json.Marshal(b)
	return string(ja) == string(jb)
}

// Endpoints is the DNS server's source: every endpoint of a service (the
// DNS handler keeps the healthy ones), and whether the service exists.
func (s *Server) Endpoints(service string) ([]api.Endpoint, bool) {
	view, _ := s.view(service, discoveryFilter{})
	known := len(view) > 0
	if !known {
		svcs, _ := s.cache.Snapshot(keyServices + service)
		for _, ev := range svcs {
			if ev.Key == keyServices+service {
				known = true
			}
		}
	}
	return sortedEndpoints(view), known
}
