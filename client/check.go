package client

import (
	"context"
	"net/http"

	"github.com/berth-dev/berth/api"
)

// UpdateCheck feeds the TTL check of a running instance (a service spec's
// check: {ttl: ...}): the state holds until the TTL runs out without another
// update, then the check turns critical. It returns the instance once its
// status carries the state, so discovery sees it on the next read. A probed
// check (http, tcp, exec) or an instance that is not running is refused
// with a 409.
func (c *Client) UpdateCheck(ctx context.Context, id string, u api.CheckUpdate) (api.Instance, error) {
	var in api.Instance
	return in, c.do(ctx, http.MethodPut, "/v1/instances/"+pe(id)+"/check", u, &in)
}
