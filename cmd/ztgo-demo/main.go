// Command ztgo-demo is what `make demo` runs, the first thing to try after building ztgo. It
// shows mutual-TLS HBONE traffic between two ztgo nodes on this machine, with nothing to set up:
// every address is on loopback.
//
// It writes one mesh config (ztunnel's LOCAL_XDS YAML) that both nodes load, differing only in
// --node:
//
//	node-a  127.0.1.1  client  default/sleep  127.0.1.10
//	node-b  127.0.2.1  echo    default/echo   127.0.2.10  service echo.default.svc.cluster.local,
//	                                                      VIP 127.10.0.10:80 -> 8080
//	                   db      prod/db        127.0.2.20  port 5432; policy prod/allow-prod-only
//	                                                      admits only principals of namespace prod
//
// It starts the two nodes from the binary given by --ztgo (node-a first: it creates the CA
// directory that node-b then loads), runs small TCP apps behind the workloads, and sends three
// flows from the client workload through node-a's SOCKS5 entry:
//
//  1. echo.default.svc.cluster.local:80 by name: node-a resolves it to the VIP, picks the echo
//     pod and carries the bytes over HBONE (HTTP/2 CONNECT over mTLS) to node-b, which delivers
//     them keeping the client's address; a line and 1 MiB are echoed and checked by SHA-256;
//  2. 127.0.2.20:5432 (db): node-b's authorization denies it; SOCKS5 answers 2 (not allowed);
//  3. 127.0.3.10:7070, not in the mesh: passthrough, plain TCP from node-a.
//
// It then prints, per flow, the identities, the path, the bytes, the client address the app saw
// and the per-stage timings both nodes recorded in /debug/flows, plus node-b's connection
// metrics. It stops the nodes and exits 0 only if all three flows behaved as expected.
//
// Usage:
//
//	go run ./cmd/ztgo-demo [--ztgo ./bin/ztgo] [--keep]
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

const (
	// demoTimeout bounds the whole demo; no step can make it hang longer.
	demoTimeout  = 25 * time.Second
	readyTimeout = 15 * time.Second
	stopGrace    = 5 * time.Second
)

func main() {
	bin := flag.String("ztgo", "./bin/ztgo", "the ztgo binary to run (make build writes ./bin/ztgo)")
	keep := flag.Bool("keep", false, "keep the temp dir (mesh.yaml, ca/, node logs) instead of removing it")
	hold := flag.Bool("hold", false, "after the traffic, keep both nodes running until Ctrl-C, to browse their admin pages")
	flag.Usage = func() {
		fmt.Fprintf(flag.CommandLine.Output(), "usage: ztgo-demo [--ztgo ./bin/ztgo] [--keep] [--hold]\n\n"+
			"Starts two ztgo nodes on loopback and sends mTLS HBONE traffic between them.\n\n")
		flag.PrintDefaults()
	}
	flag.Parse()
	if flag.NArg() > 0 {
		flag.Usage()
		os.Exit(2)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := run(ctx, options{bin: *bin, keep: *keep, hold: *hold}, &printer{w: os.Stdout, color: useColor(os.Stdout)})
	stop()
	os.Exit(code)
}

// useColor reports whether f is a terminal and NO_COLOR is unset.
func useColor(f *os.File) bool {
	if _, ok := os.LookupEnv("NO_COLOR"); ok || os.Getenv("TERM") == "dumb" {
		return false
	}
	fi, err := f.Stat()
	return err == nil && fi.Mode()&os.ModeCharDevice != 0
}

// options are the demo's flags.
type options struct {
	bin  string
	keep bool
	hold bool
}

func run(parent context.Context, o options, p *printer) int {
	began := time.Now()
	ctx, cancel := context.WithTimeout(parent, demoTimeout)
	defer cancel()
	keep := o.keep

	bin, err := exec.LookPath(o.bin)
	if err != nil {
		p.printf("%s ztgo binary %s: %v\n       build it with `make build`, or name it with --ztgo\n", p.bad("error"), o.bin, err)
		return 1
	}
	if bin, err = filepath.Abs(bin); err != nil {
		p.printf("%s %v\n", p.bad("error"), err)
		return 1
	}

	dir, err := os.MkdirTemp("", "ztgo-demo-")
	if err != nil {
		p.printf("%s temp dir: %v\n", p.bad("error"), err)
		return 1
	}
	defer func() {
		if keep {
			p.row(0, "workdir", dir+" kept (--keep)")
			return
		}
		os.RemoveAll(dir)
	}()
	caDir := filepath.Join(dir, "ca")
	if err := os.WriteFile(filepath.Join(dir, meshFile), []byte(meshYAML), 0o644); err != nil {
		p.printf("%s %v\n", p.bad("error"), err)
		return 1
	}

	p.printf("%s\n\n", p.bold("ztgo demo: a client on node-a reaches workloads on node-b through SOCKS5 -> HBONE (HTTP/2 CONNECT over mTLS)"))
	removal := "removed at exit, --keep keeps it"
	if keep {
		removal = "kept"
	}
	p.row(2, "workdir", fmt.Sprintf("%s  %s", dir, p.dim("(mesh.yaml, ca/, node-a.log, node-b.log, node-b.metrics.txt; "+removal+")")))

	// The apps first, so the nodes have somewhere to deliver.
	var apps []*echoApp
	defer func() {
		for _, a := range apps {
			a.stop()
		}
	}()
	for _, s := range []struct {
		name, ip string
		port     int
	}{
		{"echo", echoIP, echoPort}, {"db", dbIP, dbPort}, {"outside", outsideIP, outsidePort},
	} {
		a, err := startEchoApp(s.name, hostPort(s.ip, s.port))
		if err != nil {
			p.printf("%s %v%s\n", p.bad("error"), err, inUseHint(err))
			return 1
		}
		apps = append(apps, a)
	}
	echo, db, outside := apps[0], apps[1], apps[2]

	// node-a first: with an empty --ca-dir it creates the CA (LoadOrCreate), and only then may
	// node-b start and load it; started together, both would create a root and the mesh would
	// split into two trust domains that reject each other.
	var nodes []*ztgoNode
	stopNodes := func() []string {
		var notes []string
		for i := len(nodes) - 1; i >= 0; i-- {
			n := nodes[i]
			if err := n.Stop(stopGrace); err != nil {
				notes = append(notes, fmt.Sprintf("%s: %v", n.Name, err))
			}
		}
		nodes = nil
		return notes
	}
	defer stopNodes()
	specs := []struct {
		name, host, role, note string
	}{
		{nodeA, hostA, "client " + clientIP + " (default/sleep)", "created the CA in ca/"},
		{nodeB, hostB, "echo " + echoIP + " (default/echo), db " + dbIP + " (prod/db)", "loaded the same CA"},
	}
	roleWidth := 0
	for _, s := range specs {
		roleWidth = max(roleWidth, len(s.role))
	}
	for _, s := range specs {
		t0 := time.Now()
		n, err := startNode(bin, dir, caDir, s.name, s.host)
		if err != nil {
			p.printf("%s %v%s\n", p.bad("error"), err, inUseHint(err))
			return 1
		}
		nodes = append(nodes, n)
		if err := n.WaitReady(ctx, readyTimeout); err != nil {
			p.printf("%s %v%s\n", p.bad("error"), err, inUseHint(errors.New(strings.Join(n.LogTail(8), "\n"))))
			if tail := n.LogTail(8); len(tail) == 0 {
				p.printf("       %s is empty\n", n.LogPath)
			} else {
				p.printf("       last lines of %s:\n", n.LogPath)
				for _, l := range tail {
					p.printf("         %s\n", l)
				}
			}
			if !keep {
				p.printf("       (rerun with --keep to keep the logs)\n")
			}
			return 1
		}
		p.row(2, s.name, fmt.Sprintf("ready in %-6s %-*s  %s", time.Since(t0).Round(time.Millisecond), roleWidth, s.role, p.dim(s.note)))
	}
	p.row(2, "apps", fmt.Sprintf("echo %s:%d   db %s:%d   outside %s:%d %s", echoIP, echoPort, dbIP, dbPort,
		outsideIP, outsidePort, p.dim("(not in the mesh)")))
	p.row(2, "policy", "prod/allow-prod-only: namespace prod admits only principals cluster.local/ns/prod/sa/*")
	p.printf("\n")

	// Traffic.
	a, b := nodes[0], nodes[1]
	socks := a.SOCKS5Addr()
	results := []*flowResult{
		{n: 1, target: echoHost + ":" + strconv.Itoa(echoSvcPort), what: "(by name)", expect: "allowed"},
		{n: 2, target: hostPort(dbIP, dbPort), what: "(db, namespace prod)", expect: "denied"},
		{n: 3, target: hostPort(outsideIP, outsidePort), what: "(not in the mesh)", expect: "passthrough"},
	}
	echoFlow(ctx, results[0], socks, echoHost, echoSvcPort, randomBytes(blobSize))
	checkApp(results[0], echo)
	denyFlow(ctx, results[1], socks, dbIP, dbPort)
	echoFlow(ctx, results[2], socks, outsideIP, outsidePort, nil)
	checkApp(results[2], outside)

	// The nodes record a flow when it ends; the client has closed every connection by now.
	flowErr := collectFlows(a, b, results, 3*time.Second)
	results[1].appConns = db.accepted.Load()
	if results[1].appConns != 0 {
		results[1].fail("the db app accepted %d connections, want 0", results[1].appConns)
	}
	checkRecords(results)

	p.printf("%s %s\n", p.bold("flows"), p.dim(fmt.Sprintf("from workload client (%s) through node-a's SOCKS5 %s", clientIP, socks)))
	width := stagesWidth(results)
	for _, r := range results {
		p.flowReport(r, width)
	}
	p.printf("  %s\n", p.dim("node-a/node-b rows: each stage's work time in µs (queueing excluded); capture includes the SOCKS5"))
	p.printf("  %s\n", p.dim("exchange with the client, hbone the mTLS handshake of a new pooled connection; = first stage to the outcome"))
	if flowErr != nil {
		p.printf("  %s %v\n", p.bad("warning"), flowErr)
	}
	p.printf("\n")

	// Metrics and admin pages.
	p.printf("%s %s\n", p.bold("metrics"), p.dim("node-b "+b.MetricsURL()+", labels abridged"))
	if body, err := b.get(b.MetricsURL()); err != nil {
		p.printf("  %s %v\n", p.bad("warning"), err)
	} else {
		os.WriteFile(filepath.Join(dir, "node-b.metrics.txt"), body, 0o644)
		text := string(body)
		samples := pickMetrics(text, "istio_tcp_connections_opened_total", map[string]string{"destination_workload": "echo"})
		samples = append(samples, pickMetrics(text, "istio_tcp_connections_failed_total", map[string]string{"destination_workload": "db"})...)
		if len(samples) == 0 {
			p.printf("  %s no istio_tcp_connections_opened_total for echo on node-b\n", p.bad("warning"))
		}
		for _, m := range samples {
			p.printf("  %s\n", m.abridged("reporter", "source_workload", "destination_workload", "destination_service", "connection_security_policy", "response_flags"))
		}
	}
	p.printf("\n")
	p.row(0, "admin", fmt.Sprintf("node-a %s/   node-b %s/   %s", a.AdminURL(), b.AdminURL(),
		p.dim("(/config_dump, /debug/flows, /debug/pprof/)")))
	if o.hold {
		p.row(0, "holding", "both nodes keep running; press Ctrl-C to stop them")
		<-parent.Done()
	} else {
		p.row(0, "", p.dim("the nodes stop now; --hold keeps them running to browse these pages"))
	}

	// Shutdown.
	stopNotes := stopNodes()
	if len(stopNotes) == 0 {
		p.row(0, "stopped", "node-b, node-a (SIGTERM, clean exit)")
	} else {
		p.row(0, "stopped", p.bad("with problems: "+strings.Join(stopNotes, "; ")))
	}

	// Verdict.
	var failed []string
	for _, r := range results {
		if !r.ok() {
			failed = append(failed, fmt.Sprintf("flow %d (%s, expect %s)", r.n, r.target, r.expect))
		}
	}
	if parent.Err() != nil && !o.hold {
		failed = append(failed, "interrupted")
	} else if ctx.Err() != nil && parent.Err() == nil {
		failed = append(failed, fmt.Sprintf("the demo ran out of its %s", demoTimeout))
	}
	took := time.Since(began).Round(10 * time.Millisecond)
	if len(failed) > 0 {
		p.row(0, "result", p.bad(fmt.Sprintf("FAILED: %s (%s); node logs: %s", strings.Join(failed, "; "), took, dir)))
		return 1
	}
	p.row(0, "result", p.good(fmt.Sprintf("OK: echo allowed, db denied, passthrough ok (%s)", took)))
	return 0
}

// checkRecords compares what the nodes recorded with what each flow should have done.
func checkRecords(results []*flowResult) {
	want := map[string]struct{ a, b, dstID string }{
		"allowed":     {"established", "established", echoID},
		"denied":      {"DENY", "DENY", dbID},
		"passthrough": {"established", "", ""},
	}
	for _, r := range results {
		w := want[r.expect]
		if r.onA != nil {
			if r.onA.Outcome != w.a {
				r.fail("node-a recorded %s, want %s", r.onA.Outcome, w.a)
			}
			if r.onA.SrcIdentity != clientID {
				r.fail("node-a named the source %q, want %s", r.onA.SrcIdentity, clientID)
			}
			if r.onA.DstIdentity != w.dstID {
				r.fail("node-a named the destination %q, want %q", r.onA.DstIdentity, w.dstID)
			}
		}
		if r.onB != nil {
			if r.onB.Outcome != w.b {
				r.fail("node-b recorded %s, want %s", r.onB.Outcome, w.b)
			}
			if r.onB.SrcIdentity != clientID {
				r.fail("node-b verified the client as %q, want %s", r.onB.SrcIdentity, clientID)
			}
		}
	}
}

// inUseHint explains an "address already in use" error.
func inUseHint(err error) string {
	if err != nil && strings.Contains(err.Error(), "address already in use") {
		return "\n       another ztgo-demo (or ztgo node) seems to be running on these addresses; stop it and retry"
	}
	return ""
}
