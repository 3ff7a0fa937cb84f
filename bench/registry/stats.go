package main

import (
	"fmt"
	"slices"
	"time"
)

// pct is the nearest-rank percentile p (0-100) of ds.
func pct(ds []time.Duration, p float64) time.Duration {
	if len(ds) == 0 {
		return 0
	}
	s := slices.Clone(ds)
	slices.Sort(s)
	rank := int(p/100*float64(len(s)) + 0.999999)
	rank = min(max(rank, 1), len(s))
	return s[rank-1]
}

// ms formats a duration in milliseconds, with more digits when short.
func ms(d time.Duration) string {
	f := float64(d) / float64(time.Millisecond)
	switch {
	case f < 1:
		return fmt.Sprintf("%.2f ms", f)
	case f < 100:
		return fmt.Sprintf("%.1f ms", f)
	}
	return fmt.Sprintf("%.0f ms", f)
}

// p50p99 formats the median and the 99th percentile of ds.
func p50p99(ds []time.Duration) string {
	return fmt.Sprintf("p50 %s, p99 %s", ms(pct(ds, 50)), ms(pct(ds, 99)))
}

// count formats n with thousands separators.
func count(n int) string {
	s := fmt.Sprint(n)
	if n < 0 {
		return "-" + count(-n)
	}
	for i := len(s) - 3; i > 0; i -= 3 {
		s = s[:i] + "," + s[i:]
	}
	return s
}

// rate formats n per d as a count per second.
func rate(n int, d time.Duration) string {
	if d <= 0 {
		return "n/a"
	}
	return count(int(float64(n)/d.Seconds()+0.5)) + "/s"
}

func perSecond(n int, d time.Duration) float64 {
	if d <= 0 {
		return 0
	}
	return float64(n) / d.Seconds()
}

func mib(b int64) string { return fmt.Sprintf("%.1f MiB", float64(b)/(1<<20)) }
