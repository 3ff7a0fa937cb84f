package agent

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"sync"

	"github.com/berth-dev/berth/api"
	"github.com/berth-dev/berth/internal/health"
)

// ttlChecks are the health monitors of this node's running instances, by
// instance id, so that a TTL check can be fed through the agent's endpoint.
// The zero value is ready to use.
type ttlChecks struct {
	mu   sync.Mutex
	mons map[string]*health.Monitor
}

// set records the monitor now running an instance's check; nil forgets it.
func (c *ttlChecks) set(id string, m *health.Monitor) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if m == nil {
		delete(c.mons, id)
		return
	}
	if c.mons == nil {
		c.mons = map[string]*health.Monitor{}
	}
	c.mons[id] = m
}

func (c *ttlChecks) get(id string) *health.Monitor {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.mons[id]
}

// serveCheck answers PUT /v1/agent/instances/{id}/check (which the server
// forwards): it sets the state of the instance's TTL check, which reports
// a change to the instance's status at once. It answers with the check's
// state and output; 404 when this node has no such container, 409 when it
// is not running, has no check, or its check is probed rather than fed.
func (a *Agent) serveCheck(w http.ResponseWriter, r *http.Request) {
	id := r.PathValue("id")
	var u api.CheckUpdate
	dec := json.NewDecoder(io.LimitReader(r.Body, 64<<10))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&u); err != nil {
		agentError(w, http.StatusBadRequest, api.CodeInvalid, "check update: "+err.Error())
		return
	}
	switch u.State {
	case api.HealthPassing, api.HealthWarning, api.HealthCritical:
	default:
		agentError(w, http.StatusBadRequest, api.CodeInvalid,
			fmt.Sprintf("state: %q is not a health state: passing, warning or critical", u.State))
		return
	}
	mon := a.checks.get(id)
	if mon == nil {
		st, err := a.rt.Inspect(r.Context(), id)
		switch {
		case err != nil:
			runtimeError(w, err)
		case !st.Running:
			agentError(w, http.StatusConflict, api.CodeConflict, fmt.Sprintf("instance %s is not running", id))
		default:
			agentError(w, http.StatusConflict, api.CodeConflict, fmt.Sprintf("instance %s has no health check running", id))
		}
		return
	}
	if err := mon.TTLUpdate(u.State, u.Output); errors.Is(err, health.ErrNotTTL) {
		agentError(w, http.StatusConflict, api.CodeConflict, fmt.Sprintf("the check of instance %s is %v", id, err))
		return
	} else if err != nil {
		agentError(w, http.StatusBadRequest, api.CodeInvalid, "state: "+err.Error())
		return
	}
	state, output := mon.State()
	writeJSON(w, api.CheckUpdate{State: state, Output: output})
}
