package snapshot

import (
	"net/netip"
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
