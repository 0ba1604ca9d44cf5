package telemetry

import (
	"bytes"
	"errors"
	"io"
	"log/slog"
	"net/netip"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/ztgo/ztgo/control/snapshot"
	"github.com/ztgo/ztgo/stages"
	"github.com/ztgo/ztgo/stages/identity"
)

func flow() *stages.Flow {
	src := &snapshot.Workload{Name: "client-7d9", WorkloadName: "client", Namespace: "default", TrustDomain: "cluster.local",
		ServiceAccount: "client", CanonicalName: "client", CanonicalRevision: "v1", ClusterID: "Kubernetes"}
	dst := &snapshot.Workload{Name: "echo-1", Namespace: "prod", TrustDomain: "cluster.local", ServiceAccount: "echo", ClusterID: "Kubernetes"}
	f := &stages.Flow{Dir: stages.Outbound, SrcWorkload: src, DstWorkload: dst, SrcIdentity: src.Identity(), DstIdentity: dst.Identity(),
		DstService: &snapshot.Service{Name: "echo", Namespace: "prod", Hostname: "echo.prod.svc.cluster.local"},
		Src:        netip.MustParseAddrPort("10.0.0.1:5555"), UpAddr: netip.MustParseAddrPort("10.0.0.2:15008"),
		HBONEAddr: netip.MustParseAddrPort("10.0.0.2:8080")}
	f.Route.Kind = identity.HBONE
	return f
}

func TestLabels(t *testing.T) {
	l := Labels(flow())
	want := map[string]string{
		"reporter": "source", "source_workload": "client", "source_workload_namespace": "default",
		"source_principal": "spiffe://cluster.local/ns/default/sa/client", "source_canonical_service": "client",
		"source_canonical_revision": "v1", "source_cluster": "Kubernetes", "destination_workload": "echo-1",
		"destination_service": "echo.prod.svc.cluster.local", "destination_service_name": "echo",
		"destination_service_namespace": "prod", "destination_canonical_service": "unknown",
		"connection_security_policy": "mutual_tls", "request_protocol": "tcp", "response_flags": "-",
	}
	for k, v := range want {
		if l[k] != v {
			t.Errorf("%s = %q, want %q", k, l[k], v)
		}
	}
	if len(l) != len(labelNames) {
		t.Fatalf("%d labels, want %d", len(l), len(labelNames))
	}
}

func TestOpenedClosedFailed(t *testing.T) {
	reg := prometheus.NewRegistry()
	m, err := NewMetrics(reg)
	if err != nil {
		t.Fatal(err)
	}
	var logs bytes.Buffer
	tel := New(m, slog.New(slog.NewTextHandler(&logs, nil)))
	f := flow()
	tel.Opened(f)
	if got := value(t, reg, "open", prometheus.Labels{"reporter": "source"}); got != 1 {
		t.Fatalf("sockets open = %v", got)
	}
	f.BytesSent.Add(100)
	f.BytesRecv.Add(7)
	tel.Closed(f, nil)
	l := Labels(f)
	if value(t, reg, "received", l) != 100 || value(t, reg, "sent", l) != 7 || value(t, reg, "closed", l) != 1 {
		t.Fatal("bytes or closed counters wrong")
	}
	f2 := flow()
	f2.Fail(stages.FailDeny, errors.New("denied"))
	tel.Failed(f2)
	if value(t, reg, "failed", Labels(f2)) != 1 {
		t.Fatal("failed not counted with DENY flag")
	}
	out := logs.String()
	for _, want := range []string{`msg="connection complete"`, "src.identity=spiffe://cluster.local/ns/default/sa/client",
		"dst.hbone_addr=10.0.0.2:8080", "bytes_sent=100", "bytes_recv=7", `msg="connection failed"`, "response_flags=DENY"} {
		if !strings.Contains(out, want) {
			t.Errorf("access log lacks %q:\n%s", want, out)
		}
	}
}

// BenchmarkOpenedClosed is one flow's metric work on connection churn: opened, then closed
// with its byte counts.
func BenchmarkOpenedClosed(b *testing.B) { benchOpenedClosed(b, nil) }

func benchOpenedClosed(b *testing.B, log *slog.Logger) {
	m, err := NewMetrics(prometheus.NewRegistry())
	if err != nil {
		b.Fatal(err)
	}
	tel := New(m, log)
	f := flow()
	f.BytesSent.Store(100)
	f.BytesRecv.Store(7)
	b.ReportAllocs()
	for b.Loop() {
		tel.Opened(f)
		tel.Closed(f, nil)
	}
}

// BenchmarkOpenedClosedParallel is the same on every CPU at once, on one label set: the case
// where flows contend most. Each goroutine's flow keeps one ID (the shard does not depend on
// it; see BenchmarkOpenedClosedParallelNewIDs).
func BenchmarkOpenedClosedParallel(b *testing.B) {
	m, err := NewMetrics(prometheus.NewRegistry())
	if err != nil {
		b.Fatal(err)
	}
	tel := New(m, nil)
	var ids atomic.Uint64
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		f := flow()
		f.ID = ids.Add(1)
		f.BytesSent.Store(100)
		f.BytesRecv.Store(7)
		for pb.Next() {
			tel.Opened(f)
			tel.Closed(f, nil)
		}
	})
}

// BenchmarkOpenedClosedAccessLog adds the access log at its default level (info) to a
// handler that discards the text.
func BenchmarkOpenedClosedAccessLog(b *testing.B) {
	benchOpenedClosed(b, slog.New(slog.NewTextHandler(io.Discard, nil)))
}

// BenchmarkOpenedClosedParallelNewIDs is BenchmarkOpenedClosedParallel with a new, random
// flow ID for every flow, as in production. With shards chosen by flow ID, this was about
// twice as slow per flow as the fixed IDs there on 2 CPUs: every CPU wrote every shard.
func BenchmarkOpenedClosedParallelNewIDs(b *testing.B) {
	m, err := NewMetrics(prometheus.NewRegistry())
	if err != nil {
		b.Fatal(err)
	}
	tel := New(m, nil)
	var seed atomic.Uint64
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		f := flow()
		f.BytesSent.Store(100)
		f.BytesRecv.Store(7)
		x := seed.Add(0x9e3779b97f4a7c15) | 1
		for pb.Next() {
			x ^= x << 13
			x ^= x >> 7
			x ^= x << 17
			f.ID = x
			tel.Opened(f)
			tel.Closed(f, nil)
		}
	})
}
