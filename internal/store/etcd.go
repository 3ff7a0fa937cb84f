package store

import (
	"context"
	"fmt"
	"net/url"
	"os"
	"path/filepath"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/server/v3/embed"
	"go.etcd.io/etcd/server/v3/etcdserver/api/v3client"
	"go.uber.org/zap"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
)

// Config says which etcd to use.
type Config struct {
	// DataDir holds the embedded member's data (DataDir/etcd) and socket.
	DataDir string
	// Endpoints of an external etcd cluster; when set, nothing is embedded.
	Endpoints []string
	// DialTimeout bounds connecting to an external cluster.
	DialTimeout time.Duration
}

// Open starts the embedded single-member etcd (or connects to an external
// cluster) and returns a store over it.
func Open(ctx context.Context, cfg Config) (*Store, error) {
	if len(cfg.Endpoints) > 0 {
		return openExternal(ctx, cfg)
	}
	return openEmbedded(ctx, cfg)
}

func openExternal(ctx context.Context, cfg Config) (*Store, error) {
	if cfg.DialTimeout == 0 {
		cfg.DialTimeout = 5 * time.Second
	}
	cli, err := clientv3.New(clientv3.Config{
		Endpoints:   cfg.Endpoints,
		DialTimeout: cfg.DialTimeout,
		Logger:      zap.NewNop(),
		Context:     context.WithoutCancel(ctx),
	})
	if err != nil {
		return nil, fmt.Errorf("connect to etcd %v: %w", cfg.Endpoints, err)
	}
	sctx, cancel := context.WithTimeout(ctx, cfg.DialTimeout)
	defer cancel()
	if _, err := cli.Status(sctx, cfg.Endpoints[0]); err != nil {
		// Try the others before giving up: one member may be down.
		ok := false
		for _, ep := range cfg.Endpoints[1:] {
			if _, err2 := cli.Status(sctx, ep); err2 == nil {
				ok = true
				break
			}
		}
		if !ok {
			_ = cli.Close()
			return nil, fmt.Errorf("etcd %v does not answer: %w", cfg.Endpoints, err)
		}
	}
	return newStore(cli, cli, func() error { return cli.Close() }), nil
}

func openEmbedded(ctx context.Context, cfg Config) (*Store, error) {
	if cfg.DataDir == "" {
		return nil, fmt.Errorf("store: a data directory is required for the embedded etcd")
	}
	dir, err := filepath.Abs(cfg.DataDir)
	if err != nil {
		return nil, fmt.Errorf("store: data dir: %w", err)
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("store: create data dir: %w", err)
	}
	sock := filepath.Join(dir, "etcd.sock")
	if len(sock) > 100 {
		return nil, fmt.Errorf("store: data dir %q is too long for a unix socket path (keep it under 90 characters)", dir)
	}
	ec := embed.NewConfig()
	ec.Name = "berth"
	ec.Dir = filepath.Join(dir, "etcd")
	// etcd logs benign errors on every clean stop; berth reports real
	// failures itself. BERTH_ETCD_LOG_LEVEL=error (or debug) shows them.
	ec.LogLevel = "fatal"
	if lvl := os.Getenv("BERTH_ETCD_LOG_LEVEL"); lvl != "" {
		ec.LogLevel = lvl
	}
	ec.LogOutputs = []string{"stderr"}
	// One member: short raft timing makes start-up fast; nothing to elect against.
	ec.TickMs = 10
	ec.ElectionMs = 100
	ec.AutoCompactionMode = "periodic"
	ec.AutoCompactionRetention = "10m"
	ec.QuotaBackendBytes = 2 << 30
	// The raft log is kept in memory up to a snapshot; berth's batched
	// transactions are large, so snapshot sooner than etcd's 10,000
	// entries: with 128-write transactions that alone held ~1 GiB.
	ec.SnapshotCount = 2000
	ec.SnapshotCatchUpEntries = 500
	// The client listener is a unix socket in the data dir: nothing on the
	// network. The peer listener is required by etcd but never dialled by a
	// single member; it binds an ephemeral loopback port.
	cu := url.URL{Scheme: "unix", Path: sock}
	ec.ListenClientUrls = []url.URL{cu}
	ec.AdvertiseClientUrls = []url.URL{cu}
	pu := url.URL{Scheme: "http", Host: "127.0.0.1:0"}
	ec.ListenPeerUrls = []url.URL{pu}
	ec.AdvertisePeerUrls = []url.URL{pu}
	ec.InitialCluster = ec.InitialClusterFromName(ec.Name)
	ec.ListenMetricsUrls = nil

	e, err := embed.StartEtcd(ec)
	if err != nil {
		return nil, fmt.Errorf("store: start embedded etcd in %s: %w", ec.Dir, err)
	}
	select {
	case <-e.Server.ReadyNotify():
	case err := <-e.Err():
		e.Close()
		return nil, fmt.Errorf("store: embedded etcd failed: %w", err)
	case <-ctx.Done():
		e.Close()
		return nil, ctx.Err()
	case <-time.After(60 * time.Second):
		e.Close()
		return nil, fmt.Errorf("store: embedded etcd not ready after 60s")
	}
	// The in-process client serves reads, writes, transactions and leases;
	// watches go over the unix socket, because the in-process client's
	// watches can deadlock after many cancellations (etcd#18879).
	kv := v3client.New(e.Server)
	wc, err := clientv3.New(clientv3.Config{
		Endpoints:   []string{"unix://" + sock},
		DialTimeout: 5 * time.Second,
		Logger:      zap.NewNop(),
		DialOptions: []grpc.DialOption{grpc.WithTransportCredentials(insecure.NewCredentials())},
	})
	if err != nil {
		_ = kv.Close()
		e.Close()
		return nil, fmt.Errorf("store: watch client: %w", err)
	}
	closeFn := func() error {
		_ = wc.Close()
		_ = kv.Close()
		e.Close()
		return nil
	}
	return newStore(kv, wc, closeFn), nil
}
