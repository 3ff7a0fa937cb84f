package testhost

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"os"
	"runtime"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// DialContext opens a connection from inside the host's network namespace,
// so that the test process can reach servers bound there (its loopback
// included). The dialing goroutine locks its OS thread, switches it into the
// namespace, dials, and switches it back before unlocking. The thread must
// not simply be discarded: processes started with Pdeathsig from that
// thread would get SIGKILL when it exits. Only if switching back fails is
// the thread left locked, and so discarded.
func (h *Host) DialContext(ctx context.Context, network, addr string) (net.Conn, error) {
	type result struct {
		c   net.Conn
		err error
	}
	ch := make(chan result, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := os.Open(fmt.Sprintf("/proc/self/task/%d/ns/net", unix.Gettid()))
		if err != nil {
			runtime.UnlockOSThread()
			ch <- result{err: fmt.Errorf("open own netns: %w", err)}
			return
		}
		defer orig.Close()
		f, err := os.Open(h.NetnsPath)
		if err != nil {
			runtime.UnlockOSThread()
			ch <- result{err: fmt.Errorf("open netns %s: %w", h.NetnsPath, err)}
			return
		}
		defer f.Close()
		if _, _, errno := syscall.RawSyscall(unix.SYS_SETNS, f.Fd(), unix.CLONE_NEWNET, 0); errno != 0 {
			runtime.UnlockOSThread()
			ch <- result{err: fmt.Errorf("setns %s: %w", h.NetnsPath, errno)}
			return
		}
		c, err := (&net.Dialer{Timeout: 5 * time.Second}).DialContext(ctx, network, addr)
		if _, _, errno := syscall.RawSyscall(unix.SYS_SETNS, orig.Fd(), unix.CLONE_NEWNET, 0); errno == 0 {
			runtime.UnlockOSThread()
		}
		ch <- result{c, err}
	}()
	r := <-ch
	return r.c, r.err
}

// HTTPClient returns an HTTP client whose connections are made inside the host.
func (h *Host) HTTPClient() *http.Client {
	return &http.Client{
		Timeout:   60 * time.Second,
		Transport: &http.Transport{DialContext: h.DialContext, DisableKeepAlives: false, MaxIdleConnsPerHost: 16},
	}
}
