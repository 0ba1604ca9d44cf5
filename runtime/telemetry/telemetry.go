// Package telemetry reports finished and failed flows the way ztunnel does: Istio's TCP
// connection metrics (istio_tcp_*) with their full label set, and the "connection complete" /
// "connection failed" access log records.
//
// Label values come from the flow's snapshot view of the source and destination workloads;
// values that are unknown render as "unknown", as in ztunnel.
//
// Opening and closing a flow must stay cheap on connection churn: the 23 label values are
// computed and hashed once per label set, not per flow (seriesCache), the sockets gauge is
// resolved once per direction, a flow's bytes are counted in the flow and added once when it
// closes, and access log fields are only built when the logger will write them.
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

// Metrics are Istio's TCP connection metrics.
type Metrics struct {
	opened, closed, failed *prometheus.CounterVec
	received, sent         *prometheus.CounterVec
	open                   *prometheus.GaugeVec
}

// NewMetrics registers the metrics on reg.
func NewMetrics(reg prometheus.Registerer) (*Metrics, error) {
	m := &Metrics{
		opened: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "istio_tcp_connections_opened_total", Help: "The total number of TCP connections opened",
		}, labelNames),
		closed: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "istio_tcp_connections_closed_total", Help: "The total number of TCP connections closed",
		}, labelNames),
		failed: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "istio_tcp_connections_failed_total", Help: "The total number of TCP connections that failed to establish",
		}, labelNames),
		received: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "istio_tcp_received_bytes_total", Help: "The size of total bytes received during request in case of a TCP connection",
		}, labelNames),
		sent: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "istio_tcp_sent_bytes_total", Help: "The size of total bytes sent during response in case of a TCP connection",
		}, labelNames),
		open: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "istio_tcp_sockets_open", Help: "The current number of open proxied TCP connections",
		}, []string{"reporter"}),
	}
	if reg != nil {
		for _, c := range []prometheus.Collector{m.opened, m.closed, m.failed, m.received, m.sent, m.open} {
			if err := reg.Register(c); err != nil {
				return nil, fmt.Errorf("register istio metrics: %w", err)
			}
		}
	}
	return m, nil
}

// Telemetry reports flows.
type Telemetry struct {
	m     *Metrics
	log   *slog.Logger
	cache seriesCache
	// open holds the istio_tcp_sockets_open child of each direction, resolved once.
	open [numDirections]prometheus.Gauge
}

// numDirections bounds the stages.Direction values Telemetry pre-resolves.
const numDirections = 3

// New returns a reporter writing access logs to log (nil disables them).
func New(m *Metrics, log *slog.Logger) *Telemetry {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	t := &Telemetry{m: m, log: log}
	for d := range stages.Direction(numDirections) {
		t.open[d] = m.open.WithLabelValues(d.Reporter())
	}
	t.cache.init()
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
func labelValues(f *stages.Flow) []string {
	v := make([]string, numLabels)
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
	t.cache.get(f).established(t.m).opened.Inc()
	t.sockets(f.Dir).Inc()
	if t.log.Enabled(context.Background(), slog.LevelDebug) {
		t.log.Debug("connection opened", t.attrs(f, 0)...)
	}
}

// Closed counts a finished flow and writes its access log record.
func (t *Telemetry) Closed(f *stages.Flow, err error) {
	s := t.cache.get(f).established(t.m)
	s.closed.Inc()
	s.received.Add(float64(f.BytesSent.Load()))
	s.sent.Add(float64(f.BytesRecv.Load()))
	t.sockets(f.Dir).Dec()
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
	t.cache.get(f).failedCounter(t.m).Inc()
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

func (t *Telemetry) sockets(d stages.Direction) prometheus.Gauge {
	if d < numDirections {
		return t.open[d]
	}
	return t.m.open.WithLabelValues(d.Reporter())
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
	for _, s := range f.Trace.Spans() {
		if !s.End.IsZero() {
			a = append(a, "stage."+s.Stage, s.Work().String())
		}
	}
	if f.FirstByte > 0 {
		a = append(a, "stage.first_byte", f.FirstByte.String())
	}
	return a
}
