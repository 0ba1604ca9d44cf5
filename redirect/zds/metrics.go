package zds

import (
	"fmt"

	"github.com/prometheus/client_golang/prometheus"
)

// Metrics are the in-pod proxy counts, named and described as ztunnel's (src/inpod/metrics.rs
// under the "workload_manager" prefix).
type Metrics struct {
	active, pending  prometheus.Gauge
	started, stopped prometheus.Counter
}

// NewMetrics creates the metrics and registers them on reg (nil: not registered):
//
//	workload_manager_active_proxy_count
//	workload_manager_pending_proxy_count
//	workload_manager_proxies_started_total
//	workload_manager_proxies_stopped_total
func NewMetrics(reg prometheus.Registerer) (*Metrics, error) {
	m := &Metrics{
		active: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "workload_manager_active_proxy_count",
			Help: "The total number current workloads with active proxies (unstable)",
		}),
		pending: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "workload_manager_pending_proxy_count",
			Help: "The total number current workloads with pending proxies (unstable)",
		}),
		started: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "workload_manager_proxies_started_total",
			Help: "The total number of proxies that were started (unstable)",
		}),
		stopped: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "workload_manager_proxies_stopped_total",
			Help: "The total number of proxies that were stopped (unstable)",
		}),
	}
	if reg == nil {
		return m, nil
	}
	var registered []prometheus.Collector
	for _, c := range []prometheus.Collector{m.active, m.pending, m.started, m.stopped} {
		if err := reg.Register(c); err != nil {
			for _, r := range registered {
				reg.Unregister(r)
			}
			return nil, fmt.Errorf("register zds metrics: %w", err)
		}
		registered = append(registered, c)
	}
	return m, nil
}
