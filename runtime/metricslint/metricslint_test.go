package metricslint

import (
	"fmt"
	"slices"
	"strings"
	"testing"

	dto "github.com/prometheus/client_model/go"

	"github.com/ztgo/ztgo/control/xds"
	"github.com/ztgo/ztgo/runtime/node"
)

// The lint and the label checks run on the families of a node that carried flows; subnet 1
// of 127.80.0.0/16 is this package's (deploy/grafana uses another).
const subnet = 1

func TestNodeMetricsLint(t *testing.T) {
	m, mfs := Families(t, subnet)

	// Every registered family was gathered, so the lint below saw every metric the node has.
	gathered := SeriesNames(mfs)
	for _, name := range Registered(m.Node.Registry()) {
		if _, ok := gathered[name]; !ok {
			t.Errorf("%s is registered but has no series after an echo and a refused flow: the lint cannot check its labels", name)
		}
	}

	problems, unused, err := Lint(mfs)
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range problems {
		t.Errorf("promlint: %s: %s", p.Metric, p.Text)
	}
	for _, e := range unused {
		t.Errorf("lint exception %s (%q) matches no problem any more; remove it", e.Metric, e.Problem)
	}
	for _, name := range []string{
		// The metrics this package was written to add, and the ones the dashboard leans on.
		"ztgo_pool_streams", "ztgo_pool_connections", "ztgo_pool_dials_total",
		"ztgo_snapshot_version", "ztgo_snapshot_built_timestamp_seconds",
		"ztgo_stage_mailbox_depth", "ztgo_stage_backpressure_total", "ztgo_stage_rejected_total",
		"ztgo_stage_duration_seconds", "ztgo_stage_queue_seconds",
		"istio_tcp_sockets_open", "istio_build", "process_cpu_seconds_total", "go_goroutines",
	} {
		if _, ok := gathered[name]; !ok {
			t.Errorf("%s not exported", name)
		}
	}
}

// The istio_tcp_* families carry exactly ztunnel's labels, so Istio's dashboards and Kiali's
// queries work unchanged.
func TestIstioTCPLabels(t *testing.T) {
	_, mfs := Families(t, subnet+1)
	want := slices.Sorted(slices.Values(IstioTCPLabels))
	byName := map[string]*dto.MetricFamily{}
	for _, mf := range mfs {
		byName[mf.GetName()] = mf
	}
	check := func(family string, want []string) {
		t.Helper()
		mf := byName[family]
		if mf == nil {
			t.Errorf("%s not exported", family)
			return
		}
		for _, s := range mf.GetMetric() {
			var got []string
			for _, l := range s.GetLabel() {
				got = append(got, l.GetName())
			}
			slices.Sort(got)
			if !slices.Equal(got, want) {
				t.Errorf("%s labels = %v\nwant %v", family, got, want)
				return
			}
		}
	}
	for _, family := range IstioTCPFamilies {
		check(family, want)
	}
	check("istio_tcp_sockets_open", []string{"reporter"})

	// The echo flow went through the service: spot-check the values ztunnel would report.
	opened := byName["istio_tcp_connections_opened_total"]
	var found bool
	for _, s := range opened.GetMetric() {
		l := map[string]string{}
		for _, p := range s.GetLabel() {
			l[p.GetName()] = p.GetValue()
		}
		if l["reporter"] != "source" {
			continue
		}
		found = true
		for k, v := range map[string]string{
			"source_workload":               "client",
			"source_canonical_revision":     "v1",
			"source_principal":              "spiffe://cluster.local/ns/default/sa/client",
			"destination_service":           "echo.default.svc.cluster.local",
			"destination_service_name":      "echo",
			"destination_workload":          "echo",
			"destination_canonical_service": "echo",
			"destination_principal":         "spiffe://cluster.local/ns/default/sa/echo",
			"request_protocol":              "tcp",
			"response_flags":                "-",
			"connection_security_policy":    "mutual_tls",
		} {
			if l[k] != v {
				t.Errorf("opened{reporter=source} %s = %q, want %q", k, l[k], v)
			}
		}
	}
	if !found {
		t.Error("no istio_tcp_connections_opened_total series with reporter=source")
	}
}

// A node that takes its mesh from istiod registers the xDS metrics too; they are checked
// without running the node (nothing needs to connect for the families to exist).
func TestXDSNodeMetricsLint(t *testing.T) {
	n, err := node.New(node.Config{Name: "metricslint", Source: node.SourceBoth, DefaultConfig: []byte("workloads: []\n"),
		XDS: xds.Config{Address: "http://127.80.250.1:15010"}})
	if err != nil {
		t.Fatal(err)
	}
	lintRegistered(t, n, "xDS mode", "istio_xds_connection_terminations_total", "istio_xds_message_total", "istio_xds_message_bytes_total")
}

// lintRegistered checks that n registers the families want (in mode), that every registered
// name passes CheckName, and that what n gathers passes the lint.
func lintRegistered(t *testing.T, n *node.Node, mode string, want ...string) {
	t.Helper()
	names := Registered(n.Registry())
	for _, w := range want {
		if !slices.Contains(names, w) {
			t.Errorf("%s not registered in %s", w, mode)
		}
	}
	for _, name := range names {
		if err := CheckName(name); err != nil {
			t.Errorf("%s: %v", name, err)
		}
	}
	mfs, err := n.Registry().Gather()
	if err != nil {
		t.Fatal(err)
	}
	problems, _, err := Lint(mfs)
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range problems {
		t.Errorf("promlint: %s: %s", p.Metric, p.Text)
	}
}

// In-pod mode adds ztunnel's workload_manager_* families (ZDS) or the node agent's
// ztgo_agent_* families (pods directory); both pass the lint.
func TestInPodNodeMetricsLint(t *testing.T) {
	for _, tc := range []struct {
		cfg  node.Config
		want []string
	}{
		{node.Config{InPodUDS: "/nonexistent/ztgo-metricslint.sock"}, append([]string{"ztgo_inpod_proxies"}, ZtunnelNames...)},
		{node.Config{PodsDir: t.TempDir()}, []string{"ztgo_inpod_proxies", "ztgo_agent_pods", "ztgo_agent_rule_installs_total"}},
	} {
		cfg := tc.cfg
		cfg.Name, cfg.DefaultConfig = "metricslint", []byte("workloads: []\n")
		n, err := node.New(cfg)
		if err != nil {
			t.Fatal(err)
		}
		lintRegistered(t, n, fmt.Sprintf("in-pod mode %+v", tc.cfg), tc.want...)
	}
}

// The rules catch what they are for.
func TestRules(t *testing.T) {
	for name, bad := range map[string]bool{
		"ztgo_pool_streams": false, "go_goroutines": false, "process_open_fds": false,
		"istio_tcp_sockets_open": false, "istio_tcp_widgets_total": true, "pool_streams": true,
	} {
		if err := CheckName(name); (err != nil) != bad {
			t.Errorf("CheckName(%s) = %v, want error %v", name, err, bad)
		}
	}
	gauge := dto.MetricType_GAUGE
	str := func(s string) *string { return &s }
	mfs := []*dto.MetricFamily{{
		Name: str("ztgo_build"), Help: str("Build."), Type: &gauge,
		Metric: []*dto.Metric{{Label: []*dto.LabelPair{{Name: str("version"), Value: str("1")}}, Gauge: &dto.Gauge{Value: new(float64)}}},
	}}
	problems, _, err := Lint(mfs)
	if err != nil {
		t.Fatal(err)
	}
	if len(problems) != 1 || !strings.Contains(problems[0].Text, "_info") {
		t.Fatalf("problems = %v, want the _info rule", problems)
	}
}
