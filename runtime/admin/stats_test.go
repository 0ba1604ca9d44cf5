package admin

import (
	"context"
	"encoding/json"
	"io/fs"
	"log/slog"
	"net/http"
	"regexp"
	"slices"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/ztgo/ztgo/runtime/trace"
)

// node is a registry with the metrics the dashboard reads, labelled as the node labels them.
type fakeNode struct {
	reg                    *prometheus.Registry
	opened, closed, failed *prometheus.CounterVec
	received, sent         *prometheus.CounterVec
	open, depth            *prometheus.GaugeVec
	backpressure           *prometheus.CounterVec
	poolConns              prometheus.Gauge
	rec                    *trace.Recorder
}

func newFakeNode(t *testing.T) *fakeNode {
	t.Helper()
	n := &fakeNode{reg: prometheus.NewRegistry()}
	labels := []string{"reporter", "response_flags", "source_workload"}
	n.opened = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "istio_tcp_connections_opened_total", Help: "x"}, labels)
	n.closed = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "istio_tcp_connections_closed_total", Help: "x"}, labels)
	n.failed = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "istio_tcp_connections_failed_total", Help: "x"}, labels)
	n.received = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "istio_tcp_received_bytes_total", Help: "x"}, labels)
	n.sent = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "istio_tcp_sent_bytes_total", Help: "x"}, labels)
	n.open = prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "istio_tcp_sockets_open", Help: "x"}, []string{"reporter"})
	n.depth = prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "ztgo_stage_mailbox_depth", Help: "x"}, []string{"stage"})
	n.backpressure = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "ztgo_stage_backpressure_total", Help: "x"}, []string{"stage"})
	n.poolConns = prometheus.NewGauge(prometheus.GaugeOpts{Name: "ztgo_pool_connections", Help: "x"})
	n.reg.MustRegister(n.opened, n.closed, n.failed, n.received, n.sent, n.open, n.depth, n.backpressure, n.poolConns)
	var err error
	if n.rec, err = trace.NewRecorder(64, n.reg); err != nil {
		t.Fatal(err)
	}
	return n
}

// flow finishes a flow through the given stages, each working for d.
func (n *fakeNode) flow(id uint64, dir, outcome string, d time.Duration, stages ...string) {
	t0 := time.Now().Add(-time.Duration(len(stages)) * d)
	r := &trace.Record{Timeline: trace.Timeline{ID: id, Direction: dir, Begin: t0, Outcome: outcome}, SrcIdentity: "spiffe://cluster.local/ns/default/sa/client", DstIdentity: "spiffe://cluster.local/ns/default/sa/echo"}
	at := t0
	for _, st := range stages {
		r.Enter(st, at)
		r.StartStage(at)
		at = at.Add(d)
		r.Leave(at)
	}
	if outcome == "established" {
		r.Established = at
	}
	n.rec.Finish(r)
}

func serve(t *testing.T, cfg Config) string {
	t.Helper()
	cfg.AdminAddr = "127.0.0.1:0"
	if cfg.Level == nil {
		cfg.Level = new(slog.LevelVar)
	}
	if cfg.Ready == nil {
		cfg.Ready = NewReadiness()
	}
	s, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Stop(context.Background()) })
	return "http://" + s.Addr("admin")
}

func getJSON(t *testing.T, url string, v any) {
	t.Helper()
	code, body, hdr := get(t, url)
	if code != 200 || !strings.HasPrefix(hdr.Get("Content-Type"), "application/json") {
		t.Fatalf("GET %s: %d %q %s", url, code, hdr.Get("Content-Type"), body)
	}
	if err := json.Unmarshal([]byte(body), v); err != nil {
		t.Fatalf("GET %s: %v", url, err)
	}
}

func keys(m map[string]any) []string {
	var out []string
	for k := range m {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}

func TestStatsJSON(t *testing.T) {
	n := newFakeNode(t)
	built := time.Now().Add(-90 * time.Second)
	base := serve(t, Config{
		Gatherer: n.reg, Recorder: n.rec, ConfigDump: func() any { return nil },
		Summary: func() SnapshotSummary {
			return SnapshotSummary{Node: "node-b", Version: "v1.2.3", SnapshotVersion: 42, Built: built,
				Workloads: 3, LocalWorkloads: 2, Services: 1, Policies: 2, Certificates: 3,
				CertificateStates: map[string]int{"Available": 2, "Initializing": 1}}
		},
	})
	for i := range 20 {
		n.flow(uint64(i), "inbound", "established", time.Duration(100+i)*time.Microsecond, "capture", "identity", "authz", "upstream")
	}
	n.flow(100, "inbound", "DENY", 50*time.Microsecond, "capture", "identity", "authz")
	n.flow(101, "outbound", "established", time.Millisecond, "capture", "identity", "hbone")
	out := prometheus.Labels{"reporter": "source", "response_flags": "-", "source_workload": "client"}
	in := prometheus.Labels{"reporter": "destination", "response_flags": "-", "source_workload": "client"}
	n.open.WithLabelValues("source").Set(2)
	n.open.WithLabelValues("destination").Set(3)
	n.opened.With(out).Add(10)
	n.opened.With(in).Add(5)
	n.failed.With(prometheus.Labels{"reporter": "destination", "response_flags": "DENY", "source_workload": "client"}).Add(4)
	n.received.With(in).Add(1000)
	n.depth.WithLabelValues("authz").Set(7)
	n.poolConns.Set(2)

	// The shape: every top-level key, and a stage's keys.
	var raw map[string]any
	getJSON(t, base+"/debug/stats", &raw)
	want := []string{"connections", "history", "pipeline", "pool", "process", "rateSeconds", "snapshot", "stages",
		"stepSeconds", "throughput", "time", "windowEnd", "windowSeconds"}
	if got := keys(raw); !slices.Equal(got, want) {
		t.Fatalf("keys %v, want %v", got, want)
	}
	stage := raw["stages"].([]any)[0].(map[string]any)
	if got := keys(stage); !slices.Equal(got, []string{"count", "direction", "maxMicros", "meanMicros", "p50Micros", "p99Micros", "series", "stage"}) {
		t.Fatalf("stage keys %v", got)
	}
	if got := keys(stage["series"].(map[string]any)); !slices.Equal(got, []string{"count", "p50Micros", "p99Micros"}) {
		t.Fatalf("series keys %v", got)
	}

	var st Stats
	getJSON(t, base+"/debug/stats", &st)
	var order []string
	for _, s := range st.Stages {
		order = append(order, s.Direction+"/"+s.Stage)
		if len(s.Series.Count) != 60 || len(s.Series.P50US) != 60 || len(s.Series.P99US) != 60 {
			t.Fatalf("%s/%s: series of %d points", s.Direction, s.Stage, len(s.Series.Count))
		}
	}
	if want := []string{"inbound/capture", "inbound/identity", "inbound/authz", "inbound/upstream",
		"outbound/capture", "outbound/identity", "outbound/hbone"}; !slices.Equal(order, want) {
		t.Fatalf("stages %v, want %v (pipeline order)", order, want)
	}
	authz := st.Stages[2]
	if authz.Count != 21 || authz.Series.Count[59] != 21 || authz.P50US < 100 || authz.P50US > 115 || authz.MaxUS != 119 {
		t.Errorf("authz: %+v", authz)
	}
	if st.Stages[3].Count != 20 { // the denied flow never reached upstream
		t.Errorf("upstream count %d, want 20", st.Stages[3].Count)
	}
	if st.WindowSeconds != 60 || st.StepSeconds != 1 || st.WindowEnd.IsZero() {
		t.Errorf("window %d step %d end %v", st.WindowSeconds, st.StepSeconds, st.WindowEnd)
	}
	c := st.Connections
	if c.Open != 5 || c.OpenByReporter["source"] != 2 || c.OpenByReporter["destination"] != 3 || c.Opened.Total != 15 ||
		c.Failed.Total != 4 || c.Failed.TotalByFlags["DENY"] != 4 || c.Opened.TotalByFlags["-"] != 15 {
		t.Errorf("connections %+v", c)
	}
	if st.Throughput.ReceivedBytesTotal != 1000 || st.Pipeline.MailboxDepth["authz"] != 7 || st.Pool.Connections != 2 {
		t.Errorf("throughput %+v pipeline %+v pool %+v", st.Throughput, st.Pipeline, st.Pool)
	}
	sn := st.Snapshot
	if sn.Node != "node-b" || sn.Version != "v1.2.3" || sn.SnapshotVersion != 42 || sn.Workloads != 3 || sn.LocalWorkloads != 2 ||
		sn.Services != 1 || sn.Policies != 2 || sn.Certificates != 3 || sn.CertificateStates["Available"] != 2 ||
		sn.CertificateStates["Initializing"] != 1 || sn.AgeSeconds < 89 || sn.AgeSeconds > 120 {
		t.Errorf("snapshot %+v", sn)
	}

	// Rates come from the difference with an earlier gather.
	time.Sleep(600 * time.Millisecond)
	n.opened.With(out).Add(30)
	n.failed.With(prometheus.Labels{"reporter": "source", "response_flags": "CONNECT", "source_workload": "client"}).Add(3)
	n.received.With(in).Add(6000)
	n.backpressure.WithLabelValues("capture").Add(12)
	getJSON(t, base+"/debug/stats?step=10", &st)
	dt := st.RateSeconds
	if dt < 0.5 || dt > 5 {
		t.Fatalf("rateSeconds = %v", dt)
	}
	approx := func(name string, got, want float64) {
		t.Helper()
		if got < want*0.999 || got > want*1.001 {
			t.Errorf("%s = %v, want %v", name, got, want)
		}
	}
	approx("opened/s", st.Connections.Opened.PerSec, 30/dt)
	approx("failed/s", st.Connections.Failed.PerSec, 3/dt)
	approx("failed CONNECT/s", st.Connections.Failed.PerSecByFlags["CONNECT"], 3/dt)
	approx("received B/s", st.Throughput.ReceivedBytesPerSec, 6000/dt)
	approx("backpressure/s", st.Pipeline.BackpressurePerSec["capture"], 12/dt)
	if h := st.History; len(h.TimeMS) == 0 || len(h.TimeMS) != len(h.Open) || len(h.OpenedPerSec) != len(h.TimeMS) || h.Open[len(h.Open)-1] != 5 {
		t.Errorf("history %+v", h)
	}
	if st.StepSeconds != 10 || len(st.Stages[0].Series.Count) != 6 || st.Stages[0].Series.Count[5] != 21 {
		t.Errorf("step 10: step %d, series %+v", st.StepSeconds, st.Stages[0].Series)
	}
	for _, bad := range []string{"0", "61", "x"} {
		if code, _, _ := get(t, base+"/debug/stats?step="+bad); code != http.StatusBadRequest {
			t.Errorf("step=%s: %d, want 400", bad, code)
		}
	}
}

func TestStatsSummaryHook(t *testing.T) {
	n := newFakeNode(t)
	dumps := 0
	base := serve(t, Config{
		Gatherer: n.reg, Recorder: n.rec,
		ConfigDump: func() any { dumps++; return map[string]any{} },
		Summary: func() SnapshotSummary {
			return SnapshotSummary{Node: "n1", SnapshotVersion: 7, Workloads: 100000, Built: time.Now().Add(-time.Minute)}
		},
	})
	var st Stats
	getJSON(t, base+"/debug/stats", &st)
	if st.Snapshot.Node != "n1" || st.Snapshot.Workloads != 100000 || st.Snapshot.AgeSeconds < 59 || dumps != 0 {
		t.Fatalf("summary %+v, %d config dumps", st.Snapshot, dumps)
	}
	if st.Stages == nil || st.Snapshot.CertificateStates == nil || st.Connections.Opened.TotalByFlags == nil {
		t.Fatal("empty lists and maps must be [] and {} for the page, not null")
	}
}

func TestFlowsJSON(t *testing.T) {
	n := newFakeNode(t)
	base := serve(t, Config{Gatherer: n.reg, Recorder: n.rec, ConfigDump: func() any { return nil }})
	n.flow(1, "outbound", "established", 2*time.Millisecond, "capture", "identity", "hbone")
	n.flow(2, "inbound", "DENY", time.Millisecond, "capture", "identity", "authz")
	var fl map[string][]FlowJSON
	getJSON(t, base+"/debug/flows?recent=1", &fl)
	if len(fl["recent"]) != 1 || fl["recent"][0].ID != 2 {
		t.Errorf("recent %+v", fl["recent"])
	}
	if s := fl["slowestLastMinute"]; len(s) != 2 || s[0].ID != 1 || len(s[0].Stages) != 3 {
		t.Errorf("slowestLastMinute %+v", s)
	}
	if f := fl["failures"]; len(f) != 1 || f[0].Outcome != "DENY" {
		t.Errorf("failures %+v", f)
	}
	if len(fl["slowest"]) != 2 {
		t.Errorf("slowest %+v", fl["slowest"])
	}
	sp := fl["slowestLastMinute"][0].Stages
	if sp[1].OffsetUS != 2000 || sp[1].WorkUS != 2000 || sp[2].OffsetUS != 4000 {
		t.Errorf("spans %+v", sp)
	}
	if code, _, _ := get(t, base+"/debug/flows?recent=-1"); code != http.StatusBadRequest {
		t.Errorf("recent=-1: %d", code)
	}
}

func TestDashboardIsSelfContained(t *testing.T) {
	n := newFakeNode(t)
	base := serve(t, Config{Gatherer: n.reg, Recorder: n.rec, ConfigDump: func() any { return nil }})
	code, body, hdr := get(t, base+"/")
	if code != 200 || !strings.HasPrefix(hdr.Get("Content-Type"), "text/html") || !strings.Contains(hdr.Get("Content-Security-Policy"), "default-src 'none'") {
		t.Fatalf("/: %d %q csp %q", code, hdr.Get("Content-Type"), hdr.Get("Content-Security-Policy"))
	}
	for _, want := range []string{`src="/dashboard/dashboard.js"`, `href="/dashboard/dashboard.css"`, `id="stage-charts"`, `id="waterfall"`,
		`href="/config_dump"`, `href="/debug/flows"`, `href="/debug/pprof/"`} {
		if !strings.Contains(body, want) {
			t.Errorf("/ lacks %s", want)
		}
	}
	for path, ctype := range map[string]string{"/dashboard/dashboard.js": "text/javascript", "/dashboard/dashboard.css": "text/css"} {
		if code, _, hdr := get(t, base+path); code != 200 || !strings.HasPrefix(hdr.Get("Content-Type"), ctype) {
			t.Errorf("%s: %d %q", path, code, hdr.Get("Content-Type"))
		}
	}
	// No asset refers to another origin (the SVG namespace is a name, not a fetch).
	external := regexp.MustCompile(`(?i)(https?:)?//[a-z0-9.-]+\.[a-z]{2,}`)
	fs.WalkDir(dashboardFS, "dashboard", func(path string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		b, _ := fs.ReadFile(dashboardFS, path)
		for _, m := range external.FindAllString(string(b), -1) {
			if m != "http://www.w3.org" {
				t.Errorf("%s refers to %s", path, m)
			}
		}
		return nil
	})
}
