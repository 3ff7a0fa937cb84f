// Package testregistry runs a real OCI registry (Debian's docker-registry,
// which is distribution v2) inside an isolated test host made by
// e2e/testhost, and pushes images to it, for tests of `berth image pull`.
//
// The registry serves plain HTTP on 127.0.0.1:5000 of the host's own
// network namespace, so it is reachable only from inside that host: from
// processes started in it, and from the test process through
// Host.DialContext (see Transport). Its config and storage live under
// t.TempDir(); the process is stopped with the test.
package testregistry

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/remote"

	"github.com/berth-dev/berth/e2e/testhost"
)

const (
	// Binary is the registry Debian's docker-registry package installs.
	Binary = "/usr/bin/docker-registry"
	// Addr is where the registry listens inside its host.
	Addr = "127.0.0.1:5000"

	startTimeout = 30 * time.Second
	pushTimeout  = 2 * time.Minute
)

// SkipIfUnsupported skips the test unless it can run a registry in a test
// host: root, `ip` and `nsenter` (see testhost.SkipIfUnsupported), and
// Binary.
func SkipIfUnsupported(t testing.TB) {
	t.Helper()
	testhost.SkipIfUnsupported(t)
	if _, err := os.Stat(Binary); err != nil {
		t.Skipf("testregistry: %s not found (install Debian's docker-registry): %v", Binary, err)
	}
}

// config is the registry's configuration: no auth, no TLS, filesystem
// storage, nothing running in the background that the tests don't need.
const config = `version: 0.1
log:
  level: warn
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: %s
  delete:
    enabled: true
  maintenance:
    uploadpurging:
      enabled: false
http:
  addr: %s
health:
  storagedriver:
    enabled: false
`

// Start runs a registry on 127.0.0.1:5000 inside h (config file and storage
// under t.TempDir()), waits until GET /v2/ answers 200, and returns its
// address, "127.0.0.1:5000". The registry is stopped by a cleanup on t.
// Only one registry can run in a host.
//
// Like t.Fatal, Start must be called from the test's goroutine.
func Start(t testing.TB, h *testhost.Host) string {
	t.Helper()
	addr, _ := start(t, h)
	return addr
}

func start(t testing.TB, h *testhost.Host) (string, *testhost.Process) {
	t.Helper()
	if _, err := os.Stat(Binary); err != nil {
		t.Fatalf("testregistry: %s not found (install Debian's docker-registry): %v", Binary, err)
	}
	dir := t.TempDir()
	storage := filepath.Join(dir, "storage")
	if err := os.Mkdir(storage, 0o700); err != nil {
		t.Fatalf("testregistry: %v", err)
	}
	cfgPath := filepath.Join(dir, "config.yml")
	if err := os.WriteFile(cfgPath, fmt.Appendf(nil, config, storage, Addr), 0o600); err != nil {
		t.Fatalf("testregistry: %v", err)
	}

	cmd := h.Command(context.Background(), Binary, "serve", cfgPath)
	// REGISTRY_* variables would override the config file.
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "REGISTRY_") {
			cmd.Env = append(cmd.Env, kv)
		}
	}
	p := h.StartCmd(t, cmd)

	client := &http.Client{Timeout: 2 * time.Second, Transport: Transport(h)}
	defer client.CloseIdleConnections()
	deadline := time.Now().Add(startTimeout)
	var lastErr error
	for {
		resp, err := client.Get("http://" + Addr + "/v2/")
		if err == nil {
			_, _ = io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return Addr, p
			}
			err = fmt.Errorf("GET /v2/: %s", resp.Status)
		}
		lastErr = err
		if p.Exited() {
			code, _ := p.Wait(0)
			t.Fatalf("testregistry: %s exited with code %d before answering: %v\nstderr:\n%s", Binary, code, lastErr, p.Stderr())
		}
		if time.Now().After(deadline) {
			t.Fatalf("testregistry: %s not ready after %v: %v\nstderr:\n%s", Binary, startTimeout, lastErr, p.Stderr())
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// Transport returns an HTTP transport whose connections are made inside h,
// for remote.WithTransport or an http.Client talking to a registry there.
// It uses no proxy.
func Transport(h *testhost.Host) *http.Transport {
	return &http.Transport{
		DialContext:         h.DialContext,
		Proxy:               nil,
		MaxIdleConnsPerHost: 16,
		IdleConnTimeout:     30 * time.Second,
	}
}

// Push pushes img to addr/repoTag ("repo:tag"; a missing tag means
// "latest") over plain HTTP, connecting from inside h, and returns the full
// ref, e.g. "127.0.0.1:5000/berth/demo:1".
//
// Push may be called from any goroutine, but reports failure with t.Fatalf,
// which only works from the test's own goroutine.
func Push(t testing.TB, h *testhost.Host, addr, repoTag string, img v1.Image) string {
	t.Helper()
	tag, err := name.NewTag(addr+"/"+repoTag, name.Insecure)
	if err != nil {
		t.Fatalf("testregistry: push: %v", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), pushTimeout)
	defer cancel()
	tr := Transport(h)
	defer tr.CloseIdleConnections()
	if err := remote.Write(tag, img, remote.WithTransport(tr), remote.WithContext(ctx)); err != nil {
		t.Fatalf("testregistry: push %s: %v", tag, err)
	}
	return tag.Name()
}
