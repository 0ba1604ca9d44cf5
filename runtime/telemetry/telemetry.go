// Package telemetry reports finished and failed flows the way ztunnel does: Istio's TCP
// connection metrics (istio_tcp_*) with their full label set, and the "connection complete" /
// "connection failed" access log records.
//
// Label values come from the flow's snapshot view of the source and destination workloads;
// values that are unknown render as "unknown", as in ztunnel.
package telemetry

import (
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
	m   *Metrics
	log *slog.Logger
}

// New returns a reporter writing access logs to log (nil disables them).
func New(m *Metrics, log *slog.Logger) *Telemetry {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Telemetry{m: m, log: log}
}

// Labels computes the metric labels of a flow.
func Labels(f *stages.Flow) prometheus.Labels {
	l := prometheus.Labels{"reporter": f.Dir.Reporter(), "request_protocol": "tcp", "response_flags": f.Failure.String()}
	src, dst := f.SrcWorkload, f.DstWorkload
	if src == nil && f.Dir != stages.Outbound && !f.SrcIdentity.IsZero() {
		// Inbound: the source is known from its certificate and baggage, not the snapshot.
		l["source_workload_namespace"] = f.SrcIdentity.Namespace
	}
	fill(l, "source", src)
	fill(l, "destination", dst)
	if !f.SrcIdentity.IsZero() {
		l["source_principal"] = f.SrcIdentity.String()
	}
	if !f.DstIdentity.IsZero() {
		l["destination_principal"] = f.DstIdentity.String()
	}
	if svc := f.DstService; svc != nil {
		l["destination_service"] = svc.Hostname
		l["destination_service_namespace"] = svc.Namespace
		l["destination_service_name"] = svc.Name
	}
	l["connection_security_policy"] = unknown
	if f.Dir == stages.Inbound || f.Route.Kind == identity.HBONE || f.Route.Kind == identity.Waypoint {
		l["connection_security_policy"] = "mutual_tls"
	}
	for _, k := range labelNames {
		if l[k] == "" {
			l[k] = unknown
		}
	}
	return l
}

func fill(l prometheus.Labels, side string, w *snapshot.Workload) {
	if w == nil {
		return
	}
	name := w.WorkloadName
	if name == "" {
		name = w.Name
	}
	l[side+"_workload"] = name
	l[side+"_workload_namespace"] = w.Namespace
	l[side+"_canonical_service"] = w.CanonicalName
	l[side+"_canonical_revision"] = w.CanonicalRevision
	l[side+"_app"] = w.CanonicalName
	l[side+"_version"] = w.CanonicalRevision
	l[side+"_cluster"] = w.ClusterID
}

// Opened counts an established flow.
func (t *Telemetry) Opened(f *stages.Flow) {
	t.m.opened.With(Labels(f)).Inc()
	t.m.open.WithLabelValues(f.Dir.Reporter()).Inc()
	t.log.Debug("connection opened", t.attrs(f, 0)...)
}

// Closed counts a finished flow and writes its access log record.
func (t *Telemetry) Closed(f *stages.Flow, err error) {
	l := Labels(f)
	t.m.closed.With(l).Inc()
	t.m.received.With(l).Add(float64(f.BytesSent.Load()))
	t.m.sent.With(l).Add(float64(f.BytesRecv.Load()))
	t.m.open.WithLabelValues(f.Dir.Reporter()).Dec()
	attrs := t.attrs(f, time.Since(f.Trace.Begin))
	if err != nil {
		t.log.Error("connection complete", append(attrs, "error", err.Error())...)
		return
	}
	t.log.Info("connection complete", attrs...)
}

// Failed counts a flow that never got established and logs why.
func (t *Telemetry) Failed(f *stages.Flow) {
	t.m.failed.With(Labels(f)).Inc()
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
	for _, s := range f.Trace.Spans() {
		if !s.End.IsZero() {
			a = append(a, "stage."+s.Stage, s.Work().String())
		}
	}
	return a
}
