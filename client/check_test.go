package client

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"testing"

	"github.com/berth-dev/berth/api"
)

func TestUpdateCheck(t *testing.T) {
	ts := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		var u api.CheckUpdate
		if r.Method != http.MethodPut || json.Unmarshal(b, &u) != nil {
			http.Error(w, "bad", http.StatusBadRequest)
			return
		}
		w.Header().Set("Content-Type", "application/json")
		switch r.URL.EscapedPath() {
		case "/v1/instances/web-a/check":
			_ = json.NewEncoder(w).Encode(api.Instance{ID: "web-a", Status: api.InstanceStatus{Health: u.State}})
		default:
			w.WriteHeader(http.StatusConflict)
			_ = json.NewEncoder(w).Encode(api.Error{Status: 409, Code: api.CodeConflict, Message: "not a TTL check"})
		}
	}))
	defer ts.Close()
	c, err := New(ts.URL)
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		id, state string
		status    int // 0: success
	}{
		{"web-a", api.HealthPassing, 0},
		{"web-a", api.HealthWarning, 0},
		{"web-b", api.HealthPassing, http.StatusConflict},
	}
	for _, tc := range tests {
		in, err := c.UpdateCheck(context.Background(), tc.id, api.CheckUpdate{State: tc.state, Output: "x"})
		if tc.status != 0 {
			var ae *api.Error
			if !errors.As(err, &ae) || ae.Status != tc.status || ae.Message != "not a TTL check" {
				t.Fatalf("%s: error %v, want the API's %d", tc.id, err, tc.status)
			}
			continue
		}
		if err != nil || in.ID != tc.id || in.Status.Health != tc.state {
			t.Fatalf("%s %s: %+v %v", tc.id, tc.state, in, err)
		}
	}
}
