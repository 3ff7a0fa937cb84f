// Package daemon runs berth's long-lived processes: the server (store, API,
// controllers), the agent, and both together for `berth dev`. It owns their
// start-up order, readiness and graceful stop.
package daemon

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"sync"
	"time"

	"github.com/berth-dev/berth/client"
	"github.com/berth-dev/berth/internal/agent"
	"github.com/berth-dev/berth/internal/dns"
	"github.com/berth-dev/berth/internal/server"
	"github.com/berth-dev/berth/internal/store"
)

// ServerConfig configures a server process.
type ServerConfig struct {
	DataDir       string
	APIAddr       string
	EtcdEndpoints []string
	NodeTTL       time.Duration
	NodeDownGrace time.Duration
	// DNSAddr, when set, is where the server answers NAME.svc.berth.
	DNSAddr string
}

// AgentConfig configures an agent.
type AgentConfig struct {
	Server string // API address of a server
	agent.Config
}

// running is a started server with its HTTP listener.
type running struct {
	st     *store.Store
	srv    *server.Server
	http   *http.Server
	addr   string
	cancel context.CancelFunc // stops watch streams and controllers
	wg     sync.WaitGroup
	dns    *dns.Server
}

func startServer(ctx context.Context, cfg ServerConfig, log *slog.Logger) (*running, error) {
	st, err := store.Open(ctx, store.Config{DataDir: cfg.DataDir, Endpoints: cfg.EtcdEndpoints})
	if err != nil {
		return nil, err
	}
	ln, err := net.Listen("tcp", cfg.APIAddr)
	if err != nil {
		_ = st.Close()
		return nil, fmt.Errorf("API listen on %s: %w", cfg.APIAddr, err)
	}
	rctx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	host, _ := os.Hostname()
	srv := server.New(st, log, server.Options{DefaultNodeTTL: cfg.NodeTTL, NodeDownGrace: cfg.NodeDownGrace, ID: host + "/" + ln.Addr().String()})
	r := &running{st: st, srv: srv, addr: ln.Addr().String(), cancel: cancel,
		http: &http.Server{Handler: srv.Handler(), BaseContext: func(net.Listener) context.Context { return rctx },
			ReadHeaderTimeout: 10 * time.Second}}
	r.wg.Add(2)
	go func() {
		defer r.wg.Done()
		if err := r.http.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			log.Error("API server stopped", "err", err)
		}
	}()
	go func() {
		defer r.wg.Done()
		_ = srv.Run(rctx)
	}()
	select {
	case <-srv.Ready():
	case <-ctx.Done():
		r.stop(log)
		return nil, ctx.Err()
	}
	if cfg.DNSAddr != "" {
		d, err := dns.Start(rctx, dns.Config{Addr: cfg.DNSAddr}, srv)
		if err != nil {
			r.stop(log)
			return nil, fmt.Errorf("DNS on %s: %w", cfg.DNSAddr, err)
		}
		r.dns = d
	}
	return r, nil
}

func (r *running) stop(log *slog.Logger) {
	if r.dns != nil {
		_ = r.dns.Close()
	}
	r.cancel()
	sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := r.http.Shutdown(sctx); err != nil {
		log.Warn("API shutdown", "err", err)
	}
	r.wg.Wait()
	if err := r.st.Close(); err != nil {
		log.Warn("store close", "err", err)
	}
}

// RunServer runs a server until ctx ends.
func RunServer(ctx context.Context, cfg ServerConfig, out io.Writer, log *slog.Logger) error {
	start := time.Now()
	r, err := startServer(ctx, cfg, log)
	if err != nil {
		return err
	}
	fmt.Fprintf(out, "berth server: API listening on http://%s\n", r.addr)
	if r.dns != nil {
		fmt.Fprintf(out, "berth server: DNS for svc.berth on %s\n", r.dns.Addr())
	}
	fmt.Fprintf(out, "berth server: ready in %v\n", time.Since(start).Round(time.Millisecond))
	<-ctx.Done()
	log.Info("stopping")
	r.stop(log)
	return nil
}

// RunAgent runs an agent until ctx ends.
func RunAgent(ctx context.Context, cfg AgentConfig, out io.Writer, log *slog.Logger) error {
	c, err := client.New(cfg.Server)
	if err != nil {
		return err
	}
	a, err := agent.New(c, cfg.Config, log)
	if err != nil {
		return err
	}
	done := make(chan error, 1)
	go func() { done <- a.Run(ctx) }()
	select {
	case <-a.Ready():
		fmt.Fprintf(out, "berth agent: node %s registered with %s\n", a.Name(), c.Addr())
	case err := <-done:
		return err
	}
	return <-done
}

// RunDev runs a server with an embedded etcd and an agent for this machine
// in one process until ctx ends.
func RunDev(ctx context.Context, scfg ServerConfig, acfg agent.Config, out io.Writer, log *slog.Logger) error {
	start := time.Now()
	r, err := startServer(ctx, scfg, log)
	if err != nil {
		return err
	}
	fmt.Fprintf(out, "berth dev: API listening on http://%s\n", r.addr)
	if r.dns != nil {
		fmt.Fprintf(out, "berth dev: DNS for svc.berth on %s\n", r.dns.Addr())
	}
	c, err := client.New(r.addr)
	if err != nil {
		r.stop(log)
		return err
	}
	a, err := agent.New(c, acfg, log)
	if err != nil {
		r.stop(log)
		return err
	}
	actx, acancel := context.WithCancel(ctx)
	defer acancel()
	done := make(chan error, 1)
	go func() { done <- a.Run(actx) }()
	var runErr error
	select {
	case <-a.Ready():
		fmt.Fprintf(out, "berth dev: node %s ready\n", a.Name())
		fmt.Fprintf(out, "berth dev: ready in %v\n", time.Since(start).Round(time.Millisecond))
		<-ctx.Done()
		log.Info("stopping")
		acancel()
		runErr = <-done
	case runErr = <-done:
	}
	r.stop(log)
	return runErr
}
