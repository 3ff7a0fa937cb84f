package main

import (
	"fmt"
	"io"
	goruntime "runtime"
	"strings"
	"text/tabwriter"
	"time"
)

// Goals the measurements are held against.
const (
	goalBridgePct  = 95.0
	goalOverlayPct = 95.0
	goalSetup      = 15 * time.Millisecond
	// noGoal: a comparison printed to explain a gap, without a verdict.
	noGoal = 0.0
)

func report(w io.Writer, o options, rows []row, setup setupTimes) {
	pin := "no CPU pinning"
	if o.affinity != "" {
		pin = "iperf3 -A " + o.affinity
	}
	fmt.Fprintf(w, "\nberth network benchmark (%d CPUs)\n", goruntime.NumCPU())
	fmt.Fprintf(w, "  throughput: iperf3 TCP, 1 stream, %d s after %d s omitted, median of %d rounds (%s)\n", o.seconds, o.omit, o.rounds, pin)
	fmt.Fprintf(w, "  latency:    TCP ping-pong of 1-byte messages, %d round trips after %d warm-up per round;\n", o.pings, rttWarmup)
	fmt.Fprintf(w, "              p50 and p99 are the medians over the rounds\n")
	fmt.Fprintf(w, "  berth vs bare: median over the rounds of berth's run / the bare run of the same round\n\n")

	tw := tabwriter.NewWriter(w, 0, 0, 3, ' ', 0)
	fmt.Fprintln(tw, "path\tGbit/s\truns\tRTT p50\tRTT p99\t")
	for i, r := range rows {
		if r.err != nil {
			what := "not measured"
			if i == rowBerthOverlay {
				what = "overlay: not available yet"
			}
			fmt.Fprintf(tw, "%s\t%s\t\t\t\t\n", rowLabels[i], what)
			continue
		}
		var runs []string
		for _, g := range r.gbps {
			runs = append(runs, fmt.Sprintf("%.2f", g))
		}
		fmt.Fprintf(tw, "%s\t%.2f\t%s\t%s\t%s\t\n", rowLabels[i], r.gbit(), strings.Join(runs, " "), us(r.p50()), us(r.p99()))
	}
	_ = tw.Flush()
	fmt.Fprintln(w)

	tw = tabwriter.NewWriter(w, 0, 0, 3, ' ', 0)
	fmt.Fprintln(tw, "berth vs bare\tthroughput\tRTT p50\tRTT p99\tgoal")
	compare(tw, "berth bridge / bare bridge", rows[rowBerthBridge], rows[rowBridge], goalBridgePct)
	compare(tw, "berth overlay / bare VXLAN", rows[rowBerthOverlay], rows[rowVXLAN], goalOverlayPct)
	compare(tw, "berth overlay / 4b (same underlay)", rows[rowBerthOverlay], rows[rowVXLANBridged], goalOverlayPct)
	compare(tw, "berth overlay / 4c (same topology, bare)", rows[rowBerthOverlay], rows[rowVXLANBerth], noGoal)
	_ = tw.Flush()
	fmt.Fprintln(w)

	fmt.Fprintf(w, "instance network setup (network.Manager.Setup: namespace, loopback, CNI bridge + host-local ADD,\n")
	fmt.Fprintf(w, "isolation rules), %d cycles after %d warm-up, each followed by a Teardown:\n", len(setup.Setup), setupWarmup)
	if len(setup.Setup) > 0 {
		p50, p95 := pct(setup.Setup, 50), pct(setup.Setup, 95)
		fmt.Fprintf(w, "  setup     p50 %s   p95 %s   goal < %v: p50 %s, p95 %s\n", ms(p50), ms(p95), goalSetup, verdict(p50 < goalSetup), verdict(p95 < goalSetup))
		fmt.Fprintf(w, "  teardown  p50 %s   p95 %s\n", ms(pct(setup.Teardown, 50)), ms(pct(setup.Teardown, 95)))
	}
}

// compare prints berth's row as a percentage of the bare one: the median
// over the rounds of the ratio of the two runs of each round (the two ran
// next to each other), and the RTT percentiles' differences; and, unless
// goal is noGoal, whether the throughput meets it.
func compare(w io.Writer, label string, berth, bare row, goal float64) {
	g := ""
	if goal != noGoal {
		g = fmt.Sprintf("throughput >= %.0f%% of bare: ", goal)
	}
	if berth.err != nil || bare.err != nil || len(berth.gbps) == 0 || len(berth.gbps) != len(bare.gbps) {
		if g != "" {
			g += "not measured"
		}
		fmt.Fprintf(w, "%s\tn/a\t\t\t%s\n", label, g)
		return
	}
	ratios := make([]float64, len(berth.gbps))
	for i := range berth.gbps {
		ratios[i] = 100 * berth.gbps[i] / bare.gbps[i]
	}
	p := median(ratios)
	if g != "" {
		g += verdict(p >= goal)
	}
	fmt.Fprintf(w, "%s\t%.1f%%\t%s\t%s\t%s\n", label, p,
		delta(berth.p50(), bare.p50()), delta(berth.p99(), bare.p99()), g)
}

func delta(a, b time.Duration) string {
	d := a - b
	sign := "+"
	if d < 0 {
		sign, d = "-", -d
	}
	return fmt.Sprintf("%s%s (%.0f%%)", sign, us(d), 100*float64(a)/float64(b))
}

func verdict(ok bool) string {
	if ok {
		return "met"
	}
	return "MISSED"
}

func us(d time.Duration) string { return fmt.Sprintf("%.1f µs", float64(d)/1e3) }
func ms(d time.Duration) string { return fmt.Sprintf("%.2f ms", float64(d)/1e6) }
