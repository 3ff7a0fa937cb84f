package api

// MaxCheckOutput bounds a check update's output.
const MaxCheckOutput = 4096

// CheckUpdate is the body of PUT /v1/instances/{id}/check: the new state of
// an instance's TTL check (HealthPassing, HealthWarning or HealthCritical)
// and what to say about it. The agent of the instance's node takes the same
// body.
type CheckUpdate struct {
	State  string `json:"state"`
	Output string `json:"output,omitempty"`
}

// Validate names the field of every error.
func (u *CheckUpdate) Validate() error {
	var e errs
	switch u.State {
	case HealthPassing, HealthWarning, HealthCritical:
	case "":
		e.add("state", "is required: passing, warning or critical")
	default:
		e.add("state", "%q is not a health state: passing, warning or critical", u.State)
	}
	if len(u.Output) > MaxCheckOutput {
		e.add("output", "must be at most %d bytes, not %d", MaxCheckOutput, len(u.Output))
	}
	return e.err()
}
