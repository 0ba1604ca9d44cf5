// Package telemetry reports finished and failed flows the way ztunnel does: Istio's TCP
// connection metrics (istio_tcp_*) with their full label set, and the "connection complete" /
// "connection failed" access log records.
//
// Label values come from the flow's snapshot view of the source and destination workloads;
// values that are unknown render as "unknown", as in ztunnel.
//
// Opening and closing a flow must stay cheap on connection churn: the 23 label values are
// computed and hashed once per label set, not per flow (seriesCache), a flow's bytes are
// counted in the flow and added once when it closes, and access log fields are only built
// when the logger will write them.
//
// Concurrent flows must not contend either. Metrics owns its series instead of using
// CounterVecs: a label set's counters are split into up to one shard per CPU (a power of two,
// 2 to 16), each a 64-byte cache line of atomic counters allocated the first time a call
// lands in it. Opened, Closed and Failed count in the shard a runtime/shard Picker gives: the
// one the CPU running the call (its P) last wrote, as far as the Go scheduler keeps a
// goroutine on its P, so a shard's line mostly stays in one CPU's cache. (Shards chosen by
// flow ID spread flows as well, but every CPU then writes every shard in turn, and the lines
// move between CPUs on almost every call.) The istio_tcp_sockets_open gauge is sharded the
// same way. Nothing depends on where a call lands: a flow may count as opened in one shard and
// as closed in another (a sockets_open shard can go negative), and Collect sums the shards,
// which is exact whatever the placement. CounterVecs per shard would cost about 3 KB per
// family, label set and shard (a child keeps its own label pairs); a series costs about
// 0.5 KB plus 64 bytes per shard in use, as its label pairs are built per scrape instead.
package telemetry

import (
	"context"
	"fmt"
	"log/slog"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/ztgo/ztgo/control/snapshot"
	"github.com/ztgo/ztgo/stages"
	"github.com/ztgo/ztgo/stages/identity"
)

// Labels of istio_tcp_* metrics, in ztunnel's order.
var labelNames = []string{
	"reporter",
	"source_workload", "source_canonical_service", "source_canonical_revision", "source_workload_namespace",
	"source_principal", "source_app", "source_version", "source_cluster",
	"destination_service", "destination_service_namespace", "destination_service_name",
	"destination_workload", "destination_canonical_service", "destination_canonical_revision",
	"destination_workload_namespace", "destination_principal", "destination_app", "destination_version",
	"destination_cluster",
	"request_protocol", "response_flags", "connection_security_policy",
}

const unknown = "unknown"

// Telemetry reports flows.
type Telemetry struct {
	m     *Metrics
	log   *slog.Logger
	cache seriesCache
}

// New returns a reporter writing access logs to log (nil disables them).
func New(m *Metrics, log *slog.Logger) *Telemetry {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	t := &Telemetry{m: m, log: log}
	m.socketsExported.Store(true)
	t.cache.init(m)
	return t
}

// Indexes of the label values, in labelNames order.
const (
	lReporter = iota
	lSrcWorkload
	lSrcCanonicalService
	lSrcCanonicalRevision
	lSrcNamespace
	lSrcPrincipal
	lSrcApp
	lSrcVersion
	lSrcCluster
	lDstService
	lDstServiceNamespace
	lDstServiceName
	lDstWorkload
	lDstCanonicalService
	lDstCanonicalRevision
	lDstNamespace
	lDstPrincipal
	lDstApp
	lDstVersion
	lDstCluster
	lRequestProtocol
	lResponseFlags
	lSecurityPolicy
	numLabels
)

// Offsets of a side's labels from its first one (lSrcWorkload or lDstWorkload).
const (
	offWorkload = iota
	offCanonicalService
	offCanonicalRevision
	offNamespace
	offPrincipal
	offApp
	offVersion
	offCluster
)

// Labels computes the metric labels of a flow.
func Labels(f *stages.Flow) prometheus.Labels {
	v := labelValues(f)
	l := make(prometheus.Labels, numLabels)
	for i, k := range labelNames {
		l[k] = v[i]
	}
	return l
}

// labelValues computes the metric label values of a flow, in labelNames order.
func labelValues(f *stages.Flow) (v [numLabels]string) {
	v[lReporter] = f.Dir.Reporter()
	v[lRequestProtocol] = "tcp"
	v[lResponseFlags] = f.Failure.String()
	src, dst := f.SrcWorkload, f.DstWorkload
	if src == nil && f.Dir != stages.Outbound && !f.SrcIdentity.IsZero() {
		// Inbound: the source is known from its certificate and baggage, not the snapshot.
		v[lSrcNamespace] = f.SrcIdentity.Namespace
	}
	fill(v[lSrcWorkload:], src)
	fill(v[lDstWorkload:], dst)
	if !f.SrcIdentity.IsZero() {
		v[lSrcPrincipal] = f.SrcIdentity.String()
	}
	if !f.DstIdentity.IsZero() {
		v[lDstPrincipal] = f.DstIdentity.String()
	}
	if svc := f.DstService; svc != nil {
		v[lDstService] = svc.Hostname
		v[lDstServiceNamespace] = svc.Namespace
		v[lDstServiceName] = svc.Name
	}
	v[lSecurityPolicy] = unknown
	if mutualTLS(f) {
		v[lSecurityPolicy] = "mutual_tls"
	}
	for i := range v {
		if v[i] == "" {
			v[i] = unknown
		}
	}
	return v
}

func mutualTLS(f *stages.Flow) bool {
	return f.Dir == stages.Inbound || f.Route.Kind == identity.HBONE || f.Route.Kind == identity.Waypoint
}

// fill sets one side's workload labels; side starts at that side's workload label.
func fill(side []string, w *snapshot.Workload) {
	if w == nil {
		return
	}
	name := w.WorkloadName
	if name == "" {
		name = w.Name
	}
	side[offWorkload] = name
	side[offNamespace] = w.Namespace
	side[offCanonicalService] = w.CanonicalName
	side[offCanonicalRevision] = w.CanonicalRevision
	side[offApp] = w.CanonicalName
	side[offVersion] = w.CanonicalRevision
	side[offCluster] = w.ClusterID
}

// Opened counts an established flow.
func (t *Telemetry) Opened(f *stages.Flow) {
	s := t.cache.get(f)
	since(&s.established)
	i := t.m.pick()
	s.shard(i).opened.Add(1)
	t.m.openGauge(f.Dir, i).Add(1)
	if t.log.Enabled(context.Background(), slog.LevelDebug) {
		t.log.Debug("connection opened", t.attrs(f, 0)...)
	}
}

// Closed counts a finished flow and writes its access log record.
func (t *Telemetry) Closed(f *stages.Flow, err error) {
	s := t.cache.get(f)
	since(&s.established)
	i := t.m.pick()
	sh := s.shard(i)
	sh.closed.Add(1)
	if n := f.BytesSent.Load(); n > 0 {
		sh.received.Add(uint64(n))
	}
	if n := f.BytesRecv.Load(); n > 0 {
		sh.sent.Add(uint64(n))
	}
	t.m.openGauge(f.Dir, i).Add(-1)
	level := slog.LevelInfo
	if err != nil {
		level = slog.LevelError
	}
	if !t.log.Enabled(context.Background(), level) {
		return
	}
	attrs := t.attrs(f, time.Since(f.Trace.Begin))
	if err != nil {
		t.log.Error("connection complete", append(attrs, "error", err.Error())...)
		return
	}
	t.log.Info("connection complete", attrs...)
}

// Failed counts a flow that never got established and logs why.
func (t *Telemetry) Failed(f *stages.Flow) {
	s := t.cache.get(f)
	since(&s.failed)
	s.shard(t.m.pick()).failed.Add(1)
	if !t.log.Enabled(context.Background(), slog.LevelWarn) {
		return
	}
	attrs := t.attrs(f, time.Since(f.Trace.Begin))
	errText := ""
	if f.Err != nil {
		errText = f.Err.Error()
	}
	t.log.Warn("connection failed", append(attrs, "error", errText, "response_flags", f.Failure.String())...)
}

// attrs are ztunnel's access log fields plus the per-stage timings.
func (t *Telemetry) attrs(f *stages.Flow, d time.Duration) []any {
	a := []any{"flow", f.ID, "src.addr", f.Src.String()}
	if w := f.SrcWorkload; w != nil {
		a = append(a, "src.workload", w.Name, "src.namespace", w.Namespace)
	}
	if !f.SrcIdentity.IsZero() {
		a = append(a, "src.identity", f.SrcIdentity.String())
	}
	a = append(a, "dst.addr", f.UpAddr.String())
	if f.HBONEAddr.IsValid() {
		a = append(a, "dst.hbone_addr", f.HBONEAddr.String())
	}
	if s := f.DstService; s != nil {
		a = append(a, "dst.service", s.Hostname)
	}
	if w := f.DstWorkload; w != nil {
		a = append(a, "dst.workload", w.Name, "dst.namespace", w.Namespace)
	}
	if !f.DstIdentity.IsZero() {
		a = append(a, "dst.identity", f.DstIdentity.String())
	}
	a = append(a, "direction", f.Dir.String())
	if d > 0 {
		a = append(a, "bytes_sent", f.BytesSent.Load(), "bytes_recv", f.BytesRecv.Load(), "duration", fmt.Sprintf("%dms", d.Milliseconds()))
	}
	for i := range f.Trace.NumSpans() {
		if s := f.Trace.Span(i); !s.End.IsZero() {
			a = append(a, "stage."+s.Stage, s.Work().String())
		}
	}
	if f.FirstByte > 0 {
		a = append(a, "stage.first_byte", f.FirstByte.String())
	}
	return a
}
