package benchhost

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"time"

	"github.com/berth-dev/berth/client"
)

// Dev is a `berth dev` (server, embedded etcd and agent in one process) a
// run starts in its namespace. The exported fields say how to start it;
// Start sets Client.
type Dev struct {
	Bin     string        // the berth binary
	Data    string        // its --data-dir
	API     string        // its --api-addr, where Client connects
	Args    []string      // more flags of berth dev (--node-name, --dns-addr, ...)
	Log     string        // the file that gets its output
	Archive string        // an OCI archive of the image the run uses, imported once berth is ready
	Timeout time.Duration // longest wait for it to be ready and for the import; also Client's per call

	// Client is an API client with a pool of 64 idle connections, for
	// the calls of the run that are not measured.
	Client *client.Client

	proc   *exec.Cmd
	exited chan struct{}
}

// Start starts berth dev, waits until it says it is ready (and prints that
// line), connects Client and imports Archive. On error the Dev is closed
// all the same: Close does nothing when the process did not start.
func (d *Dev) Start(ctx context.Context) error {
	logf, err := os.Create(d.Log)
	if err != nil {
		return fmt.Errorf("berth's log: %w", err)
	}
	args := append([]string{"dev", "--data-dir", d.Data, "--api-addr", d.API}, d.Args...)
	cmd := exec.Command(d.Bin, args...)
	cmd.Stderr = logf
	// Its own process group: a terminal's Ctrl-C is for the benchmark,
	// which stops berth itself.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	out, err := cmd.StdoutPipe()
	if err != nil {
		logf.Close()
		return fmt.Errorf("berth's stdout: %w", err)
	}
	if err := cmd.Start(); err != nil {
		logf.Close()
		return fmt.Errorf("start berth dev: %w", err)
	}
	d.proc, d.exited = cmd, make(chan struct{})
	ready := make(chan struct{})
	// Owned by the process: it ends when berth closes its stdout.
	go func() {
		defer close(d.exited)
		defer logf.Close()
		sc := bufio.NewScanner(out)
		once := false
		for sc.Scan() {
			fmt.Fprintln(logf, sc.Text())
			if !once && strings.Contains(sc.Text(), "ready in") {
				once = true
				fmt.Fprintln(os.Stderr, "bench:", sc.Text())
				close(ready)
			}
		}
		_ = cmd.Wait()
	}()
	select {
	case <-ready:
	case <-d.exited:
		return fmt.Errorf("berth dev exited before it was ready; its log:\n%s", Tail(d.Log))
	case <-time.After(d.Timeout):
		return fmt.Errorf("berth dev not ready after %v; its log:\n%s", d.Timeout, Tail(d.Log))
	case <-ctx.Done():
		return ctx.Err()
	}
	if d.Client, err = NewClient(d.API, 64, d.Timeout); err != nil {
		return err
	}
	// berth is ready before its node's runtime may be: import until the
	// runtime takes the image.
	ictx, cancel := context.WithTimeout(ctx, d.Timeout)
	defer cancel()
	for {
		_, err := d.Client.ImportImage(ictx, d.Archive, "")
		if err == nil {
			return nil
		}
		if ictx.Err() != nil {
			return fmt.Errorf("berth: import the test image: %w", err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// Pid is berth dev's process id.
func (d *Dev) Pid() int { return d.proc.Process.Pid }

// Alive says whether berth dev still runs.
func (d *Dev) Alive() bool {
	select {
	case <-d.exited:
		return false
	default:
		return true
	}
}

// Close stops berth dev (Stop) and then, with `berth agent cleanup`, its
// containerd, shims and containers.
func (d *Dev) Close(ctx context.Context) error {
	if d.proc == nil {
		return nil
	}
	var errs []error
	if err := Stop(d.proc.Process, d.exited, "berth dev"); err != nil {
		errs = append(errs, err)
	}
	cctx, cancel := context.WithTimeout(ctx, 90*time.Second)
	defer cancel()
	cmd := exec.CommandContext(cctx, d.Bin, "agent", "cleanup", "--data-dir", d.Data)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if out, err := cmd.CombinedOutput(); err != nil {
		errs = append(errs, fmt.Errorf("berth agent cleanup: %v: %s", err, strings.TrimSpace(string(out))))
	}
	return errors.Join(errs...)
}

// Stop ends a process the run started and waits for it: SIGTERM, then
// SIGKILL if it has not exited 20s later. exited closes once the process
// has been waited for; name names it in the error that says it was killed.
func Stop(p *os.Process, exited <-chan struct{}, name string) error {
	select {
	case <-exited:
		return nil
	default:
	}
	_ = p.Signal(syscall.SIGTERM)
	select {
	case <-exited:
		return nil
	case <-time.After(20 * time.Second):
		_ = p.Kill()
		<-exited
		return fmt.Errorf("%s did not stop on SIGTERM; killed", name)
	}
}

// NewClient returns an API client of the berth at addr with its own pool
// of conns idle connections, and a timeout per call.
func NewClient(addr string, conns int, timeout time.Duration) (*client.Client, error) {
	hc := &http.Client{Timeout: timeout, Transport: Transport(conns)}
	c, err := client.New(addr, client.WithHTTPClient(hc))
	if err != nil {
		return nil, fmt.Errorf("berth client: %w", err)
	}
	return c, nil
}

// Transport is an HTTP transport with no proxy and a pool of conns idle
// connections.
func Transport(conns int) *http.Transport {
	return &http.Transport{
		Proxy:               nil,
		DialContext:         (&net.Dialer{Timeout: 5 * time.Second}).DialContext,
		MaxIdleConns:        conns,
		MaxIdleConnsPerHost: conns,
		IdleConnTimeout:     time.Minute,
	}
}

// Tail is the last 20 lines of the file at path.
func Tail(path string) string {
	b, _ := os.ReadFile(path)
	lines := strings.Split(strings.TrimSpace(string(b)), "\n")
	return strings.Join(lines[max(0, len(lines)-20):], "\n")
}
