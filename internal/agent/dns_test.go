package agent

import (
	"context"
	"testing"
	"time"

	"github.com/berth-dev/berth/api"
)

// TestAPISourceFollowsChanges: the gateway DNS's source answers from a
// watch: a registration that becomes critical, or goes, leaves the answer
// as soon as the server knows, with no cache to expire; unknown services
// are unknown.
func TestAPISourceFollowsChanges(t *testing.T) {
	c, _ := startServer(t, testLog(t), nil)
	ctx := context.Background()
	src := &apiSource{c: c, cache: map[string]sourceEntry{}}
	defer src.close()
	if eps, known := src.Endpoints("nope"); known || len(eps) != 0 {
		t.Fatalf("unknown service: %v %v", eps, known)
	}
	reg := func(id, health string) {
		t.Helper()
		if _, err := c.Register(ctx, "db", id, api.RegistrationSpec{Address: "192.0.2.10", Port: 5432, TTL: api.Duration(time.Minute), Health: health}); err != nil {
			t.Fatal(err)
		}
	}
	reg("a", api.HealthPassing)
	reg("b", api.HealthPassing)
	ids := func() map[string]bool {
		eps, _ := src.Endpoints("db")
		m := map[string]bool{}
		for _, ep := range eps {
			m[ep.ID] = true
		}
		return m
	}
	eventually(t, 500*time.Millisecond, "a and b answered", func() bool { got := ids(); return got["a"] && got["b"] })
	reg("b", api.HealthCritical)
	eventually(t, 500*time.Millisecond, "b leaves the answer when critical", func() bool { got := ids(); return got["a"] && !got["b"] })
	if err := c.Deregister(ctx, "db", "a"); err != nil {
		t.Fatal(err)
	}
	eventually(t, 500*time.Millisecond, "a leaves the answer when deregistered", func() bool { return len(ids()) == 0 })
}
