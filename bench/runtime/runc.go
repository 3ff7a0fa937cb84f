package main

import (
	"archive/tar"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/mutate"

	"github.com/berth-dev/berth/bench/internal/hostclean"
)

// runcSubject runs bare runc on one OCI bundle prepared once: the image's
// rootfs, mounted read-only by every container, and `runc spec` adjusted.
type runcSubject struct {
	l      layout
	errLog *os.File // runc's stderr (and the containers')
	pids   map[string]int
}

func (s *runcSubject) Name() string { return "runc run -d (bundle)" }

// newRunc prepares the bundle. A non-nil subject is returned even on
// error, to be closed.
func newRunc(ctx context.Context, l layout, img v1.Image) (*runcSubject, error) {
	s := &runcSubject{l: l, pids: map[string]int{}}
	if err := os.MkdirAll(l.runcRoot, 0o700); err != nil {
		return nil, err
	}
	var err error
	if s.errLog, err = os.OpenFile(filepath.Join(l.work, "runc.log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600); err != nil {
		return nil, err
	}
	rootfs := filepath.Join(l.bundle, "rootfs")
	rc := mutate.Extract(img)
	defer rc.Close()
	if err := untar(rc, rootfs); err != nil {
		return s, fmt.Errorf("unpack the rootfs: %w", err)
	}
	// Mount points runc would otherwise make in the shared rootfs.
	for _, d := range []string{"proc", "dev", "sys"} {
		if err := os.MkdirAll(filepath.Join(rootfs, d), 0o755); err != nil {
			return s, err
		}
	}
	if out, err := exec.CommandContext(ctx, "runc", "spec", "--bundle", l.bundle).CombinedOutput(); err != nil {
		return s, fmt.Errorf("runc spec: %v: %s", err, out)
	}
	cfgPath := filepath.Join(l.bundle, "config.json")
	b, err := os.ReadFile(cfgPath)
	if err != nil {
		return s, err
	}
	// Edited as a map, so that nothing runc spec wrote is lost.
	var cfg map[string]any
	if err := json.Unmarshal(b, &cfg); err != nil {
		return s, fmt.Errorf("runc spec: %w", err)
	}
	proc, _ := cfg["process"].(map[string]any)
	if proc == nil {
		return s, errors.New("runc spec wrote no process")
	}
	proc["terminal"] = false
	proc["args"] = command
	cfg["root"] = map[string]any{"path": "rootfs", "readonly": true}
	cfg["hostname"] = "runc"
	if b, err = json.MarshalIndent(cfg, "", "\t"); err != nil {
		return s, err
	}
	return s, os.WriteFile(cfgPath, b, 0o644)
}

// untar unpacks a flattened image filesystem.
func untar(r io.Reader, dir string) error {
	tr := tar.NewReader(r)
	for {
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return err
		}
		name := filepath.Clean("/" + h.Name)
		p := filepath.Join(dir, name)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			return err
		}
		mode := h.FileInfo().Mode() & (os.ModePerm | os.ModeSticky | os.ModeSetuid | os.ModeSetgid)
		switch h.Typeflag {
		case tar.TypeDir:
			if err := os.MkdirAll(p, 0o755); err != nil {
				return err
			}
			if err := os.Chmod(p, mode); err != nil {
				return err
			}
		case tar.TypeReg:
			f, err := os.OpenFile(p, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, mode)
			if err != nil {
				return err
			}
			_, err = io.Copy(f, tr)
			if cerr := f.Close(); err == nil {
				err = cerr
			}
			if err != nil {
				return err
			}
			if err := os.Chmod(p, mode); err != nil {
				return err
			}
		case tar.TypeSymlink:
			_ = os.Remove(p)
			if err := os.Symlink(h.Linkname, p); err != nil {
				return err
			}
		case tar.TypeLink:
			_ = os.Remove(p)
			if err := os.Link(filepath.Join(dir, filepath.Clean("/"+h.Linkname)), p); err != nil {
				return err
			}
		default:
			continue
		}
		_ = os.Lchown(p, h.Uid, h.Gid)
	}
}

func (s *runcSubject) id(key string) string { return s.l.prefix + "-" + key }

func (s *runcSubject) runc(ctx context.Context, args ...string) ([]byte, error) {
	cmd := exec.CommandContext(ctx, "runc", append([]string{"--root", s.l.runcRoot}, args...)...)
	var out bytes.Buffer
	if args[0] != "run" {
		cmd.Stdout = &out
	}
	// An *os.File, not a pipe: `runc run -d` hands its stdio to the
	// container, and a pipe would keep Wait waiting for the container.
	cmd.Stderr = s.errLog
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Run(); err != nil {
		return nil, fmt.Errorf("runc %s: %w (see %s)", strings.Join(args, " "), err, s.errLog.Name())
	}
	return out.Bytes(), nil
}

type runcState struct {
	Status string `json:"status"`
	Pid    int    `json:"pid"`
}

func (s *runcSubject) state(ctx context.Context, id string) (runcState, error) {
	out, err := s.runc(ctx, "state", id)
	if err != nil {
		return runcState{}, err
	}
	var st runcState
	if err := json.Unmarshal(out, &st); err != nil {
		return runcState{}, fmt.Errorf("runc state %s: %w", id, err)
	}
	return st, nil
}

// Create is `runc run -d` until it returns, then `runc state` saying
// running.
func (s *runcSubject) Create(ctx context.Context, key string) (time.Duration, error) {
	id := s.id(key)
	start := time.Now()
	if _, err := s.runc(ctx, "run", "-d", "--bundle", s.l.bundle, id); err != nil {
		return 0, err
	}
	st, err := s.state(ctx, id)
	d := time.Since(start)
	if err != nil {
		return 0, err
	}
	if st.Status != "running" {
		return 0, fmt.Errorf("runc state %s: %s, not running", id, st.Status)
	}
	s.pids[id] = st.Pid
	return d, nil
}

// Remove is `runc kill KILL`, a wait until the container's process is gone
// (a 1ms poll of /proc, as a shim's reaper would learn it), and
// `runc delete -f`. (Right after the kill, delete -f finds the process
// still there and polls it every 100ms itself.)
func (s *runcSubject) Remove(ctx context.Context, key string) (time.Duration, error) {
	id := s.id(key)
	pid := s.pids[id]
	start := time.Now()
	if _, err := s.runc(ctx, "kill", id, "KILL"); err != nil {
		return 0, err
	}
	for pid > 0 && hostclean.Alive(pid) {
		if ctx.Err() != nil {
			return 0, ctx.Err()
		}
		time.Sleep(time.Millisecond)
	}
	if _, err := s.runc(ctx, "delete", "-f", id); err != nil {
		return 0, err
	}
	d := time.Since(start)
	delete(s.pids, id)
	return d, nil
}

func (s *runcSubject) Pids(_ context.Context, key string) ([]int, error) {
	if pid, ok := s.pids[s.id(key)]; ok {
		return []int{pid}, nil
	}
	return nil, fmt.Errorf("no container %s", s.id(key))
}

// Close force-deletes what is left.
func (s *runcSubject) Close(ctx context.Context) error {
	runcLeftovers(ctx, s.l.runcRoot)
	if s.errLog != nil {
		_ = s.errLog.Close()
	}
	return nil
}
