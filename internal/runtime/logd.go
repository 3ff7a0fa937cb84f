package runtime

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/containerd/containerd/v2/pkg/cio"
	"golang.org/x/sys/unix"
)

// LogdName is the name under which the berth binary runs as a node's log
// collector (multi-call, by argv[0]).
//
// One collector per agent keeps every container's stdout and stderr in
// rotated files. Each container gets two FIFOs (under the run directory);
// containerd's shim copies the container's output into them, and the
// collector reads them. The collector is started detached, like
// containerd, so that an agent crash or restart never stops it; the shim
// keeps its own read end of each FIFO open, so that a container never gets
// EPIPE even while no collector runs (its output waits in the pipe, and a
// new collector takes every FIFO back from the run directory). Compared
// with a log driver process per container (containerd's binary IO), a
// start costs two mkfifo and one local request instead of a process.
const LogdName = "berth-logd"

// logdPartialFlush is how long the collector keeps an unterminated line
// before it stores it as it is.
const logdPartialFlush = time.Second

// logdRequest is one request to the collector, a JSON line on its socket.
type logdRequest struct {
	Op   string `json:"op"` // attach, detach, ping
	ID   string `json:"id,omitempty"`
	Path string `json:"path,omitempty"` // the log file, for attach
}

type logdReply struct {
	Error string `json:"error,omitempty"`
}

// logs is the agent's side of the collector.
type logs struct {
	p   Paths
	log *slog.Logger
	mu  sync.Mutex // serialises starting a collector
}

// fifoPath is one of a container's files in dir: its FIFOs ("out",
// "err") and the path of its log file ("path"). They sit side by side
// rather than in a directory per container: one directory less to create
// and remove for every container.
func fifoPath(dir, id, kind string) string { return filepath.Join(dir, id+"."+kind) }

// fifoKinds are a container's two FIFOs and the streams they carry.
var fifoKinds = [2][2]string{{"out", "stdout"}, {"err", "stderr"}}

// ensure makes sure a collector answers, starting one when none does.
func (l *logs) ensure(ctx context.Context) error {
	if err := l.call(ctx, logdRequest{Op: "ping"}); err == nil {
		return nil
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if err := l.call(ctx, logdRequest{Op: "ping"}); err == nil {
		return nil
	}
	// A collector that still runs but does not answer must not read the
	// FIFOs beside the new one.
	if b, err := os.ReadFile(l.p.LogdPID); err == nil {
		if pid, err := strconv.Atoi(strings.TrimSpace(string(b))); err == nil && isLogd(pid, l.p.LogdSocket) {
			l.log.Warn("runtime: the log collector does not answer; replacing it", "pid", pid)
			_ = syscall.Kill(pid, syscall.SIGKILL)
		}
	}
	if err := startLogd(l.p, l.log); err != nil {
		return err
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		err := l.call(ctx, logdRequest{Op: "ping"})
		if err == nil {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("the log collector does not answer on %s (log %s): %w", l.p.LogdSocket, l.p.LogdLog, err)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(10 * time.Millisecond):
		}
	}
}

// call sends one request and waits for its reply.
func (l *logs) call(ctx context.Context, req logdRequest) error {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	var d net.Dialer
	conn, err := d.DialContext(ctx, "unix", l.p.LogdSocket)
	if err != nil {
		return err
	}
	defer conn.Close()
	if dl, ok := ctx.Deadline(); ok {
		_ = conn.SetDeadline(dl)
	}
	b, _ := json.Marshal(req)
	if _, err := conn.Write(append(b, '\n')); err != nil {
		return err
	}
	var rep logdReply
	if err := json.NewDecoder(conn).Decode(&rep); err != nil {
		return fmt.Errorf("log collector: %w", err)
	}
	if rep.Error != "" {
		return errors.New(rep.Error)
	}
	return nil
}

// attach prepares a container's FIFOs, has the collector read them into
// logPath, and returns the IO to create the container's task with.
func (l *logs) attach(ctx context.Context, id, logPath string) (cio.Creator, error) {
	dir := l.p.LogFIFOs
	if strings.ContainsAny(id, "/\x00") {
		return nil, fmt.Errorf("logs: bad container id %q", id)
	}
	for _, k := range fifoKinds {
		err := unix.Mkfifo(fifoPath(dir, id, k[0]), 0o600)
		if errors.Is(err, unix.ENOENT) {
			if err = os.MkdirAll(dir, 0o700); err == nil {
				err = unix.Mkfifo(fifoPath(dir, id, k[0]), 0o600)
			}
		}
		if err != nil && !errors.Is(err, unix.EEXIST) {
			return nil, fmt.Errorf("logs of %s: mkfifo: %w", id, err)
		}
	}
	// Where the logs go, for a collector that starts later.
	pathFile := fifoPath(dir, id, "path")
	if b, err := os.ReadFile(pathFile); err != nil || string(b) != logPath {
		if err := writeFileAtomic(pathFile, []byte(logPath)); err != nil {
			return nil, fmt.Errorf("logs of %s: %w", id, err)
		}
	}
	req := logdRequest{Op: "attach", ID: id, Path: logPath}
	if err := l.call(ctx, req); err != nil {
		// No collector (it was stopped or died): start one, which takes
		// this container's FIFOs too.
		if err := l.ensure(ctx); err != nil {
			return nil, err
		}
		if err := l.call(ctx, req); err != nil {
			return nil, fmt.Errorf("logs of %s: %w", id, err)
		}
	}
	cfg := cio.Config{Stdout: fifoPath(dir, id, "out"), Stderr: fifoPath(dir, id, "err")}
	return func(string) (cio.IO, error) { return fifoIO{cfg}, nil }, nil
}

// detach stops collecting a removed container's logs.
func (l *logs) detach(ctx context.Context, id string) {
	for _, k := range []string{"path", "out", "err"} {
		_ = os.Remove(fifoPath(l.p.LogFIFOs, id, k))
	}
	_ = l.call(ctx, logdRequest{Op: "detach", ID: id})
}

// fifoIO hands the FIFOs to containerd; the collector, not this process,
// reads them.
type fifoIO struct{ cfg cio.Config }

func (f fifoIO) Config() cio.Config { return f.cfg }
func (fifoIO) Cancel()              {}
func (fifoIO) Wait()                {}
func (fifoIO) Close() error         { return nil }

func writeFileAtomic(path string, b []byte) error {
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, b, 0o600); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}

// startLogd starts a collector detached from the agent (its own session).
func startLogd(p Paths, log *slog.Logger) error {
	exe, err := os.Executable()
	if err != nil {
		return fmt.Errorf("runtime: find own binary: %w", err)
	}
	if err := os.MkdirAll(p.LogFIFOs, 0o700); err != nil {
		return fmt.Errorf("runtime: %w", err)
	}
	logf, err := os.OpenFile(p.LogdLog, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return fmt.Errorf("runtime: log collector's log: %w", err)
	}
	defer logf.Close()
	cmd := &exec.Cmd{Path: exe, Args: []string{LogdName, "--socket", p.LogdSocket, "--dir", p.LogFIFOs}}
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.Dir = "/"
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("runtime: start the log collector: %w", err)
	}
	pid := cmd.Process.Pid
	_ = os.WriteFile(p.LogdPID, []byte(strconv.Itoa(pid)), 0o600)
	_ = cmd.Process.Release()
	log.Info("runtime: started the log collector", "pid", pid, "socket", p.LogdSocket)
	return nil
}

// isLogd says whether pid is the collector serving socket.
func isLogd(pid int, socket string) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	if err != nil {
		return false
	}
	args := strings.Split(string(b), "\x00")
	if len(args) == 0 || args[0] != LogdName {
		return false
	}
	for i, a := range args {
		if a == "--socket" && i+1 < len(args) && args[i+1] == socket {
			return true
		}
	}
	return false
}

// RunLogd is the collector's main: berth-logd --socket PATH --dir DIR.
// It returns the process's exit code.
func RunLogd(args []string) int {
	var socket, dir string
	for i := 0; i+1 < len(args); i++ {
		switch args[i] {
		case "--socket":
			socket = args[i+1]
		case "--dir":
			dir = args[i+1]
		}
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelInfo}))
	if socket == "" || dir == "" {
		log.Error(LogdName + ": usage: --socket PATH --dir DIR")
		return 2
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	signal.Ignore(syscall.SIGHUP, syscall.SIGPIPE)
	c := &collector{dir: dir, log: log, att: map[string]*attachment{}}
	if err := c.run(ctx, socket); err != nil {
		log.Error(LogdName, "err", err)
		return 1
	}
	return 0
}

// collector reads the FIFOs of every container into its log files.
type collector struct {
	dir string
	log *slog.Logger

	mu  sync.Mutex
	att map[string]*attachment
	wg  sync.WaitGroup
}

// attachment is one container's FIFOs and log file.
type attachment struct {
	path  string
	w     *rotator
	files []*os.File
	left  sync.WaitGroup // readers still running
}

func (c *collector) run(ctx context.Context, socket string) error {
	if err := os.MkdirAll(c.dir, 0o700); err != nil {
		return err
	}
	_ = os.Remove(socket)
	ln, err := net.Listen("unix", socket)
	if err != nil {
		return err
	}
	// Take back the FIFOs of containers a previous collector read.
	ents, _ := os.ReadDir(c.dir)
	for _, e := range ents {
		id, ok := strings.CutSuffix(e.Name(), ".path")
		if !ok || id == "" {
			continue
		}
		if b, err := os.ReadFile(filepath.Join(c.dir, e.Name())); err == nil {
			if err := c.attach(id, string(b)); err != nil {
				c.log.Warn("logd: reattach", "container", id, "err", err)
			}
		}
	}
	c.log.Info("logd: serving", "socket", socket, "containers", len(c.att))
	c.wg.Add(1)
	go func() {
		defer c.wg.Done()
		c.prune(ctx)
	}()
	go func() {
		<-ctx.Done()
		_ = ln.Close()
	}()
	for {
		conn, err := ln.Accept()
		if err != nil {
			if ctx.Err() != nil {
				break
			}
			c.log.Warn("logd: accept", "err", err)
			time.Sleep(10 * time.Millisecond)
			continue
		}
		c.wg.Add(1)
		go func() {
			defer c.wg.Done()
			c.serve(conn)
		}()
	}
	c.mu.Lock()
	for id := range c.att {
		c.detachLocked(id)
	}
	c.mu.Unlock()
	c.wg.Wait()
	return nil
}

// serve answers one request.
func (c *collector) serve(conn net.Conn) {
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(5 * time.Second))
	line, err := bufio.NewReader(conn).ReadBytes('\n')
	if err != nil {
		return
	}
	var req logdRequest
	var rep logdReply
	if err := json.Unmarshal(line, &req); err != nil {
		rep.Error = "bad request: " + err.Error()
	} else {
		switch req.Op {
		case "ping":
		case "attach":
			if err := c.attach(req.ID, req.Path); err != nil {
				rep.Error = err.Error()
			}
		case "detach":
			c.mu.Lock()
			c.detachLocked(req.ID)
			c.mu.Unlock()
		default:
			rep.Error = "unknown op " + strconv.Quote(req.Op)
		}
	}
	b, _ := json.Marshal(rep)
	_, _ = conn.Write(append(b, '\n'))
}

// attach starts reading a container's FIFOs; it is a no-op when they are
// read already.
func (c *collector) attach(id, path string) error {
	if id == "" || strings.ContainsAny(id, "/\x00") || id == "." || id == ".." || path == "" {
		return fmt.Errorf("attach: bad container %q or path %q", id, path)
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if a := c.att[id]; a != nil {
		if a.path == path {
			return nil
		}
		c.detachLocked(id)
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return err
	}
	w, err := newRotator(path, DefaultLogMaxSize, DefaultLogMaxFiles)
	if err != nil {
		return err
	}
	a := &attachment{path: path, w: w}
	for _, k := range fifoKinds {
		// Read and write: the open does not wait for the shim, and the
		// reader never sees an end of file between two runs of the
		// container's task.
		f, err := os.OpenFile(fifoPath(c.dir, id, k[0]), os.O_RDWR, 0)
		if err != nil {
			for _, f := range a.files {
				_ = f.Close()
			}
			_ = w.Close()
			return fmt.Errorf("attach %s: %w", id, err)
		}
		a.files = append(a.files, f)
	}
	for i, k := range fifoKinds {
		a.left.Add(1)
		c.wg.Add(1)
		go func() {
			defer c.wg.Done()
			defer a.left.Done()
			copyLines(a.files[i], k[1], a.w)
		}()
	}
	c.att[id] = a
	return nil
}

// detachLocked stops reading a container's FIFOs; c.mu is held.
func (c *collector) detachLocked(id string) {
	a := c.att[id]
	if a == nil {
		return
	}
	delete(c.att, id)
	for _, f := range a.files {
		_ = f.Close() // ends the blocked reads
	}
	c.wg.Add(1)
	go func() {
		defer c.wg.Done()
		a.left.Wait()
		_ = a.w.Close()
	}()
}

// prune detaches containers whose FIFOs were removed while no detach
// reached the collector (an agent that died in between).
func (c *collector) prune(ctx context.Context) {
	t := time.NewTicker(30 * time.Second)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		c.mu.Lock()
		for id := range c.att {
			if _, err := os.Stat(fifoPath(c.dir, id, "path")); os.IsNotExist(err) {
				c.detachLocked(id)
			}
		}
		c.mu.Unlock()
	}
}

// copyLines stores each line read from f; an unterminated line is stored
// once nothing more came for logdPartialFlush, a line longer than the
// buffer in pieces. It returns when f is closed.
func copyLines(f *os.File, stream string, w *rotator) {
	emit := func(b []byte) {
		w.write(LogLine{Time: time.Now().UTC(), Stream: stream, Line: string(b)})
	}
	buf := make([]byte, 64<<10)
	n := 0 // bytes of an unterminated line at the start of buf
	for {
		if n > 0 {
			_ = f.SetReadDeadline(time.Now().Add(logdPartialFlush))
		}
		m, err := f.Read(buf[n:])
		if n > 0 {
			_ = f.SetReadDeadline(time.Time{})
		}
		data := buf[:n+m]
		for {
			i := bytes.IndexByte(data, '\n')
			if i < 0 {
				break
			}
			emit(data[:i])
			data = data[i+1:]
		}
		n = copy(buf, data)
		if n == len(buf) {
			emit(buf)
			n = 0
		}
		if err == nil {
			continue
		}
		if n > 0 {
			emit(buf[:n])
			n = 0
		}
		switch {
		case errors.Is(err, os.ErrDeadlineExceeded):
		case errors.Is(err, io.EOF):
			// Cannot happen on a FIFO this process holds open for writing
			// too; if it does, do not spin.
			time.Sleep(100 * time.Millisecond)
		default:
			return // closed
		}
	}
}
