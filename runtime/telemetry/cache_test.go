package telemetry

import (
	"fmt"
	"sync"
	"testing"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/ztgo/ztgo/control/snapshot"
	"github.com/ztgo/ztgo/stages"
	"github.com/ztgo/ztgo/stages/identity"
	"github.com/ztgo/ztgo/tls/spiffe"
)

func newTelemetry(t testing.TB) (*Telemetry, *prometheus.Registry) {
	t.Helper()
	reg := prometheus.NewRegistry()
	m, err := NewMetrics(reg)
	if err != nil {
		t.Fatal(err)
	}
	return New(m, nil), reg
}

// published returns n snapshots published in order (versions 1..n).
func published(t testing.TB, n int) []*snapshot.Snapshot {
	t.Helper()
	st := snapshot.NewStore()
	var out []*snapshot.Snapshot
	for range n {
		s, err := snapshot.Build(snapshot.Config{})
		if err != nil {
			t.Fatal(err)
		}
		st.Publish(s)
		out = append(out, s)
	}
	return out
}

// Every kind of flow lands on the series its Labels name, through the cache.
func TestCachedSeriesMatchLabels(t *testing.T) {
	tel, reg := newTelemetry(t)
	inbound := flow()
	inbound.Dir, inbound.SrcWorkload = stages.Inbound, nil
	passthrough := flow()
	passthrough.Route.Kind, passthrough.DstWorkload, passthrough.DstService = identity.Passthrough, nil, nil
	passthrough.DstIdentity = spiffe.ID{}
	denied := flow()
	denied.Failure = stages.FailDeny
	for i, f := range []*stages.Flow{flow(), inbound, passthrough} {
		f.BytesSent.Store(int64(10 * (i + 1)))
		for range 2 {
			tel.Opened(f)
			tel.Closed(f, nil)
		}
		l := Labels(f)
		if got := value(t, reg, "opened", l); got != 2 {
			t.Errorf("flow %d: opened = %v, want 2 (labels %v)", i, got, l)
		}
		if got := value(t, reg, "received", l); got != float64(20*(i+1)) {
			t.Errorf("flow %d: received bytes = %v, want %d", i, got, 20*(i+1))
		}
	}
	tel.Failed(denied)
	if got := value(t, reg, "failed", Labels(denied)); got != 1 {
		t.Errorf("failed = %v, want 1", got)
	}
	// A label set that only failed exports no opened series, and the reverse.
	if n := count(t, reg, "opened"); n != 3 {
		t.Errorf("opened has %d series, want 3", n)
	}
	if n := count(t, reg, "failed"); n != 1 {
		t.Errorf("failed has %d series, want 1", n)
	}
	if value(t, reg, "open", prometheus.Labels{"reporter": "source"}) != 0 || value(t, reg, "open", prometheus.Labels{"reporter": "destination"}) != 0 {
		t.Error("sockets open not back to 0")
	}
}

// Equal workloads behind different pointers are different keys with the same labels: they
// share one series.
func TestCacheKeyedByPointerSharesSeries(t *testing.T) {
	tel, reg := newTelemetry(t)
	a, b := flow(), flow()
	if a.SrcWorkload == b.SrcWorkload {
		t.Fatal("want distinct pointers")
	}
	tel.Opened(a)
	tel.Opened(b)
	if got := value(t, reg, "opened", Labels(a)); got != 2 {
		t.Fatalf("opened = %v, want 2", got)
	}
	if n := tel.cache.len(); n != 2 {
		t.Fatalf("cache holds %d entries, want 2", n)
	}
}

// A newer snapshot starts a new generation; an older one does not go back.
func TestCacheGenerationFollowsSnapshot(t *testing.T) {
	tel, _ := newTelemetry(t)
	snaps := published(t, 2)
	old, cur := flow(), flow()
	old.Snap, cur.Snap = snaps[0], snaps[1]
	tel.Opened(old)
	tel.Opened(flow()) // no snapshot: version 0, same generation
	if g := tel.cache.gen.Load(); g.version != snaps[0].Version() || tel.cache.len() != 2 {
		t.Fatalf("generation %d with %d entries, want %d with 2", g.version, tel.cache.len(), snaps[0].Version())
	}
	tel.Opened(cur)
	if g := tel.cache.gen.Load(); g.version != snaps[1].Version() || tel.cache.len() != 1 {
		t.Fatalf("generation %d with %d entries, want %d with 1", g.version, tel.cache.len(), snaps[1].Version())
	}
	tel.Closed(old, nil)
	if g := tel.cache.gen.Load(); g.version != snaps[1].Version() || tel.cache.len() != 2 {
		t.Fatalf("an older flow changed the generation to %d (%d entries)", g.version, tel.cache.len())
	}
}

// The cache never holds more than maxSeries entries, whatever the flows.
func TestCacheBounded(t *testing.T) {
	tel, reg := newTelemetry(t)
	for i := range maxSeries + 100 {
		f := flow()
		f.Dir, f.SrcWorkload = stages.Inbound, nil
		f.SrcIdentity = spiffe.ID{TrustDomain: "cluster.local", Namespace: "ns", ServiceAccount: fmt.Sprintf("sa-%d", i)}
		tel.Failed(f)
		if n := tel.cache.len(); n > maxSeries {
			t.Fatalf("cache holds %d entries, more than %d", n, maxSeries)
		}
	}
	if n := count(t, reg, "failed"); n != maxSeries+100 {
		t.Fatalf("failed has %d series, want every label set (%d) still exported", n, maxSeries+100)
	}
}

// Concurrent flows over a few label sets and changing snapshots count exactly (run with -race).
func TestCacheConcurrent(t *testing.T) {
	tel, reg := newTelemetry(t)
	snaps := published(t, 4)
	const goroutines, each = 8, 500
	var wg sync.WaitGroup
	for g := range goroutines {
		wg.Go(func() {
			for i := range each {
				f := flow()
				f.Snap = snaps[(g+i)%len(snaps)]
				if i%2 == 1 {
					f.Dir = stages.Inbound
				}
				f.BytesSent.Store(1)
				tel.Opened(f)
				tel.Closed(f, nil)
			}
		})
	}
	wg.Wait()
	out, in := flow(), flow()
	in.Dir = stages.Inbound
	total := value(t, reg, "closed", Labels(out)) + value(t, reg, "closed", Labels(in))
	if total != goroutines*each {
		t.Fatalf("closed = %v, want %d", total, goroutines*each)
	}
	if got := value(t, reg, "received", Labels(in)); got != goroutines*each/2 {
		t.Fatalf("inbound received bytes = %v, want %d", got, goroutines*each/2)
	}
}

// The label indexes used by labelValues name the labels labelNames lists.
func TestLabelIndexes(t *testing.T) {
	if len(labelNames) != numLabels {
		t.Fatalf("%d label names, %d indexes", len(labelNames), numLabels)
	}
	for i, want := range map[int]string{
		lReporter: "reporter", lSrcWorkload: "source_workload", lSrcCanonicalService: "source_canonical_service",
		lSrcCanonicalRevision: "source_canonical_revision", lSrcNamespace: "source_workload_namespace",
		lSrcPrincipal: "source_principal", lSrcApp: "source_app", lSrcVersion: "source_version", lSrcCluster: "source_cluster",
		lDstService: "destination_service", lDstServiceNamespace: "destination_service_namespace",
		lDstServiceName: "destination_service_name", lDstWorkload: "destination_workload",
		lDstCanonicalService: "destination_canonical_service", lDstCanonicalRevision: "destination_canonical_revision",
		lDstNamespace: "destination_workload_namespace", lDstPrincipal: "destination_principal", lDstApp: "destination_app",
		lDstVersion: "destination_version", lDstCluster: "destination_cluster",
		lRequestProtocol: "request_protocol", lResponseFlags: "response_flags", lSecurityPolicy: "connection_security_policy",
	} {
		if labelNames[i] != want {
			t.Errorf("index %d is %s, want %s", i, labelNames[i], want)
		}
	}
	for side, base := range map[string]int{"source": lSrcWorkload, "destination": lDstWorkload} {
		for off, suffix := range map[int]string{
			offWorkload: "_workload", offCanonicalService: "_canonical_service", offCanonicalRevision: "_canonical_revision",
			offNamespace: "_workload_namespace", offPrincipal: "_principal", offApp: "_app", offVersion: "_version", offCluster: "_cluster",
		} {
			if got := labelNames[base+off]; got != side+suffix {
				t.Errorf("%s offset %d is %s, want %s%s", side, off, got, side, suffix)
			}
		}
	}
}
