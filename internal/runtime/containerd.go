package runtime

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	containerd "github.com/containerd/containerd/v2/client"
	"golang.org/x/sys/unix"
)

// Namespace is the containerd namespace berth's containers live in.
const Namespace = "berth"

// Paths are where one agent's private containerd keeps its files.
type Paths struct {
	Root     string // persistent: images, snapshots, container metadata
	State    string // volatile (under /run): sockets, task state
	Socket   string
	Config   string
	Log      string
	PID      string
	RuncRoot string // parent of each container's private runc root
	// The log collector (logd.go): its socket, pid file and own log, and
	// the containers' FIFOs, one directory each.
	LogdSocket, LogdPID, LogdLog, LogFIFOs string
}

// PathsFor derives a containerd's paths from an agent's data directory.
// Sockets and state go under /run/berth-<hash> to keep unix socket paths short.
func PathsFor(dataDir string) (Paths, error) {
	abs, err := filepath.Abs(dataDir)
	if err != nil {
		return Paths{}, err
	}
	sum := sha256.Sum256([]byte(abs))
	run := filepath.Join("/run", "berth-"+hex.EncodeToString(sum[:])[:12])
	return Paths{
		Root:     filepath.Join(abs, "containerd"),
		State:    filepath.Join(run, "containerd"),
		Socket:   filepath.Join(run, "containerd.sock"),
		Config:   filepath.Join(abs, "containerd", "config.toml"),
		Log:      filepath.Join(abs, "containerd", "containerd.log"),
		PID:      filepath.Join(run, "containerd.pid"),
		RuncRoot: filepath.Join(run, "runc"),

		LogdSocket: filepath.Join(run, "logd.sock"),
		LogdPID:    filepath.Join(run, "logd.pid"),
		LogdLog:    filepath.Join(abs, "logd.log"),
		LogFIFOs:   filepath.Join(run, "logs"),
	}, nil
}

func (p Paths) config() string {
	// CRI and NRI are not wanted: berth is the orchestrator. Nothing listens
	// on TCP (no debug or metrics address).
	return fmt.Sprintf(`version = 3
root = %q
state = %q
disabled_plugins = [
  "io.containerd.grpc.v1.cri",
  "io.containerd.cri.v1.images",
  "io.containerd.cri.v1.runtime",
  "io.containerd.podsandbox.controller.v1.podsandbox",
  "io.containerd.nri.v1.nri",
  "io.containerd.tracing.processor.v1.otlp",
  "io.containerd.internal.v1.tracing",
]

[grpc]
  address = %q

[ttrpc]
  address = %q

[debug]
  address = ""
  level = "warn"

[metrics]
  address = ""
`, p.Root, p.State, p.Socket, p.Socket+".ttrpc")
}

// Connect returns a client of the agent's private containerd, starting one
// when none answers. A started containerd is detached (its own session, not
// a child that dies with the agent), so that an agent crash or restart never
// kills it, its shims or the containers.
func Connect(ctx context.Context, p Paths, log *slog.Logger) (*containerd.Client, error) {
	if c, err := dial(ctx, p, 2*time.Second); err == nil {
		log.Info("runtime: reattached to containerd", "socket", p.Socket)
		return c, nil
	}
	if err := start(p, log); err != nil {
		return nil, err
	}
	c, err := dial(ctx, p, 30*time.Second)
	if err != nil {
		return nil, fmt.Errorf("containerd started but does not answer on %s (log %s): %w", p.Socket, p.Log, err)
	}
	return c, nil
}

func dial(ctx context.Context, p Paths, timeout time.Duration) (*containerd.Client, error) {
	deadline := time.Now().Add(timeout)
	var last error
	for time.Now().Before(deadline) {
		if _, err := os.Stat(p.Socket); err == nil {
			c, err := containerd.New(p.Socket, containerd.WithDefaultNamespace(Namespace), containerd.WithTimeout(2*time.Second))
			if err == nil {
				vctx, cancel := context.WithTimeout(ctx, 2*time.Second)
				_, err = c.Version(vctx)
				cancel()
				if err == nil {
					return c, nil
				}
				_ = c.Close()
			}
			last = err
		} else {
			last = err
		}
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-time.After(25 * time.Millisecond):
		}
	}
	return nil, fmt.Errorf("containerd at %s: %w", p.Socket, last)
}

func start(p Paths, log *slog.Logger) error {
	bin, err := exec.LookPath("containerd")
	if err != nil {
		return fmt.Errorf("containerd is not installed (run scripts/install.sh): %w", err)
	}
	if err := volatileRunDir(filepath.Dir(p.Socket), log); err != nil {
		return err
	}
	for _, d := range []string{p.Root, p.State, p.RuncRoot} {
		if err := os.MkdirAll(d, 0o711); err != nil {
			return fmt.Errorf("runtime: %w", err)
		}
	}
	if err := os.WriteFile(p.Config, []byte(p.config()), 0o600); err != nil {
		return fmt.Errorf("runtime: write containerd config: %w", err)
	}
	_ = os.Remove(p.Socket)
	logf, err := os.OpenFile(p.Log, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return fmt.Errorf("runtime: containerd log: %w", err)
	}
	defer logf.Close()
	cmd := exec.Command(bin, "--config", p.Config)
	cmd.Env = runtimeEnv(os.Environ())
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.Dir = "/"
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("runtime: start containerd: %w", err)
	}
	pid := cmd.Process.Pid
	_ = os.WriteFile(p.PID, []byte(strconv.Itoa(pid)), 0o600)
	// Detach: the agent does not wait for it; nothing reaps it but init.
	_ = cmd.Process.Release()
	log.Info("runtime: started containerd", "pid", pid, "socket", p.Socket)
	return nil
}

// Shutdown stops an agent's containerd with everything it runs: every
// container is killed and deleted, containerd and its shims are stopped,
// and leftover mounts under its directories are unmounted. It is for
// `berth agent cleanup` and tests, never for a normal agent stop.
func Shutdown(ctx context.Context, p Paths, log *slog.Logger) error {
	var errs []error
	if c, err := dial(ctx, p, time.Second); err == nil {
		r := &Containerd{c: c, paths: p, log: log, logs: &logs{p: p, log: log}}
		list, _ := r.List(ctx)
		for _, st := range list {
			if err := r.Remove(ctx, st.ID, 0); err != nil {
				errs = append(errs, err)
			}
		}
		_ = c.Close()
	}
	if b, err := os.ReadFile(p.PID); err == nil {
		if pid, err := strconv.Atoi(strings.TrimSpace(string(b))); err == nil && isContainerd(pid) {
			_ = syscall.Kill(pid, syscall.SIGTERM)
			for i := 0; i < 100 && processAlive(pid); i++ {
				time.Sleep(50 * time.Millisecond)
			}
			if processAlive(pid) {
				_ = syscall.Kill(pid, syscall.SIGKILL)
			}
		}
	}
	// The log collector, once the containers are gone.
	if b, err := os.ReadFile(p.LogdPID); err == nil {
		if pid, err := strconv.Atoi(strings.TrimSpace(string(b))); err == nil && isLogd(pid, p.LogdSocket) {
			_ = syscall.Kill(pid, syscall.SIGTERM)
			for i := 0; i < 100 && processAlive(pid); i++ {
				time.Sleep(20 * time.Millisecond)
			}
			if processAlive(pid) {
				_ = syscall.Kill(pid, syscall.SIGKILL)
			}
		}
	}
	// Shims whose containerd is gone, identified by the socket they serve.
	for _, pid := range shimsOf(p) {
		_ = syscall.Kill(pid, syscall.SIGKILL)
	}
	// Containers killed with their shims leave their cgroups behind: remove
	// those of this runtime's containers (named in its runc root), and then
	// the common parent when nothing else is in it.
	var ids []string
	if ents, err := os.ReadDir(p.RuncRoot); err == nil {
		for _, e := range ents {
			if e.IsDir() {
				ids = append(ids, e.Name())
			}
		}
	}
	removeCgroups(ids)
	// The run dir also holds instances' network namespaces (bind mounts).
	for _, dir := range []string{p.State, p.Root, p.RuncRoot, filepath.Dir(p.Socket)} {
		if err := unmountUnder(dir); err != nil {
			errs = append(errs, err)
		}
	}
	_ = os.RemoveAll(filepath.Dir(p.Socket))
	return errors.Join(errs...)
}

// removeCgroups removes the cgroups of the named containers under berth's
// cgroup parent, on cgroup v1 (one tree per controller) and v2, and then
// the parent itself when nothing else is left in it. Processes still in
// them (containers whose containerd and shims are gone) are killed first.
func removeCgroups(ids []string) {
	var parents []string
	for _, pattern := range []string{"/sys/fs/cgroup/*/" + Namespace, "/sys/fs/cgroup/" + Namespace} {
		if dirs, err := filepath.Glob(pattern); err == nil {
			parents = append(parents, dirs...)
		}
	}
	for _, parent := range parents {
		for _, id := range ids {
			dir := filepath.Join(parent, id)
			for i := 0; i < 50; i++ {
				if err := syscall.Rmdir(dir); err == nil || !errors.Is(err, syscall.EBUSY) {
					break
				}
				killCgroup(dir)
				time.Sleep(20 * time.Millisecond)
			}
		}
		_ = syscall.Rmdir(parent)
	}
}

// killCgroup sends SIGKILL to every process in a cgroup directory.
func killCgroup(dir string) {
	b, err := os.ReadFile(filepath.Join(dir, "cgroup.procs"))
	if err != nil {
		return
	}
	for _, f := range strings.Fields(string(b)) {
		if pid, err := strconv.Atoi(f); err == nil && pid > 1 {
			_ = syscall.Kill(pid, syscall.SIGKILL)
		}
	}
}

// volatileRunDir puts a new run directory (containerd's state, the runc
// roots, the log FIFOs, the instances' network namespaces) on a tmpfs of
// its own when /run is not one, as on some VMs: what it holds must not
// outlive the machine, and creating and deleting the many small files of
// every container start is much cheaper there than on a disk file system
// that tracks recently deleted inodes. A run directory that already has
// content is left as it is: it may be the state of containers that run.
func volatileRunDir(dir string, log *slog.Logger) error {
	var st unix.Statfs_t
	if err := unix.Statfs(filepath.Dir(dir), &st); err == nil && st.Type == unix.TMPFS_MAGIC {
		return nil
	}
	if err := unix.Statfs(dir, &st); err == nil && st.Type == unix.TMPFS_MAGIC {
		return nil // mounted by an earlier start
	}
	if ents, err := os.ReadDir(dir); err == nil && len(ents) > 0 {
		return nil
	}
	if err := os.MkdirAll(dir, 0o711); err != nil {
		return fmt.Errorf("runtime: %w", err)
	}
	if err := unix.Mount("tmpfs", dir, "tmpfs", unix.MS_NOSUID|unix.MS_NODEV, "mode=0711"); err != nil {
		// Not fatal: the directory works on any file system.
		log.Warn("runtime: no tmpfs for the run directory", "dir", dir, "err", err)
		return nil
	}
	return nil
}

func isContainerd(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/comm", pid))
	return err == nil && strings.TrimSpace(string(b)) == "containerd"
}

func processAlive(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	// A zombie is dead for our purposes.
	if i := strings.LastIndexByte(string(b), ')'); i >= 0 && i+2 < len(b) {
		return b[i+2] != 'Z'
	}
	return true
}

// shimsOf finds runc shims started by this containerd: their command line
// names its socket (-address).
func shimsOf(p Paths) []int {
	var out []int
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		cmd, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
		if err != nil {
			continue
		}
		args := strings.Split(string(cmd), "\x00")
		if len(args) == 0 || !strings.HasSuffix(args[0], "containerd-shim-runc-v2") {
			continue
		}
		for i, a := range args {
			if a == "-address" && i+1 < len(args) && args[i+1] == p.Socket {
				out = append(out, pid)
			}
		}
	}
	return out
}

// unmountUnder lazily unmounts every mount point below dir, deepest first.
func unmountUnder(dir string) error {
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return err
	}
	var points []string
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) > 4 && (f[4] == dir || strings.HasPrefix(f[4], dir+"/")) {
			points = append(points, f[4])
		}
	}
	var errs []error
	for i := len(points) - 1; i >= 0; i-- {
		if err := syscall.Unmount(points[i], syscall.MNT_DETACH); err != nil && !errors.Is(err, syscall.EINVAL) && !errors.Is(err, syscall.ENOENT) {
			errs = append(errs, fmt.Errorf("unmount %s: %w", points[i], err))
		}
	}
	return errors.Join(errs...)
}

// runtimeEnv is the environment containerd, and through it the shims and
// runc, get: what finds their binaries and a temporary directory, not the
// rest of the agent's environment (a GODEBUG or GOGC meant for berth, a
// proxy, a CONTAINERD_* variable would change how they run).
func runtimeEnv(env []string) []string {
	out := []string{"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}
	for _, kv := range env {
		k, _, _ := strings.Cut(kv, "=")
		switch k {
		case "PATH":
			out[0] = kv
		case "TMPDIR":
			out = append(out, kv)
		}
	}
	return out
}
