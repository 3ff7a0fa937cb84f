package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"os/signal"
	goruntime "runtime"
	"strings"
	"syscall"
	"time"

	"github.com/berth-dev/berth/internal/testimage"
)

// Goals, and what Consul 1.22 did on this kind of machine.
const (
	goalRegs     = 5000                  // registrations/s
	goalWatchP99 = 10 * time.Millisecond // watch propagation p99
	goalDNS      = 50000                 // DNS queries/s on 2 cores
	goalFailP99  = 100 * time.Millisecond
	goalMemory   = 100 << 20 // bytes with 10,000 registrations

	consulRegs  = "~200/s"
	consulDNS   = "~1,900/s"
	consulWatch = "blocking-query wake p99 ≈ 27 ms"
	consulFail  = "0.3–0.9 s (1 s HTTP check)"
)

// results is everything one run measured.
type results struct {
	reg1, reg32, dereg opResult
	memBase, memRegs   memory
	memLoad            memory // after the read loads
	etcdDB             int64  // size of etcd's database file then
	ctdRSS             int64
	reads              loadResult
	dns, dnsRaw        dnsResult
	watch1, watchN     watchResult
	fail               failoverResult
	failErr            error
}

// child runs the benchmark inside the namespace and returns the exit code.
func child(o options, netns, work string) int {
	if work == "" {
		fmt.Fprintln(os.Stderr, "bench: no work directory given")
		return 1
	}
	l := layoutFor(work, netns)
	ppid := os.Getppid()
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()

	var b *berthDev
	defer func() {
		if b != nil {
			// Clean up with a context of its own: ctx may be cancelled.
			cctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
			if err := b.Close(cctx); err != nil {
				fmt.Fprintln(os.Stderr, "bench: stop berth:", err)
			}
			cancel()
		}
		// The parent sweeps and checks after this process; if it died
		// (its death sends SIGTERM here), do its part too.
		if os.Getppid() != ppid {
			fmt.Fprintln(os.Stderr, "bench: the parent is gone; sweeping for it")
			for _, p := range sweep(l, netns) {
				fmt.Fprintln(os.Stderr, "bench: cleanup check FAILED:", p)
			}
		}
	}()

	err := func() error {
		start := time.Now()
		img, err := testimage.Build(testimage.Options{Files: map[string]string{"/www/index.html": "hello from berth\n"}})
		if err != nil {
			return fmt.Errorf("build the test image: %w", err)
		}
		if err := testimage.WriteOCIArchive(img, imageRef, l.archive); err != nil {
			return fmt.Errorf("write the test image: %w", err)
		}
		b, err = startBerth(ctx, l, o.berth, o.timeout)
		if err != nil {
			return err
		}
		fmt.Fprintf(os.Stderr, "bench: set up in %v (namespace %s)\n", time.Since(start).Round(time.Millisecond), netns)
		res, err := run(ctx, o, b)
		if err != nil {
			return err
		}
		report(os.Stdout, o, res, time.Since(start))
		return nil
	}()
	if err != nil {
		if ctx.Err() != nil {
			fmt.Fprintln(os.Stderr, "bench: interrupted; cleaning up")
			return 130
		}
		fmt.Fprintln(os.Stderr, "bench:", err)
		if b != nil && !b.alive() {
			fmt.Fprintf(os.Stderr, "bench: berth dev has exited; the end of its log:\n%s\n", tail(l.log))
		}
		return 1
	}
	return 0
}

// run measures every phase in turn.
func run(ctx context.Context, o options, b *berthDev) (results, error) {
	var res results
	var err error
	logf := func(format string, args ...any) {
		fmt.Fprintf(os.Stderr, "bench: "+format+"\n", args...)
	}
	// Let the start settle (the agent's first reports, etcd's first
	// compaction check) before the baseline.
	time.Sleep(time.Second)
	if res.memBase, err = memoryOf(b.pid()); err != nil {
		return res, err
	}

	// Registrations: 1 client, then deregistered; 32 clients with fresh
	// ids, which stay for the rest of the run.
	setA := registrations("a", o.instances, o.services)
	logf("registering %s instances of %d services with 1 client", count(o.instances), o.services)
	if res.reg1, err = each(ctx, setA, 1, register); err != nil {
		return res, err
	}
	if err := phaseOK("registrations, 1 client", res.reg1); err != nil {
		return res, err
	}
	logf("  %s in %v", rate(res.reg1.n, res.reg1.took), res.reg1.took.Round(time.Millisecond))
	logf("deregistering them with %d clients", o.clients)
	if res.dereg, err = each(ctx, setA, o.clients, deregister); err != nil {
		return res, err
	}
	if err := phaseOK("deregistrations", res.dereg); err != nil {
		return res, err
	}
	logf("  %s in %v", rate(res.dereg.n, res.dereg.took), res.dereg.took.Round(time.Millisecond))
	setB := registrations("b", o.instances, o.services)
	logf("registering %s fresh instances with %d clients", count(o.instances), o.clients)
	if res.reg32, err = each(ctx, setB, o.clients, register); err != nil {
		return res, err
	}
	if err := phaseOK("registrations, concurrent clients", res.reg32); err != nil {
		return res, err
	}
	logf("  %s in %v", rate(res.reg32.n, res.reg32.took), res.reg32.took.Round(time.Millisecond))
	if err := checkDiscovery(ctx, b.c, o.services, o.instances); err != nil {
		return res, err
	}

	// Memory with the registrations in place.
	time.Sleep(time.Second)
	if res.memRegs, err = memoryOf(b.pid()); err != nil {
		return res, err
	}
	res.etcdDB = b.etcdDB()
	if pid := b.containerdPid(); pid > 0 {
		if m, err := memoryOf(pid); err == nil {
			res.ctdRSS = m.rss
		}
	}
	logf("berth's RSS: %s with %s registrations (%s before them)", mib(res.memRegs.rss), count(o.instances), mib(res.memBase.rss))

	// Discovery reads.
	logf("discovery reads: %d clients for %v (after 1s of warm-up)", o.clients, o.readFor)
	discoveryLoad(ctx, o.services, o.clients, time.Second)
	res.reads = discoveryLoad(ctx, o.services, o.clients, o.readFor)
	if ctx.Err() != nil {
		return res, ctx.Err()
	}
	if len(res.reads.lat) == 0 {
		return res, fmt.Errorf("discovery reads: none answered: %v", res.reads.first)
	}
	logf("  %s", rate(len(res.reads.lat), res.reads.elapsed))

	// DNS, with miekg/dns clients, then with lighter ones.
	for _, raw := range []bool{false, true} {
		kind := "miekg/dns Exchange"
		if raw {
			kind = "raw reads"
		}
		logf("DNS: %d UDP clients (%s) for %v (after 1s of warm-up)", o.clients, kind, o.dnsFor)
		if _, err := dnsLoad(ctx, o.services, o.clients, time.Second, raw); err != nil {
			return res, err
		}
		r, err := dnsLoad(ctx, o.services, o.clients, o.dnsFor, raw)
		if err != nil {
			return res, err
		}
		logf("  %s", rate(len(r.lat), r.elapsed))
		if raw {
			res.dnsRaw = r
		} else {
			res.dns = r
		}
	}
	if res.memLoad, err = memoryOf(b.pid()); err != nil {
		return res, err
	}

	// Watch propagation, to 1 watcher and to many.
	svc := serviceName(0)
	logf("watch propagation: 1 watcher of %s, %d changes", svc, o.changes)
	if res.watch1, err = watchPropagation(ctx, svc, 1, o.changes, o.watchFor); err != nil {
		return res, err
	}
	logf("  p99 %s", ms(pct(res.watch1.delays, 99)))
	logf("watch propagation: %s watchers of %s, %d changes (at most %v)", count(o.watchers), svc, o.changes, o.watchFor)
	if res.watchN, err = watchPropagation(ctx, svc, o.watchers, o.changes, o.watchFor); err != nil {
		return res, err
	}
	logf("  %s watches open in %v; p99 %s", count(o.watchers), res.watchN.open.Round(time.Millisecond), ms(pct(res.watchN.delays, 99)))

	// Failover with real containers.
	if o.kills > 0 {
		logf("failover: %d replicas of httpd, %d kills", o.replicas, o.kills)
		res.fail, res.failErr = failover(ctx, b, o)
		if ctx.Err() != nil {
			return res, ctx.Err()
		}
		if res.failErr != nil {
			logf("failover: %v", res.failErr)
		}
	}
	if !b.alive() {
		return res, fmt.Errorf("berth dev exited during the run; the end of its log:\n%s", tail(b.l.log))
	}
	return res, nil
}

// phaseOK fails a batch of calls in which some failed.
func phaseOK(what string, r opResult) error {
	if r.errs > 0 {
		return fmt.Errorf("%s: %d of %d calls failed, the first: %w", what, r.errs, r.errs+r.n, r.first)
	}
	return nil
}

// verdict compares a result with its goal.
func verdict(ok bool) string {
	if ok {
		return "ok"
	}
	return "MISSED"
}

func report(w io.Writer, o options, r results, took time.Duration) {
	fmt.Fprintf(w, "\nberth registry benchmark: one `berth dev` (API server + embedded etcd + agent in one process),\n")
	fmt.Fprintf(w, "%s registrations of %d services, %d concurrent clients, GOMAXPROCS %d on %d CPUs; load generators in the same namespace\n\n",
		count(o.instances), o.services, o.clients, goruntime.GOMAXPROCS(0), goruntime.NumCPU())

	// Each measure: its figure, goal, verdict and Consul's figure on one
	// line, the details indented below.
	type row struct{ what, figure, goal, verdict, consul, detail string }
	var rows []row
	add := func(x row) { rows = append(rows, x) }

	// The registration goal is a throughput, which the concurrent clients
	// measure; one client making one call at a time measures the latency
	// of a call (each waits for its durable etcd commit).
	regRow := func(what string, res opResult, goal bool) {
		x := row{what: what, figure: rate(res.n, res.took), consul: consulRegs,
			detail: fmt.Sprintf("%s in %.1f s; per call %s", count(res.n), res.took.Seconds(), p50p99(res.lat))}
		if goal {
			x.goal, x.verdict = fmt.Sprintf("≥ %s/s", count(goalRegs)), verdict(perSecond(res.n, res.took) >= goalRegs)
		} else {
			x.detail += "; one call at a time, each answered after its durable commit: bound by the latency of a call"
		}
		add(x)
	}
	regRow("registrations/s, 1 client", r.reg1, false)
	regRow(fmt.Sprintf("registrations/s, %d clients", o.clients), r.reg32, true)
	add(row{what: fmt.Sprintf("deregistrations/s, %d clients", o.clients), figure: rate(r.dereg.n, r.dereg.took),
		detail: fmt.Sprintf("the 1-client phase's registrations, removed before the %d-client phase; per call %s", o.clients, p50p99(r.dereg.lat))})

	add(row{what: fmt.Sprintf("discovery reads/s, %d clients", o.clients),
		figure: fmt.Sprintf("%s, %s", rate(len(r.reads.lat), r.reads.elapsed), p50p99(r.reads.lat)),
		detail: fmt.Sprintf("GET /v1/discovery/{name}?healthy=1, %.1f KB per answer, %d errors", float64(r.reads.bytes)/float64(max(1, len(r.reads.lat)))/1000, r.reads.errs)})

	watchRow := func(res watchResult) {
		what := fmt.Sprintf("watch propagation, %s watcher", count(res.watchers))
		if res.watchers > 1 {
			what += "s"
		}
		detail := fmt.Sprintf("%d changes, each timed on every stream; max %s; from the write sent %s; write answered in p50 %s",
			res.changes, ms(pct(res.delays, 100)), p50p99(res.fromSent), ms(pct(res.writes, 50)))
		if res.early > 0 {
			detail += fmt.Sprintf("; %s of %s deliveries came before the write's answer (counted as 0)", count(res.early), count(len(res.delays)))
		}
		if res.stopped {
			detail += fmt.Sprintf("; stopped after %v", o.watchFor)
		}
		if res.missing > 0 {
			detail += fmt.Sprintf("; %s deliveries missing after %v", count(res.missing), missWait)
		}
		add(row{what: what, figure: p50p99(res.delays), goal: "p99 < 10 ms",
			verdict: verdict(pct(res.delays, 99) < goalWatchP99 && res.missing == 0), consul: consulWatch, detail: detail})
	}
	watchRow(r.watch1)
	watchRow(r.watchN)

	// The DNS goal is the server's rate, which the raw clients (like
	// dnsperf) measure; miekg/dns clients that unpack every answer spend
	// more of the two CPUs than the server does.
	dnsRow := func(what, how string, d dnsResult, goal bool) {
		x := row{what: what, figure: fmt.Sprintf("%s, %s", rate(len(d.lat), d.elapsed), p50p99(d.lat)), consul: consulDNS,
			detail: fmt.Sprintf("%s; %d timeouts, %d bad answers, %d truncated (of %d SRV)", how, d.timeouts, d.bad, d.truncated, d.srv)}
		if goal {
			x.goal, x.verdict = fmt.Sprintf("≥ %s/s", count(goalDNS)), verdict(perSecond(len(d.lat), d.elapsed) >= goalDNS)
		}
		add(x)
	}
	dnsRow(fmt.Sprintf("DNS queries/s, %d miekg/dns clients", o.clients), "dns.Client.Exchange, answers unpacked: bound by the clients' CPU", r.dns, false)
	dnsRow(fmt.Sprintf("DNS queries/s, %d raw UDP clients", o.clients), "queries packed once, answers' headers checked", r.dnsRaw, true)

	if o.kills > 0 {
		f := r.fail
		failRow := func(what string, ds []time.Duration, missed int, goal bool, detail string) {
			x := row{what: what, figure: p50p99(ds), detail: fmt.Sprintf("%d kills, max %s", len(ds)+missed, ms(pct(ds, 100)))}
			if missed > 0 {
				x.detail += fmt.Sprintf(", %d not gone after %v", missed, failWait)
			}
			if detail != "" {
				x.detail += "; " + detail
			}
			if goal {
				x.goal, x.verdict, x.consul = "p99 < 100 ms", verdict(len(ds) > 0 && missed == 0 && pct(ds, 99) < goalFailP99), consulFail
			}
			add(x)
		}
		failRow("failover: gone from watch stream", f.watch, f.missed[0], true, "process SIGKILLed → delete on GET /v1/discovery/{name}?healthy=1&watch=1")
		failRow("failover: gone from GET ?healthy=1", f.get, f.missed[1], false, "")
		failRow("failover: gone from DNS A", f.dns, f.missed[2], false, "")
		if len(f.dead) > 0 {
			failRow("  of which kill → process exited", f.dead, 0, false, "the kernel: the process's pidfd readable")
		}
		if len(f.exit) > 0 {
			failRow("  kill → containerd exit event", f.exit, 0, false, "berth's containerd publishes /tasks/exit (the shim reaped it; before berth)")
		}
		if len(f.status) > 0 {
			failRow("  kill → instance status changed", f.status, 0, false, "on an instance watch: the agent's status report stored")
		}
		if len(f.berth) > 0 {
			failRow("  exit event → gone from watch", f.berth, 0, false, "berth's part")
		}
		if len(f.recovery) > 0 {
			add(row{what: "failover: back in all three", figure: p50p99(f.recovery), detail: "restart delay 300 ms + start + the first passing check"})
		}
		if r.failErr != nil {
			add(row{what: "failover: stopped early", detail: r.failErr.Error()})
		}
	}

	add(row{what: "memory: berth VmRSS, registrations in place", figure: mib(r.memRegs.rss),
		goal: fmt.Sprintf("< %d MiB", goalMemory>>20), verdict: verdict(r.memRegs.rss < goalMemory),
		detail: fmt.Sprintf("VmHWM %s; anon %s, file %s; %s before registering, %s after the read loads",
			mib(r.memRegs.hwm), mib(r.memRegs.anon), mib(r.memRegs.file), mib(r.memBase.rss), mib(r.memLoad.rss))})

	wWhat, wFig, wGoal := 0, 0, 0
	for _, x := range rows {
		wWhat, wFig, wGoal = max(wWhat, runes(x.what)), max(wFig, runes(x.figure)), max(wGoal, runes(x.goal))
	}
	pad := func(s string, n int) string { return s + strings.Repeat(" ", max(0, n-runes(s))) }
	fmt.Fprintf(w, "%s  %s  %s  %-6s  %s\n", pad("measure", wWhat), pad("result", wFig), pad("goal", wGoal), "", "Consul 1.22 (this kind of machine)")
	for _, x := range rows {
		fmt.Fprintf(w, "%s\n", strings.TrimRight(fmt.Sprintf("%s  %s  %s  %-6s  %s", pad(x.what, wWhat), pad(x.figure, wFig), pad(x.goal, wGoal), x.verdict, x.consul), " "))
		if x.detail != "" {
			fmt.Fprintf(w, "      %s\n", x.detail)
		}
	}
	fmt.Fprintf(w, "\nmemory is the whole `berth dev` process (API server, watch cache, embedded etcd, agent); berth's containerd (%s RSS) is a separate process, not counted.\n", mib(r.ctdRSS))
	if r.etcdDB > 0 {
		fmt.Fprintf(w, "etcd's database file (mapped, part of \"file\") was %s with the registrations in place.\n", mib(r.etcdDB))
	}
	fmt.Fprintf(w, "measured in %v; load average (1, 5, 15 min): %s\n", took.Round(time.Second), loadavg())
}

func runes(s string) int { return len([]rune(s)) }

func loadavg() string {
	b, err := os.ReadFile("/proc/loadavg")
	if f := strings.Fields(string(b)); err == nil && len(f) >= 3 {
		return strings.Join(f[:3], " ")
	}
	return "?"
}
