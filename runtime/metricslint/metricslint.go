// Package metricslint checks the metrics a ztgo node exports, and gives other tests a running
// node to ask which metrics exist.
//
// Mesh starts one in-process node serving a two-workload mesh on loopback addresses and
// drives flows through it, so that every labelled family has a series: Families returns what
// the node's registry gathers then. Lint runs promlint, plus ztgo's Rules, over those
// families and drops the deliberate exceptions listed in Exceptions: names Istio chose and users scrape, which ztgo
// keeps byte for byte, even where a Prometheus naming rule would want otherwise.
//
// The package imports "testing" and is for tests only (its own, and deploy/grafana's check
// that the dashboard asks for metrics that exist); ztgo's binaries never import it.
package metricslint

import (
	"errors"
	"fmt"
	"regexp"
	"slices"
	"strings"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil/promlint"
	dto "github.com/prometheus/client_model/go"
)

// Exception is a promlint problem ztgo keeps on purpose.
type Exception struct {
	// Metric is the family's name; Problem is a substring of promlint's text.
	Metric, Problem string
	// Why the name stays as it is.
	Why string
}

// Exceptions are the deliberate lint exceptions. Each names one family and one rule, so a new
// metric with the same problem still fails the lint.
//
// promlint's own rules (client_golang v1.25: help, units, counter suffixes, reserved
// suffixes, type in name, reserved characters, camel case, unit abbreviations, duplicates)
// find nothing to excuse today: Istio's istio_tcp_* counters end in _total, and their units
// (bytes) are base units. The exceptions are to ztgo's two stricter rules (Rules).
var Exceptions = []Exception{
	{
		Metric: "workload_manager_active_proxy_count", Problem: `should not have "_count" suffix`,
		Why: "ztunnel's in-pod workload manager gauge (inpod/metrics.rs); ztgo's ZDS client keeps its name",
	},
	{
		Metric: "workload_manager_pending_proxy_count", Problem: `should not have "_count" suffix`,
		Why: "ztunnel's in-pod workload manager gauge (inpod/metrics.rs); ztgo's ZDS client keeps its name",
	},
	{
		Metric: "istio_build", Problem: "should end in _info",
		Why: "Istio's build-info metric; ztunnel exports istio_build{component=\"ztunnel\",tag=...} and " +
			"Istio's dashboards and `istioctl` count proxies and versions by that name",
	},
}

// IstioNames are the istio_* families ztunnel exports (spec/ztunnel-compat.md §1.15, §1.19).
// ztgo may export these names and no other istio_* name: an Istio name is a promise that
// Istio's dashboards read it the same way.
var IstioNames = []string{
	"istio_build",
	"istio_tcp_connections_opened_total", "istio_tcp_connections_closed_total", "istio_tcp_connections_failed_total",
	"istio_tcp_received_bytes_total", "istio_tcp_sent_bytes_total", "istio_tcp_sockets_open",
	"istio_on_demand_dns_total", "istio_crl_policy_rejections_total", "istio_crl_untracked_connections_total",
	"istio_xds_connection_terminations_total", "istio_xds_message_total", "istio_xds_message_bytes_total",
	"istio_dns_requests_total", "istio_dns_upstream_requests_total", "istio_dns_upstream_failures_total",
	"istio_dns_upstream_request_duration_seconds",
}

// ZtunnelNames are the families ztunnel exports without the istio_ prefix: its in-pod
// workload manager's (spec/ztunnel-compat.md §1.19, inpod/metrics.rs). ztgo's ZDS client
// exports them under the same names.
var ZtunnelNames = []string{
	"workload_manager_active_proxy_count", "workload_manager_pending_proxy_count",
	"workload_manager_proxies_started_total", "workload_manager_proxies_stopped_total",
}

// CheckName applies the namespace rule to one family name: ztgo's own metrics start with
// ztgo_; the others are Istio's names (IstioNames) or client_golang's Go and process
// collectors (go_, process_).
func CheckName(name string) error {
	switch {
	case strings.HasPrefix(name, "ztgo_"), strings.HasPrefix(name, "go_"), strings.HasPrefix(name, "process_"):
		return nil
	case slices.Contains(IstioNames, name), slices.Contains(ZtunnelNames, name):
		return nil
	case strings.HasPrefix(name, "istio_"):
		return errors.New("istio_ name that ztunnel does not export: ztgo's own metrics start with ztgo_")
	}
	return errors.New("metric name outside ztgo's namespaces: ztgo's own metrics start with ztgo_")
}

// buildLabels are label names that mark a gauge as build information.
var buildLabels = []string{"version", "tag", "revision", "commit", "goversion"}

// Rules are ztgo's validations beside promlint's defaults: the namespace rule (CheckName),
// and that a gauge carrying build information (a label in buildLabels) is an info metric
// whose name ends in _info.
var Rules = []promlint.Validation{
	func(mf *dto.MetricFamily) []error {
		if err := CheckName(mf.GetName()); err != nil {
			return []error{err}
		}
		return nil
	},
	func(mf *dto.MetricFamily) []error {
		if mf.GetType() != dto.MetricType_GAUGE || strings.HasSuffix(mf.GetName(), "_info") {
			return nil
		}
		for _, m := range mf.GetMetric() {
			for _, l := range m.GetLabel() {
				if slices.Contains(buildLabels, l.GetName()) {
					return []error{fmt.Errorf("gauge with build label %q is an info metric and should end in _info", l.GetName())}
				}
			}
		}
		return nil
	},
}

// IstioTCPLabels are the label names ztunnel puts on istio_tcp_connections_opened_total,
// _closed_total, _failed_total, istio_tcp_received_bytes_total and istio_tcp_sent_bytes_total
// (proxy/metrics.rs; spec/ztunnel-compat.md §1.19), without the optional locality labels
// (source_region, source_zone, destination_region, destination_zone), which ztunnel adds
// only when it knows the workloads' locality.
var IstioTCPLabels = []string{
	"reporter",
	"source_workload", "source_canonical_service", "source_canonical_revision", "source_workload_namespace",
	"source_principal", "source_app", "source_version", "source_cluster",
	"destination_service", "destination_service_namespace", "destination_service_name",
	"destination_workload", "destination_canonical_service", "destination_canonical_revision",
	"destination_workload_namespace", "destination_principal", "destination_app", "destination_version",
	"destination_cluster",
	"request_protocol", "response_flags", "connection_security_policy",
}

// IstioTCPFamilies are the families that carry IstioTCPLabels.
var IstioTCPFamilies = []string{
	"istio_tcp_connections_opened_total",
	"istio_tcp_connections_closed_total",
	"istio_tcp_connections_failed_total",
	"istio_tcp_received_bytes_total",
	"istio_tcp_sent_bytes_total",
}

// Lint runs promlint with Rules over mfs and returns the problems that are not in Exceptions, and the
// exceptions that matched no problem although their family was linted (a stale exception
// hides nothing and should go; one for a family this node does not have, such as in-pod
// metrics in loopback mode, is not stale).
func Lint(mfs []*dto.MetricFamily) (problems []promlint.Problem, unused []Exception, err error) {
	present := map[string]bool{}
	for _, mf := range mfs {
		present[mf.GetName()] = true
	}
	l := promlint.NewWithMetricFamilies(mfs)
	l.AddCustomValidations(Rules...)
	all, err := l.Lint()
	if err != nil {
		return nil, nil, fmt.Errorf("promlint: %w", err)
	}
	used := make([]bool, len(Exceptions))
	for _, p := range all {
		excepted := false
		for i, e := range Exceptions {
			if p.Metric == e.Metric && strings.Contains(p.Text, e.Problem) {
				used[i], excepted = true, true
			}
		}
		if !excepted {
			problems = append(problems, p)
		}
	}
	for i, e := range Exceptions {
		if !used[i] && present[e.Metric] {
			unused = append(unused, e)
		}
	}
	return problems, unused, nil
}

var descName = regexp.MustCompile(`fqName: "([^"]*)"`)

// Registered returns the names of every family the collectors registered on reg describe,
// whether or not they have a series yet.
func Registered(reg prometheus.Collector) []string {
	ch := make(chan *prometheus.Desc)
	go func() {
		reg.Describe(ch)
		close(ch)
	}()
	seen := map[string]bool{}
	var names []string
	for d := range ch {
		// Desc keeps its name unexported; its String is the only way to it.
		m := descName.FindStringSubmatch(d.String())
		if m == nil || seen[m[1]] {
			continue
		}
		seen[m[1]] = true
		names = append(names, m[1])
	}
	return names
}

// SeriesNames returns every name a query can select in mfs: each family's name and, for
// histograms and summaries, the _bucket, _sum and _count series. The value says which family
// a name belongs to.
func SeriesNames(mfs []*dto.MetricFamily) map[string]string {
	out := map[string]string{}
	for _, mf := range mfs {
		name := mf.GetName()
		out[name] = name
		switch mf.GetType() {
		case dto.MetricType_HISTOGRAM, dto.MetricType_GAUGE_HISTOGRAM:
			out[name+"_bucket"] = name
			out[name+"_sum"] = name
			out[name+"_count"] = name
		case dto.MetricType_SUMMARY:
			out[name+"_sum"] = name
			out[name+"_count"] = name
		}
	}
	return out
}
