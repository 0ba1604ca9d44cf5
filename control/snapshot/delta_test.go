package snapshot

import (
	"net/netip"
	"slices"
	"strings"
	"testing"
)

func TestApplyDelta(t *testing.T) {
	base, err := Build(Config{
		Workloads: []*Workload{
			{UID: "w1", Name: "a", Namespace: "ns", Addresses: []netip.Addr{netip.MustParseAddr("10.0.0.1")}, Services: map[string]PortMap{"ns/svc.local": {80: 8080}}},
			{UID: "w2", Name: "b", Namespace: "ns", Addresses: []netip.Addr{netip.MustParseAddr("10.0.0.2")}},
		},
		Services: []*Service{{Name: "svc", Namespace: "ns", Hostname: "svc.local", VIPs: []NetworkAddress{{Addr: netip.MustParseAddr("10.96.0.1")}}}},
		Policies: []*Policy{{Name: "p", Namespace: "ns", Scope: ScopeNamespace}},
	})
	if err != nil {
		t.Fatal(err)
	}
	next, rerrs := base.Apply(Delta{
		Workloads: []*Workload{
			{UID: "w3", Name: "c", Namespace: "ns", Addresses: []netip.Addr{netip.MustParseAddr("10.0.0.3")}, Services: map[string]PortMap{"ns/svc.local": {80: 8080}}},
			{UID: "bad", Namespace: "ns", Addresses: []netip.Addr{netip.MustParseAddr("10.0.0.9")}}, // no name
		},
		RemovedWorkloads: []string{"w2"},
		RemovedPolicies:  []string{"ns/p"},
		Policies:         []*Policy{{Name: "q", Namespace: "ns", Scope: ScopeNamespace, Action: ActionDeny}},
	})
	if len(rerrs) != 1 || rerrs[0].Kind != "workload" {
		t.Fatalf("errors = %v, want one workload error", rerrs)
	}
	if next.WorkloadByUID("w2") != nil || next.WorkloadByUID("w3") == nil || next.WorkloadByUID("bad") != nil {
		t.Fatal("upsert/remove not applied")
	}
	if base.WorkloadByUID("w2") == nil || base.WorkloadByUID("w3") != nil {
		t.Fatal("Apply changed the base snapshot")
	}
	svc := next.ServiceByKey(NamespacedHostname{Namespace: "ns", Hostname: "svc.local"})
	if eps := next.Endpoints(svc); len(eps) != 2 || eps[0].Workload.UID != "w1" || eps[1].Workload.UID != "w3" {
		t.Fatalf("endpoints = %v", eps)
	}
	if next.PolicyByKey("ns/p") != nil || next.PolicyByKey("ns/q") == nil {
		t.Fatal("policy delta not applied")
	}
	// Removing the service stages its endpoints; adding it back links them again.
	gone, _ := next.Apply(Delta{RemovedServices: []NamespacedHostname{{Namespace: "ns", Hostname: "svc.local"}}})
	if len(gone.StagedServices()) != 1 {
		t.Fatalf("staged = %v", gone.StagedServices())
	}
	back, _ := gone.Apply(Delta{Services: []*Service{{Name: "svc", Namespace: "ns", Hostname: "svc.local"}}})
	if eps := back.Endpoints(back.ServiceByKey(NamespacedHostname{Namespace: "ns", Hostname: "svc.local"})); len(eps) != 2 {
		t.Fatalf("endpoints after re-add = %d", len(eps))
	}
}

// TestApplyAddressConflict: when the workload that won an address leaves (or changes address,
// or loses its preference), the best remaining claimant takes the address back, as Build would
// have chosen it.
func TestApplyAddressConflict(t *testing.T) {
	ip := netip.MustParseAddr("10.0.0.1")
	entry := &Workload{UID: "c/networking.istio.io/WorkloadEntry/ns/e", Name: "e", Namespace: "ns", Protocol: TunnelHBONE, Addresses: []netip.Addr{ip}}
	tcpPod := pod("ns", "b", "10.0.0.1")
	hbonePod := pod("ns", "c", "10.0.0.1")
	hbonePod.Protocol = TunnelHBONE
	s := mustBuild(t, Config{Workloads: []*Workload{entry}})
	steps := []struct {
		name string
		d    Delta
		want *Workload
	}{
		{"a pod beats the entry", Delta{Workloads: []*Workload{tcpPod}}, tcpPod},
		{"an HBONE pod beats a TCP pod", Delta{Workloads: []*Workload{hbonePod}}, hbonePod},
		{"winner leaves: the TCP pod takes the address back", Delta{RemovedWorkloads: []string{hbonePod.UID}}, tcpPod},
		{"winner moves away: the entry takes it back", Delta{Workloads: []*Workload{pod("ns", "b", "10.0.0.2")}}, entry},
		{"the winner comes back", Delta{Workloads: []*Workload{hbonePod}}, hbonePod},
		{"winner turns host-network", Delta{Workloads: []*Workload{func() *Workload {
			w := *hbonePod
			w.NetworkMode = NetworkHost
			return &w
		}()}}, entry},
		{"last claimant leaves", Delta{RemovedWorkloads: []string{entry.UID}}, nil},
	}
	for _, st := range steps {
		next, rerrs := s.Apply(st.d)
		if len(rerrs) > 0 {
			t.Fatalf("%s: %v", st.name, rerrs)
		}
		if got := next.WorkloadByAddr("", ip); got != st.want {
			t.Errorf("%s: WorkloadByAddr = %s, want %s", st.name, uidOf(got), uidOf(st.want))
		}
		cfg := Config{Workloads: next.Workloads()}
		if got := mustBuild(t, cfg).WorkloadByAddr("", ip); got != st.want {
			t.Errorf("%s: Build of the same workloads picks %s", st.name, uidOf(got))
		}
		s = next
	}
}

// TestApplyLargeDeltas applies a whole mesh as one delta, then removes and changes half of it in
// another: batched list changes give what Build gives.
func TestApplyLargeDeltas(t *testing.T) {
	cfg := meshConfig(3000, 300)
	empty := mustBuild(t, Config{})
	s, rerrs := empty.Apply(Delta{Workloads: cfg.Workloads, Services: cfg.Services, Policies: cfg.Policies})
	if len(rerrs) > 0 {
		t.Fatal(rerrs)
	}
	checkSameAsBuild(t, "whole mesh", s, cfg)

	var d Delta
	keep := Config{Policies: cfg.Policies}
	for i, w := range cfg.Workloads {
		switch i % 4 {
		case 0:
			d.RemovedWorkloads = append(d.RemovedWorkloads, w.UID)
		case 1:
			nw := *w
			nw.Node = "elsewhere"
			nw.Services = map[string]PortMap{cfg.Services[(i+1)%len(cfg.Services)].Key().String(): {80: 9090}}
			d.Workloads = append(d.Workloads, &nw)
			keep.Workloads = append(keep.Workloads, &nw)
		default:
			keep.Workloads = append(keep.Workloads, w)
		}
	}
	for i, svc := range cfg.Services {
		if i%3 == 0 {
			d.RemovedServices = append(d.RemovedServices, svc.Key())
		} else {
			keep.Services = append(keep.Services, svc)
		}
	}
	next, rerrs := s.Apply(d)
	if len(rerrs) > 0 {
		t.Fatal(rerrs)
	}
	checkSameAsBuild(t, "half changed", next, keep)
	checkSameAsBuild(t, "the snapshot before", s, cfg)
}

func checkSameAsBuild(t *testing.T, where string, got *Snapshot, cfg Config) {
	t.Helper()
	want := mustBuild(t, cfg)
	if g, w := tableSizes(got), tableSizes(want); !slices.Equal(g, w) {
		t.Errorf("%s: index sizes %v, want %v", where, g, w)
	}
	if !slices.Equal(got.Workloads(), want.Workloads()) || !slices.Equal(got.Services(), want.Services()) ||
		!slices.Equal(got.Policies(), want.Policies()) || !slices.Equal(got.StagedServices(), want.StagedServices()) {
		t.Errorf("%s: sorted lists differ", where)
	}
	for _, w := range want.Workloads() {
		for _, a := range w.Addresses {
			if got.WorkloadByAddr(w.Network, a) != want.WorkloadByAddr(w.Network, a) {
				t.Errorf("%s: WorkloadByAddr(%s) differs", where, a)
			}
		}
		if !slices.Equal(got.WorkloadsOnNode(w.Node), want.WorkloadsOnNode(w.Node)) {
			t.Errorf("%s: WorkloadsOnNode(%s) differs", where, w.Node)
		}
	}
	for _, svc := range want.Services() {
		if !sameEndpoints(got.Endpoints(svc), want.Endpoints(svc)) {
			t.Errorf("%s: Endpoints(%s) = %s, want %s", where, svc.Key(), endpointList(got.Endpoints(svc)), endpointList(want.Endpoints(svc)))
		}
		for _, v := range svc.VIPs {
			if got.ServiceByVIP(v.Network, v.Addr, "z") != want.ServiceByVIP(v.Network, v.Addr, "z") {
				t.Errorf("%s: ServiceByVIP(%s) differs", where, v.Addr)
			}
		}
	}
	for _, p := range want.Policies() {
		if !slices.Equal(got.NamespacePolicies(p.Namespace), want.NamespacePolicies(p.Namespace)) {
			t.Errorf("%s: NamespacePolicies(%s) differs", where, p.Namespace)
		}
	}
}

func TestWorkloadIndexes(t *testing.T) {
	vm1 := &Workload{UID: "c/x/WorkloadEntry/ns/vm1", Name: "vm1", Namespace: "ns", Hostname: "vm.example.com", Node: "n1"}
	vm2 := &Workload{UID: "c/x/WorkloadEntry/ns/vm0", Name: "vm0", Namespace: "ns", Hostname: "vm.example.com", Node: "n1"}
	other := &Workload{UID: "c/x/WorkloadEntry/other/vm", Name: "vm", Namespace: "other", Hostname: "vm.example.com"}
	s := mustBuild(t, Config{Workloads: []*Workload{vm1, vm2, other, pod("ns", "p", "10.0.0.1")}})
	nh := NamespacedHostname{Namespace: "ns", Hostname: "vm.example.com"}
	if got := s.WorkloadByHostname(nh); got != vm2 {
		t.Errorf("WorkloadByHostname(%s) = %s, want the lower uid %s", nh, uidOf(got), vm2.UID)
	}
	if got := s.WorkloadByHostname(NamespacedHostname{Namespace: "ns"}); got != nil {
		t.Errorf("WorkloadByHostname with an empty hostname = %s, want nil", uidOf(got))
	}
	next, _ := s.Apply(Delta{RemovedWorkloads: []string{vm2.UID}})
	if got := next.WorkloadByHostname(nh); got != vm1 {
		t.Errorf("after removing %s: WorkloadByHostname = %s, want %s", vm2.UID, uidOf(got), vm1.UID)
	}
	// WorkloadsOnNode hands out a copy: changing it changes nothing in the snapshot.
	l := s.WorkloadsOnNode("n1")
	if len(l) != 2 || l[0] != vm2 || l[1] != vm1 {
		t.Fatalf("WorkloadsOnNode(n1) = %s", workloadList(l))
	}
	l[0] = nil
	if s.WorkloadsOnNode("n1")[0] != vm2 {
		t.Error("writing into WorkloadsOnNode's result changed the snapshot")
	}
}

func TestEditList(t *testing.T) {
	id := func(s string) string { return s[:1] } // "b2" replaces "b1": same key "b"
	for _, tc := range []struct {
		base, adds, dels, want []string
	}{
		{nil, nil, nil, nil},
		{nil, []string{"c", "a", "b", "a"}, nil, []string{"a", "b", "c"}},
		{[]string{"a", "c", "e"}, []string{"b", "d", "f"}, []string{"c", "x"}, []string{"a", "b", "d", "e", "f"}},
		{[]string{"a1", "b1", "c1"}, []string{"b2"}, []string{"b"}, []string{"a1", "b2", "c1"}},
		{[]string{"a1", "b1", "c1"}, []string{"b2"}, nil, []string{"a1", "b2", "c1"}}, // an add replaces
		{[]string{"a", "b"}, nil, []string{"b", "a"}, nil},
	} {
		e := &listEdit[string, string]{adds: slices.Clone(tc.adds), dels: slices.Clone(tc.dels)}
		base := slices.Clone(tc.base)
		got := editList(base, e, id, strings.Compare)
		if !slices.Equal(got, tc.want) || (got == nil) != (tc.want == nil) {
			t.Errorf("editList(%q, +%q, -%q) = %q, want %q", tc.base, tc.adds, tc.dels, got, tc.want)
		}
		if len(got) != cap(got) {
			t.Errorf("editList result has spare capacity %d > %d", cap(got), len(got))
		}
		if !slices.Equal(base, tc.base) {
			t.Errorf("editList wrote into its base: %q", base)
		}
	}
}

func TestCounts(t *testing.T) {
	s, err := Build(Config{
		Workloads: []*Workload{{UID: "a", Name: "a", Namespace: "ns"}, {UID: "b", Name: "b", Namespace: "ns"}},
		Services:  []*Service{{Name: "s", Namespace: "ns", Hostname: "s.local"}},
	})
	if err != nil {
		t.Fatal(err)
	}
	if w, svc, p := s.Counts(); w != 2 || svc != 1 || p != 0 {
		t.Fatalf("Counts = %d %d %d", w, svc, p)
	}
	next, _ := s.Apply(Delta{RemovedWorkloads: []string{"a"}, Policies: []*Policy{{Name: "p", Namespace: "ns", Scope: ScopeNamespace}}})
	if w, svc, p := next.Counts(); w != 1 || svc != 1 || p != 1 {
		t.Fatalf("Counts after Apply = %d %d %d", w, svc, p)
	}
}

// TestApplyNil: a nil upsert is rejected as Build rejects it, and the rest of the delta applies.
func TestApplyNil(t *testing.T) {
	next, rerrs := mustBuild(t, Config{}).Apply(Delta{
		Workloads: []*Workload{nil, pod("ns", "a", "10.0.0.1")},
		Services:  []*Service{nil},
		Policies:  []*Policy{nil},
	})
	var got []string
	for _, re := range rerrs {
		got = append(got, re.Error())
	}
	want := []string{"workload nil: must not be nil", "service nil: must not be nil", "policy nil: must not be nil"}
	if !slices.Equal(got, want) {
		t.Fatalf("errors = %q, want %q", got, want)
	}
	if w, svc, p := next.Counts(); w != 1 || svc != 0 || p != 0 {
		t.Fatalf("Counts = %d %d %d, want the one valid workload", w, svc, p)
	}
}
