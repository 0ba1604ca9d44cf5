package xds

import (
	"fmt"

	"github.com/prometheus/client_golang/prometheus"
)

// TerminationReason says why an xDS stream ended; it is the reason label of
// istio_xds_connection_terminations_total, with ztunnel's values.
type TerminationReason string

const (
	// ReasonConnectionError: the stream could not be established (dial, TLS, token, or an
	// error status before the first response). Retried with growing backoff.
	ReasonConnectionError TerminationReason = "ConnectionError"
	// ReasonError: an established stream failed with a gRPC status that is not a routine
	// reconnect. Retried with growing backoff.
	ReasonError TerminationReason = "Error"
	// ReasonReconnect: the server or transport closed the stream in a routine way (Unknown,
	// Cancelled, DeadlineExceeded, "transport is closing", "received prior goaway").
	// Retried after the initial backoff.
	ReasonReconnect TerminationReason = "Reconnect"
	// ReasonComplete: the server ended the stream with OK. Retried after the initial backoff.
	ReasonComplete TerminationReason = "Complete"
)

// Metrics are the xDS client's counters, named as ztunnel names them.
type Metrics struct {
	terminations *prometheus.CounterVec
	messages     *prometheus.CounterVec
	bytes        *prometheus.CounterVec
}

// NewMetrics creates the xDS metrics and registers them on reg (nil: not registered):
//
//	istio_xds_connection_terminations_total{reason}
//	istio_xds_message_total{url}
//	istio_xds_message_bytes_total{url}
func NewMetrics(reg prometheus.Registerer) (*Metrics, error) {
	m := &Metrics{
		terminations: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "istio_xds_connection_terminations_total",
			Help: "The total number of completed connections to xds server (unstable)",
		}, []string{"reason"}),
		messages: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "istio_xds_message_total",
			Help: "Total number of messages received (unstable)",
		}, []string{"url"}),
		bytes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "istio_xds_message_bytes_total",
			Help: "Total number of bytes received (unstable)",
		}, []string{"url"}),
	}
	// Zero series for every reason, so a dashboard rate() sees the first termination.
	for _, r := range []TerminationReason{ReasonConnectionError, ReasonError, ReasonReconnect, ReasonComplete} {
		m.terminations.WithLabelValues(string(r))
	}
	if reg == nil {
		return m, nil
	}
	var registered []prometheus.Collector
	for _, c := range []prometheus.Collector{m.terminations, m.messages, m.bytes} {
		if err := reg.Register(c); err != nil {
			for _, r := range registered {
				reg.Unregister(r)
			}
			return nil, fmt.Errorf("register xds metrics: %w", err)
		}
		registered = append(registered, c)
	}
	return m, nil
}

func (m *Metrics) terminated(r TerminationReason) {
	m.terminations.WithLabelValues(string(r)).Inc()
}

// received counts one response. Bytes are the encoded sizes of the resources it carries, not
// of the whole message, as ztunnel counts them.
func (m *Metrics) received(typeURL string, resourceBytes int) {
	m.messages.WithLabelValues(typeURL).Inc()
	m.bytes.WithLabelValues(typeURL).Add(float64(resourceBytes))
}
