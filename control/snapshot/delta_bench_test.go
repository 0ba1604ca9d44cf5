package snapshot

import (
	"fmt"
	"net/netip"
	"runtime"
	"slices"
	"sync"
	"testing"
	"time"
)

// benchSnapshot is the 100k-workload, 10k-service snapshot the benchmarks look up in and apply to,
// built once per test binary: snapshots are immutable, so every benchmark may share it.
var benchSnapshot = sync.OnceValue(func() *Snapshot {
	s, err := Build(meshConfig(benchWorkloads, benchServices))
	if err != nil {
		panic(err)
	}
	return s
})

// benchBase returns benchSnapshot after a collection, so that the garbage of building it (or
// of the benchmark before) is not collected during the timed loop.
func benchBase() *Snapshot {
	s := benchSnapshot()
	runtime.GC()
	return s
}

// opTimer collects per-operation durations so a benchmark can report percentiles: the target is
// a p99, which ns/op (a mean) does not show.
type opTimer struct{ d []time.Duration }

func (t *opTimer) time(f func()) {
	start := time.Now()
	f()
	t.d = append(t.d, time.Since(start))
}

func (t *opTimer) report(b *testing.B) {
	if len(t.d) == 0 {
		return
	}
	slices.Sort(t.d)
	at := func(q float64) float64 { return float64(t.d[min(len(t.d)-1, int(q*float64(len(t.d))))].Nanoseconds()) }
	b.ReportMetric(at(0.50), "p50-ns")
	b.ReportMetric(at(0.99), "p99-ns")
	b.ReportMetric(float64(t.d[len(t.d)-1].Nanoseconds()), "max-ns")
}

// BenchmarkApplyOneWorkload100k upserts one workload (a new version of an existing pod with a
// new address, serving one service) into the 100k/10k snapshot, chaining: each op applies to
// the previous op's result, as a source does.
func BenchmarkApplyOneWorkload100k(b *testing.B) {
	s := benchBase()
	picks := probes(4096, benchWorkloads)
	var t opTimer
	b.ReportAllocs()
	i := 0
	for b.Loop() {
		old := s.WorkloadByUID(fmt.Sprintf("Kubernetes//Pod/ns-%d/w-%d", picks[i%len(picks)]%100, picks[i%len(picks)]))
		w := *old
		w.Addresses = []netip.Addr{netip.AddrFrom4([4]byte{10, 200 + byte(i>>16), byte(i >> 8), byte(i)})}
		w.Status = HealthStatus(i & 1)
		var rerrs []ResourceError
		t.time(func() { s, rerrs = s.Apply(Delta{Workloads: []*Workload{&w}}) })
		if len(rerrs) > 0 {
			b.Fatal(rerrs)
		}
		i++
	}
	t.report(b)
	if w := s.WorkloadByAddr("", netip.AddrFrom4([4]byte{10, 200 + byte((i-1)>>16), byte((i - 1) >> 8), byte(i - 1)})); w == nil {
		b.Fatal("last upsert not applied")
	}
}

// BenchmarkApplyRemoveWorkload100k removes one workload (an endpoint of one service) per op.
func BenchmarkApplyRemoveWorkload100k(b *testing.B) {
	s := benchBase()
	var t opTimer
	b.ReportAllocs()
	i := 0
	for b.Loop() {
		n := (i * 7919) % benchWorkloads
		uid := fmt.Sprintf("Kubernetes//Pod/ns-%d/w-%d", n%100, n)
		var rerrs []ResourceError
		t.time(func() { s, rerrs = s.Apply(Delta{RemovedWorkloads: []string{uid}}) })
		if len(rerrs) > 0 {
			b.Fatal(rerrs)
		}
		i++
	}
	t.report(b)
}

// BenchmarkApplyOneService100k upserts one service (a new version with another port and a new
// VIP): its ten endpoints move to the new object.
func BenchmarkApplyOneService100k(b *testing.B) {
	s := benchBase()
	picks := probes(4096, benchServices)
	var t opTimer
	b.ReportAllocs()
	i := 0
	for b.Loop() {
		n := picks[i%len(picks)]
		ns := fmt.Sprintf("ns-%d", n%100)
		old := s.ServiceByKey(NamespacedHostname{Namespace: ns, Hostname: fmt.Sprintf("svc-%d.%s.svc.cluster.local", n, ns)})
		svc := *old
		svc.Ports = PortMap{80: 8080, 443: 8443, uint16(1000 + i%1000): 9000}
		svc.VIPs = append(slices.Clip(old.VIPs[:2]), NetworkAddress{Addr: netip.AddrFrom4([4]byte{10, 97, byte(i >> 8), byte(i)})})
		var rerrs []ResourceError
		t.time(func() { s, rerrs = s.Apply(Delta{Services: []*Service{&svc}}) })
		if len(rerrs) > 0 {
			b.Fatal(rerrs)
		}
		if len(s.Endpoints(&svc)) != 10 {
			b.Fatalf("service %s has %d endpoints after upsert, want 10", svc.Key(), len(s.Endpoints(&svc)))
		}
		i++
	}
	t.report(b)
}

// BenchmarkSnapshotMemory100k reports what a built 100k/10k snapshot costs per workload,
// objects (workloads, services, policies) and indexes together: the spec's budget is 2 KB. It
// builds once, however many iterations it is asked for (ns/op is not its point).
func BenchmarkSnapshotMemory100k(b *testing.B) {
	var perWorkload float64
	for b.Loop() {
		if perWorkload != 0 {
			continue
		}
		before := heapInUse()
		s, err := Build(meshConfig(benchWorkloads, benchServices))
		if err != nil {
			b.Fatal(err)
		}
		after := heapInUse()
		runtime.KeepAlive(s)
		perWorkload = float64(after-before) / benchWorkloads
	}
	b.ReportMetric(perWorkload, "B/workload")
}
