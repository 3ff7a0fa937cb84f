package api

import "fmt"

// MaxStatusBatch bounds the items of one InstanceStatusBatch.
const MaxStatusBatch = 1000

// InstanceStatusUpdate is an agent's report of one instance's status.
type InstanceStatusUpdate struct {
	ID     string         `json:"id"`
	Status InstanceStatus `json:"status"`
}

// InstanceStatusBatch reports the statuses of many instances in one request
// (PUT /v1/instances/status): what an agent with many instances, or a
// simulated node, sends instead of one request per instance.
type InstanceStatusBatch struct {
	Items []InstanceStatusUpdate `json:"items"`
}

// Validate checks every item; fields are named items[i].id and
// items[i].status.*.
func (b *InstanceStatusBatch) Validate() error {
	var e errs
	if len(b.Items) > MaxStatusBatch {
		e.add("items", "at most %d items per batch, got %d", MaxStatusBatch, len(b.Items))
	}
	seen := map[string]bool{}
	for i := range b.Items {
		it := &b.Items[i]
		f := fmt.Sprintf("items[%d]", i)
		switch {
		case it.ID == "":
			e.add(f+".id", "must not be empty")
		case seen[it.ID]:
			e.add(f+".id", "instance %q appears twice", it.ID)
		}
		seen[it.ID] = true
		if err := it.Status.Validate(); err != nil {
			if fe, ok := AsFieldErrors(err); ok {
				for _, x := range fe {
					e.add(f+"."+x.Field, "%s", x.Reason)
				}
			}
		}
	}
	return e.err()
}

// InstanceStatusResult is the outcome of one item of a batch: Error is
// empty when the status was recorded.
type InstanceStatusResult struct {
	ID    string `json:"id"`
	Error string `json:"error,omitempty"`
}

// InstanceStatusBatchResult answers an InstanceStatusBatch, item by item.
type InstanceStatusBatchResult struct {
	Results []InstanceStatusResult `json:"results"`
}
