//go:build linux

// Command meshbench measures ztgo against the direct loopback path and performance.md's peers
// in one run and prints a markdown table of the medians and ratios.
//
//	go run ./perf/cmd/meshbench --ztgo ./bin/ztgo [--quick] [--out FILE] [--profile-dir DIR] [--istiohbone BIN] [--only tp1,rtt1,rate,idle,slow,...]
//
// It starts two ztgo processes from the given binary on one mesh config (a client workload
// 127.40.1.10 on node bench-a, a server workload 127.40.2.10 on node bench-b, both HBONE) and a
// shared CA directory, and runs its own servers on 127.40.2.10: a sink, a source, an echo, a
// server that writes one byte and closes, and two flood servers for the slow reader; and, in a
// process of its own (the same executable with MESHBENCH_IDLE_ECHO set), an echo with a small
// buffer for idle connections. The sink, the source and the echo also listen on 127.40.5.10, an
// address not in the mesh, with the same handlers and counters. Every workload but the idle and
// slow-reader ones runs on several paths, interleaved round by round (direct, ztgo,
// passthrough, stunnel, istio, direct, ztgo ...):
//
//   - direct: a client socket bound to 127.40.1.10 straight to 127.40.2.10:port;
//   - ztgo: the same client socket to node a's SOCKS5 (CONNECT answered once the upstream is
//     established), HBONE (HTTP/2 CONNECT over mTLS) to node b, then node b to the server.
//   - passthrough (throughput and round-trip workloads): the same client socket to node a's
//     SOCKS5, CONNECT to 127.40.5.10:port, which is not in the mesh, so node a routes it as
//     passthrough: plain TCP from node a to the server, spliced; no HBONE, node b takes no
//     part. performance.md's target is passthrough >= 0.80x direct in throughput.
//   - stunnel (throughput workloads only): the same client socket to a client-mode stunnel on
//     127.40.3.1, TLS 1.3 with a client certificate to a server stunnel on 127.40.3.2 that
//     verifies it (mutual TLS, a throwaway ECDSA P-256 CA made in the temp dir), then to the
//     server. When stunnel4 is not installed or the pair does not work, its runs are skipped
//     with a line in the report.
//   - istio (throughput and round-trip workloads): Istio's Go HBONE (istio.io/istio/pkg/hbone)
//     as two processes of perf/cmd/istiohbone, built into a temp dir with `go build` from the
//     module root unless --istiohbone names a binary: the client side on 127.40.4.1 turns each
//     connection into one HBONE CONNECT through Istio's dialer, over mutual TLS 1.3 (its own
//     throwaway CA) to the server side on 127.40.4.2:15008 (Istio's hbone.NewServer), which
//     dials the server. When it cannot be built or does not work, its runs are skipped with a
//     line in the report.
//
// Workloads: 1-stream throughput both ways, 8-stream throughput, round trips of 1 B and 1 KiB
// on one connection, a fixed rate of 1,000 1 KiB round trips a second (rate), and new
// connections to a first byte, sequential and with 8 clients. It also records the nodes' RSS
// and their CPU time per GB moved, per connection and per 1,000 rps, and, with --profile-dir,
// CPU profiles of both nodes during an extra 1-stream throughput run.
//
// The fixed-rate workload (rate) uses fortio's fixed-rate engine (fortio.org/fortio/periodic):
// 1,000 calls a second from 8 threads, each with a long-lived connection to the echo, one call
// being a 1,024-byte write and its echo, for 5 s (quick) or 15 s in every round on the direct
// and ztgo paths. It reports the achieved rate, fortio's p50/p90/p99, the latency ztgo adds at
// p90 and p99 (against ztunnel's ~0.17/0.20 ms), and both nodes' CPU (utime+stime) over the run
// per 1,000 rps against the 0.05 vCPU target.
//
// Idle connections (idle) run once, through ztgo only (memory per proxied connection has no
// direct counterpart), before the rounds: 10,000 connections (quick: 2,000), each with one
// small round trip to the idle echo, are left open while both nodes' RSS settles; the report
// gives each node's (RSS after - RSS before) / N against the 4 KB target, and the same for the
// Go heap and goroutine stacks in use (from each node's /metrics) and its goroutines. With --profile-dir it also takes heap profiles of both nodes while the
// connections are idle. The bench raises its RLIMIT_NOFILE to the hard limit (and above it
// when it must and may), which the nodes and the echo process inherit, and checks every
// process's open files against its limit before opening; should a process run out anyway,
// the workload fails with each one's open files and limit.
//
// The slow reader (slow) runs once, after idle and before the rounds: a flood server writes as
// fast as it can to a client that reads 1 KiB a second, for 10 s (quick) or 30 s, through ztgo
// and, at the same time, directly. Every 500 ms the bench samples the bytes each server wrote
// and the nodes' heap in use and RSS; it reads each node's live heap (after forced GCs) before
// and at the end. The flow is bounded when the server stalled (it wrote no more in the second
// half than the client read, give or take a few window openings) and no node's live heap grew
// by more than one HTTP/2 stream window plus one largest frame (stages/hbone's settings).
//
// Performance targets are ratios measured side by side on the same machine in the same run
// (shared/spec/performance.md); the table marks each as met or missed. Every wait is bounded;
// the nodes and the peers' processes are always stopped with SIGTERM, and any failure exits
// nonzero.
package main

import (
	"bufio"
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"syscall"
	"time"
)

// plan is the size of a run.
type plan struct {
	name     string
	rounds   int
	tpDur    time.Duration // throughput window
	tpWarm   time.Duration // before the window
	rttCount int           // round trips per size per round
	connDur  time.Duration // sequential connection run
	conn8Dur time.Duration // 8-client connection run
	idleN    int           // idle connections
	idleMax  time.Duration // bound of the idle-connection workload
	rateDur  time.Duration // fixed-rate run, per path and round
	slowDur  time.Duration // slow-reader run, once
	// limit is the watchdog for the whole run, above the planned time (quick ~2 m 50 s, full
	// ~16 min, +11 s with --profile-dir; Istio's pair is built before it starts) so that only
	// a hang or a badly slowed machine hits it.
	limit time.Duration
}

var (
	quickPlan = plan{name: "quick", rounds: 3, tpDur: 2 * time.Second, tpWarm: 100 * time.Millisecond,
		rttCount: 2000, connDur: 2 * time.Second, conn8Dur: 500 * time.Millisecond,
		idleN: 2000, idleMax: 30 * time.Second, rateDur: 5 * time.Second, slowDur: 10 * time.Second, limit: 5 * time.Minute}
	fullPlan = plan{name: "full", rounds: 7, tpDur: 5 * time.Second, tpWarm: 100 * time.Millisecond,
		rttCount: 10000, connDur: 1500 * time.Millisecond, conn8Dur: time.Second,
		idleN: 10000, idleMax: time.Minute, rateDur: 15 * time.Second, slowDur: 30 * time.Second, limit: 20 * time.Minute}
)

// String sums the plan up for the --quick flag's help, so the help cannot drift from the plans.
func (p plan) String() string {
	return fmt.Sprintf("%d rounds, %s throughput windows, %s idle connections, watchdog %s",
		p.rounds, p.tpDur, thousands(int64(p.idleN)), p.limit)
}

const (
	readyTimeout = 20 * time.Second
	stopGrace    = 10 * time.Second
)

func main() {
	if os.Getenv(idleEchoEnv) != "" {
		os.Exit(idleEchoMain())
	}
	os.Exit(run())
}

func run() int {
	var (
		bin        = flag.String("ztgo", "./bin/ztgo", "ztgo binary to run (make build)")
		quick      = flag.Bool("quick", false, quickPlan.String()+"; default: "+fullPlan.String())
		out        = flag.String("out", "", "also write the markdown report to this file")
		profileDir = flag.String("profile-dir", "", "write CPU profiles of both nodes here, taken during two extra runs through ztgo: 1-stream throughput (throughput-node-{a,b}.pprof) and new connections from 8 clients (connrate-node-{a,b}.pprof), unless only idle runs; and heap profiles while the idle connections are open (idle-heap-node-{a,b}.pprof)")
		keep       = flag.Bool("keep", false, "keep the temp dir (mesh, CA, node logs)")
		istioBin   = flag.String("istiohbone", "", "istiohbone binary for Istio's Go HBONE pair (default: build ./perf/cmd/istiohbone into a temp dir, from the module root)")
		only       = flag.String("only", "", "run only these workloads, comma-separated: "+strings.Join(workloadNames, ", ")+" (default: all)")
	)
	flag.Parse()
	if flag.NArg() > 0 {
		fmt.Fprintf(os.Stderr, "meshbench: unexpected arguments %q\n", flag.Args())
		return 2
	}
	pl := fullPlan
	if *quick {
		pl = quickPlan
	}
	sel := map[string]bool{}
	for _, w := range strings.Split(*only, ",") {
		if w = strings.TrimSpace(w); w == "" {
			continue
		}
		if !slices.Contains(workloadNames, w) {
			fmt.Fprintf(os.Stderr, "meshbench: --only %q: want some of %s\n", w, strings.Join(workloadNames, ", "))
			return 2
		}
		sel[w] = true
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	quietFortio()

	b := &bench{pl: pl, bin: *bin, profileDir: *profileDir, keep: *keep, only: sel, res: newResults(), cuts: map[string]int64{}}
	// Istio's Go HBONE pair: built before the watchdog starts (a cold build takes a while).
	if b.needsIstio() {
		if *istioBin != "" {
			var err error
			if b.istioBin, err = filepath.Abs(*istioBin); err == nil {
				_, err = os.Stat(b.istioBin)
			}
			if err != nil {
				fmt.Fprintf(os.Stderr, "meshbench: --istiohbone: %v\n", err)
				return 1
			}
		} else {
			bdir, err := os.MkdirTemp("", "meshbench-istiohbone-")
			if err != nil {
				fmt.Fprintf(os.Stderr, "meshbench: %v\n", err)
				return 1
			}
			defer os.RemoveAll(bdir)
			t0 := time.Now()
			if b.istioBin, err = buildIstioHBONE(ctx, bdir); err != nil {
				b.istioSkip = err.Error()
				logf("%v", err)
			} else {
				logf("built istiohbone in %s", time.Since(t0).Round(100*time.Millisecond))
			}
		}
	}
	ctx, cancel := context.WithTimeoutCause(ctx, pl.limit, fmt.Errorf("meshbench watchdog: run exceeded %s", pl.limit))
	defer cancel()
	b.began = time.Now()
	text, err := b.run(ctx)
	if text != "" {
		fmt.Print(text)
		if *out != "" {
			if werr := os.WriteFile(*out, []byte(text), 0o644); werr != nil {
				err = errors.Join(err, werr)
			}
		}
	}
	if err != nil {
		if c := context.Cause(ctx); c != nil && errors.Is(err, context.DeadlineExceeded) {
			err = fmt.Errorf("%w (%v)", err, c)
		}
		fmt.Fprintf(os.Stderr, "meshbench: FAILED after %s: %v\n", time.Since(b.began).Round(100*time.Millisecond), err)
		return 1
	}
	fmt.Fprintf(os.Stderr, "meshbench: done in %s\n", time.Since(b.began).Round(100*time.Millisecond))
	return 0
}

// bench is one run.
type bench struct {
	pl         plan
	bin        string
	profileDir string
	keep       bool
	only       map[string]bool // workloads to run; empty: all
	res        *results
	began      time.Time
	// istioBin is the istiohbone binary (built or given); istioSkip says why there is none.
	istioBin, istioSkip string

	srv     *servers
	idleSrv *idleEcho // the idle echo process, when idle runs
	nodes   nodeSet   // running nodes (cleared once stopped)
	started nodeSet   // every node started, for their logs
	direct  path
	ztgo    path
	// passthrough is node a's SOCKS5 to an address outside the mesh (throughput and round trips).
	passthrough path
	// peers are performance.md's peers that run (the stunnel pair, Istio's Go HBONE pair), in
	// the order their runs follow ztgo's in each round; peerSkips say why one does not run.
	peers     []*peer
	peerSkips []string
	// cuts counts, by path, the source connections whose last write the source abandoned
	// (sourceStopGrace after the client's FIN).
	cuts     map[string]int64
	notes    []string
	problems []string
}

// workloadNames are the workloads --only selects from.
var workloadNames = []string{"tp1", "tp1r", "tp8", "rtt1", "rtt1k", "rate", "conn", "conn8", "idle", "slow"}

// rounded reports whether any workload that runs in rounds is selected.
func (b *bench) rounded() bool {
	for _, w := range workloadNames {
		if w != "idle" && w != "slow" && b.runs(w) {
			return true
		}
	}
	return false
}

func (b *bench) runs(workload string) bool { return len(b.only) == 0 || b.only[workload] }

func logf(format string, a ...any) {
	fmt.Fprintf(os.Stderr, "meshbench: "+format+"\n", a...)
}

// run does the whole run and returns the report; a report with problems comes with an error.
func (b *bench) run(ctx context.Context) (text string, err error) {
	bin, err := exec.LookPath(b.bin)
	if err != nil {
		return "", fmt.Errorf("ztgo binary %s: %w (build it with `make build`)", b.bin, err)
	}
	if bin, err = filepath.Abs(bin); err != nil {
		return "", err
	}
	m, err := describeMachine(ctx, bin)
	if err != nil {
		return "", err
	}
	m.loadStart = loadAvg()
	logf("%s mode, %d rounds; %s, %d cores, kernel %s, %s; ztgo %s", b.pl.name, b.pl.rounds, m.cpuModel, m.cores, m.kernel, m.goVersion, m.ztgo)
	// Before the nodes start, so that they inherit it (syscall.Setrlimit also stops os/exec
	// from restoring the original soft limit in children).
	lim, err := raiseNoFile(uint64(b.pl.idleN + 4*fdHeadroom))
	if err != nil {
		return "", err
	}
	logf("RLIMIT_NOFILE %d (hard %d), inherited by the nodes", lim.Cur, lim.Max)

	dir, err := os.MkdirTemp("", "meshbench-")
	if err != nil {
		return "", err
	}
	defer func() {
		if b.keep {
			logf("temp dir kept: %s", dir)
			return
		}
		os.RemoveAll(dir)
	}()
	if err := os.WriteFile(filepath.Join(dir, meshFile), []byte(meshYAML), 0o644); err != nil {
		return "", err
	}
	if b.srv, err = startServers(); err != nil {
		return "", err
	}
	defer b.srv.close()
	if b.runs("idle") {
		if b.idleSrv, err = startIdleEcho(); err != nil {
			return "", err
		}
		defer b.idleSrv.stop()
	}

	// Node a first: it creates the CA in the empty directory; node b then loads the same one.
	defer func() { err = errors.Join(err, b.stopNodes()) }()
	caDir := filepath.Join(dir, "ca")
	for _, s := range []struct{ name, host string }{{nodeA, hostA}, {nodeB, hostB}} {
		t0 := time.Now()
		n, err := startNode(bin, dir, caDir, s.name, s.host)
		if err != nil {
			return "", err
		}
		b.nodes = append(b.nodes, n)
		b.started = append(b.started, n)
		if err := n.waitReady(ctx, readyTimeout); err != nil {
			return "", err
		}
		logf("%s ready in %s (pid %d)", s.name, time.Since(t0).Round(time.Millisecond), n.Cmd.Process.Pid)
	}
	if err := sleep(ctx, 250*time.Millisecond); err != nil {
		return "", err
	}
	if err := b.recordMem("rss.idle", ""); err != nil {
		return "", err
	}

	b.direct = directPath()
	b.ztgo = ztgoPath(b.nodes[0].SOCKS5Addr())
	b.passthrough = passthroughPath(b.nodes[0].SOCKS5Addr())
	for _, p := range []path{b.direct, b.ztgo, b.passthrough} {
		if err := checkPath(ctx, p); err != nil {
			return "", err
		}
	}
	defer b.stopPeers()
	if b.runs("tp1") || b.runs("tp1r") || b.runs("tp8") {
		b.startPeer(ctx, "stunnel pair", func() (*peer, error) { return startStunnel(ctx, dir) })
	}
	if b.needsIstio() {
		b.startPeer(ctx, "Istio's Go HBONE pair", func() (*peer, error) {
			if b.istioBin == "" {
				return nil, errors.New(b.istioSkip)
			}
			return startIstio(ctx, dir, b.istioBin)
		})
	}
	if err := b.srv.echo.waitIdle(drainLimit); err != nil {
		return "", err
	}

	if b.runs("idle") {
		// First: on fresh nodes, memory freed by earlier workloads and not yet returned to the
		// OS cannot absorb the connections' memory and hide it from the RSS.
		if err := b.idle(ctx); err != nil {
			return "", fmt.Errorf("idle connections: %w", err)
		}
	}
	if b.runs("slow") {
		// Once, before the rounds: the nodes' buffer pools have not been filled by the
		// throughput workloads yet, so the heap shows what the slow flow makes them allocate.
		if err := b.slow(ctx); err != nil {
			return "", fmt.Errorf("slow reader: %w", err)
		}
	}
	for r := range b.pl.rounds {
		if !b.rounded() {
			break
		}
		if err := b.round(ctx, r); err != nil {
			return "", err
		}
	}
	if b.profileDir != "" && b.rounded() {
		if err := b.profile(ctx); err != nil {
			return "", err
		}
	}
	if err := b.recordMem("rss.end", "hwm.end"); err != nil {
		return "", err
	}
	if err := b.nodes.alive(); err != nil {
		return "", err
	}
	if err := b.peersAlive(); err != nil {
		return "", err
	}
	for _, p := range b.peers {
		b.notes = append(b.notes, p.logNotes()...) // before stop: the logs are theirs
	}
	b.stopPeers()
	// Stop now, so a bad exit is part of the report.
	if err := b.stopNodes(); err != nil {
		b.problems = append(b.problems, err.Error())
	}
	b.problems = append(b.problems, b.srv.errors()...)
	if b.idleSrv != nil {
		b.problems = append(b.problems, b.idleSrv.errors()...)
	}
	for _, name := range allPaths {
		if n := b.cuts[name]; n > 0 {
			b.notes = append(b.notes, fmt.Sprintf("Server → client throughput, %s path: on %d connection(s) the source's last write "+
				"was still blocked %s after the client's FIN and was abandoned (the path stopped carrying the response at the FIN).",
				name, n, sourceStopGrace))
		}
	}
	b.notes = append(b.notes, b.nodeLogNotes()...)
	m.loadEnd = loadAvg()
	text = report(b.pl, m, b.res, b.began, time.Since(b.began), b.peerSkips, b.notes, b.problems)
	if len(b.problems) > 0 {
		return text, fmt.Errorf("%d problems: %s", len(b.problems), strings.Join(b.problems, "; "))
	}
	return text, nil
}

func (b *bench) stopNodes() error {
	var errs []error
	for i := len(b.nodes) - 1; i >= 0; i-- {
		n := b.nodes[i]
		if err := n.Stop(stopGrace); err != nil {
			errs = append(errs, fmt.Errorf("stopping %s: %w", n.Name, err))
		}
	}
	b.nodes = nil
	return errors.Join(errs...)
}

// recordMem records VmRSS (and VmHWM when hwmKey is set) of each node and their sum, in MiB.
func (b *bench) recordMem(rssKey, hwmKey string) error {
	var rss, hwm int64
	for i, n := range b.nodes {
		r, h, err := n.memKiB()
		if err != nil {
			return err
		}
		suffix := []string{".a", ".b"}[i]
		b.res.add(rssKey+suffix, "ztgo", float64(r)/1024)
		if hwmKey != "" {
			b.res.add(hwmKey+suffix, "ztgo", float64(h)/1024)
		}
		rss += r
		hwm += h
	}
	b.res.add(rssKey, "ztgo", float64(rss)/1024)
	if hwmKey != "" {
		b.res.add(hwmKey, "ztgo", float64(hwm)/1024)
	}
	logf("ztgo RSS (%s): %.1f MiB for both nodes", rssKey, float64(rss)/1024)
	return nil
}

// raiseNoFile raises this process's soft RLIMIT_NOFILE to its hard limit, and both to want
// when the hard limit is lower and the process may raise it (CAP_SYS_RESOURCE); it returns the
// limit in force. Processes started afterwards inherit it.
func raiseNoFile(want uint64) (syscall.Rlimit, error) {
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		return lim, fmt.Errorf("getrlimit RLIMIT_NOFILE: %w", err)
	}
	if lim.Max < want {
		up := syscall.Rlimit{Cur: want, Max: want}
		if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &up); err == nil {
			return up, nil
		}
		// Not allowed: the hard limit stays, and a workload that needs more says so.
	}
	lim.Cur = lim.Max
	if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		return lim, fmt.Errorf("setrlimit RLIMIT_NOFILE to %d: %w", lim.Max, err)
	}
	return lim, nil
}

// idle runs the idle-connection workload through ztgo and records each node's memory.
func (b *bench) idle(ctx context.Context) error {
	s, err := idleConns(ctx, b.ztgo, b.pl.idleN, b.pl.idleMax, b.idleSrv, b.nodes, b.profileDir)
	if err != nil {
		return err
	}
	if err := b.nodes.alive(); err != nil {
		return err
	}
	b.res.add("idle.n", "ztgo", float64(s.n))
	for i := range b.nodes {
		suffix := []string{".a", ".b"}[i]
		b.res.add("idle.rss.before"+suffix, "ztgo", float64(s.rss0[i]))
		b.res.add("idle.rss.after"+suffix, "ztgo", float64(s.rss1[i]))
		b.res.add("idle.heap.before"+suffix, "ztgo", s.mem0[i].heapInuse)
		b.res.add("idle.heap.after"+suffix, "ztgo", s.mem1[i].heapInuse)
		b.res.add("idle.stack.before"+suffix, "ztgo", s.mem0[i].stackInuse)
		b.res.add("idle.stack.after"+suffix, "ztgo", s.mem1[i].stackInuse)
		b.res.add("idle.gr.before"+suffix, "ztgo", s.mem0[i].goroutines)
		b.res.add("idle.gr.after"+suffix, "ztgo", s.mem1[i].goroutines)
		per := func(a, b float64) float64 { return (b - a) / float64(s.n) }
		logf("idle %s: RSS %.1f -> %.1f MiB (%.0f B/conn), heap in use %.1f -> %.1f MiB (%.0f B/conn), stacks %.0f B/conn, goroutines %.0f -> %.0f (%.2f/conn)",
			b.nodes[i].Name, float64(s.rss0[i])/(1<<20), float64(s.rss1[i])/(1<<20), per(float64(s.rss0[i]), float64(s.rss1[i])),
			s.mem0[i].heapInuse/(1<<20), s.mem1[i].heapInuse/(1<<20), per(s.mem0[i].heapInuse, s.mem1[i].heapInuse),
			per(s.mem0[i].stackInuse, s.mem1[i].stackInuse), s.mem0[i].goroutines, s.mem1[i].goroutines, per(s.mem0[i].goroutines, s.mem1[i].goroutines))
	}
	settle := func(w time.Duration, ok bool) string {
		if ok {
			return fmt.Sprintf("settled in %s", w.Round(100*time.Millisecond))
		}
		return fmt.Sprintf("still moving by ≥ %.0f%% per %s after %s (last sample used)", settleDelta*100, settleStep, w.Round(100*time.Millisecond))
	}
	note := fmt.Sprintf("Idle connections: %s opened in %s (%s conn/s, %d at a time, each with a %d-byte round trip); "+
		"RSS %s before and %s once open; goroutines after closing them all: %s.",
		thousands(int64(s.n)), s.open.Round(10*time.Millisecond), fmtRate(float64(s.n)/s.open.Seconds()), idleOpeners, len(idleMsg),
		settle(s.wait0, s.settled0), settle(s.wait1, s.settled1), b.goroutineList(s.goroutinesAfterClose, s.mem0))
	b.notes = append(b.notes, note)
	logf("%s", note)
	if len(s.profiles) > 0 {
		note := fmt.Sprintf("Heap profiles (after a GC in the node) while the %s connections were idle: %s/idle-heap-node-{a,b}.pprof.",
			thousands(int64(s.n)), b.profileDir)
		b.notes = append(b.notes, note)
		logf("%s", note)
	}
	return nil
}

// slow runs the slow-reader workload, direct and through ztgo at once, and records it.
func (b *bench) slow(ctx context.Context) error {
	run, err := slowReaders(ctx, []path{b.direct, b.ztgo}, []*server{b.srv.slowDirect, b.srv.slowZtgo}, b.pl.slowDur, b.nodes)
	if err != nil {
		return err
	}
	if err := b.nodes.alive(); err != nil {
		return err
	}
	b.res.slow = &run
	sum := run.summarize()
	for i, name := range run.paths {
		logf("slow %-6s server wrote %.2f MiB in %s (%.1f KiB in the second half, within %d KiB of its end from %s); client read %d B, then drained %.2f MiB",
			name, float64(sum.written[i])/(1<<20), run.duration.Round(100*time.Millisecond), float64(sum.secondHalf[i])/1024,
			slowStallSlack>>10, sum.stalledBy[i].Round(100*time.Millisecond), run.read[i], float64(run.drained[i])/(1<<20))
	}
	for i, n := range b.nodes {
		logf("slow %s: live heap %.2f -> %.2f MiB (growth %.2f MiB, bound %.0f MiB); heap in use without GC %.2f MiB before, largest growth %.2f MiB; RSS largest growth %.2f MiB",
			n.Name, run.live0[i]/(1<<20), run.live1[i]/(1<<20), sum.liveGrowth[i]/(1<<20), float64(slowBound)/(1<<20),
			run.heap0[i]/(1<<20), sum.heapGrowth[i]/(1<<20), float64(sum.rssGrowth[i])/(1<<20))
	}
	return nil
}

// goroutineList renders each node's goroutines after the idle connections closed, against
// their number before.
func (b *bench) goroutineList(after []float64, before []goMem) string {
	var parts []string
	for i, g := range after {
		parts = append(parts, fmt.Sprintf("%s %.0f (%.0f before opening)", b.nodes[i].Name, g, before[i].goroutines))
	}
	return strings.Join(parts, ", ")
}

// round runs every workload once on each path, direct first.
func (b *bench) round(ctx context.Context, r int) error {
	tag := fmt.Sprintf("round %d/%d", r+1, b.pl.rounds)
	type tpSpec struct {
		key     string
		reverse bool
		streams int
		srv     *server
	}
	for _, w := range []tpSpec{
		{"tp1", false, 1, b.srv.sink},
		{"tp1r", true, 1, b.srv.source},
		{"tp8", false, 8, b.srv.sink},
	} {
		if !b.runs(w.key) {
			continue
		}
		for _, p := range b.paths(false) {
			var ns nodeSet
			if p.name == "ztgo" || p.name == "passthrough" { // passthrough: node a works, node b idles
				ns = b.nodes
			}
			cut0 := w.srv.cut.Load()
			s, err := throughput(ctx, b.pl, p, w.reverse, w.streams, w.srv, ns, nil)
			if err != nil {
				return fmt.Errorf("%s %s %s: %w", tag, w.key, p.name, err)
			}
			if n := w.srv.cut.Load() - cut0; n > 0 {
				b.cuts[p.name] += n
			}
			if err := b.nodes.alive(); err != nil {
				return err
			}
			if err := b.peersAlive(); err != nil {
				return err
			}
			b.res.add(w.key, p.name, s.gbps)
			b.res.add("busy."+w.key, p.name, s.busy)
			b.res.add("self."+w.key, p.name, s.self)
			b.res.add("softirq."+w.key, p.name, s.softirq)
			b.res.add("steal."+w.key, p.name, s.steal)
			b.res.add("other."+w.key, p.name, s.other)
			extra := ""
			if len(s.cpu) == 2 && s.bytes > 0 {
				gb := float64(s.bytes) / 1e9
				b.res.add("cpu."+w.key+".a", p.name, s.cpu[0]/gb)
				b.res.add("cpu."+w.key+".b", p.name, s.cpu[1]/gb)
				b.res.add("cpu."+w.key, p.name, (s.cpu[0]+s.cpu[1])/gb)
				b.res.add("util."+w.key+".a", p.name, s.cpu[0]/s.secs)
				b.res.add("util."+w.key+".b", p.name, s.cpu[1]/s.secs)
				b.res.add("util."+w.key, p.name, (s.cpu[0]+s.cpu[1])/s.secs)
				extra = fmt.Sprintf(", ztgo CPU %.2f + %.2f s (%.2f s/GB)", s.cpu[0], s.cpu[1], (s.cpu[0]+s.cpu[1])/gb)
			}
			logf("%s %-4s %-11s %6.2f Gbit/s (%.2f GB in %.2fs, machine %.2f CPUs busy: softirq %.2f, steal %.2f, bench %.2f, other %.2f%s)",
				tag, w.key, p.name, s.gbps, float64(s.bytes)/1e9, s.secs, s.busy, s.softirq, s.steal, s.self, s.other, extra)
		}
	}
	for _, w := range []struct {
		key  string
		size int
	}{{"rtt1", 1}, {"rtt1k", 1024}} {
		if !b.runs(w.key) {
			continue
		}
		for _, p := range b.paths(true) {
			d, err := roundTrips(ctx, p, w.size, b.pl.rttCount, b.srv.echo)
			if err != nil {
				return fmt.Errorf("%s %s: %w", tag, w.key, err)
			}
			if err := b.nodes.alive(); err != nil {
				return err
			}
			if err := b.peersAlive(); err != nil {
				return err
			}
			p50, p99 := percentile(d, 50), percentile(d, 99)
			b.res.add(w.key+".p50", p.name, p50)
			b.res.add(w.key+".p99", p.name, p99)
			logf("%s %-5s %-11s p50 %7.1f µs, p99 %7.1f µs (%d round trips)", tag, w.key, p.name, p50, p99, len(d))
		}
	}
	if b.runs("rate") {
		for _, p := range []path{b.direct, b.ztgo} {
			// The nodes' CPU is sampled on the direct run too: their cost with no traffic.
			s, err := fixedRate(ctx, p, b.pl.rateDur, b.srv.echo, b.nodes)
			if err != nil {
				return fmt.Errorf("%s rate %s: %w", tag, p.name, err)
			}
			if err := b.nodes.alive(); err != nil {
				return err
			}
			b.res.add("rate.qps", p.name, s.qps)
			b.res.add("rate.p50", p.name, s.p50)
			b.res.add("rate.p90", p.name, s.p90)
			b.res.add("rate.p99", p.name, s.p99)
			extra := ""
			if p.name == "direct" && len(s.cpu) == 2 && s.secs > 0 {
				b.res.add("util.rate.a", p.name, s.cpu[0]/s.secs)
				b.res.add("util.rate.b", p.name, s.cpu[1]/s.secs)
				extra = fmt.Sprintf(", ztgo nodes (no traffic) %.3f + %.3f vCPU", s.cpu[0]/s.secs, s.cpu[1]/s.secs)
			}
			if p.name == "ztgo" && len(s.cpu) == 2 && s.qps > 0 && s.secs > 0 {
				b.res.add("util.rate.a", p.name, s.cpu[0]/s.secs)
				b.res.add("util.rate.b", p.name, s.cpu[1]/s.secs)
				// vCPU per 1,000 calls/s: CPU seconds per second of the run, per thousand calls/s.
				per := func(c float64) float64 { return c / s.secs / (s.qps / 1000) }
				b.res.add("cpu.rate.a", p.name, per(s.cpu[0]))
				b.res.add("cpu.rate.b", p.name, per(s.cpu[1]))
				b.res.add("cpu.rate", p.name, per(s.cpu[0]+s.cpu[1]))
				extra = fmt.Sprintf(", ztgo CPU %.3f + %.3f s: %.4f + %.4f vCPU per 1,000 rps", s.cpu[0], s.cpu[1], per(s.cpu[0]), per(s.cpu[1]))
			}
			logf("%s rate  %-6s %7.1f calls/s (%d in %.2fs), p50 %6.1f µs, p90 %6.1f µs, p99 %7.1f µs%s", tag, p.name,
				s.qps, s.calls, s.secs, s.p50, s.p90, s.p99, extra)
		}
	}
	for _, w := range []struct {
		key     string
		clients int
		dur     time.Duration
	}{{"conn", 1, b.pl.connDur}, {"conn8", 8, b.pl.conn8Dur}} {
		if !b.runs(w.key) {
			continue
		}
		for _, p := range []path{b.direct, b.ztgo} {
			var ns nodeSet
			if p.name == "ztgo" {
				ns = b.nodes
			}
			s, err := connRate(ctx, p, w.clients, w.dur, b.srv.first, ns, nil)
			if err != nil {
				return fmt.Errorf("%s %s %s: %w", tag, w.key, p.name, err)
			}
			if err := b.nodes.alive(); err != nil {
				return err
			}
			if s.errs > 0 {
				b.problems = append(b.problems, fmt.Sprintf("%s %s %s: %d failed connections of %d (first: %v)", tag, w.key, p.name, s.errs, s.n+s.errs, s.firstErr))
			}
			b.res.add(w.key+".rate", p.name, s.rate)
			if w.clients == 1 {
				b.res.add(w.key+".p50", p.name, percentile(s.lat, 50))
				b.res.add(w.key+".p99", p.name, percentile(s.lat, 99))
			}
			extra := ""
			if len(s.cpu) == 2 && s.n > 0 {
				us := func(c float64) float64 { return c * 1e6 / float64(s.n) }
				b.res.add("cpu."+w.key+".a", p.name, us(s.cpu[0]))
				b.res.add("cpu."+w.key+".b", p.name, us(s.cpu[1]))
				b.res.add("cpu."+w.key, p.name, us(s.cpu[0]+s.cpu[1]))
				extra = fmt.Sprintf(", ztgo CPU %.0f µs/conn", us(s.cpu[0]+s.cpu[1]))
			}
			logf("%s %-5s %-6s %7.0f conn/s, p50 %6.1f µs, p99 %7.1f µs (%d connections, %d errors%s)", tag, w.key, p.name,
				s.rate, percentile(s.lat, 50), percentile(s.lat, 99), s.n, s.errs, extra)
		}
	}
	return nil
}

// profile captures CPU profiles of both nodes during two extra (unrecorded) runs through ztgo:
// 1-stream client -> server throughput, and new connections from 8 clients.
func (b *bench) profile(ctx context.Context) error {
	if err := os.MkdirAll(b.profileDir, 0o755); err != nil {
		return err
	}
	secs := max(1, int(b.pl.tpDur/time.Second))
	var errc chan error
	start := func(prefix string) func() {
		return func() {
			errc = make(chan error, len(b.nodes))
			for i, n := range b.nodes {
				file := filepath.Join(b.profileDir, prefix+"-node-"+[]string{"a", "b"}[i]+".pprof")
				go func() { errc <- n.cpuProfile(ctx, secs, file) }()
			}
		}
	}
	collect := func(err error) error {
		var errs []error
		if errc != nil {
			for range b.nodes {
				errs = append(errs, <-errc)
			}
		}
		errc = nil
		return errors.Join(append([]error{err}, errs...)...)
	}

	s, err := throughput(ctx, b.pl, b.ztgo, false, 1, b.srv.sink, b.nodes, start("throughput"))
	if err := collect(err); err != nil {
		return fmt.Errorf("throughput profile run: %w", err)
	}
	note := fmt.Sprintf("CPU profiles (%d s, both nodes) during an extra unrecorded 1-stream client → server run through ztgo "+
		"(%.2f Gbit/s while profiled): %s/throughput-node-{a,b}.pprof.", secs, s.gbps, b.profileDir)
	b.notes = append(b.notes, note)
	logf("%s", note)

	// The profile spans secs; the clients run a little longer so it sees only churn.
	c, err := connRate(ctx, b.ztgo, 8, time.Duration(secs)*time.Second+200*time.Millisecond, b.srv.first, b.nodes, start("connrate"))
	if err := collect(err); err != nil {
		return fmt.Errorf("connection profile run: %w", err)
	}
	if c.errs > 0 {
		b.problems = append(b.problems, fmt.Sprintf("connection profile run: %d failed connections (first: %v)", c.errs, c.firstErr))
	}
	note = fmt.Sprintf("CPU profiles (%d s, both nodes) during an extra unrecorded run of new connections from 8 clients through ztgo "+
		"(%.0f conn/s while profiled): %s/connrate-node-{a,b}.pprof.", secs, c.rate, b.profileDir)
	b.notes = append(b.notes, note)
	logf("%s", note)
	return nil
}

// nodeLogNotes summarises what the nodes logged (at warn level, so every line is a warning or
// an error).
func (b *bench) nodeLogNotes() []string {
	var notes []string
	for _, n := range b.started {
		lines := n.logLines()
		if len(lines) == 0 {
			notes = append(notes, fmt.Sprintf("%s logged nothing at warn level or above.", n.Name))
			continue
		}
		shown := lines[:min(3, len(lines))]
		notes = append(notes, fmt.Sprintf("%s logged %d lines at warn level or above; first: `%s`", n.Name, len(lines), strings.Join(shown, "` `")))
	}
	return notes
}

// describeMachine records the CPU, cores, kernel, Go and ztgo versions.
func describeMachine(ctx context.Context, bin string) (machine, error) {
	m := machine{cores: runtime.NumCPU(), gomaxprocs: runtime.GOMAXPROCS(0), goVersion: runtime.Version(), binary: bin}
	if f, err := os.Open("/proc/cpuinfo"); err == nil {
		sc := bufio.NewScanner(f)
		procs := 0
		for sc.Scan() {
			k, v, ok := strings.Cut(sc.Text(), ":")
			if !ok {
				continue
			}
			switch strings.TrimSpace(k) {
			case "model name":
				if m.cpuModel == "" {
					m.cpuModel = strings.TrimSpace(v)
				}
			case "processor":
				procs++
			}
		}
		f.Close()
		if procs > 0 {
			m.cores = procs
		}
	}
	if m.cpuModel == "" {
		m.cpuModel = "unknown CPU"
	}
	vctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if out, err := exec.CommandContext(vctx, "uname", "-r").Output(); err == nil {
		m.kernel = strings.TrimSpace(string(out))
	} else if b, err := os.ReadFile("/proc/sys/kernel/osrelease"); err == nil {
		m.kernel = strings.TrimSpace(string(b))
	}
	out, err := exec.CommandContext(vctx, bin, "version").Output()
	if err != nil {
		return m, fmt.Errorf("%s version: %w", bin, err)
	}
	m.ztgo = strings.TrimSpace(string(out))
	return m, nil
}

// startPeer starts a peer with start and checks its path; when the peer is missing or does not
// work, its runs are skipped (a line in b.peerSkips says why) and the run goes on.
func (b *bench) startPeer(ctx context.Context, label string, start func() (*peer, error)) {
	p, err := start()
	if err == nil {
		if err = checkPath(ctx, p.path); err != nil {
			err = fmt.Errorf("%w; %s", err, p.logs())
			p.stop()
		}
	}
	if err != nil {
		skip := fmt.Sprintf("%s: SKIPPED, %v", label, err)
		b.peerSkips = append(b.peerSkips, skip)
		logf("%s", skip)
		return
	}
	b.peers = append(b.peers, p)
	logf("%s ready (%s): %s", label, p.bin, p.pids())
}

// needsIstio reports whether a selected workload runs Istio's Go HBONE pair.
func (b *bench) needsIstio() bool {
	for _, w := range []string{"tp1", "tp1r", "tp8", "rtt1", "rtt1k"} {
		if b.runs(w) {
			return true
		}
	}
	return false
}

// paths are the paths of the throughput and round-trip workloads in the order of a round:
// direct, ztgo, passthrough, then each peer that runs (for the round trips, those that run
// them).
func (b *bench) paths(rtt bool) []path {
	ps := []path{b.direct, b.ztgo, b.passthrough}
	for _, p := range b.peers {
		if !rtt || p.rtt {
			ps = append(ps, p.path)
		}
	}
	return ps
}

func (b *bench) peersAlive() error {
	for _, p := range b.peers {
		if err := p.alive(); err != nil {
			return err
		}
	}
	return nil
}

// stopPeers stops every peer's processes; safe to call twice.
func (b *bench) stopPeers() {
	for _, p := range b.peers {
		p.stop()
	}
}
