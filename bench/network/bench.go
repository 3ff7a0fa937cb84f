package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"sort"
	"strings"
	"syscall"
	"time"

	"github.com/berth-dev/berth/bench/internal/hostclean"
	"github.com/berth-dev/berth/client"
)

// env is the child's state: what it made, to measure and to clean up.
type env struct {
	o        options
	l        layout
	made     []string // namespaces made by the child (not its own)
	procs    procs
	daemons  []*daemon
	c        *client.Client
	services []string
}

// Row keys.
const (
	rowVeth = iota
	rowBridge
	rowBerthBridge
	rowVXLAN
	rowVXLANBridged
	rowVXLANBerth
	rowBerthOverlay
	nRows
)

var rowLabels = [nRows]string{
	"1 bare veth pair",
	"2 bare Linux bridge",
	"3 berth bridge network (1 node)",
	"4 bare VXLAN pair",
	"4b bare VXLAN, bridge underlay",
	"4c bare overlay, berth's topology",
	"5 berth overlay network (2 nodes)",
}

// row is one measured path.
type row struct {
	p    pair
	err  error       // not measured, and why
	gbps []float64   // per round
	rtts []rttResult // per round
}

// gbit is the median throughput over the rounds.
func (r row) gbit() float64 { return median(r.gbps) }

// p50 and p99 are the medians over the rounds of each round's percentile.
func (r row) p50() time.Duration {
	return medianDur(r.rtts, func(x rttResult) time.Duration { return x.P50 })
}
func (r row) p99() time.Duration {
	return medianDur(r.rtts, func(x rttResult) time.Duration { return x.P99 })
}

func medianDur(rs []rttResult, f func(rttResult) time.Duration) time.Duration {
	v := make([]float64, len(rs))
	for i, r := range rs {
		v[i] = float64(f(r))
	}
	return time.Duration(median(v))
}

// child runs the benchmark inside node a's namespace and returns the exit
// code.
func child(o options, prefix, work string) int {
	if work == "" {
		fmt.Fprintln(os.Stderr, "bench: no work directory given")
		return 1
	}
	e := &env{o: o, l: layoutFor(prefix, work)}
	ppid := os.Getppid()
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	defer func() {
		if err := e.cleanup(); err != nil {
			fmt.Fprintln(os.Stderr, "bench: cleanup:", err)
		}
		// The parent sweeps and checks after this process; if it died
		// (its death sends SIGTERM here), do its part too.
		if os.Getppid() != ppid {
			fmt.Fprintln(os.Stderr, "bench: the parent is gone; sweeping for it")
			for _, p := range sweep(e.l, nil) {
				fmt.Fprintln(os.Stderr, "bench: cleanup check FAILED:", p)
			}
		}
	}()
	if err := os.MkdirAll(e.l.logs, 0o755); err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		return 1
	}
	start := time.Now()
	var rows [nRows]row
	var setup setupTimes
	err := func() error {
		if err := e.topology(); err != nil {
			return fmt.Errorf("topology: %w", err)
		}
		rows[rowVeth].p = pair{server: e.l.nsPath("v2"), client: e.l.nsPath("v1"), serverIP: vethB}
		rows[rowBridge].p = pair{server: e.l.nsPath("b2"), client: e.l.nsPath("b1"), serverIP: bridgeB}
		rows[rowVXLAN].p = pair{server: e.l.nsPath("x2"), client: e.l.nsPath("x1"), serverIP: vxB}
		rows[rowVXLANBridged].p = pair{server: e.l.nsPath("y2"), client: e.l.nsPath("y1"), serverIP: vyB}
		rows[rowVXLANBerth].p = pair{server: e.l.nsPath("i2"), client: e.l.nsPath("i1"), serverIP: vzB}

		// The setup time first, on a quiet machine.
		fmt.Fprintf(os.Stderr, "bench: network setup: %d Setup+Teardown cycles\n", o.setups)
		var err error
		if setup, err = e.setupBench(ctx); err != nil {
			return fmt.Errorf("network setup benchmark: %w", err)
		}

		fmt.Fprintln(os.Stderr, "bench: starting berth dev on node a, bridge network")
		if err := e.startBerth(ctx); err != nil {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			rows[rowBerthBridge].err, rows[rowBerthOverlay].err = err, err
			fmt.Fprintln(os.Stderr, "bench: berth:", err)
		} else {
			if rows[rowBerthBridge].p, err = e.berthBridge(ctx); err != nil {
				if ctx.Err() != nil {
					return ctx.Err()
				}
				rows[rowBerthBridge].err = err
				fmt.Fprintln(os.Stderr, "bench: berth bridge network:", err)
			}
			fmt.Fprintln(os.Stderr, "bench: starting berth agent on node b, overlay network")
			if rows[rowBerthOverlay].p, err = e.berthOverlay(ctx); err != nil {
				if ctx.Err() != nil {
					return ctx.Err()
				}
				rows[rowBerthOverlay].err = err
				fmt.Fprintln(os.Stderr, "bench: overlay: not available yet:", err)
			}
		}
		fmt.Fprintf(os.Stderr, "bench: set up in %v; measuring\n", time.Since(start).Round(time.Millisecond))

		// Rounds interleave the rows, so that machine noise hits all of
		// them alike, in an order that reverses from round to round (each
		// berth row runs once before and once after its bare twin). Each
		// round runs iperf3 and then the ping-pong on every row.
		for r := range o.rounds {
			for k := range nRows {
				i := k
				if r%2 == 1 {
					i = nRows - 1 - k
				}
				if rows[i].err != nil {
					continue
				}
				tag := fmt.Sprintf("%d-%d", i+1, r+1)
				g, err := e.iperf(ctx, rows[i].p, tag)
				if err != nil {
					if ctx.Err() != nil {
						return ctx.Err()
					}
					return fmt.Errorf("%s: iperf3: %w", rowLabels[i], err)
				}
				rt, err := e.rtt(ctx, rows[i].p, tag, o.pings, 5*time.Second)
				if err != nil {
					if ctx.Err() != nil {
						return ctx.Err()
					}
					return fmt.Errorf("%s: ping-pong: %w", rowLabels[i], err)
				}
				rows[i].gbps = append(rows[i].gbps, g)
				rows[i].rtts = append(rows[i].rtts, rt)
				fmt.Fprintf(os.Stderr, "bench: round %d: %-34s %6.2f Gbit/s   RTT p50 %s p99 %s\n", r+1, rowLabels[i], g, us(rt.P50), us(rt.P99))
			}
		}
		return nil
	}()
	if ctx.Err() != nil {
		fmt.Fprintln(os.Stderr, "bench: interrupted; cleaning up")
		return 130
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		fmt.Fprintf(os.Stderr, "bench: logs were in %s (removed at exit)\n", e.l.logs)
		return 1
	}
	report(os.Stdout, o, rows[:], setup)
	fmt.Fprintf(os.Stderr, "bench: measured in %v\n", time.Since(start).Round(time.Millisecond))
	if rows[rowBerthBridge].err != nil {
		return 1 // the overlay may be missing; berth's bridge may not
	}
	return 0
}

// cleanup stops what the child started and deletes the namespaces it
// made; the parent deletes the child's own and checks.
func (e *env) cleanup() error {
	var errs []error
	e.procs.killAll()
	if err := e.stopBerth(); err != nil {
		errs = append(errs, err)
	}
	// Whatever is left in the namespaces (nothing, normally), then the
	// namespaces: their links go with them.
	var paths []string
	for _, n := range e.made {
		paths = append(paths, "/run/netns/"+n)
	}
	if n := killInNamespaces(paths); n > 0 {
		fmt.Fprintf(os.Stderr, "bench: cleanup: killed %d processes left in the namespaces\n", n)
	}
	if err := hostclean.UnmountUnder(e.l.setupRun); err != nil {
		errs = append(errs, err)
	}
	for i := len(e.made) - 1; i >= 0; i-- {
		if out, err := exec.Command("ip", "netns", "delete", e.made[i]).CombinedOutput(); err != nil {
			errs = append(errs, fmt.Errorf("ip netns delete %s: %v %s", e.made[i], err, strings.TrimSpace(string(out))))
		}
	}
	return errors.Join(errs...)
}

func median(v []float64) float64 {
	if len(v) == 0 {
		return 0
	}
	s := append([]float64(nil), v...)
	sort.Float64s(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}
