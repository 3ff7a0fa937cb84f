package client

import (
	"context"
	"net/http"

	"github.com/berth-dev/berth/api"
)

// PutInstanceStatuses reports many instances' statuses in one request (at
// most api.MaxStatusBatch). Items the server could not record carry an
// error in the result.
func (c *Client) PutInstanceStatuses(ctx context.Context, items []api.InstanceStatusUpdate) (api.InstanceStatusBatchResult, error) {
	var out api.InstanceStatusBatchResult
	return out, c.do(ctx, http.MethodPut, "/v1/instances/status", api.InstanceStatusBatch{Items: items}, &out)
}
