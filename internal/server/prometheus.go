package server

import (
	"fmt"
	"net"
	"net/http"
	"sort"
	"strconv"
	"strings"

	"github.com/berth-dev/berth/api"
)

// targetGroup is one group of Prometheus's HTTP service discovery format
// (http_sd_configs): targets and the labels they share.
type targetGroup struct {
	Targets []string          `json:"targets"`
	Labels  map[string]string `json:"labels"`
}

// Labels of Prometheus targets. Like every __meta_ label they are there for
// relabeling and dropped after it.
const (
	promLabelPrefix   = "__meta_berth_"
	promLabelService  = promLabelPrefix + "service"
	promLabelInstance = promLabelPrefix + "instance"
	promLabelNode     = promLabelPrefix + "node"
	promLabelNetwork  = promLabelPrefix + "network"
	promLabelHealth   = promLabelPrefix + "health"
	promLabelExternal = promLabelPrefix + "external"
	promLabelPortName = promLabelPrefix + "port_name"
	promLabelMeta     = promLabelPrefix + "meta_"
)

// promFilter is what a targets request asks for.
type promFilter struct {
	service string // one service; all when empty
	healthy bool   // leave out critical endpoints
	port    string // the named port to scrape; the endpoint's first when empty
}

func parsePromFilter(r *http.Request) (promFilter, error) {
	q := r.URL.Query()
	f := promFilter{service: q.Get("service"), port: q.Get("port")}
	var fe api.FieldErrors
	if q.Has("service") {
		if why := api.ValidName(f.service); why != "" {
			fe = append(fe, api.FieldError{Field: "service", Reason: why})
		}
	}
	if q.Has("port") {
		if why := api.ValidName(f.port); why != "" {
			fe = append(fe, api.FieldError{Field: "port", Reason: why})
		}
	}
	switch v := q.Get("healthy"); v {
	case "", "0", "false", "no":
	case "1", "true", "yes":
		f.healthy = true
	default:
		fe = append(fe, api.FieldError{Field: "healthy", Reason: fmt.Sprintf("%q is not a boolean: use 1 or 0", v)})
	}
	if len(fe) > 0 {
		return f, invalid("targets request", fe)
	}
	return f, nil
}

// prometheusTargets answers GET /v1/prometheus/targets in Prometheus's HTTP
// service discovery format: one target group per endpoint of every service
// (or of ?service=), orchestrated instances on each of their networks and
// external registrations alike, with ?healthy=1 only those not critical, at
// the endpoint's first port or its port named by ?port= (endpoints without
// it are left out, as are those with no port at all).
func (s *Server) prometheusTargets(w http.ResponseWriter, r *http.Request) error {
	f, err := parsePromFilter(r)
	if err != nil {
		return err
	}
	select {
	case <-s.cache.Ready():
	case <-r.Context().Done():
		return r.Context().Err()
	}
	idx := s.index()
	names := []string{f.service}
	if f.service == "" {
		names = idx.serviceNames(s.cache)
	}
	groups := []targetGroup{} // never null: Prometheus wants a list
	for _, name := range names {
		eps, _, _, _ := idx.lookup(s.cache, name)
		for _, ep := range eps {
			if g, ok := targetGroupOf(ep, f); ok {
				groups = append(groups, g)
			}
		}
	}
	writeJSON(w, http.StatusOK, groups)
	return nil
}

// targetGroupOf is an endpoint as a target group, or false when f leaves it
// out or it has no port to scrape.
func targetGroupOf(ep api.Endpoint, f promFilter) (targetGroup, bool) {
	if f.healthy && ep.Health == api.HealthCritical {
		return targetGroup{}, false
	}
	port, portName := ep.Port, firstPortName(ep)
	if f.port != "" {
		p, ok := ep.Ports[f.port]
		if !ok {
			return targetGroup{}, false
		}
		port, portName = p, f.port
	}
	if port <= 0 || ep.Address == "" {
		return targetGroup{}, false
	}
	labels := map[string]string{
		promLabelService:  ep.Service,
		promLabelInstance: ep.ID,
		promLabelNode:     ep.Node,
		promLabelNetwork:  ep.Network,
		promLabelHealth:   ep.Health,
		promLabelExternal: strconv.FormatBool(ep.External),
		promLabelPortName: portName,
	}
	keys := make([]string, 0, len(ep.Meta))
	for k := range ep.Meta {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		// Keys that sanitise alike: the first in order wins.
		name := promLabelMeta + promLabelName(k)
		if _, taken := labels[name]; !taken {
			labels[name] = ep.Meta[k]
		}
	}
	return targetGroup{Targets: []string{net.JoinHostPort(ep.Address, strconv.Itoa(port))}, Labels: labels}, true
}

// firstPortName names the endpoint's Port among its Ports ("" when none
// does; the first name in order when several do).
func firstPortName(ep api.Endpoint) string {
	name := ""
	for n, p := range ep.Ports {
		if p == ep.Port && (name == "" || n < name) {
			name = n
		}
	}
	return name
}

// promLabelName makes s a valid Prometheus label name part: every
// character other than an ASCII letter, digit or underscore becomes an
// underscore. (Prefixed, a leading digit is fine.)
func promLabelName(s string) string {
	return strings.Map(func(r rune) rune {
		switch {
		case r >= 'a' && r <= 'z', r >= 'A' && r <= 'Z', r >= '0' && r <= '9', r == '_':
			return r
		}
		return '_'
	}, s)
}
