package client

import (
	"context"
	"net/http"
	"net/url"

	"github.com/berth-dev/berth/api"
)

// DiscoverOptions narrow a discovery.
type DiscoverOptions struct {
	Healthy bool              // only passing and warning endpoints
	Network string            // only endpoints on this network (external ones always)
	Meta    map[string]string // only endpoints with these metadata
}

// DiscoveryPath is the list path of a service's discovery view (for Watch).
func DiscoveryPath(service string, o DiscoverOptions) string {
	v := url.Values{}
	if o.Healthy {
		v.Set("healthy", "1")
	}
	if o.Network != "" {
		v.Set("network", o.Network)
	}
	for k, val := range o.Meta {
		v.Add("meta", k+":"+val)
	}
	p := "/v1/discovery/" + pe(service)
	if len(v) > 0 {
		p += "?" + v.Encode()
	}
	return p
}

// Discover lists a service's endpoints.
func (c *Client) Discover(ctx context.Context, service string, o DiscoverOptions) (api.List[api.Endpoint], error) {
	var l api.List[api.Endpoint]
	return l, c.do(ctx, http.MethodGet, DiscoveryPath(service, o), nil, &l)
}
