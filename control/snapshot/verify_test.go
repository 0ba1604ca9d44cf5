package snapshot

import (
	"bytes"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"reflect"
	"regexp"
	"strings"
	"testing"
)

// fullWorkload, fullService and fullPolicy set every field, every pointer and one element of
// every list and map, so that walking them by reflection reaches every leaf the fingerprint
// must cover.
func fullWorkload() *Workload {
	gw := func(ip string) *GatewayAddress {
		return &GatewayAddress{
			Address:   &NetworkAddress{Network: "gw-net", Addr: addr(ip)},
			Hostname:  &NamespacedHostname{Namespace: "gw-ns", Hostname: "gw.example.com"},
			HBONEPort: 15008,
		}
	}
	return &Workload{
		UID: "Kubernetes//Pod/ns/full", Name: "full", Namespace: "ns", Addresses: addrs("10.0.0.1"),
		Hostname: "full.example.com", Network: "net1", Protocol: TunnelHBONE, TrustDomain: "td",
		ServiceAccount: "sa", Waypoint: gw("10.0.0.10"), NetworkGateway: gw("10.0.0.11"), Node: "node",
		CanonicalName: "cn", CanonicalRevision: "v1", WorkloadType: WorkloadJob, WorkloadName: "wn",
		NativeTunnel: true, ApplicationTunnel: &ApplicationTunnel{Protocol: AppTunnelProxy, Port: 15088},
		Services:              map[string]PortMap{"ns/full-svc.example.com": {80: 8080}},
		AuthorizationPolicies: []string{"ns/sel"}, Status: Unhealthy, ClusterID: "c1",
		Locality: Locality{Region: "r", Zone: "z", Subzone: "s"}, NetworkMode: NetworkStandard, Capacity: 2,
	}
}

func fullService() *Service {
	return &Service{
		Name: "full-svc", Namespace: "ns", Hostname: "full-svc.example.com",
		VIPs:            []NetworkAddress{{Network: "net1", Addr: addr("10.96.0.1")}},
		CIDRVIPs:        []NetworkPrefix{{Network: "net1", Prefix: netip.MustParsePrefix("10.97.0.0/24")}},
		Ports:           PortMap{80: 8080},
		SubjectAltNames: []string{"spiffe://td/ns/ns/sa/sa"},
		Waypoint: &GatewayAddress{
			Address:  &NetworkAddress{Network: "gw-net", Addr: addr("10.0.0.10")},
			Hostname: &NamespacedHostname{Namespace: "gw-ns", Hostname: "gw.example.com"}, HBONEPort: 15008,
		},
		WeightedWaypoints: []WeightedWaypoint{{
			Destination: GatewayAddress{
				Address:  &NetworkAddress{Network: "gw-net", Addr: addr("10.0.0.12")},
				Hostname: &NamespacedHostname{Namespace: "gw-ns", Hostname: "gw2.example.com"}, HBONEPort: 15009,
			},
			Weight: 5,
		}},
		LoadBalancing: &LoadBalancing{RoutingPreference: []LBScope{ScopeZone}, Mode: LBModeFailover, HealthPolicy: AllowAll},
		IPFamilies:    IPv4Only, Canonical: true, Visibility: VisibilityNamespace,
	}
}

func fullPolicy() *Policy {
	sm := func(v string) []StringMatch { return []StringMatch{{Kind: MatchPrefix, Value: v}} }
	sa := func(v string) []ServiceAccountMatch {
		return []ServiceAccountMatch{{Namespace: "ns", ServiceAccount: v}}
	}
	px := func(v string) []netip.Prefix { return []netip.Prefix{netip.MustParsePrefix(v)} }
	return &Policy{
		Name: "full-pol", Namespace: "ns", Scope: ScopeNamespace, Action: ActionDeny, DryRun: true,
		Rules: []Rule{{{{
			Namespaces: sm("a"), NotNamespaces: sm("b"), ServiceAccounts: sa("c"), NotServiceAccounts: sa("d"),
			Principals: sm("e"), NotPrincipals: sm("f"), SourceIPs: px("10.1.0.0/16"), NotSourceIPs: px("10.2.0.0/16"),
			DestinationIPs: px("10.3.0.0/16"), NotDestinationIPs: px("10.4.0.0/16"),
			DestinationPorts: []uint16{80}, NotDestinationPorts: []uint16{81},
		}}}},
	}
}

// leafWalker visits every leaf reachable from a value, depth first in a fixed order, and
// mutates the target-th one. A leaf is a scalar, an address or prefix, and also each pointer
// (mutated to nil), slice (grown by one) and map (given one more entry) on the way down.
type leafWalker struct {
	target, seen int
	path         string
}

func (lw *leafWalker) leaf(path string, mutate func()) bool {
	lw.seen++
	if lw.seen-1 != lw.target {
		return false
	}
	mutate()
	lw.path = path
	return true
}

func (lw *leafWalker) visit(v reflect.Value, path string) bool {
	switch v.Kind() {
	case reflect.String:
		return lw.leaf(path, func() { v.SetString(v.String() + "~") })
	case reflect.Bool:
		return lw.leaf(path, func() { v.SetBool(!v.Bool()) })
	case reflect.Uint8, reflect.Uint16, reflect.Uint32, reflect.Uint64:
		return lw.leaf(path, func() { v.SetUint(v.Uint() + 1) })
	case reflect.Struct:
		switch v.Type() {
		case reflect.TypeFor[netip.Addr]():
			return lw.leaf(path, func() { v.Set(reflect.ValueOf(v.Interface().(netip.Addr).Next())) })
		case reflect.TypeFor[netip.Prefix]():
			return lw.leaf(path, func() {
				p := v.Interface().(netip.Prefix)
				v.Set(reflect.ValueOf(netip.PrefixFrom(p.Addr(), p.Bits()-1)))
			})
		}
		for i := range v.NumField() {
			if f := v.Type().Field(i); f.IsExported() && lw.visit(v.Field(i), path+"."+f.Name) {
				return true
			}
		}
		return false
	case reflect.Pointer:
		if lw.leaf(path, func() { v.SetZero() }) {
			return true
		}
		return lw.visit(v.Elem(), path)
	case reflect.Slice:
		if lw.leaf(path, func() { v.Set(reflect.Append(v, reflect.Zero(v.Type().Elem()))) }) {
			return true
		}
		for i := range v.Len() {
			if lw.visit(v.Index(i), fmt.Sprintf("%s[%d]", path, i)) {
				return true
			}
		}
		return false
	case reflect.Map:
		if lw.leaf(path, func() { v.SetMapIndex(reflect.Zero(v.Type().Key()), reflect.Zero(v.Type().Elem())) }) {
			return true
		}
		for _, k := range v.MapKeys() { // the samples' maps have one key: the order is fixed
			c := reflect.New(v.Type().Elem()).Elem()
			c.Set(v.MapIndex(k))
			if lw.visit(c, fmt.Sprintf("%s[%v]", path, k)) {
				v.SetMapIndex(k, c)
				return true
			}
		}
		return false
	default:
		panic(fmt.Sprintf("leafWalker: %s has kind %s; teach the walker and the fingerprint about it", path, v.Kind()))
	}
}

// TestFingerprintCoversEveryField mutates, one at a time, every leaf of a fully populated
// workload, service and policy in a built snapshot, and checks that the fingerprint sees the
// change and names the top-level field. A field added to these types without being added to
// the fingerprint fails here.
func TestFingerprintCoversEveryField(t *testing.T) {
	for _, kind := range []string{"workload", "service", "policy"} {
		t.Run(kind, func(t *testing.T) {
			for i := 0; ; i++ {
				w, svc, pol := fullWorkload(), fullService(), fullPolicy()
				s := mustBuild(t, Config{Workloads: []*Workload{w}, Services: []*Service{svc}, Policies: []*Policy{pol}})
				fp := takeFingerprint(s)
				root := map[string]any{"workload": w, "service": svc, "policy": pol}[kind]
				lw := &leafWalker{target: i}
				if !lw.visit(reflect.ValueOf(root).Elem(), "") {
					if i < 10 {
						t.Fatalf("only %d leaves found", i)
					}
					t.Logf("%d leaves checked", i)
					return
				}
				err := fp.verify()
				if err == nil {
					t.Errorf("mutating %s%s went unnoticed", kind, lw.path)
					continue
				}
				if !errors.Is(err, ErrMutated) {
					t.Errorf("mutating %s%s: error %q does not wrap ErrMutated", kind, lw.path, err)
				}
				field := strings.SplitN(strings.TrimPrefix(lw.path, "."), ".", 2)[0]
				field = strings.SplitN(field, "[", 2)[0]
				if !regexp.MustCompile(`[:,] ` + field + `(,| changed)`).MatchString(err.Error()) {
					t.Errorf("mutating %s%s: error %q does not name %s", kind, lw.path, err, field)
				}
			}
		})
	}
}

func TestFingerprintSizes(t *testing.T) {
	s := mustBuild(t, Config{Workloads: []*Workload{fullWorkload()}, Services: []*Service{fullService()}, Policies: []*Policy{fullPolicy()}})
	fp := takeFingerprint(s)
	if len(fp.fields) != cap(fp.fields) || len(fp.sums) != cap(fp.sums) {
		t.Errorf("fingerprint uses %d/%d field digests and %d/%d sums: the per-kind field counts are stale",
			len(fp.fields), cap(fp.fields), len(fp.sums), cap(fp.sums))
	}
	if err := fp.verify(); err != nil {
		t.Errorf("untouched snapshot: %v", err)
	}
}

// published returns a verifying store that has published a snapshot of the full samples, plus
// a workload a that serves the service, and a second global policy.
func published(t *testing.T) (*Store, *Snapshot, *bytes.Buffer) {
	t.Helper()
	var logs bytes.Buffer
	st := NewStore()
	st.VerifyImmutable = true
	st.Logger = slog.New(slog.NewTextHandler(&logs, nil))
	svc := fullService()
	a := serving(pod("ns", "a", "10.0.0.2"), svc, PortMap{80: 9090})
	a.Services["ns/staged.example.com"] = nil
	s := mustBuild(t, Config{
		Workloads: []*Workload{fullWorkload(), a},
		Services:  []*Service{svc},
		Policies:  []*Policy{fullPolicy(), {Name: "g1"}, {Name: "g2"}},
	})
	st.Publish(s)
	return st, s, &logs
}

func TestVerifyUntouched(t *testing.T) {
	st, s, logs := published(t)
	if err := st.Verify(); err != nil {
		t.Fatalf("Verify of an untouched snapshot: %v", err)
	}
	// Lookups and accessors do not count as changes.
	_ = s.Endpoints(s.Services()[0])
	_ = s.WorkloadsOnNode("node")
	_, _, _ = s.ResolveGateway(s.Workloads()[0].Waypoint)
	// A new snapshot built from the same objects (as a source that keeps unchanged objects
	// does) writes nothing into them, so the old one still verifies at the next Publish.
	st.Publish(mustBuild(t, Config{Workloads: s.Workloads(), Services: s.Services(), Policies: s.Policies()}))
	if err := st.Verify(); err != nil {
		t.Errorf("Verify after republishing the same objects: %v", err)
	}
	if logs.Len() != 0 {
		t.Errorf("logged %q for untouched snapshots", logs.String())
	}
}

func TestVerifyDetectsMutation(t *testing.T) {
	for _, tc := range []struct {
		name   string
		mutate func(s *Snapshot)
		want   []string
	}{
		{
			name:   "workload field",
			mutate: func(s *Snapshot) { s.WorkloadByUID("Kubernetes//Pod/ns/a").Status = Unhealthy },
			want:   []string{"workloads[0] workload Kubernetes//Pod/ns/a: Status changed"},
		},
		{
			name:   "workload address in place",
			mutate: func(s *Snapshot) { s.WorkloadByUID("Kubernetes//Pod/ns/a").Addresses[0] = addr("10.9.9.9") },
			want:   []string{"workloads[0] workload Kubernetes//Pod/ns/a: Addresses changed"},
		},
		{
			name: "two fields of one workload",
			mutate: func(s *Snapshot) {
				w := s.WorkloadByUID("Kubernetes//Pod/ns/full")
				w.Node, w.Locality.Zone = "other", "other"
			},
			want: []string{"workloads[1] workload Kubernetes//Pod/ns/full: Node, Locality changed"},
		},
		{
			name:   "waypoint behind a pointer",
			mutate: func(s *Snapshot) { s.WorkloadByUID("Kubernetes//Pod/ns/full").Waypoint.HBONEPort = 1 },
			want:   []string{"Waypoint changed"},
		},
		{
			name: "endpoint port map, shared with the workload",
			mutate: func(s *Snapshot) {
				s.Endpoints(s.Services()[0])[0].Ports[80] = 1
			},
			want: []string{"workload Kubernetes//Pod/ns/a: Services changed", "endpoints[0] service ns/full-svc.example.com: Ports changed"},
		},
		{
			name:   "endpoint list entry replaced",
			mutate: func(s *Snapshot) { s.Endpoints(s.Services()[0])[0].Workload = s.Workloads()[1] },
			want:   []string{"endpoints[0] service ns/full-svc.example.com: Workload changed"},
		},
		{
			name:   "workload list entry replaced",
			mutate: func(s *Snapshot) { s.Workloads()[0] = s.Workloads()[1] },
			want:   []string{"workloads[0] workload Kubernetes//Pod/ns/full:"},
		},
		{
			name:   "service VIP",
			mutate: func(s *Snapshot) { s.Services()[0].VIPs[0].Network = "elsewhere" },
			want:   []string{"services[0] service ns/full-svc.example.com: VIPs changed"},
		},
		{
			name:   "service load balancing",
			mutate: func(s *Snapshot) { s.Services()[0].LoadBalancing.RoutingPreference[0] = ScopeNode },
			want:   []string{"LoadBalancing changed"},
		},
		{
			name:   "policy rule deep inside",
			mutate: func(s *Snapshot) { s.PolicyByKey("ns/full-pol").Rules[0][0][0].NotDestinationPorts[0] = 9 },
			want:   []string{"policy ns/full-pol: Rules changed"},
		},
		{
			name:   "namespace policy list",
			mutate: func(s *Snapshot) { s.NamespacePolicies("")[0] = s.NamespacePolicies("")[1] },
			want:   []string{"lists[0] of the snapshot: NamespacePolicies changed"},
		},
		{
			name:   "staged services",
			mutate: func(s *Snapshot) { s.StagedServices()[0] = "x/y" },
			want:   []string{"StagedServices changed"},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			st, s, _ := published(t)
			tc.mutate(s)
			err := st.Verify()
			if err == nil {
				t.Fatal("Verify found nothing")
			}
			if !errors.Is(err, ErrMutated) {
				t.Errorf("error %q does not wrap ErrMutated", err)
			}
			for _, w := range append(tc.want, fmt.Sprintf("snapshot %d", s.Version())) {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not mention %q", err, w)
				}
			}
			// Reported once: the next Verify and Publish are quiet about it.
			if err := st.Verify(); err != nil {
				t.Errorf("second Verify: %v", err)
			}
		})
	}
}

func TestVerifyAtNextPublish(t *testing.T) {
	st, s, logs := published(t)
	s.WorkloadByUID("Kubernetes//Pod/ns/a").Capacity = 7
	next := mustBuild(t, Config{})
	st.Publish(next)
	if st.Load() != next {
		t.Fatal("Publish did not publish after finding a violation")
	}
	if !strings.Contains(logs.String(), "snapshot immutability check failed") || !strings.Contains(logs.String(), "Capacity changed") {
		t.Errorf("Publish logged %q, want the violation", logs.String())
	}
	err := st.Verify()
	if !errors.Is(err, ErrMutated) || !strings.Contains(err.Error(), "publish: snapshot 1:") ||
		!strings.Contains(err.Error(), "workload Kubernetes//Pod/ns/a: Capacity changed") {
		t.Errorf("Verify after Publish = %v, want the violation in snapshot 1", err)
	}
	if err := st.Verify(); err != nil {
		t.Errorf("second Verify = %v, want nil (reported once)", err)
	}
}

func TestVerifyRepublish(t *testing.T) {
	st, s, _ := published(t)
	st.Publish(s)
	if err := st.Verify(); err == nil || !strings.Contains(err.Error(), "snapshot 1 is published again") {
		t.Errorf("Verify after publishing a snapshot twice = %v", err)
	}
}

func TestVerifyBounded(t *testing.T) {
	st, _, _ := published(t)
	st.Logger = nil // Verify alone reports
	for i := range maxFound + 5 {
		s := mustBuild(t, Config{Workloads: []*Workload{pod("ns", "w", "10.0.0.1")}})
		st.Publish(s)
		s.Workloads()[0].Node = fmt.Sprint("n", i)
	}
	err := st.Verify()
	if err == nil {
		t.Fatal("Verify found nothing")
	}
	if n := strings.Count(err.Error(), "Node changed"); n != maxFound+1 { // kept ones + current
		t.Errorf("%d violations reported, want %d", n, maxFound+1)
	}
	if !strings.Contains(err.Error(), "verify: 4 more violations were dropped") {
		t.Errorf("error %q does not count the dropped violations", err)
	}
}

func TestVerifyOff(t *testing.T) {
	st := NewStore()
	s := mustBuild(t, Config{Workloads: []*Workload{pod("ns", "a", "10.0.0.1")}})
	st.Publish(s)
	s.Workloads()[0].Node = "mutated"
	st.Publish(mustBuild(t, Config{}))
	if err := st.Verify(); err != nil {
		t.Errorf("Verify with VerifyImmutable off = %v, want nil", err)
	}
	if st.print != nil {
		t.Error("a store without VerifyImmutable took a fingerprint")
	}
}

func TestDebugFromEnv(t *testing.T) {
	for val, want := range map[string]bool{"1": true, "": false, "0": false, "true": false} {
		got := DebugFromEnv(func(k string) string {
			if k != DebugSnapshotEnv {
				t.Errorf("DebugFromEnv read %q", k)
			}
			return val
		})
		if got != want {
			t.Errorf("%s=%q: DebugFromEnv = %v, want %v", DebugSnapshotEnv, val, got, want)
		}
	}
}
