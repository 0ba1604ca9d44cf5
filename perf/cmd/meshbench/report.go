//go:build linux

package main

import (
	"fmt"
	"math"
	"slices"
	"strings"
	"time"
)

// results holds one value per round for each metric and path.
type results struct {
	samples map[string]map[string][]float64 // metric -> path -> one value per round
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
	// vsStunnel marks the rows the stunnel pair also runs; stTarget and stCheck are the target
	// against it, when there is one.
	vsStunnel bool
	stTarget  string
	stCheck   func(stunnel, ztgo float64) bool
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

var rows = []row{
	{"tp1", "Throughput, 1 stream, client → server", "Gbit/s", fmtGbps, "≥ 0.30x direct", ratioAtLeast(0.30), true, "≥ 2.0x stunnel", ratioAtLeast(2.0)},
	{"tp1r", "Throughput, 1 stream, server → client", "Gbit/s", fmtGbps, "≥ 0.30x direct", ratioAtLeast(0.30), true, "≥ 2.0x stunnel", ratioAtLeast(2.0)},
	{"tp8", "Throughput, 8 streams, client → server", "Gbit/s (sum)", fmtGbps, "≥ 0.45x direct", ratioAtLeast(0.45), true, "", nil},
	{"rtt1.p50", "Round trip, 1 B echo, one connection", "p50 µs", fmtUS, "≤ 3.0x direct", ratioAtMost(3.0), false, "", nil},
	{"rtt1.p99", "Round trip, 1 B echo, one connection", "p99 µs", fmtUS, "", nil, false, "", nil},
	{"rtt1k.p50", "Round trip, 1 KiB echo, one connection", "p50 µs", fmtUS, "≤ 3.0x direct", ratioAtMost(3.0), false, "", nil},
	{"rtt1k.p99", "Round trip, 1 KiB echo, one connection", "p99 µs", fmtUS, "", nil, false, "", nil},
	{"conn.rate", "New connection + first byte, 1 client", "conn/s", fmtRate, "", nil, false, "", nil},
	{"conn.p50", "New connection + first byte, 1 client", "p50 µs", fmtUS, "≤ 3.0x direct", ratioAtMost(3.0), false, "", nil},
	{"conn.p99", "New connection + first byte, 1 client", "p99 µs", fmtUS, "", nil, false, "", nil},
	{"conn8.rate", "New connection + first byte, 8 clients", "conn/s", fmtRate, "≥ 10,000/s", func(_, z float64) bool { return z >= 10000 }, false, "", nil},
}

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
// stunnelSkip, when not empty, says why the stunnel pair did not run.
func report(pl plan, m machine, r *results, began time.Time, elapsed time.Duration, stunnelSkip string, notes, problems []string) string {
	var b strings.Builder
	p := func(format string, a ...any) { fmt.Fprintf(&b, format, a...) }
	p("## meshbench: ztgo vs direct, %s mode\n\n", pl.name)
	p("Run %s, %s wall time. %d rounds; in every round each workload runs on the direct path and then through ztgo "+
		"(interleaved direct, ztgo, direct, ztgo ...); each figure is the median over the rounds of that path, "+
		"and the ratio is ztgo / direct of the medians. Throughput: %s windows after a %s warm-up, %d KiB writes. "+
		"Round trips: %d per size per round after %d unrecorded. Connections: %s with 1 client, %s with 8 clients. "+
		"Idle connections: %s, once, through ztgo only, before the rounds.\n\n",
		began.UTC().Format("2006-01-02 15:04 UTC"), elapsed.Round(100*time.Millisecond), pl.rounds,
		pl.tpDur, pl.tpWarm, chunk>>10, pl.rttCount, rttWarmup, pl.connDur, pl.conn8Dur, thousands(int64(pl.idleN)))
	p("Machine: %s, %d cores (GOMAXPROCS %d), kernel %s, %s; ztgo: %s. Load average (1, 5, 15 min) at start %s, at end %s.\n\n",
		m.cpuModel, m.cores, m.gomaxprocs, m.kernel, m.goVersion, m.ztgo, m.loadStart, m.loadEnd)

	rounded, withStunnel := false, false
	for _, rw := range rows {
		if len(r.values(rw.key, "direct"))+len(r.values(rw.key, "ztgo")) > 0 {
			rounded = true
		}
		if len(r.values(rw.key, "stunnel")) > 0 {
			withStunnel = true
		}
	}
	if withStunnel {
		p("The stunnel pair (performance.md's peer) runs in the throughput workloads only, interleaved with the others "+
			"(direct, ztgo, stunnel, direct, ztgo, stunnel ...): the client connects to a client-mode stunnel on %s, which "+
			"speaks TLS 1.3 with a client certificate to a server stunnel on %s that verifies it against the same throwaway "+
			"ECDSA P-256 CA (mutual TLS) and connects to the same servers; OpenSSL's default TLS 1.3 cipher suites (it picks TLS_AES_256_GCM_SHA384). "+
			"ztgo/stunnel is the ratio of the medians.\n\n", stunnelClientIP, stunnelServerIP)
	}
	if stunnelSkip != "" {
		p("**%s**\n\n", stunnelSkip)
	}
	if rounded {
		if withStunnel {
			p("| workload | metric | direct | ztgo | ztgo/direct | target | verdict | stunnel pair | ztgo/stunnel | target vs stunnel | verdict vs stunnel |\n")
			p("|---|---|---:|---:|---:|---|---|---:|---:|---|---|\n")
		} else {
			p("| workload | metric | direct | ztgo | ztgo/direct | target | verdict |\n")
			p("|---|---|---:|---:|---:|---|---|\n")
		}
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
		if withStunnel {
			ss, sratio, starget, sverdict := "—", "—", "—", "—"
			sv, oks := r.median(rw.key, "stunnel")
			if oks {
				ss = rw.format(sv)
				if okz && sv > 0 {
					sratio = fmt.Sprintf("%.2fx", z/sv)
				}
			}
			if rw.stCheck != nil {
				starget = rw.stTarget
				if oks && okz {
					sverdict = "missed"
					if rw.stCheck(sv, z) {
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
	p("%s", idleReport(r))

	p("Resources of the two ztgo processes (/proc/<pid>/status VmRSS and VmHWM; utime+stime from /proc/<pid>/stat over each " +
		"measured window; GB = 10^9 bytes arriving at the receiver; medians over the rounds):\n\n")
	p("| resource | unit | node a (client side) | node b (server side) | both | note |\n")
	p("|---|---|---:|---:|---:|---|\n")
	for _, rr := range resRows {
		var cells [3]string
		have := false
		for i, k := range rr.keys {
			cells[i] = "—"
			if v, ok := r.median(k, "ztgo"); ok {
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
	p("\n")

	machineRows := false
	for _, k := range []string{"busy.tp1", "busy.tp1r", "busy.tp8"} {
		if len(r.values(k, "direct"))+len(r.values(k, "ztgo"))+len(r.values(k, "stunnel")) > 0 {
			machineRows = true
		}
	}
	if machineRows {
		p("Whole machine during the throughput windows, in CPUs of %d (/proc/stat, /proc/<pid>/stat). busy: all but idle; "+
			"softirq: irq and softirq, mostly loopback TCP receive work, a part of busy that is also in the bench's or the nodes' "+
			"time when it ran in their context; steal: taken by the hypervisor; bench: this process (clients and servers); nodes: "+
			"both ztgo processes; other: busy minus steal, bench and nodes, i.e. any other process on the machine and softirq run "+
			"outside the bench and the nodes (for the stunnel path: the two stunnel processes are in other):\n\n", m.cores)
		p("| workload | path | busy | softirq | steal | bench | nodes | other |\n|---|---|---:|---:|---:|---:|---:|---:|\n")
		for _, k := range []struct{ key, what string }{
			{"tp1", "Throughput, 1 stream, client → server"},
			{"tp1r", "Throughput, 1 stream, server → client"},
			{"tp8", "Throughput, 8 streams, client → server"},
		} {
			for _, path := range []string{"direct", "ztgo", "stunnel"} {
				if path == "stunnel" && len(r.values("busy."+k.key, path)) == 0 {
					continue
				}
				cell := func(metric string) string {
					if v, ok := r.median(metric, path); ok {
						return fmt.Sprintf("%.2f", v)
					}
					return "—"
				}
				nodes := "—"
				if path == "ztgo" {
					nodes = cell("util." + k.key)
				}
				p("| %s | %s | %s | %s | %s | %s | %s | %s |\n", k.what, path, cell("busy."+k.key), cell("softirq."+k.key),
					cell("steal."+k.key), cell("self."+k.key), nodes, cell("other."+k.key))
			}
		}
		p("\n")
	}

	if rounded {
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
	for _, rw := range rows {
		for _, path := range []string{"direct", "ztgo", "stunnel"} {
			v := r.values(rw.key, path)
			if len(v) == 0 {
				continue
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
	if rounded {
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
