package localfile

import (
	"fmt"

	"github.com/prometheus/client_golang/prometheus"
)

// Metrics counts local config loads. The initial load counts as a reload.
type Metrics struct {
	reloadsOK    prometheus.Counter
	reloadsError prometheus.Counter
	lastSuccess  prometheus.Gauge
}

// NewMetrics creates the local config metrics and registers them on reg (nil: not registered):
//
//	ztgo_config_reloads_total{result="ok"|"error"}
//	ztgo_config_last_reload_success_timestamp_seconds
func NewMetrics(reg prometheus.Registerer) (*Metrics, error) {
	reloads := prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "ztgo_config_reloads_total",
		Help: "Local config loads, by result (ok: published; error: rejected, the last good config stays).",
	}, []string{"result"})
	last := prometheus.NewGauge(prometheus.GaugeOpts{
		Name: "ztgo_config_last_reload_success_timestamp_seconds",
		Help: "Unix time of the last local config load that was published.",
	})
	m := &Metrics{
		reloadsOK:    reloads.WithLabelValues("ok"),
		reloadsError: reloads.WithLabelValues("error"),
		lastSuccess:  last,
	}
	if reg != nil {
		if err := reg.Register(reloads); err != nil {
			return nil, fmt.Errorf("register local config metrics: %w", err)
		}
		if err := reg.Register(last); err != nil {
			reg.Unregister(reloads)
			return nil, fmt.Errorf("register local config metrics: %w", err)
		}
	}
	return m, nil
}
