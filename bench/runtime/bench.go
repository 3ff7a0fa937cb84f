package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	goruntime "runtime"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/berth-dev/berth/bench/internal/hostclean"
	"github.com/berth-dev/berth/internal/testimage"
)

// command is what every container of every subject runs: `sleep 1000`,
// under a shell that exits at once on SIGTERM (berth removes an instance
// with SIGTERM first and SIGKILL only after a 10s grace).
var command = []string{"sh", "-c", `trap "exit 0" TERM; sleep 1000 & wait`}

// imageRef names the test image in every store.
const imageRef = testimage.DefaultRef

// subject is one way of running containers.
type subject interface {
	Name() string
	// Create starts the container (or service) key and returns how long it
	// took until it runs.
	Create(ctx context.Context, key string) (time.Duration, error)
	// Remove stops and deletes what Create(key) made and returns how long
	// it took until it is gone.
	Remove(ctx context.Context, key string) (time.Duration, error)
	// Pids returns the pids of the main processes of what Create(key) or
	// CreateMany(key) made.
	Pids(ctx context.Context, key string) ([]int, error)
}

// parallelSubject also starts and removes many containers at once.
type parallelSubject interface {
	subject
	CreateMany(ctx context.Context, key string, n int) (time.Duration, error)
	RemoveMany(ctx context.Context, key string, n int) (time.Duration, error)
}

// closer is a subject with something to stop at the end.
type closer interface {
	Close(ctx context.Context) error
}

type samples struct {
	create, remove       []time.Duration
	cpuCreate, cpuRemove cpuUse // summed over the samples
}

type throughput struct {
	name               string
	n                  int
	start, clean       time.Duration
	cpuStart, cpuClean cpuUse
	err                error
}

// child runs the benchmark inside the namespace and returns the exit code.
func child(o options, netns, work string) int {
	if work == "" {
		fmt.Fprintln(os.Stderr, "bench: no work directory given")
		return 1
	}
	l := layoutFor(work, netns)
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	// Before anything starts, so that all the run's processes are counted.
	meter, err := newCPUMeter(l.prefix)
	if err != nil {
		fmt.Fprintln(os.Stderr, "bench: no CPU accounting:", err)
	}

	var subjects []subject
	defer func() {
		// Clean up with a context of its own: ctx may be cancelled.
		cctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		defer cancel()
		for i := len(subjects) - 1; i >= 0; i-- {
			if c, ok := subjects[i].(closer); ok {
				if err := c.Close(cctx); err != nil {
					fmt.Fprintf(os.Stderr, "bench: clean up %s: %v\n", subjects[i].Name(), err)
				}
			}
		}
	}()

	err = func() error {
		start := time.Now()
		img, err := testimage.Build(testimage.Options{})
		if err != nil {
			return fmt.Errorf("build the test image: %w", err)
		}
		if err := testimage.WriteOCIArchive(img, imageRef, l.archive); err != nil {
			return err
		}
		b, err := startBerth(ctx, l, o.berth, o.timeout)
		if b != nil {
			subjects = append(subjects, b)
		}
		if err != nil {
			return err
		}
		subjects = append(subjects, b.noNetwork())
		ctd, raw, err := startContainerd(ctx, l, log)
		if ctd != nil {
			subjects = append(subjects, ctd, raw)
		}
		if err != nil {
			return err
		}
		rc, err := newRunc(ctx, l, img)
		if rc != nil {
			subjects = append(subjects, rc)
		}
		if err != nil {
			return err
		}
		fmt.Fprintf(os.Stderr, "bench: set up in %v (namespace %s)\n", time.Since(start).Round(time.Millisecond), netns)
		return run(ctx, o, selected(subjects, o.subjects), meter)
	}()
	if err != nil {
		if ctx.Err() != nil {
			fmt.Fprintln(os.Stderr, "bench: interrupted; cleaning up")
			return 130
		}
		fmt.Fprintln(os.Stderr, "bench:", err)
		return 1
	}
	return 0
}

// subjectKeys name the subjects for -subjects, in the order child makes
// them.
var subjectKeys = []string{"berth", "none", "calls", "raw", "runc"}

// selected keeps the subjects named in list.
func selected(all []subject, list string) []subject {
	want := map[string]bool{}
	for _, k := range strings.Split(list, ",") {
		want[strings.TrimSpace(k)] = true
	}
	var out []subject
	for i, s := range all {
		if i < len(subjectKeys) && want[subjectKeys[i]] {
			out = append(out, s)
		}
	}
	return out
}

// run measures and prints.
func run(ctx context.Context, o options, subjects []subject, meter *cpuMeter) error {
	load := loadavg()
	res := make([]samples, len(subjects))
	rounds := o.warmup + o.n
	start := time.Now()
	for r := 0; r < rounds; r++ {
		for k := range subjects {
			// Rotate the order so that no subject always goes first.
			i := (k + r) % len(subjects)
			s := subjects[i]
			key := fmt.Sprintf("%c%03d", "bncru"[i], r)
			c0 := meter.sample(false)
			tc, err := withTimeout(ctx, o.timeout, func(ctx context.Context) (time.Duration, error) { return s.Create(ctx, key) })
			if err != nil {
				return fmt.Errorf("%s: create %s: %w", s.Name(), key, err)
			}
			if err := settle(ctx, s, key, o.timeout); err != nil {
				return err
			}
			c1 := meter.sample(true)
			tr, err := withTimeout(ctx, o.timeout, func(ctx context.Context) (time.Duration, error) { return s.Remove(ctx, key) })
			if err != nil {
				return fmt.Errorf("%s: remove %s: %w", s.Name(), key, err)
			}
			c2 := meter.sample(false)
			if r >= o.warmup {
				res[i].create = append(res[i].create, tc)
				res[i].remove = append(res[i].remove, tr)
				res[i].cpuCreate = res[i].cpuCreate.plus(c1.since(c0))
				res[i].cpuRemove = res[i].cpuRemove.plus(c2.since(c1.withoutContainers()))
			}
		}
		if (r+1)%10 == 0 || r+1 == rounds {
			fmt.Fprintf(os.Stderr, "bench: latency round %d/%d (%v)\n", r+1, rounds, time.Since(start).Round(time.Millisecond))
		}
	}

	var tps []throughput
	for _, s := range subjects {
		ps, ok := s.(parallelSubject)
		if !ok {
			continue
		}
		tp := throughput{name: s.Name(), n: o.parallel}
		c0 := meter.sample(false)
		tp.start, tp.err = withTimeout(ctx, 5*o.timeout, func(ctx context.Context) (time.Duration, error) {
			return ps.CreateMany(ctx, "tp", o.parallel)
		})
		if tp.err == nil {
			tp.err = settle(ctx, s, "tp", o.timeout)
		}
		c1 := meter.sample(true)
		d, err := withTimeout(ctx, 5*o.timeout, func(ctx context.Context) (time.Duration, error) {
			return ps.RemoveMany(ctx, "tp", o.parallel)
		})
		tp.clean, tp.err = d, errors.Join(tp.err, err)
		c2 := meter.sample(false)
		tp.cpuStart, tp.cpuClean = c1.since(c0), c2.since(c1.withoutContainers())
		if ctx.Err() != nil {
			return ctx.Err()
		}
		if tp.err != nil {
			return fmt.Errorf("%s: throughput: %w", s.Name(), tp.err)
		}
		fmt.Fprintf(os.Stderr, "bench: throughput of %s done\n", s.Name())
		tps = append(tps, tp)
	}
	report(os.Stdout, o, subjects, res, tps, time.Since(start))
	fmt.Fprintf(os.Stdout, "load average (1, 5, 15 min) on %d CPUs: %s before, %s after (after includes this run's own parallel phase)\n", goruntime.NumCPU(), load, loadavg())
	return nil
}

func loadavg() string {
	b, err := os.ReadFile("/proc/loadavg")
	if f := strings.Fields(string(b)); err == nil && len(f) >= 3 {
		return strings.Join(f[:3], " ")
	}
	return "?"
}

// settle waits, untimed, until the shell of every container of key has
// set its SIGTERM trap. A container counts as running as soon as its
// process is started, a few milliseconds before its shell runs `trap`; a
// SIGTERM in between would be ignored (PID 1 of a pid namespace) and berth
// would wait out its 10s grace.
func settle(ctx context.Context, s subject, key string, timeout time.Duration) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	pids, err := s.Pids(ctx, key)
	if err != nil {
		return fmt.Errorf("%s: pids of %s: %w", s.Name(), key, err)
	}
	for _, pid := range pids {
		for !catchesTERM(pid) {
			if !hostclean.Alive(pid) {
				return fmt.Errorf("%s: %s: process %d ended", s.Name(), key, pid)
			}
			select {
			case <-ctx.Done():
				return fmt.Errorf("%s: %s: the shell of process %d set no SIGTERM trap: %w", s.Name(), key, pid, ctx.Err())
			case <-time.After(time.Millisecond):
			}
		}
	}
	return nil
}

// catchesTERM says whether pid has a SIGTERM handler (SigCgt bit 15).
func catchesTERM(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return false
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "SigCgt:"); ok {
			mask, err := strconv.ParseUint(strings.TrimSpace(v), 16, 64)
			return err == nil && mask&(1<<(syscall.SIGTERM-1)) != 0
		}
	}
	return false
}

func withTimeout(ctx context.Context, d time.Duration, f func(context.Context) (time.Duration, error)) (time.Duration, error) {
	ctx, cancel := context.WithTimeout(ctx, d)
	defer cancel()
	return f(ctx)
}

// pct is the nearest-rank percentile p of ds.
func pct(ds []time.Duration, p float64) time.Duration {
	if len(ds) == 0 {
		return 0
	}
	s := append([]time.Duration(nil), ds...)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	rank := int(p/100*float64(len(s)) + 0.999999)
	rank = min(max(rank, 1), len(s))
	return s[rank-1]
}

func ms(d time.Duration) string { return fmt.Sprintf("%.1f ms", float64(d)/float64(time.Millisecond)) }

func over(a, b time.Duration) string {
	if b <= 0 {
		return "n/a"
	}
	return fmt.Sprintf("%+.0f%%", (float64(a)/float64(b)-1)*100)
}

func report(w io.Writer, o options, subjects []subject, res []samples, tps []throughput, took time.Duration) {
	fmt.Fprintf(w, "\nberth runtime benchmark: %d samples per subject (after %d warm-up rounds), image %s,\n", o.n, o.warmup, imageRef)
	fmt.Fprintf(w, "command %s\n\n", strings.Join(quoteAll(command), " "))
	fmt.Fprintf(w, "%-28s %-26s %-26s\n", "subject", "create→running p50 / p95", "stop→removed p50 / p95")
	for i, s := range subjects {
		fmt.Fprintf(w, "%-28s %-26s %-26s\n", s.Name(),
			ms(pct(res[i].create, 50))+" / "+ms(pct(res[i].create, 95)),
			ms(pct(res[i].remove, 50))+" / "+ms(pct(res[i].remove, 95)))
	}
	fmt.Fprintf(w, "\nthroughput, %d containers started at once:\n", o.parallel)
	rate := map[string]float64{}
	for _, tp := range tps {
		r := float64(tp.n) / tp.start.Seconds()
		rate[tp.name] = r
		fmt.Fprintf(w, "  %-26s %d running in %6.2f s = %6.1f containers/s (all removed in %.2f s)\n",
			tp.name, tp.n, tp.start.Seconds(), r, tp.clean.Seconds())
	}
	fmt.Fprintf(w, "\nCPU time per container (user+sys of everything the run started: berth, containerd,\n"+
		"shims, runc, log collectors, CNI plugins, the containers; the benchmark itself left out):\n")
	for i, s := range subjects {
		fmt.Fprintf(w, "  %-26s start %s\n  %-26s remove %s\n", s.Name(), res[i].cpuCreate.perContainer(len(res[i].create)),
			"", res[i].cpuRemove.perContainer(len(res[i].remove)))
	}
	for _, tp := range tps {
		fmt.Fprintf(w, "  %-26s start %s\n  %-26s remove %s\n", fmt.Sprintf("%s, %d at once", tp.name, tp.n), tp.cpuStart.perContainer(tp.n),
			"", tp.cpuClean.perContainer(tp.n))
	}
	// Each berth subject against each containerd subject.
	var berths, bases []int
	for i, s := range subjects {
		switch {
		case strings.HasPrefix(s.Name(), "berth"):
			berths = append(berths, i)
		case strings.HasPrefix(s.Name(), "containerd"):
			bases = append(bases, i)
		}
	}
	if len(berths) > 0 && len(bases) > 0 {
		fmt.Fprintf(w, "\nberth overhead:\n")
	}
	for _, b := range berths {
		for _, j := range bases {
			fmt.Fprintf(w, "  %s vs %s:\n    create→running p50 %s, p95 %s; stop→removed p50 %s, p95 %s",
				subjects[b].Name(), subjects[j].Name(),
				over(pct(res[b].create, 50), pct(res[j].create, 50)), over(pct(res[b].create, 95), pct(res[j].create, 95)),
				over(pct(res[b].remove, 50), pct(res[j].remove, 50)), over(pct(res[b].remove, 95), pct(res[j].remove, 95)))
			if rb, rc := rate[subjects[b].Name()], rate[subjects[j].Name()]; rb > 0 && rc > 0 {
				fmt.Fprintf(w, "; throughput %+.0f%%", (rb/rc-1)*100)
			}
			fmt.Fprintln(w)
		}
	}
	fmt.Fprintf(w, "\nmeasured in %v; ", took.Round(time.Second))
}

func quoteAll(args []string) []string {
	out := make([]string, len(args))
	for i, a := range args {
		if strings.ContainsAny(a, " \"'$&;") {
			out[i] = "'" + a + "'"
		} else {
			out[i] = a
		}
	}
	return out
}
