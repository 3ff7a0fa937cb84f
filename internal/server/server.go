// Package server is berth's control plane: the HTTP+JSON API under /v1/,
// validation of every write, storage through the store, watch streams fanned
// out from one cache, and the controllers (node liveness for now) that run on
// the one server elected leader.
package server

import (
	"context"
	"fmt"
	"log/slog"
	"net/http"
	"os"
	"sync"
	"time"

	"go.etcd.io/etcd/client/v3/concurrency"

	"github.com/berth-dev/berth/api"
	"github.com/berth-dev/berth/internal/cache"
	"github.com/berth-dev/berth/internal/store"
)

// Keys of the objects in the store.
const (
	keyNodes         = store.Prefix + "nodes/"
	keyNodeLeases    = store.Prefix + "nodeleases/"
	keyNetworks      = store.Prefix + "networks/"
	keyNetworksIndex = store.Prefix + "index/networks"
	keyServices      = store.Prefix + "services/"
	keyInstances     = store.Prefix + "instances/"
	keyRegistrations = store.Prefix + "registrations/"
	keyElection      = store.Prefix + "election/controllers"
)

// Options tune a server.
type Options struct {
	// DefaultNodeTTL is a node's lease when its agent does not ask for one.
	DefaultNodeTTL time.Duration
	// NodeDownGrace is how long a node may be down before its instances
	// are replaced on other nodes.
	NodeDownGrace time.Duration
	// NoDeployments leaves services' instances alone (tests of the API
	// that need a quiet store).
	NoDeployments bool
	deployments   bool // tests: keep deployments on in the API test harness
	// ID names this server in the leader election; it must be stable
	// across restarts and unique among servers (host name and API address).
	ID string
}

// Server serves the API over a store.
type Server struct {
	st    *store.Store
	cache *cache.Cache
	log   *slog.Logger
	opts  Options

	hbMu       sync.Mutex
	heartbeats map[string]time.Time // last heartbeat seen by this server, per node

	regIndex *registryIndex // discovery's per-service view of the cache
	leases   *leasePool     // registrations' leases, granted ahead of time
}

// New returns a server over st. Run must be called to fill its cache and
// run its controllers.
func New(st *store.Store, log *slog.Logger, opts Options) *Server {
	if opts.DefaultNodeTTL == 0 {
		opts.DefaultNodeTTL = 10 * time.Second
	}
	if opts.NodeDownGrace == 0 {
		opts.NodeDownGrace = 5 * time.Second
	}
	if opts.ID == "" {
		h, _ := os.Hostname()
		opts.ID = fmt.Sprintf("%s-%d", h, os.Getpid())
	}
	return &Server{st: st, cache: cache.New(st, store.Prefix, log), log: log, opts: opts,
		heartbeats: map[string]time.Time{}, regIndex: &registryIndex{}, leases: newLeasePool(st, log)}
}

// Ready is closed once the server can answer watches.
func (s *Server) Ready() <-chan struct{} { return s.cache.Ready() }

// Run fills the cache and, while this server is the elected leader, runs the
// controllers. It returns when ctx ends.
func (s *Server) Run(ctx context.Context) error {
	s.ensureDefaultNetwork(ctx)
	var wg sync.WaitGroup
	wg.Add(2)
	go func() {
		defer wg.Done()
		_ = s.cache.Run(ctx)
	}()
	go func() {
		defer wg.Done()
		s.lead(ctx)
	}()
	wg.Wait()
	s.leases.close()
	return nil
}

// lead campaigns for leadership and runs the controllers while it holds it.
func (s *Server) lead(ctx context.Context) {
	for ctx.Err() == nil {
		sess, err := concurrency.NewSession(s.st.Client(), concurrency.WithTTL(5), concurrency.WithContext(ctx))
		if err != nil {
			s.log.Warn("election: session failed", "err", err)
			if !sleepCtx(ctx, time.Second) {
				return
			}
			continue
		}
		s.dropStaleCandidacy(ctx, int64(sess.Lease()))
		el := concurrency.NewElection(sess, keyElection)
		if err := el.Campaign(ctx, s.opts.ID); err != nil {
			_ = sess.Close()
			if ctx.Err() == nil {
				s.log.Warn("election: campaign failed", "err", err)
				sleepCtx(ctx, time.Second)
			}
			continue
		}
		s.log.Info("leading the controllers", "server", s.opts.ID)
		lctx, cancel := context.WithCancel(ctx)
		done := make(chan struct{})
		go func() {
			defer close(done)
			s.runControllers(lctx)
		}()
		select {
		case <-ctx.Done():
		case <-sess.Done():
			s.log.Warn("election: lost the session; stepping down")
		}
		cancel()
		<-done
		rctx, rcancel := context.WithTimeout(context.WithoutCancel(ctx), 2*time.Second)
		_ = el.Resign(rctx)
		rcancel()
		_ = sess.Close()
	}
}

// dropStaleCandidacy revokes election entries left under this server's ID by
// an earlier run of it that was killed, so that a restart leads at once
// instead of waiting for the dead run's session to expire.
func (s *Server) dropStaleCandidacy(ctx context.Context, own int64) {
	kvs, _, err := s.st.List(ctx, keyElection+"/")
	if err != nil {
		return
	}
	for _, kv := range kvs {
		if string(kv.Value) == s.opts.ID && kv.Lease != 0 && kv.Lease != own {
			s.log.Info("election: dropping this server's stale candidacy", "lease", kv.Lease)
			_ = s.st.Revoke(ctx, kv.Lease)
		}
	}
}

func (s *Server) runControllers(ctx context.Context) {
	select {
	case <-s.cache.Ready():
	case <-ctx.Done():
		return
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		if !s.opts.NoDeployments {
			s.runDeployments(ctx)
		}
	}()
	s.runNodeLiveness(ctx)
	<-done
}

func sleepCtx(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-ctx.Done():
		return false
	}
}

// Handler returns the API's HTTP handler.
func (s *Server) Handler() http.Handler {
	mux := http.NewServeMux()
	h := func(pattern string, fn func(http.ResponseWriter, *http.Request) error) {
		mux.HandleFunc(pattern, func(w http.ResponseWriter, r *http.Request) {
			if err := fn(w, r); err != nil {
				s.fail(w, r, err)
			}
		})
	}
	h("GET /v1/health", s.health)

	h("GET /v1/nodes", s.listNodes)
	h("GET /v1/nodes/{name}", s.getNode)
	h("PUT /v1/nodes/{name}", s.registerNode)
	h("POST /v1/nodes/{name}/heartbeat", s.heartbeat)
	h("DELETE /v1/nodes/{name}/lease", s.releaseNode)
	h("DELETE /v1/nodes/{name}", s.deleteNode)

	h("GET /v1/networks", s.listNetworks)
	h("GET /v1/networks/{name}", s.getNetwork)
	h("POST /v1/networks", s.createNetwork)
	h("DELETE /v1/networks/{name}", s.deleteNetwork)

	h("GET /v1/services", s.listServices)
	h("GET /v1/services/{name}", s.getService)
	h("POST /v1/services", s.applyService)
	h("PUT /v1/services/{name}", s.applyService)
	h("DELETE /v1/services/{name}", s.deleteService)

	h("GET /v1/instances", s.listInstances)
	h("GET /v1/instances/{id}", s.getInstance)
	h("PUT /v1/instances/{id}/status", s.putInstanceStatus)
	h("PUT /v1/instances/status", s.putInstanceStatuses)
	h("POST /v1/instances/{id}/stop", s.stopInstance)
	h("DELETE /v1/instances/{id}", s.removeInstance)
	h("GET /v1/instances/{id}/logs", s.proxyInstance("logs"))
	h("POST /v1/instances/{id}/exec", s.proxyInstance("exec"))
	h("PUT /v1/instances/{id}/check", s.putInstanceCheck)

	h("GET /v1/discovery/{name}", s.discover)
	h("GET /v1/prometheus/targets", s.prometheusTargets)

	h("GET /v1/images", s.listImages)
	h("POST /v1/images/import", s.importImage)
	h("POST /v1/images/pull", s.pullImage)
	h("DELETE /v1/images", s.removeImage)

	h("GET /v1/registry/services", s.listAllRegistrations)
	h("GET /v1/registry/services/{name}/instances", s.listRegistrations)
	h("GET /v1/registry/services/{name}/instances/{id}", s.getRegistration)
	h("PUT /v1/registry/services/{name}/instances/{id}", s.register)
	h("PUT /v1/registry/services/{name}/instances/{id}/renew", s.renew)
	h("DELETE /v1/registry/services/{name}/instances/{id}", s.deregister)

	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusNotFound, apiError(http.StatusNotFound, api.CodeNotFound, "no API endpoint %s %s", r.Method, r.URL.Path))
	})
	return logRequests(s.log, mux)
}

func (s *Server) health(w http.ResponseWriter, r *http.Request) error {
	select {
	case <-s.cache.Ready():
	default:
		return apiError(http.StatusServiceUnavailable, api.CodeInternal, "starting")
	}
	writeJSON(w, http.StatusOK, map[string]any{"status": "ok", "revision": s.cache.Revision()})
	return nil
}
