package main

import (
	"net/netip"
	"testing"

	"github.com/ztgo/ztgo/control/localfile"
	"github.com/ztgo/ztgo/control/snapshot"
	"github.com/ztgo/ztgo/stages/authz"
	"github.com/ztgo/ztgo/tls/spiffe"
)

// TestMeshConfig checks that the config both nodes load parses, agrees with the constants the
// demo uses, and decides the demo's flows as the demo expects.
func TestMeshConfig(t *testing.T) {
	snap, err := localfile.Load([]byte(meshYAML))
	if err != nil {
		t.Fatalf("mesh.yaml does not load: %v", err)
	}
	workload := func(ip, node, id string) *snapshot.Workload {
		t.Helper()
		w := snap.WorkloadByAddr("", netip.MustParseAddr(ip))
		if w == nil {
			t.Fatalf("no workload at %s", ip)
		}
		if w.Node != node || w.Identity().String() != id || w.Protocol != snapshot.TunnelHBONE {
			t.Errorf("workload at %s: node %q identity %s protocol %v, want %s %s HBONE", ip, w.Node, w.Identity(), w.Protocol, node, id)
		}
		return w
	}
	client := workload(clientIP, nodeA, clientID)
	echo := workload(echoIP, nodeB, echoID)
	db := workload(dbIP, nodeB, dbID)
	if n := len(snap.WorkloadsOnNode(nodeA)); n != 1 {
		t.Errorf("%s has %d workloads, want 1", nodeA, n)
	}
	if n := len(snap.WorkloadsOnNode(nodeB)); n != 2 {
		t.Errorf("%s has %d workloads, want 2", nodeB, n)
	}
	for _, addr := range []string{outsideIP, hostA, hostB} {
		if w := snap.WorkloadByAddr("", netip.MustParseAddr(addr)); w != nil {
			t.Errorf("%s must not be a workload (it is %s)", addr, w.Name)
		}
	}

	svc := snap.ServiceByHostname(echoHost, "default")
	if svc == nil {
		t.Fatalf("no service %s", echoHost)
	}
	if len(svc.VIPs) != 1 || svc.VIPs[0].Addr != netip.MustParseAddr(echoVIP) {
		t.Errorf("service VIPs %v, want %s", svc.VIPs, echoVIP)
	}
	if got := svc.Ports[echoSvcPort]; got != echoPort {
		t.Errorf("service port %d -> %d, want %d", echoSvcPort, got, echoPort)
	}
	if snap.ServiceByVIP("", netip.MustParseAddr(echoVIP), "default") != svc {
		t.Errorf("VIP %s does not lead to %s", echoVIP, echoHost)
	}

	decide := func(from spiffe.ID, srcIP string, to *snapshot.Workload, dstIP string, port uint16) bool {
		return authz.Evaluate(snap, to, authz.Conn{
			SrcIdentity: from, SrcIP: netip.MustParseAddr(srcIP), DstIP: netip.MustParseAddr(dstIP), DstPort: port,
		}).Allow
	}
	if !decide(client.Identity(), clientIP, echo, echoIP, echoPort) {
		t.Error("client -> echo is denied, want allowed")
	}
	if decide(client.Identity(), clientIP, db, dbIP, dbPort) {
		t.Error("client -> db is allowed, want denied")
	}
	prod := spiffe.ID{TrustDomain: "cluster.local", Namespace: "prod", ServiceAccount: "batch"}
	if !decide(prod, "127.0.9.9", db, dbIP, dbPort) {
		t.Error("prod/batch -> db is denied, want allowed: the policy must admit namespace prod")
	}
}

func TestParseMetricLine(t *testing.T) {
	m, ok := parseMetricLine(`istio_tcp_connections_opened_total{reporter="destination",destination_workload="echo",x="a\"b\\c"} 3`)
	if !ok || m.Name != "istio_tcp_connections_opened_total" || m.Value != "3" ||
		m.Labels["reporter"] != "destination" || m.Labels["destination_workload"] != "echo" || m.Labels["x"] != `a"b\c` {
		t.Errorf("got %+v %v", m, ok)
	}
	if m, ok := parseMetricLine("go_goroutines 12"); !ok || m.Name != "go_goroutines" || m.Value != "12" {
		t.Errorf("got %+v %v", m, ok)
	}
	for _, bad := range []string{"", "# HELP x y", `x{a="b} 1`, `x{a=b} 1`, "x{} "} {
		if m, ok := parseMetricLine(bad); ok {
			t.Errorf("%q parsed as %+v", bad, m)
		}
	}
	text := "# TYPE c counter\nc{reporter=\"source\",w=\"echo\"} 1\nc{reporter=\"destination\",w=\"echo\"} 2\nc{w=\"db\"} 5\n"
	got := pickMetrics(text, "c", map[string]string{"w": "echo"})
	if len(got) != 2 || got[0].Labels["reporter"] != "destination" || got[1].Value != "1" {
		t.Errorf("pickMetrics: %+v", got)
	}
	if s := got[0].abridged("reporter", "w", "missing"); s != `c{reporter="destination",w="echo"} 2` {
		t.Errorf("abridged: %s", s)
	}
}

func TestMatchFlows(t *testing.T) {
	onA := []flowRecord{
		{Direction: "outbound", Src: "127.0.1.10:1001", TraceParent: "00-aa-01-01"},
		{Direction: "outbound", Src: "127.0.1.10:1002", TraceParent: "00-bb-01-01"},
		{Direction: "outbound", Src: "127.0.1.10:1003", TraceParent: "00-cc-01-01"},
	}
	onB := []flowRecord{
		{Direction: "inbound", Src: "127.0.1.10:5000", TraceParent: "00-bb-01-01"},
		{Direction: "inbound", Src: "127.0.1.10:5001", TraceParent: "00-aa-01-01"},
	}
	results := []*flowResult{
		{expect: "allowed", local: netip.MustParseAddrPort("127.0.1.10:1001")},
		{expect: "denied", local: netip.MustParseAddrPort("127.0.1.10:1002")},
		{expect: "passthrough", local: netip.MustParseAddrPort("127.0.1.10:1003")},
	}
	if missing := matchFlows(onA, onB, results); missing != 0 {
		t.Fatalf("%d missing", missing)
	}
	if results[0].onB.Src != "127.0.1.10:5001" || results[1].onB.Src != "127.0.1.10:5000" || results[2].onB != nil {
		t.Errorf("wrong node-b matches: %+v %+v %+v", results[0].onB, results[1].onB, results[2].onB)
	}
	if missing := matchFlows(onA[:1], nil, results); missing != 4 {
		t.Errorf("missing = %d, want 4 (two on node-a, two on node-b)", missing)
	}
}

func TestThousands(t *testing.T) {
	for n, want := range map[int64]string{0: "0", 999: "999", 1000: "1,000", 1048576: "1,048,576", -12345: "-12,345"} {
		if got := thousands(n); got != want {
			t.Errorf("thousands(%d) = %s, want %s", n, got, want)
		}
	}
}
