package agent

import (
	"fmt"

	"github.com/prometheus/client_golang/prometheus"
)

// Label values.
const (
	stateCaptured = "captured"
	statePending  = "pending"

	opInstall = "install"
	opRemove  = "remove"
	opCheck   = "check"

	stageNetns = "netns"
	stageRules = "rules"
	stageSink  = "sink"

	resultAck   = "ack"
	resultNack  = "nack"
	resultError = "error"
)

// agentMetrics are the Agent's metrics.
type agentMetrics struct {
	pods         *prometheus.GaugeVec
	ruleInstalls prometheus.Counter
	ruleFailures *prometheus.CounterVec
	driftRepairs prometheus.Counter
	podFailures  *prometheus.CounterVec
}

func newAgentMetrics(reg prometheus.Registerer) (*agentMetrics, error) {
	m := &agentMetrics{
		pods: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "ztgo_agent_pods",
			Help: "Pods the node agent manages, by state: captured (rules installed, sink started) or pending (waiting for a retry).",
		}, []string{"state"}),
		ruleInstalls: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "ztgo_agent_rule_installs_total",
			Help: "Capture rule installations that succeeded, drift repairs included.",
		}),
		ruleFailures: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "ztgo_agent_rule_failures_total",
			Help: "Capture rule operations that failed, by operation: install, remove or check.",
		}, []string{"op"}),
		driftRepairs: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "ztgo_agent_drift_repairs_total",
			Help: "Pods whose capture rules had drifted from the configuration and were reinstalled.",
		}),
		podFailures: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "ztgo_agent_pod_failures_total",
			Help: "Failed attempts to capture a pod, retried later, by stage: netns (open the namespace), rules or sink.",
		}, []string{"stage"}),
	}
	for _, s := range []string{stateCaptured, statePending} {
		m.pods.WithLabelValues(s)
	}
	for _, op := range []string{opInstall, opRemove, opCheck} {
		m.ruleFailures.WithLabelValues(op)
	}
	for _, s := range []string{stageNetns, stageRules, stageSink} {
		m.podFailures.WithLabelValues(s)
	}
	if err := register(reg, "node agent", m.pods, m.ruleInstalls, m.ruleFailures, m.driftRepairs, m.podFailures); err != nil {
		return nil, err
	}
	return m, nil
}

// serverMetrics are the ZDS Server's metrics.
type serverMetrics struct {
	conns    prometheus.Gauge
	messages *prometheus.CounterVec
}

func newServerMetrics(reg prometheus.Registerer) (*serverMetrics, error) {
	m := &serverMetrics{
		conns: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "ztgo_agent_zds_connections",
			Help: "ZDS clients (ztgo or ztunnel) connected to the node agent.",
		}),
		messages: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "ztgo_agent_zds_messages_total",
			Help: "ZDS requests the node agent sent, by type (add, del, snapshot_sent) and result (ack, nack, error).",
		}, []string{"type", "result"}),
	}
	for _, t := range []string{"add", "del", "snapshot_sent"} {
		for _, r := range []string{resultAck, resultNack, resultError} {
			m.messages.WithLabelValues(t, r)
		}
	}
	if err := register(reg, "zds server", m.conns, m.messages); err != nil {
		return nil, err
	}
	return m, nil
}

// register registers cs on reg (nil: nothing), all or none.
func register(reg prometheus.Registerer, what string, cs ...prometheus.Collector) error {
	if reg == nil {
		return nil
	}
	for i, c := range cs {
		if err := reg.Register(c); err != nil {
			for _, r := range cs[:i] {
				reg.Unregister(r)
			}
			return fmt.Errorf("register %s metrics: %w", what, err)
		}
	}
	return nil
}
