//go:build linux

package main

import (
	"fmt"
	"math"
	"runtime/debug"
	"slices"
	"strings"
	"time"

	"github.com/ztgo/ztgo/stages/hbone"
)

// results holds one value per round for each metric and path.
type results struct {
	samples map[string]map[string][]float64 // metric -> path -> one value per round
	slow    *slowRun                        // the slow-reader run (once), when it ran
}

func newResults() *results { return &results{samples: map[string]map[string][]float64{}} }

func (r *results) add(metric, path string, v float64) {
	m := r.samples[metric]
	if m == nil {
		m = map[string][]float64{}
		r.samples[metric] = m
	}
	m[path] = append(m[path], v)
}

func (r *results) values(metric, path string) []float64 { return r.samples[metric][path] }

func (r *results) median(metric, path string) (float64, bool) {
	v := r.values(metric, path)
	if len(v) == 0 {
		return 0, false
	}
	return median(v), true
}

func median(v []float64) float64 {
	s := slices.Clone(v)
	slices.Sort(s)
	n := len(s)
	if n%2 == 1 {
		return s[n/2]
	}
	return (s[n/2-1] + s[n/2]) / 2
}

// percentile is the nearest-rank percentile q (0..100) of d, in microseconds.
func percentile(d []time.Duration, q float64) float64 {
	if len(d) == 0 {
		return math.NaN()
	}
	s := slices.Clone(d)
	slices.Sort(s)
	i := int(math.Ceil(q/100*float64(len(s)))) - 1
	i = max(0, min(i, len(s)-1))
	return float64(s[i]) / float64(time.Microsecond)
}

// row is one line of the comparison table.
type row struct {
	key, workload, metric string
	format                func(float64) string
	target                string
	// check says whether the target is met; nil when the row has no target.
	check func(direct, ztgo float64) bool
	// vs are the targets against the peers, by path name, where performance.md sets one.
	vs map[string]peerTarget
}

// peerTarget is a target against a peer.
type peerTarget struct {
	target string
	check  func(peer, ztgo float64) bool
}

// peerCols are the peers' columns of the report, in the order of a round; a peer's columns
// appear when it has values.
var peerCols = []struct{ path, label string }{
	{"stunnel", "stunnel pair"},
	{"istio", "Istio Go HBONE"},
}

func fmtGbps(v float64) string { return fmt.Sprintf("%.2f", v) }
func fmtUS(v float64) string   { return fmt.Sprintf("%.1f", v) }
func fmtRate(v float64) string { return thousands(int64(math.Round(v))) }

func thousands(n int64) string {
	s := fmt.Sprint(n)
	if n < 0 {
		return "-" + thousands(-n)
	}
	var b strings.Builder
	for i, c := range s {
		if i > 0 && (len(s)-i)%3 == 0 {
			b.WriteByte(',')
		}
		b.WriteRune(c)
	}
	return b.String()
}

func ratioAtLeast(x float64) func(d, z float64) bool {
	return func(d, z float64) bool { return d > 0 && z/d >= x }
}

func ratioAtMost(x float64) func(d, z float64) bool {
	return func(d, z float64) bool { return d > 0 && z/d <= x }
}

// oneStreamVs are performance.md's 1-stream throughput targets against the peers.
var oneStreamVs = map[string]peerTarget{
	"stunnel": {"≥ 2.0x stunnel", ratioAtLeast(2.0)},
	"istio":   {"≥ 2.5x Istio Go HBONE", ratioAtLeast(2.5)},
}

var rows = []row{
	{"tp1", "Throughput, 1 stream, client → server", "Gbit/s", fmtGbps, "≥ 0.30x direct", ratioAtLeast(0.30), oneStreamVs},
	{"tp1r", "Throughput, 1 stream, server → client", "Gbit/s", fmtGbps, "≥ 0.30x direct", ratioAtLeast(0.30), oneStreamVs},
	{"tp8", "Throughput, 8 streams, client → server", "Gbit/s (sum)", fmtGbps, "≥ 0.45x direct", ratioAtLeast(0.45), nil},
	{"rtt1.p50", "Round trip, 1 B echo, one connection", "p50 µs", fmtUS, "≤ 3.0x direct", ratioAtMost(3.0), nil},
	{"rtt1.p99", "Round trip, 1 B echo, one connection", "p99 µs", fmtUS, "", nil, nil},
	{"rtt1k.p50", "Round trip, 1 KiB echo, one connection", "p50 µs", fmtUS, "≤ 3.0x direct", ratioAtMost(3.0), nil},
	{"rtt1k.p99", "Round trip, 1 KiB echo, one connection", "p99 µs", fmtUS, "", nil, nil},
	{"conn.rate", "New connection + first byte, 1 client", "conn/s", fmtRate, "", nil, nil},
	{"conn.p50", "New connection + first byte, 1 client", "p50 µs", fmtUS, "≤ 3.0x direct", ratioAtMost(3.0), nil},
	{"conn.p99", "New connection + first byte, 1 client", "p99 µs", fmtUS, "", nil, nil},
	{"conn8.rate", "New connection + first byte, 8 clients", "conn/s", fmtRate, "≥ 10,000/s", func(_, z float64) bool { return z >= 10000 }, nil},
}

// passthroughVs are performance.md's targets for the passthrough path ("plaintext passthrough:
// splice relay, ≥ 0.80x direct"), by row; check gets the direct and the passthrough medians.
var passthroughVs = map[string]peerTarget{
	"tp1":  {"≥ 0.80x direct", ratioAtLeast(0.80)},
	"tp1r": {"≥ 0.80x direct", ratioAtLeast(0.80)},
	"tp8":  {"≥ 0.80x direct", ratioAtLeast(0.80)},
}

// allPaths are every path's name, in the order of a round.
var allPaths = []string{"direct", "ztgo", "passthrough", "stunnel", "istio"}

// resRow is one line of the resources table (ztgo nodes only).
type resRow struct {
	what, unit string
	keys       [3]string // node a, node b, both
	format     func(float64) string
	target     string
}

func fmtMiB(v float64) string  { return fmt.Sprintf("%.1f", v) }
func fmtSecs(v float64) string { return fmt.Sprintf("%.2f", v) }

var resRows = []resRow{
	{"RSS at idle after start", "MiB", [3]string{"rss.idle.a", "rss.idle.b", "rss.idle"}, fmtMiB, "≤ 20 MB per node is specified with 100 workloads (here 2): indicative only"},
	{"RSS after all workloads", "MiB", [3]string{"rss.end.a", "rss.end.b", "rss.end"}, fmtMiB, ""},
	{"Peak RSS (VmHWM) over the run", "MiB", [3]string{"hwm.end.a", "hwm.end.b", "hwm.end"}, fmtMiB, ""},
	{"CPU per GB moved, 1 stream client → server", "CPU s/GB", [3]string{"cpu.tp1.a", "cpu.tp1.b", "cpu.tp1"}, fmtSecs, ""},
	{"CPU per GB moved, 1 stream server → client", "CPU s/GB", [3]string{"cpu.tp1r.a", "cpu.tp1r.b", "cpu.tp1r"}, fmtSecs, ""},
	{"CPU per GB moved, 8 streams client → server", "CPU s/GB", [3]string{"cpu.tp8.a", "cpu.tp8.b", "cpu.tp8"}, fmtSecs, ""},
	{"CPU used during 1-stream client → server window", "vCPU", [3]string{"util.tp1.a", "util.tp1.b", "util.tp1"}, fmtSecs, ""},
	{"CPU per new connection, 1 client", "CPU µs/conn", [3]string{"cpu.conn.a", "cpu.conn.b", "cpu.conn"}, fmtUS, ""},
	{"CPU per new connection, 8 clients", "CPU µs/conn", [3]string{"cpu.conn8.a", "cpu.conn8.b", "cpu.conn8"}, fmtUS, ""},
}

// passthroughResRows are the nodes' resources during the passthrough path's windows, where
// node a relays alone and node b carries nothing.
var passthroughResRows = []resRow{
	{"Passthrough: CPU per GB moved, 1 stream client → server", "CPU s/GB", [3]string{"cpu.tp1.a", "cpu.tp1.b", "cpu.tp1"}, fmtSecs, ""},
	{"Passthrough: CPU per GB moved, 1 stream server → client", "CPU s/GB", [3]string{"cpu.tp1r.a", "cpu.tp1r.b", "cpu.tp1r"}, fmtSecs, ""},
	{"Passthrough: CPU per GB moved, 8 streams client → server", "CPU s/GB", [3]string{"cpu.tp8.a", "cpu.tp8.b", "cpu.tp8"}, fmtSecs, ""},
	{"Passthrough: CPU used during 1-stream client → server window", "vCPU", [3]string{"util.tp1.a", "util.tp1.b", "util.tp1"}, fmtSecs, ""},
}

// Memory per idle proxied connection (performance.md): ≤ 4 KB, moonshot 2 KB. KB here is
// 1,000 bytes, as in ztunnel's ~3.8 KB (38 MB for 10k connections).
const (
	idleTargetBytes   = 4000
	idleMoonshotBytes = 2000
)

func fmtBytes(v float64) string { return thousands(int64(math.Round(v))) }

// idleReport renders the idle-connection table, or nothing when the workload did not run.
func idleReport(r *results) string {
	nv, ok := r.median("idle.n", "ztgo")
	if !ok || nv <= 0 {
		return ""
	}
	var b strings.Builder
	p := func(format string, a ...any) { fmt.Fprintf(&b, format, a...) }
	p("Memory per idle connection, ztgo only (the direct path has no proxy to measure): %s connections from the client "+
		"through node a's SOCKS5, HBONE to node b (pooled, ztgo's default 100 streams per HBONE connection) and node b to an "+
		"echo server (a process of its own), each carrying one %d-byte round trip, then left idle. Before opening them and once they are open, the "+
		"nodes' VmRSS is sampled every %s until no node moved by %.0f%% or more in %d steps running (at most %s), then "+
		"go_memstats_heap_inuse_bytes, go_memstats_stack_inuse_bytes and go_goroutines are read from each node's /metrics "+
		"(no GC forced). Per connection "+
		"is (idle − before) / %s. Target (performance.md): RSS ≤ 4 KB per connection (ztunnel ~3.8 KB), moonshot 2 KB; "+
		"KB = 1,000 B; the ratio column is per connection / 4 KB.\n\n",
		thousands(int64(nv)), len(idleMsg), settleStep, settleDelta*100, settleCalm, settleLimit, thousands(int64(nv)))
	p("| node | measure | before | idle, %s open | per connection | per connection / 4 KB | target | verdict |\n", thousands(int64(nv)))
	p("|---|---|---:|---:|---:|---:|---|---|\n")
	type cell struct{ before, after float64 }
	get := func(key, suffix string) (cell, bool) {
		b0, ok0 := r.median(key+".before"+suffix, "ztgo")
		b1, ok1 := r.median(key+".after"+suffix, "ztgo")
		return cell{b0, b1}, ok0 && ok1
	}
	mib := func(v float64) string { return fmt.Sprintf("%.1f MiB", v/(1<<20)) }
	count := func(v float64) string { return thousands(int64(math.Round(v))) }
	line := func(node, measure string, c cell, format func(float64) string, unit string, target bool) {
		per := (c.after - c.before) / nv
		ratio, tgt, verdict := "—", "—", "—"
		if unit == "B" {
			ratio = fmt.Sprintf("%.2fx", per/idleTargetBytes)
		}
		if target {
			tgt = "≤ 4 KB (moonshot 2 KB)"
			verdict = "missed"
			switch {
			case per <= idleMoonshotBytes:
				verdict = "met (moonshot too)"
			case per <= idleTargetBytes:
				verdict = "met"
			}
		}
		perS := fmt.Sprintf("%s %s", fmtBytes(per), unit)
		if unit != "B" {
			perS = fmt.Sprintf("%.2f", per)
		}
		p("| %s | %s | %s | %s | %s | %s | %s | %s |\n", node, measure, format(c.before), format(c.after), perS, ratio, tgt, verdict)
	}
	var sum cell
	haveBoth := true
	for _, n := range []struct{ name, suffix string }{{"node a (client side)", ".a"}, {"node b (server side)", ".b"}} {
		if c, ok := get("idle.rss", n.suffix); ok {
			line(n.name, "RSS", c, mib, "B", true)
			sum.before += c.before
			sum.after += c.after
		} else {
			haveBoth = false
		}
		if c, ok := get("idle.heap", n.suffix); ok {
			line(n.name, "Go heap in use", c, mib, "B", false)
		}
		if c, ok := get("idle.stack", n.suffix); ok {
			line(n.name, "goroutine stacks", c, mib, "B", false)
		}
		if c, ok := get("idle.gr", n.suffix); ok {
			line(n.name, "goroutines", c, count, "", false)
		}
	}
	if haveBoth {
		line("both nodes", "RSS", sum, mib, "B", false)
	}
	p("\n")
	return b.String()
}

// CPU per 1,000 rps of 1 KB request/response (performance.md): ≤ 0.05 vCPU; ztunnel ~0.06
// (istio.io, 1.24, one ztunnel). Latency added by two ztunnels at 1,000 rps of 1 KB (istio.io,
// 1.22): ~0.17 ms at p90, ~0.20 ms at p99.
const (
	rateCPUTarget   = 0.05
	ztunnelAddedP90 = 170.0 // µs
	ztunnelAddedP99 = 200.0 // µs
)

// rateReport renders the fixed-rate table, or nothing when the workload did not run.
func rateReport(pl plan, r *results) string {
	if len(r.values("rate.qps", "direct"))+len(r.values("rate.qps", "ztgo")) == 0 {
		return ""
	}
	var b strings.Builder
	p := func(format string, a ...any) { fmt.Fprintf(&b, format, a...) }
	p("Fixed rate (rate), with fortio's fixed-rate engine (fortio.org/fortio/periodic %s): %s calls/s requested over %d "+
		"threads, each with its own long-lived connection to the echo server (through node a's SOCKS5 for ztgo, established "+
		"before the run), threads staggered over the period (fortio's uniform mode); each call writes %s bytes and reads "+
		"them back. %s per path in every round (interleaved direct, ztgo). Latency is fortio's histogram (1 µs unit, "+
		"buckets 20-100 µs wide between 100 µs and 1 ms, interpolated), medians over the rounds; added latency is the "+
		"difference of those medians. CPU is utime+stime of each node over fortio's run divided by its wall time and by "+
		"the achieved calls/s / 1,000. performance.md's target is ≤ 0.05 vCPU per 1,000 rps; ztunnel's ~0.06 is one "+
		"ztunnel's, so the per-node rows carry the verdict and the both-nodes row reads it strictly. ztunnel's added "+
		"latency (two ztunnels, other hardware, istio.io) is an anchor, not a target.\n\n",
		moduleVersion("fortio.org/fortio"), thousands(rateQPS), rateThreads, thousands(rateSize), pl.rateDur)
	p("| measure | unit | direct | ztgo | ztgo − direct | target or anchor | verdict |\n|---|---|---:|---:|---:|---|---|\n")
	cell := func(key, path string, format func(float64) string) (string, float64, bool) {
		v, ok := r.median(key, path)
		if !ok {
			return "—", 0, false
		}
		return format(v), v, true
	}
	ds, _, _ := cell("rate.qps", "direct", fmtRateTenth)
	zs, _, _ := cell("rate.qps", "ztgo", fmtRateTenth)
	p("| achieved rate | calls/s | %s | %s | — | %s requested | — |\n", ds, zs, thousands(rateQPS))
	for _, q := range []struct {
		key, name string
		anchor    float64
	}{{"rate.p50", "p50", 0}, {"rate.p90", "p90", ztunnelAddedP90}, {"rate.p99", "p99", ztunnelAddedP99}} {
		ds, d, okd := cell(q.key, "direct", fmtUS)
		zs, z, okz := cell(q.key, "ztgo", fmtUS)
		added, anchor, verdict := "—", "—", "—"
		if okd && okz {
			added = fmt.Sprintf("%+.1f", z-d)
		}
		if q.anchor > 0 {
			anchor = fmt.Sprintf("ztunnel adds ~%.0f µs (anchor)", q.anchor)
			if okd && okz {
				verdict = "adds more than ztunnel"
				if z-d <= q.anchor {
					verdict = "adds less than ztunnel"
				}
			}
		}
		p("| latency %s | µs | %s | %s | %s | %s | %s |\n", q.name, ds, zs, added, anchor, verdict)
	}
	for _, n := range []struct{ key, what string }{{"cpu.rate.a", "node a (client side)"}, {"cpu.rate.b", "node b (server side)"}, {"cpu.rate", "both nodes"}} {
		zs, z, ok := cell(n.key, "ztgo", func(v float64) string { return fmt.Sprintf("%.4f", v) })
		target := "≤ 0.05 vCPU per node (ztunnel ~0.06)"
		if n.key == "cpu.rate" {
			target = "≤ 0.05 vCPU (strict reading: both nodes)"
		}
		verdict := "—"
		if ok {
			verdict = "missed"
			if z <= rateCPUTarget {
				verdict = "met"
			}
		}
		p("| CPU per 1,000 rps, %s | vCPU | — | %s | — | %s | %s |\n", n.what, zs, target, verdict)
	}
	for _, n := range []struct{ key, what string }{{"util.rate.a", "node a"}, {"util.rate.b", "node b"}} {
		ds, _, _ := cell(n.key, "direct", func(v float64) string { return fmt.Sprintf("%.4f", v) })
		zs, _, _ := cell(n.key, "ztgo", func(v float64) string { return fmt.Sprintf("%.4f", v) })
		p("| CPU used, %s (direct column: during the direct run, no traffic through the nodes) | vCPU | %s | %s | — | — | — |\n", n.what, ds, zs)
	}
	p("\n")
	return b.String()
}

func fmtRateTenth(v float64) string { return fmt.Sprintf("%.1f", v) }

// moduleVersion is the version of module path this program was built with, or "(version unknown)".
func moduleVersion(path string) string {
	if bi, ok := debug.ReadBuildInfo(); ok {
		for _, d := range bi.Deps {
			if d.Path == path {
				return d.Version
			}
		}
	}
	return "(version unknown)"
}

// slowReport renders the slow-reader tables, or nothing when the workload did not run.
func slowReport(r *results) string {
	run := r.slow
	if run == nil || len(run.points) == 0 {
		return ""
	}
	sum := run.summarize()
	var b strings.Builder
	p := func(format string, a ...any) { fmt.Fprintf(&b, format, a...) }
	mib := func(v float64) string { return fmt.Sprintf("%.2f MiB", v/(1<<20)) }
	p("Slow reader (slow), once, before the rounds: a flood server writes %d KiB chunks as fast as the path takes them while "+
		"the client reads %d bytes a second, for %s; one flow through ztgo (SOCKS5, HBONE, node b to the server) and one "+
		"direct at the same time, each to a flood server of its own. Every %s the bench reads each server's count of "+
		"bytes written and each node's go_memstats_heap_inuse_bytes (/metrics, no GC forced) and VmRSS. After the run each "+
		"client half-closes and reads the rest at full speed. A flow has stalled when the server wrote no more in the second "+
		"half of the run than the client read meanwhile plus %d KiB (a few TCP window openings; a loopback segment is 64 KiB). "+
		"Bound (performance.md: proxy memory for the flow ≤ window size): each node's live Go heap (heap in use right after "+
		"two GCs forced through /debug/pprof/heap?gc=1, the second one freeing what sync.Pools held) at the end of the run, with the flows still stalled, is at most %s "+
		"above its live heap before the run: one HTTP/2 stream window (%s; ztgo's settings are ztunnel's, stages/hbone), "+
		"the data node a may hold for the slow client, plus one frame of the largest size allowed (%s), the frame reader's "+
		"buffer on the pooled connection. Growth / window reads performance.md's \"≤ window size\" strictly. The heap's "+
		"largest growth without a forced GC (garbage included) and the RSS growth are shown beside it.\n\n",
		slowWrite>>10, slowRead, run.duration.Round(100*time.Millisecond), slowSample, slowStallSlack>>10, mib(float64(slowBound)),
		mib(float64(hbone.DefaultStreamWindow)), mib(float64(hbone.DefaultMaxFrameSize)))
	p("| path | server wrote in the run | in the second half | client read | drained after the run | within %d KiB of its end from | verdict |\n", slowStallSlack>>10)
	p("|---|---:|---:|---:|---:|---:|---|\n")
	for i, name := range run.paths {
		verdict := "did not stall"
		if sum.stalled[i] {
			verdict = "stalled"
		}
		by := sum.stalledBy[i].Round(100 * time.Millisecond).String()
		if sum.stalledBy[i] == run.points[0].at {
			by = "the first sample, " + by
		}
		p("| %s | %s | %s KiB | %s B | %s | %s | %s |\n", name, mib(float64(sum.written[i])), fmtKiB(sum.secondHalf[i]),
			thousands(run.read[i]), mib(float64(run.drained[i])), by, verdict)
	}
	p("\n| node | live heap before | live heap at the end | live heap growth | growth / window | bound | verdict | heap in use before (no GC) | its largest growth | VmRSS before | largest RSS growth |\n")
	p("|---|---:|---:|---:|---:|---|---|---:|---:|---:|---:|\n")
	for i := range run.heap0 {
		verdict := "within"
		if sum.liveGrowth[i] > slowBound {
			verdict = "over"
		}
		p("| %s | %s | %s | %s | %.2fx | ≤ %s | %s | %s | %s | %s | %s |\n", []string{"node a (client side)", "node b (server side)"}[i],
			mib(run.live0[i]), mib(run.live1[i]), mib(sum.liveGrowth[i]), sum.liveGrowth[i]/float64(hbone.DefaultStreamWindow),
			mib(float64(slowBound)), verdict,
			mib(run.heap0[i]), mib(sum.heapGrowth[i]), mib(float64(run.rss0[i])), mib(float64(sum.rssGrowth[i])))
	}
	ztgoStalled := false
	for i, name := range run.paths {
		if name == "ztgo" {
			ztgoStalled = sum.stalled[i]
		}
	}
	switch {
	case ztgoStalled && sum.heapBounded:
		p("\n**Slow reader through ztgo: bounded** (the server stalled and neither node's live heap grew by more than %s).\n\n", mib(float64(slowBound)))
	default:
		var why []string
		if !ztgoStalled {
			why = append(why, "the server kept writing in the second half")
		}
		if !sum.heapBounded {
			why = append(why, "a node's live heap grew by more than "+mib(float64(slowBound)))
		}
		p("\n**Slow reader through ztgo: NOT shown bounded** (%s).\n\n", strings.Join(why, "; "))
	}
	zi := slices.Index(run.paths, "ztgo")
	p("Every second sample (%s apart): time, bytes the ztgo flow's server had written in MiB, (Go heap in use of node a / node b in MiB):", 2*slowSample)
	for i, pt := range run.points {
		if i%2 == 1 && i != len(run.points)-1 {
			continue
		}
		w := "—"
		if zi >= 0 {
			w = fmt.Sprintf("%.2f", float64(pt.written[zi])/(1<<20))
		}
		p(" %.1fs %s (%.1f/%.1f);", pt.at.Seconds(), w, pt.heap[0]/(1<<20), pt.heap[1]/(1<<20))
	}
	p("\n\n")
	return b.String()
}

func fmtKiB(v int64) string { return fmt.Sprintf("%.1f", float64(v)/1024) }

// machine describes where the run happened.
type machine struct {
	cpuModel   string
	cores      int
	gomaxprocs int
	kernel     string
	goVersion  string
	ztgo       string
	binary     string
	// loadStart and loadEnd are /proc/loadavg at the start and the end of the run.
	loadStart, loadEnd string
}

// report renders the markdown report.
// peerSkips say why a peer did not run.
func report(pl plan, m machine, r *results, began time.Time, elapsed time.Duration, peerSkips, notes, problems []string) string {
	var b strings.Builder
	p := func(format string, a ...any) { fmt.Fprintf(&b, format, a...) }
	p("## meshbench: ztgo vs direct, %s mode\n\n", pl.name)
	p("Run %s, %s wall time. %d rounds; in every round each workload runs on the direct path and then through ztgo "+
		"(interleaved direct, ztgo, direct, ztgo ...), the throughput and round-trip workloads then on the passthrough path "+
		"and each peer's too (direct, ztgo, passthrough, stunnel, istio ...); each figure is the median over the rounds of that path, "+
		"and the ratio is ztgo / direct of the medians. Throughput: %s windows after a %s warm-up, %d KiB writes. "+
		"Round trips: %d per size per round after %d unrecorded. Fixed rate: %s per path per round. Connections: %s with 1 client, %s with 8 clients. "+
		"Idle connections: %s, once, through ztgo only, before the rounds. Slow reader: %s, once, before the rounds.\n\n",
		began.UTC().Format("2006-01-02 15:04 UTC"), elapsed.Round(100*time.Millisecond), pl.rounds,
		pl.tpDur, pl.tpWarm, chunk>>10, pl.rttCount, rttWarmup, pl.rateDur, pl.connDur, pl.conn8Dur, thousands(int64(pl.idleN)), pl.slowDur)
	p("Machine: %s, %d cores (GOMAXPROCS %d), kernel %s, %s; ztgo: %s. Load average (1, 5, 15 min) at start %s, at end %s.\n\n",
		m.cpuModel, m.cores, m.gomaxprocs, m.kernel, m.goVersion, m.ztgo, m.loadStart, m.loadEnd)

	rounded := false
	with := map[string]bool{} // passthrough and peers with values
	for _, rw := range rows {
		if len(r.values(rw.key, "direct"))+len(r.values(rw.key, "ztgo")) > 0 {
			rounded = true
		}
		if len(r.values(rw.key, "passthrough")) > 0 {
			with["passthrough"] = true
		}
		for _, pc := range peerCols {
			if len(r.values(rw.key, pc.path)) > 0 {
				with[pc.path] = true
			}
		}
	}
	if with["passthrough"] {
		p("ztgo passthrough runs in the throughput and round-trip workloads, right after ztgo in every round (direct, ztgo, "+
			"passthrough ...): the same client socket asks node a's SOCKS5 for %s:port, an address in no workload or service of "+
			"the mesh, where the sink, the source and the echo also listen; node a routes it as passthrough, plain TCP from "+
			"node a to the server (spliced), with no HBONE and no part for node b. Its ratio is passthrough / direct of the "+
			"medians, against performance.md's \"plaintext passthrough ≥ 0.80x direct\" on the throughput rows.\n\n", passthroughIP)
	}
	if with["stunnel"] {
		p("The stunnel pair (performance.md's peer) runs in the throughput workloads only, interleaved with the others "+
			"(direct, ztgo, passthrough, stunnel, direct, ztgo, passthrough, stunnel ...): the client connects to a client-mode stunnel on %s, which "+
			"speaks TLS 1.3 with a client certificate to a server stunnel on %s that verifies it against the same throwaway "+
			"ECDSA P-256 CA (mutual TLS) and connects to the same servers; OpenSSL's default TLS 1.3 cipher suites (it picks TLS_AES_256_GCM_SHA384). "+
			"ztgo/stunnel is the ratio of the medians.\n\n", stunnelClientIP, stunnelServerIP)
	}
	if with["istio"] {
		p("Istio's Go HBONE pair (performance.md's peer, istio.io/istio/pkg/hbone) runs in the throughput and round-trip "+
			"workloads, interleaved with the others (direct, ztgo, passthrough, stunnel, istio ...): the client connects to "+
			"perf/cmd/istiohbone in client mode on %s, which turns each connection into one HBONE CONNECT made with Istio's "+
			"dialer (hbone.NewDialer: x/net/http2's Transport, so all streams share one pooled TLS 1.3 connection, with a "+
			"client certificate) to perf/cmd/istiohbone in server mode on %s (hbone.NewServer: net/http's HTTP/2 server "+
			"behind a TLS listener that requires and verifies the client certificate against a throwaway ECDSA P-256 CA), "+
			"which dials the same servers. Both sides copy through Istio's 32 KiB buffers, with its HTTP/2 defaults; Istio's "+
			"\"hbone\" log scope is at warn. Istio's dialer returns a net.Pipe, which has no half-close: the client side "+
			"closes the pipe when the client half-closes (the workloads need nothing back after that). ztgo/istio is the "+
			"ratio of the medians; on latency rows below 1 means ztgo is faster.\n\n", istioClientIP, hostPort(istioServerIP, istioPort))
	}
	for _, s := range peerSkips {
		p("**%s**\n\n", s)
	}
	if rounded {
		p("| workload | metric | direct | ztgo | ztgo/direct | target | verdict |")
		sep := "|---|---|---:|---:|---:|---|---|"
		if with["passthrough"] {
			p(" ztgo passthrough | passthrough/direct | target (passthrough) | verdict (passthrough) |")
			sep += "---:|---:|---|---|"
		}
		for _, pc := range peerCols {
			if with[pc.path] {
				p(" %s | ztgo/%s | target vs %s | verdict vs %s |", pc.label, pc.path, pc.path, pc.path)
				sep += "---:|---:|---|---|"
			}
		}
		p("\n%s\n", sep)
	}
	for _, rw := range rows {
		d, okd := r.median(rw.key, "direct")
		z, okz := r.median(rw.key, "ztgo")
		if !okd && !okz {
			continue
		}
		ds, zs, ratio := "—", "—", "—"
		if okd {
			ds = rw.format(d)
		}
		if okz {
			zs = rw.format(z)
		}
		if okd && okz && d > 0 {
			ratio = fmt.Sprintf("%.2fx", z/d)
		}
		target, verdict := "—", "—"
		if rw.check != nil {
			target = rw.target
			if okd && okz {
				verdict = "missed"
				if rw.check(d, z) {
					verdict = "met"
				}
			}
		}
		p("| %s | %s | %s | %s | %s | %s | %s |", rw.workload, rw.metric, ds, zs, ratio, target, verdict)
		if with["passthrough"] {
			ps, pratio, ptarget, pverdict := "—", "—", "—", "—"
			pv, okp := r.median(rw.key, "passthrough")
			if okp {
				ps = rw.format(pv)
				if okd && d > 0 {
					pratio = fmt.Sprintf("%.2fx", pv/d)
				}
			}
			if t, ok := passthroughVs[rw.key]; ok {
				ptarget = t.target
				if okd && okp {
					pverdict = "missed"
					if t.check(d, pv) {
						pverdict = "met"
					}
				}
			}
			p(" %s | %s | %s | %s |", ps, pratio, ptarget, pverdict)
		}
		for _, pc := range peerCols {
			if !with[pc.path] {
				continue
			}
			ss, sratio, starget, sverdict := "—", "—", "—", "—"
			sv, oks := r.median(rw.key, pc.path)
			if oks {
				ss = rw.format(sv)
				if okz && sv > 0 {
					sratio = fmt.Sprintf("%.2fx", z/sv)
				}
			}
			if t, ok := rw.vs[pc.path]; ok {
				starget = t.target
				if oks && okz {
					sverdict = "missed"
					if t.check(sv, z) {
						sverdict = "met"
					}
				}
			}
			p(" %s | %s | %s | %s |", ss, sratio, starget, sverdict)
		}
		p("\n")
	}
	if rounded {
		p("\n")
	}
	p("%s", rateReport(pl, r))
	p("%s", idleReport(r))
	p("%s", slowReport(r))

	p("Resources of the two ztgo processes (/proc/<pid>/status VmRSS and VmHWM; utime+stime from /proc/<pid>/stat over each " +
		"measured window; GB = 10^9 bytes arriving at the receiver; medians over the rounds; rows marked passthrough are " +
		"the passthrough path's windows, where node b carries nothing):\n\n")
	p("| resource | unit | node a (client side) | node b (server side) | both | note |\n")
	p("|---|---|---:|---:|---:|---|\n")
	resLines := func(rrs []resRow, path string) {
		for _, rr := range rrs {
			var cells [3]string
			have := false
			for i, k := range rr.keys {
				cells[i] = "—"
				if v, ok := r.median(k, path); ok {
					cells[i] = rr.format(v)
					have = true
				}
			}
			if !have {
				continue
			}
			note := rr.target
			if note == "" {
				note = "—"
			}
			p("| %s | %s | %s | %s | %s | %s |\n", rr.what, rr.unit, cells[0], cells[1], cells[2], note)
		}
	}
	resLines(resRows, "ztgo")
	resLines(passthroughResRows, "passthrough")
	p("\n")

	machineRows := false
	for _, k := range []string{"busy.tp1", "busy.tp1r", "busy.tp8"} {
		for _, path := range allPaths {
			if len(r.values(k, path)) > 0 {
				machineRows = true
			}
		}
	}
	if machineRows {
		p("Whole machine during the throughput windows, in CPUs of %d (/proc/stat, /proc/<pid>/stat). busy: all but idle; "+
			"softirq: irq and softirq, mostly loopback TCP receive work, a part of busy that is also in the bench's or the nodes' "+
			"time when it ran in their context; steal: taken by the hypervisor; bench: this process (clients and servers); nodes: "+
			"both ztgo processes; other: busy minus steal, bench and nodes, i.e. any other process on the machine and softirq run "+
			"outside the bench and the nodes (for the stunnel and istio paths: their two processes are in other):\n\n", m.cores)
		p("| workload | path | busy | softirq | steal | bench | nodes | other |\n|---|---|---:|---:|---:|---:|---:|---:|\n")
		for _, k := range []struct{ key, what string }{
			{"tp1", "Throughput, 1 stream, client → server"},
			{"tp1r", "Throughput, 1 stream, server → client"},
			{"tp8", "Throughput, 8 streams, client → server"},
		} {
			for _, path := range allPaths {
				if path != "direct" && path != "ztgo" && len(r.values("busy."+k.key, path)) == 0 {
					continue
				}
				cell := func(metric string) string {
					if v, ok := r.median(metric, path); ok {
						return fmt.Sprintf("%.2f", v)
					}
					return "—"
				}
				nodes := "—"
				if path == "ztgo" || path == "passthrough" {
					nodes = cell("util." + k.key)
				}
				p("| %s | %s | %s | %s | %s | %s | %s | %s |\n", k.what, path, cell("busy."+k.key), cell("softirq."+k.key),
					cell("steal."+k.key), cell("self."+k.key), nodes, cell("other."+k.key))
			}
		}
		p("\n")
	}

	perRound := slices.Clone(rows)
	for _, k := range []struct {
		key, metric string
		format      func(float64) string
	}{
		{"rate.qps", "calls/s", fmtRateTenth}, {"rate.p50", "p50 µs", fmtUS}, {"rate.p90", "p90 µs", fmtUS},
		{"rate.p99", "p99 µs", fmtUS}, {"cpu.rate", "vCPU per 1,000 rps, both nodes", func(v float64) string { return fmt.Sprintf("%.4f", v) }},
	} {
		perRound = append(perRound, row{key: k.key, metric: k.metric, format: k.format})
	}
	header := false
	for _, rw := range perRound {
		for _, path := range allPaths {
			v := r.values(rw.key, path)
			if len(v) == 0 {
				continue
			}
			if !header {
				header = true
				p("Every round's value (the medians above are taken over these):\n\n")
				p("| metric | path |")
				for i := range pl.rounds {
					p(" r%d |", i+1)
				}
				p("\n|---|---|")
				for range pl.rounds {
					p("---:|")
				}
				p("\n")
			}
			p("| %s %s | %s |", rw.key, rw.metric, path)
			for i := range pl.rounds {
				if i < len(v) {
					p(" %s |", rw.format(v[i]))
				} else {
					p(" — |")
				}
			}
			p("\n")
		}
	}
	if header {
		p("\n")
	}
	if len(notes) > 0 {
		p("Notes:\n\n")
		for _, n := range notes {
			p("- %s\n", n)
		}
		p("\n")
	}
	if len(problems) > 0 {
		p("**Problems (the run failed):**\n\n")
		for _, n := range problems {
			p("- %s\n", n)
		}
		p("\n")
	}
	return b.String()
}
