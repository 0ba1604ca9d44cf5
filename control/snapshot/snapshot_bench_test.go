package snapshot

import (
	"fmt"
	"net/netip"
	"runtime"
	"testing"
)

// Mesh size of the benchmarks: a large cluster as ztunnel's scale tests see it.
const (
	benchWorkloads = 100_000
	benchServices  = 10_000
)

func workloadAddr(i int) netip.Addr {
	return netip.AddrFrom4([4]byte{10, byte(1 + i>>16), byte(i >> 8), byte(i)})
}

func serviceVIP(i int) netip.Addr { return netip.AddrFrom4([4]byte{10, 96, byte(i >> 8), byte(i)}) }

// cidrVIPOf is the /24 that every hundredth service owns; every thousandth also owns a /16.
func cidrVIPOf(i int) netip.Prefix {
	return netip.PrefixFrom(netip.AddrFrom4([4]byte{172, 16, byte(i / 100), 0}), 24)
}

// meshConfig returns nw workloads in 100 namespaces, ten per service, on 1000 nodes; ns services
// with an IPv4 and an IPv6 VIP; and 1000 policies (10 global, 100 namespace, the rest
// selector).
func meshConfig(nw, ns int) Config {
	var cfg Config
	keys := make([]string, ns)
	for i := range ns {
		n := fmt.Sprintf("ns-%d", i%100)
		svc := &Service{
			Name: fmt.Sprintf("svc-%d", i), Namespace: n, Hostname: fmt.Sprintf("svc-%d.%s.svc.cluster.local", i, n),
			VIPs: []NetworkAddress{
				{Addr: serviceVIP(i)},
				{Addr: netip.AddrFrom16([16]byte{0: 0xfd, 2: 0x96, 14: byte(i >> 8), 15: byte(i)})},
			},
			Ports:           PortMap{80: 8080, 443: 8443},
			SubjectAltNames: []string{"spiffe://cluster.local/ns/" + n + "/sa/svc"},
		}
		if i%100 == 0 {
			svc.CIDRVIPs = append(svc.CIDRVIPs, NetworkPrefix{Prefix: cidrVIPOf(i)})
		}
		if i%1000 == 0 {
			svc.CIDRVIPs = append(svc.CIDRVIPs, NetworkPrefix{Prefix: netip.PrefixFrom(netip.AddrFrom4([4]byte{172, byte(32 + i/1000), 0, 0}), 16)})
		}
		keys[i] = svc.Key().String()
		cfg.Services = append(cfg.Services, svc)
	}
	for i := range nw {
		n := fmt.Sprintf("ns-%d", i%100)
		name := fmt.Sprintf("w-%d", i)
		cfg.Workloads = append(cfg.Workloads, &Workload{
			UID: "Kubernetes//Pod/" + n + "/" + name, Name: name, Namespace: n,
			Addresses:      []netip.Addr{workloadAddr(i)},
			Protocol:       TunnelHBONE,
			ServiceAccount: fmt.Sprintf("sa-%d", i%50),
			Node:           fmt.Sprintf("node-%d", i%1000),
			CanonicalName:  fmt.Sprintf("app-%d", i%ns), CanonicalRevision: "v1",
			WorkloadName: fmt.Sprintf("app-%d", i%ns),
			Services:     map[string]PortMap{keys[i%ns]: {80: 8080, 443: 8443}},
			Locality:     Locality{Region: "r1", Zone: fmt.Sprintf("z%d", i%3)},
		})
	}
	for i := range 1000 {
		p := &Policy{Name: fmt.Sprintf("p-%d", i), Namespace: fmt.Sprintf("ns-%d", i%100), Scope: ScopeWorkloadSelector,
			Rules: []Rule{{{{DestinationPorts: []uint16{80}}}}}}
		switch {
		case i < 10:
			p.Scope, p.Namespace = ScopeGlobal, "istio-system"
		case i < 110:
			p.Scope = ScopeNamespace
		}
		cfg.Policies = append(cfg.Policies, p)
	}
	return cfg
}

// heapInUse returns the live heap after a collection.
func heapInUse() uint64 {
	runtime.GC()
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	return m.HeapAlloc
}

// probes returns n workload indexes spread over the mesh, so successive lookups do not hit the
// same cache lines.
func probes(n, max int) []int {
	out := make([]int, n)
	x := uint32(2463534242)
	for i := range out {
		x ^= x << 13
		x ^= x >> 17
		x ^= x << 5
		out[i] = int(x % uint32(max))
	}
	return out
}

func BenchmarkBuild100k(b *testing.B) {
	before := heapInUse()
	cfg := meshConfig(benchWorkloads, benchServices)
	withConfig := heapInUse()
	s, err := Build(cfg)
	if err != nil {
		b.Fatal(err)
	}
	built := heapInUse()
	runtime.KeepAlive(s)
	s = nil

	b.ReportAllocs()
	for b.Loop() {
		// Build is idempotent on objects it has already defaulted, so cfg can be reused.
		if _, err := Build(cfg); err != nil {
			b.Fatal(err)
		}
	}
	// B/workload is what a snapshot adds on top of its objects (indexes, endpoint lists);
	// cfgB/workload is the objects themselves as this mesh shapes them (one address, one
	// service, short names), services and policies included.
	b.ReportMetric(float64(built-withConfig)/benchWorkloads, "B/workload")
	b.ReportMetric(float64(withConfig-before)/benchWorkloads, "cfgB/workload")
	runtime.KeepAlive(cfg)
}

func BenchmarkWorkloadByAddr(b *testing.B) {
	s := benchBase()
	ips := make([]netip.Addr, 4096)
	for i, p := range probes(len(ips), benchWorkloads) {
		ips[i] = workloadAddr(p)
	}
	b.Run("hit", func(b *testing.B) {
		b.ReportAllocs()
		i := 0
		for b.Loop() {
			if s.WorkloadByAddr("", ips[i&4095]) == nil {
				b.Fatal("miss")
			}
			i++
		}
	})
	b.Run("mapped", func(b *testing.B) {
		mapped := make([]netip.Addr, len(ips))
		for i, ip := range ips {
			mapped[i] = netip.AddrFrom16(ip.As16())
		}
		b.ReportAllocs()
		i := 0
		for b.Loop() {
			if s.WorkloadByAddr("", mapped[i&4095]) == nil {
				b.Fatal("miss")
			}
			i++
		}
	})
	b.Run("miss", func(b *testing.B) {
		ip := netip.MustParseAddr("192.0.2.1")
		b.ReportAllocs()
		for b.Loop() {
			if s.WorkloadByAddr("", ip) != nil {
				b.Fatal("hit")
			}
		}
	})
}

func BenchmarkServiceByVIP(b *testing.B) {
	s := benchBase()
	vips := make([]netip.Addr, 4096)
	cidrs := make([]netip.Addr, 4096)
	for i, p := range probes(len(vips), benchServices) {
		vips[i] = serviceVIP(p)
		cidrs[i] = cidrVIPOf(p / 100 * 100).Addr().Next()
	}
	for _, bc := range []struct {
		name string
		ips  []netip.Addr
		want bool
	}{
		{"exact", vips, true},
		{"cidr", cidrs, true},
		{"miss", []netip.Addr{netip.MustParseAddr("192.0.2.1")}, false},
	} {
		b.Run(bc.name, func(b *testing.B) {
			b.ReportAllocs()
			i := 0
			for b.Loop() {
				if got := s.ServiceByVIP("", bc.ips[i%len(bc.ips)], "ns-1"); (got != nil) != bc.want {
					b.Fatalf("ServiceByVIP(%s) = %v", bc.ips[i%len(bc.ips)], got)
				}
				i++
			}
		})
	}
}

// BenchmarkFingerprint100k is the cost VerifyImmutable adds to each Publish (twice: the old
// snapshot is checked, the new one recorded).
func BenchmarkFingerprint100k(b *testing.B) {
	s := benchBase()
	fp := takeFingerprint(s)
	b.ReportAllocs()
	for b.Loop() {
		if err := fp.verify(); err != nil {
			b.Fatal(err)
		}
	}
}

// TestLookupsDoNotAllocate guards the promise in Snapshot's doc: the lookups a flow makes cost
// no allocation.
func TestLookupsDoNotAllocate(t *testing.T) {
	built := mustBuild(t, meshConfig(2000, 200))
	// The same lookups on a snapshot Apply made, whose tables are part shared, part its own.
	w := *built.WorkloadByUID("Kubernetes//Pod/ns-7/w-7")
	w.Hostname = "vm.example.com"
	applied, rerrs := built.Apply(Delta{Workloads: []*Workload{&w}})
	if len(rerrs) > 0 {
		t.Fatal(rerrs)
	}
	for _, s := range []*Snapshot{built, applied} {
		lookupsDoNotAllocate(t, s)
	}
}

func lookupsDoNotAllocate(t *testing.T, s *Snapshot) {
	svc := s.ServiceByKey(NamespacedHostname{Namespace: "ns-1", Hostname: "svc-1.ns-1.svc.cluster.local"})
	if svc == nil || len(s.Endpoints(svc)) == 0 {
		t.Fatal("fixture lacks svc-1 with endpoints")
	}
	w0 := s.Workloads()[0]
	cidrIP := cidrVIPOf(100).Addr().Next()
	mapped := netip.AddrFrom16(workloadAddr(7).As16())
	gw := &GatewayAddress{Hostname: &NamespacedHostname{Namespace: "ns-1", Hostname: svc.Hostname}}
	vm := NamespacedHostname{Namespace: "ns-7", Hostname: "vm.example.com"}
	for _, tc := range []struct {
		name string
		f    func() bool
	}{
		{"WorkloadByAddr", func() bool { return s.WorkloadByAddr("", workloadAddr(7)) != nil }},
		{"WorkloadByAddr mapped", func() bool { return s.WorkloadByAddr("", mapped) != nil }},
		{"WorkloadByAddr miss", func() bool { return s.WorkloadByAddr("net2", workloadAddr(7)) == nil }},
		{"WorkloadByUID", func() bool { return s.WorkloadByUID(w0.UID) == w0 }},
		{"ServiceByVIP exact", func() bool { return s.ServiceByVIP("", serviceVIP(1), "ns-2") == svc }},
		{"ServiceByVIP CIDR", func() bool { return s.ServiceByVIP("", cidrIP, "ns-2") != nil }},
		{"ServiceByVIP miss", func() bool { return s.ServiceByVIP("", netip.MustParseAddr("fd00::1"), "ns-2") == nil }},
		{"ServiceByHostname", func() bool { return s.ServiceByHostname(svc.Hostname, "ns-2") == svc }},
		{"ServiceByKey", func() bool { return s.ServiceByKey(svc.Key()) == svc }},
		{"Endpoints", func() bool { return len(s.Endpoints(svc)) == 10 }},
		{"PolicyByKey", func() bool { return s.PolicyByKey("ns-50/p-150") != nil }},
		{"NamespacePolicies", func() bool { return len(s.NamespacePolicies("ns-50")) == 1 }},
		{"ResolveGateway", func() bool {
			_, _, ok := s.ResolveGateway(gw)
			return ok
		}},
		{"WorkloadByHostname", func() bool {
			// Only the applied snapshot has a workload with this hostname.
			if w := s.WorkloadByUID("Kubernetes//Pod/ns-7/w-7"); w.Hostname != "" {
				return s.WorkloadByHostname(vm) == w
			}
			return s.WorkloadByHostname(vm) == nil
		}},
	} {
		if !tc.f() {
			t.Errorf("%s: wrong result", tc.name)
			continue
		}
		if n := testing.AllocsPerRun(200, func() { tc.f() }); n != 0 {
			t.Errorf("%s allocates %.1f times per call, want 0", tc.name, n)
		}
	}
}
