package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

const (
	iperfPort = "5201"
	rttPort   = "5300"
	rttWarmup = 200
)

// pair is where one row's traffic flows: a server and a client namespace.
type pair struct {
	server, client string // namespace paths
	serverIP       string
}

// procs tracks the helper processes the child runs in namespaces, to kill
// them by PID if the run is cut short.
type procs struct {
	mu  sync.Mutex
	set map[*exec.Cmd]bool
}

func (p *procs) add(c *exec.Cmd) {
	p.mu.Lock()
	if p.set == nil {
		p.set = map[*exec.Cmd]bool{}
	}
	p.set[c] = true
	p.mu.Unlock()
}

func (p *procs) remove(c *exec.Cmd) {
	p.mu.Lock()
	delete(p.set, c)
	p.mu.Unlock()
}

func (p *procs) killAll() {
	p.mu.Lock()
	defer p.mu.Unlock()
	for c := range p.set {
		if c.Process != nil {
			_ = c.Process.Kill()
		}
	}
}

// nsCommand runs name inside the namespace at nsPath. nsenter execs name
// without forking, so the command's PID is name's; it gets SIGKILL if this
// process dies.
func nsCommand(ctx context.Context, nsPath, name string, args ...string) *exec.Cmd {
	cmd := exec.CommandContext(ctx, "nsenter", append([]string{"--net=" + nsPath, "--", name}, args...)...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	cmd.WaitDelay = 5 * time.Second
	return cmd
}

// server is a helper process serving in the background, its output in a
// file.
type server struct {
	cmd  *exec.Cmd
	out  string
	done chan struct{}
	e    *env
}

func (e *env) startServer(ctx context.Context, nsPath, logName, name string, args ...string) (*server, error) {
	s := &server{cmd: nsCommand(ctx, nsPath, name, args...), out: filepath.Join(e.l.logs, logName), done: make(chan struct{}), e: e}
	f, err := os.Create(s.out)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	s.cmd.Stdout, s.cmd.Stderr = f, f
	if err := s.cmd.Start(); err != nil {
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	e.procs.add(s.cmd)
	go func() {
		_ = s.cmd.Wait()
		e.procs.remove(s.cmd)
		close(s.done)
	}()
	return s, nil
}

func (s *server) output() string {
	b, _ := os.ReadFile(s.out)
	return string(b)
}

// waitFor waits until the output holds substr.
func (s *server) waitFor(substr string, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		select {
		case <-s.done:
			if strings.Contains(s.output(), substr) {
				return nil
			}
			return fmt.Errorf("%s exited: %s", s.cmd.Args[3], strings.TrimSpace(s.output()))
		default:
		}
		if strings.Contains(s.output(), substr) {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s: no %q after %v: %s", s.cmd.Args[3], substr, timeout, strings.TrimSpace(s.output()))
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// stop waits up to grace for the server to end by itself, then kills it.
func (s *server) stop(grace time.Duration) {
	select {
	case <-s.done:
		return
	case <-time.After(grace):
	}
	_ = s.cmd.Process.Kill()
	<-s.done
}

// iperf runs one iperf3 test from the client namespace to the server's and
// returns the throughput the receiver saw, in Gbit/s.
func (e *env) iperf(ctx context.Context, p pair, tag string) (float64, error) {
	srv, err := e.startServer(ctx, p.server, "iperf3-server-"+tag+".log", "iperf3", "-s", "-1", "-p", iperfPort, "--forceflush")
	if err != nil {
		return 0, err
	}
	defer srv.stop(2 * time.Second)
	if err := srv.waitFor("Server listening", 5*time.Second); err != nil {
		return 0, err
	}
	args := []string{"-c", p.serverIP, "-p", iperfPort, "-t", strconv.Itoa(e.o.seconds), "-O", strconv.Itoa(e.o.omit), "-P", "1", "-J"}
	if e.o.affinity != "" {
		args = append(args, "-A", e.o.affinity)
	}
	cctx, cancel := context.WithTimeout(ctx, time.Duration(e.o.seconds+e.o.omit+20)*time.Second)
	defer cancel()
	cmd := nsCommand(cctx, p.client, "iperf3", args...)
	var stderr strings.Builder
	cmd.Stderr = &stderr
	e.procs.add(cmd)
	out, err := cmd.Output()
	e.procs.remove(cmd)
	_ = os.WriteFile(filepath.Join(e.l.logs, "iperf3-client-"+tag+".json"), out, 0o644)
	var r struct {
		End struct {
			SumSent struct {
				BitsPerSecond float64 `json:"bits_per_second"`
			} `json:"sum_sent"`
			SumReceived struct {
				BitsPerSecond float64 `json:"bits_per_second"`
			} `json:"sum_received"`
		} `json:"end"`
		Error string `json:"error"`
	}
	if jerr := json.Unmarshal(out, &r); jerr != nil {
		return 0, fmt.Errorf("iperf3: %v (%v) %s", err, jerr, strings.TrimSpace(stderr.String()))
	}
	if r.Error != "" {
		return 0, fmt.Errorf("iperf3: %s", r.Error)
	}
	if err != nil {
		return 0, fmt.Errorf("iperf3: %v %s", err, strings.TrimSpace(stderr.String()))
	}
	bps := r.End.SumReceived.BitsPerSecond
	if bps == 0 {
		bps = r.End.SumSent.BitsPerSecond
	}
	return bps / 1e9, nil
}

// rttResult is what the ping-pong client prints.
type rttResult struct {
	N    int           `json:"n"`
	Min  time.Duration `json:"min"`
	P50  time.Duration `json:"p50"`
	P99  time.Duration `json:"p99"`
	Mean time.Duration `json:"mean"`
}

// rtt runs the ping-pong helper: a server in the server namespace, the
// client in the client's, n round trips after a warm-up. dialFor bounds
// the client's attempts to connect (the overlay's routes may still be on
// their way).
func (e *env) rtt(ctx context.Context, p pair, tag string, n int, dialFor time.Duration) (rttResult, error) {
	exe, err := os.Executable()
	if err != nil {
		return rttResult{}, err
	}
	srv, err := e.startServer(ctx, p.server, "rtt-server-"+tag+".log", exe, cmdRTTServer, ":"+rttPort)
	if err != nil {
		return rttResult{}, err
	}
	defer srv.stop(2 * time.Second)
	if err := srv.waitFor("listening", 5*time.Second); err != nil {
		return rttResult{}, err
	}
	cctx, cancel := context.WithTimeout(ctx, dialFor+60*time.Second)
	defer cancel()
	cmd := nsCommand(cctx, p.client, exe, cmdRTTClient, net.JoinHostPort(p.serverIP, rttPort),
		strconv.Itoa(n), strconv.Itoa(rttWarmup), dialFor.String())
	var r rttResult
	if err := e.runJSON(cmd, "ping-pong", &r); err != nil {
		return rttResult{}, err
	}
	return r, nil
}

// rttServer (inside a namespace): accept one connection and echo every
// byte back until it closes.
func rttServer(args []string) int {
	if len(args) != 1 {
		fmt.Fprintln(os.Stderr, "usage: __rtt-server ADDR")
		return 2
	}
	ln, err := net.Listen("tcp", args[0])
	if err != nil {
		fmt.Println("error:", err)
		return 1
	}
	fmt.Println("listening")
	_ = ln.(*net.TCPListener).SetDeadline(time.Now().Add(2 * time.Minute))
	c, err := ln.Accept()
	ln.Close()
	if err != nil {
		fmt.Println("error:", err)
		return 1
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(2 * time.Minute))
	buf := make([]byte, 1)
	for {
		if _, err := io.ReadFull(c, buf); err != nil {
			if errors.Is(err, io.EOF) {
				return 0
			}
			fmt.Println("error:", err)
			return 1
		}
		if _, err := c.Write(buf); err != nil {
			fmt.Println("error:", err)
			return 1
		}
	}
}

// rttClient (inside a namespace): connect (retrying for up to DIALFOR),
// send one byte and wait for it back, WARMUP+N times, and print the
// latencies of the last N as JSON.
func rttClient(args []string) int {
	if len(args) != 4 {
		fmt.Fprintln(os.Stderr, "usage: __rtt-client ADDR N WARMUP DIALFOR")
		return 2
	}
	n, err1 := strconv.Atoi(args[1])
	warmup, err2 := strconv.Atoi(args[2])
	dialFor, err3 := time.ParseDuration(args[3])
	if err := errors.Join(err1, err2, err3); err != nil || n < 1 || warmup < 0 {
		fmt.Fprintln(os.Stderr, "bad arguments:", err)
		return 2
	}
	var c net.Conn
	deadline := time.Now().Add(dialFor)
	for {
		var err error
		c, err = net.DialTimeout("tcp", args[0], time.Second)
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			fmt.Fprintf(os.Stderr, "connect %s: %v\n", args[0], err)
			return 1
		}
		time.Sleep(100 * time.Millisecond)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(time.Minute))
	lat := make([]time.Duration, 0, n)
	b := []byte{'x'}
	for i := range warmup + n {
		start := time.Now()
		if _, err := c.Write(b); err != nil {
			fmt.Fprintln(os.Stderr, "write:", err)
			return 1
		}
		if _, err := io.ReadFull(c, b); err != nil {
			fmt.Fprintln(os.Stderr, "read:", err)
			return 1
		}
		if i >= warmup {
			lat = append(lat, time.Since(start))
		}
	}
	sort.Slice(lat, func(i, j int) bool { return lat[i] < lat[j] })
	var sum time.Duration
	for _, d := range lat {
		sum += d
	}
	r := rttResult{N: n, Min: lat[0], P50: pct(lat, 50), P99: pct(lat, 99), Mean: sum / time.Duration(n)}
	b, _ = json.Marshal(r)
	fmt.Println(string(b))
	return 0
}

// pct is the nearest-rank percentile of sorted samples.
func pct(sorted []time.Duration, p float64) time.Duration {
	if len(sorted) == 0 {
		return 0
	}
	i := int(math.Ceil(float64(len(sorted))*p/100)) - 1
	return sorted[min(max(i, 0), len(sorted)-1)]
}

// runJSON runs a helper (this binary re-executed in a namespace), tracked
// for cleanup, and decodes the JSON it prints into out.
func (e *env) runJSON(cmd *exec.Cmd, what string, out any) error {
	var stderr strings.Builder
	cmd.Stderr = &stderr
	e.procs.add(cmd)
	b, err := cmd.Output()
	e.procs.remove(cmd)
	if err != nil {
		return fmt.Errorf("%s: %v %s", what, err, strings.TrimSpace(stderr.String()))
	}
	if err := json.Unmarshal(b, out); err != nil {
		return fmt.Errorf("%s output %q: %v", what, b, err)
	}
	return nil
}
