package certs

import (
	"errors"
	"fmt"

	"github.com/prometheus/client_golang/prometheus"
)

// Metrics are the certificate manager's Prometheus series.
type Metrics struct {
	// Issued counts signing attempts by result ("success" or "failure").
	Issued *prometheus.CounterVec
	// Expiry is the NotAfter of each identity's current certificate, in Unix seconds. The
	// identity label is bounded by the workloads on one node, and a forgotten identity's
	// series is deleted.
	Expiry *prometheus.GaugeVec
}

const (
	resultSuccess = "success"
	resultFailure = "failure"
)

// NewMetrics creates the series and registers them on reg; a nil reg leaves them unregistered.
func NewMetrics(reg prometheus.Registerer) (*Metrics, error) {
	m := &Metrics{
		Issued: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "ztgo_cert_issued_total",
			Help: "Workload certificate signing attempts, by result.",
		}, []string{"result"}),
		Expiry: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "ztgo_cert_expiry_timestamp_seconds",
			Help: "Expiry time of the current workload certificate of each identity, in Unix seconds.",
		}, []string{"identity"}),
	}
	// Pre-create both results so a rate() over failures exists before the first failure.
	m.Issued.WithLabelValues(resultSuccess)
	m.Issued.WithLabelValues(resultFailure)
	if reg == nil {
		return m, nil
	}
	var errs []error
	for _, c := range []prometheus.Collector{m.Issued, m.Expiry} {
		if err := reg.Register(c); err != nil {
			errs = append(errs, err)
		}
	}
	if err := errors.Join(errs...); err != nil {
		return nil, fmt.Errorf("register certificate metrics: %w", err)
	}
	return m, nil
}
