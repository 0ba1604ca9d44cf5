package identity

import (
	"fmt"
	"maps"
	"math"
	"math/rand/v2"
	"net/netip"
	"slices"
	"testing"

	"github.com/ztgo/ztgo/control/snapshot"
)

// picks load balances n times and returns how often each endpoint (by name) was chosen.
func picks(t testing.TB, snap *snapshot.Snapshot, src *snapshot.Workload, svc *snapshot.Service, port uint16, mode resolveMode, n int) map[string]int {
	t.Helper()
	rnd := rand.New(rand.NewPCG(7, 11))
	out := map[string]int{}
	for range n {
		ep, ok := loadBalance(snap, src, svc, port, mode, rnd)
		if !ok {
			out[""]++
			continue
		}
		out[ep.Workload.Name]++
	}
	return out
}

func names(counts map[string]int) []string {
	return slices.Sorted(maps.Keys(counts))
}

// TestLoadBalanceLocality mirrors ztunnel's test_load_balance (src/state.rs): preferences
// [NETWORK, REGION, ZONE] under STRICT and FAILOVER, from sources at different places.
func TestLoadBalanceLocality(t *testing.T) {
	ep := func(name, network, region, zone string, ips ...string) *snapshot.Workload {
		w := app(name, snapshot.TunnelHBONE, ips...)
		w.Network, w.Locality = network, snapshot.Locality{Region: region, Zone: zone}
		return endpointOf(w, webKey, snapshot.PortMap{80: 80})
	}
	build := func(mode snapshot.LBMode) (*snapshot.Snapshot, *snapshot.Service) {
		f := newFixture()
		svc := web(snapshot.PortMap{80: 80})
		svc.LoadBalancing = &snapshot.LoadBalancing{
			Mode:              mode,
			RoutingPreference: []snapshot.LBScope{snapshot.ScopeNetwork, snapshot.ScopeRegion, snapshot.ScopeZone},
		}
		f.addService(svc)
		f.add(
			ep("wl_no_locality", "network", "", "", "192.168.0.1"),
			ep("wl_match", "network", "reg", "zone", "192.168.0.2"),
			ep("wl_almost", "network", "reg", "not-zone", "192.168.0.3"),
			ep("wl_other", "other", "reg", "zone", "192.168.0.5"),
			ep("wl_empty_ip", "network", "reg", "zone", "192.168.0.6"),
		)
		snap := f.build(t)
		// Build needs an address; take it away afterwards to model an address-less endpoint.
		workloadNamed(snap, "wl_empty_ip").Addresses = nil
		return snap, svc
	}
	src := func(network, region, zone string) *snapshot.Workload {
		return &snapshot.Workload{Name: "client", Namespace: "default", Network: network,
			Locality: snapshot.Locality{Region: region, Zone: zone}}
	}
	tests := []struct {
		name string
		mode snapshot.LBMode
		src  *snapshot.Workload
		want []string // "" means no endpoint
	}{
		{"strict no match selects nothing", snapshot.LBModeStrict, src("", "", ""), []string{""}},
		{"strict match", snapshot.LBModeStrict, src("network", "reg", "zone"), []string{"wl_match"}},
		{"failover no match can select any endpoint", snapshot.LBModeFailover, src("no-match", "no-match", "no-match"),
			[]string{"wl_almost", "wl_match", "wl_no_locality", "wl_other"}},
		{"failover matches network+region+zone", snapshot.LBModeFailover, src("network", "reg", "zone"), []string{"wl_match"}},
		{"failover matches network+region", snapshot.LBModeFailover, src("network", "reg", ""), []string{"wl_almost", "wl_match"}},
		{"failover matches network", snapshot.LBModeFailover, src("network", "no-match", "no-match"),
			[]string{"wl_almost", "wl_match", "wl_no_locality"}},
		// NETWORK is preferred, not required: on a mismatch the other scopes still rank.
		{"failover matches region+zone", snapshot.LBModeFailover, src("no-match", "reg", "zone"), []string{"wl_match", "wl_other"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			snap, svc := build(tt.mode)
			got := names(picks(t, snap, tt.src, svc, 80, modeStandard, 400))
			if !slices.Equal(got, tt.want) {
				t.Errorf("picked %q, want %q", got, tt.want)
			}
		})
	}
}

func TestLoadBalanceScopes(t *testing.T) {
	src := &snapshot.Workload{Name: "client", Namespace: "default", Node: "n1", ClusterID: "c1",
		Locality: snapshot.Locality{Region: "r1", Zone: "z1", Subzone: "s1"}}
	var ips int
	mk := func(name, region, zone, subzone, node, cluster string) *snapshot.Workload {
		ips++
		w := app(name, snapshot.TunnelHBONE, fmt.Sprintf("10.0.9.%d", ips))
		w.Locality = snapshot.Locality{Region: region, Zone: zone, Subzone: subzone}
		w.Node, w.ClusterID = node, cluster
		return endpointOf(w, webKey, nil)
	}
	tests := []struct {
		name  string
		mode  snapshot.LBMode
		prefs []snapshot.LBScope
		want  []string
	}{
		{"unspecified mode ignores locality", snapshot.LBModeUnspecified,
			[]snapshot.LBScope{snapshot.ScopeRegion}, []string{"e-all", "e-node", "e-none", "e-region", "e-subzone"}},
		{"failover keeps the best rank only", snapshot.LBModeFailover,
			[]snapshot.LBScope{snapshot.ScopeRegion, snapshot.ScopeZone, snapshot.ScopeSubzone}, []string{"e-all", "e-subzone"}},
		{"node before region", snapshot.LBModeFailover,
			[]snapshot.LBScope{snapshot.ScopeNode, snapshot.ScopeRegion}, []string{"e-all"}},
		{"zone before node", snapshot.LBModeFailover,
			[]snapshot.LBScope{snapshot.ScopeZone, snapshot.ScopeNode}, []string{"e-all"}},
		{"zone only", snapshot.LBModeFailover,
			[]snapshot.LBScope{snapshot.ScopeZone}, []string{"e-all", "e-subzone"}},
		{"cluster scope", snapshot.LBModeStrict,
			[]snapshot.LBScope{snapshot.ScopeCluster}, []string{"e-all"}},
		{"strict drops partial matches", snapshot.LBModeStrict,
			[]snapshot.LBScope{snapshot.ScopeRegion, snapshot.ScopeZone, snapshot.ScopeSubzone, snapshot.ScopeNode}, []string{"e-all"}},
		{"strict without preferences keeps all", snapshot.LBModeStrict,
			nil, []string{"e-all", "e-node", "e-none", "e-region", "e-subzone"}},
		{"unspecified scope matches nothing", snapshot.LBModeFailover,
			[]snapshot.LBScope{snapshot.ScopeUnspecified}, []string{"e-all", "e-node", "e-none", "e-region", "e-subzone"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := newFixture()
			svc := web(snapshot.PortMap{80: 8080})
			svc.LoadBalancing = &snapshot.LoadBalancing{Mode: tt.mode, RoutingPreference: tt.prefs}
			f.addService(svc)
			f.add(
				mk("e-all", "r1", "z1", "s1", "n1", "c1"),
				mk("e-subzone", "r1", "z1", "s1", "n2", "c2"),
				mk("e-region", "r1", "z2", "s1", "n2", "c2"),
				mk("e-node", "r2", "z2", "s2", "n1", "c2"),
				mk("e-none", "r2", "z2", "s2", "n2", "c2"),
			)
			snap := f.build(t)
			got := names(picks(t, snap, src, svc, 80, modeStandard, 400))
			if !slices.Equal(got, tt.want) {
				t.Errorf("picked %q, want %q", got, tt.want)
			}
		})
	}
}

// TestLoadBalanceConsecutive checks that a scope matched after a miss does not count: from a
// node no endpoint runs on, [NODE, REGION] ranks everything 0, region matches included.
func TestLoadBalanceConsecutive(t *testing.T) {
	src := &snapshot.Workload{Name: "client", Namespace: "default", Node: "elsewhere", Locality: snapshot.Locality{Region: "r1"}}
	f := newFixture()
	svc := web(snapshot.PortMap{80: 8080})
	svc.LoadBalancing = &snapshot.LoadBalancing{Mode: snapshot.LBModeFailover,
		RoutingPreference: []snapshot.LBScope{snapshot.ScopeNode, snapshot.ScopeRegion}}
	f.addService(svc)
	near := endpointOf(app("near", snapshot.TunnelHBONE, "10.0.9.1"), webKey, nil)
	near.Node, near.Locality.Region = "n1", "r1"
	far := endpointOf(app("far", snapshot.TunnelHBONE, "10.0.9.2"), webKey, nil)
	far.Node, far.Locality.Region = "n2", "r2"
	f.add(near, far)
	snap := f.build(t)
	if got := names(picks(t, snap, src, svc, 80, modeStandard, 200)); !slices.Equal(got, []string{"far", "near"}) {
		t.Errorf("picked %q, want [far near]", got)
	}
}

// TestLoadBalanceNetworkFirst checks the NETWORK-first bonus: a network match outranks any
// number of other matches, and among same-network endpoints the other scopes still order.
func TestLoadBalanceNetworkFirst(t *testing.T) {
	src := &snapshot.Workload{Name: "client", Namespace: "default", Network: "n1", Locality: snapshot.Locality{Region: "r1"}}
	mk := func(name, network, region, ip string) *snapshot.Workload {
		w := app(name, snapshot.TunnelHBONE, ip)
		w.Network, w.Locality.Region = network, region
		return endpointOf(w, webKey, nil)
	}
	for _, tc := range []struct {
		name string
		eps  []*snapshot.Workload
		want []string
	}{
		{"same network beats same region", []*snapshot.Workload{mk("net", "n1", "r2", "10.0.9.1"), mk("region", "n2", "r1", "10.0.9.2")}, []string{"net"}},
		{"same network and region beats same network", []*snapshot.Workload{
			mk("net", "n1", "r2", "10.0.9.1"), mk("region", "n2", "r1", "10.0.9.2"), mk("both", "n1", "r1", "10.0.9.3")}, []string{"both"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := newFixture()
			svc := web(snapshot.PortMap{80: 8080})
			svc.LoadBalancing = &snapshot.LoadBalancing{Mode: snapshot.LBModeFailover,
				RoutingPreference: []snapshot.LBScope{snapshot.ScopeNetwork, snapshot.ScopeRegion}}
			f.addService(svc)
			f.add(tc.eps...)
			snap := f.build(t)
			if got := names(picks(t, snap, src, svc, 80, modeStandard, 200)); !slices.Equal(got, tc.want) {
				t.Errorf("picked %q, want %q", got, tc.want)
			}
		})
	}
}

func TestLoadBalanceWeights(t *testing.T) {
	f := newFixture()
	svc := web(snapshot.PortMap{80: 8080})
	// FAILOVER by region: the far endpoint's large capacity must not leak into the near ones.
	svc.LoadBalancing = &snapshot.LoadBalancing{Mode: snapshot.LBModeFailover, RoutingPreference: []snapshot.LBScope{snapshot.ScopeRegion}}
	f.addService(svc)
	for i, c := range []uint32{0, 2, 7} { // 0 is the default weight 1
		w := endpointOf(app(fmt.Sprintf("w%d", i), snapshot.TunnelHBONE, fmt.Sprintf("10.0.9.%d", i+1)), webKey, nil)
		w.Capacity, w.Locality.Region = c, "r1"
		f.add(w)
	}
	far := endpointOf(app("far", snapshot.TunnelHBONE, "10.0.9.100"), webKey, nil)
	far.Capacity, far.Locality.Region = 1000, "r2"
	f.add(far)
	snap := f.build(t)
	src := &snapshot.Workload{Name: "client", Namespace: "default", Locality: snapshot.Locality{Region: "r1"}}

	const n = 100000
	got := picks(t, snap, src, svc, 80, modeStandard, n)
	for name, want := range map[string]float64{"w0": 0.1, "w1": 0.2, "w2": 0.7, "far": 0} {
		if share := float64(got[name]) / n; math.Abs(share-want) > 0.01 {
			t.Errorf("%s picked %.3f of the time, want %.2f (counts %v)", name, share, want, got)
		}
	}
}

func TestLoadBalanceHealth(t *testing.T) {
	for _, tc := range []struct {
		policy snapshot.LBHealthPolicy
		want   []string
	}{
		{snapshot.OnlyHealthy, []string{"healthy"}},
		{snapshot.AllowAll, []string{"healthy", "sick"}},
	} {
		f := newFixture()
		svc := web(snapshot.PortMap{80: 8080})
		svc.LoadBalancing = &snapshot.LoadBalancing{HealthPolicy: tc.policy}
		f.addService(svc)
		sick := endpointOf(app("sick", snapshot.TunnelHBONE, "10.0.9.2"), webKey, nil)
		sick.Status = snapshot.Unhealthy
		f.add(endpointOf(app("healthy", snapshot.TunnelHBONE, "10.0.9.1"), webKey, nil), sick)
		snap := f.build(t)
		if got := names(picks(t, snap, f.src, svc, 80, modeStandard, 200)); !slices.Equal(got, tc.want) {
			t.Errorf("policy %d: picked %q, want %q", tc.policy, got, tc.want)
		}
	}
}

func TestLoadBalancePorts(t *testing.T) {
	tunnel := &snapshot.ApplicationTunnel{Protocol: snapshot.AppTunnelProxy, Port: 15088}
	tests := []struct {
		name     string
		svcPorts snapshot.PortMap
		epPorts  snapshot.PortMap
		tunnel   *snapshot.ApplicationTunnel
		mode     resolveMode
		port     uint16 // mapped port; 0 means no upstream
	}{
		{"endpoint mapping", snapshot.PortMap{80: 0}, snapshot.PortMap{80: 9090}, nil, modeStandard, 9090},
		{"service mapping", snapshot.PortMap{80: 8080}, nil, nil, modeStandard, 8080},
		{"endpoint mapping beats service mapping", snapshot.PortMap{80: 8080}, snapshot.PortMap{80: 9090}, nil, modeStandard, 9090},
		{"named port without endpoint mapping", snapshot.PortMap{80: 0}, nil, nil, modeStandard, 0},
		{"port missing from service", snapshot.PortMap{81: 81}, snapshot.PortMap{80: 80}, nil, modeStandard, 0},
		{"waypoint: app tunnel keeps the service port", snapshot.PortMap{80: 0}, nil, tunnel, modeWaypoint, 80},
		{"waypoint: app tunnel without the port on the service", nil, nil, tunnel, modeWaypoint, 80},
		{"waypoint: port missing and no app tunnel", nil, nil, nil, modeWaypoint, 0},
		{"waypoint: declared zero port and nothing to map it", snapshot.PortMap{80: 0}, nil, nil, modeWaypoint, 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := newFixture()
			svc := web(tt.svcPorts)
			f.addService(svc)
			w := endpointOf(app("ep", snapshot.TunnelHBONE, "10.0.9.1"), webKey, tt.epPorts)
			w.ApplicationTunnel = tt.tunnel
			f.add(w)
			snap := f.build(t)
			p, ok := findUpstreamFromService(snap, f.src, 80, tt.mode, svc, nil)
			var got uint16
			if ok {
				got = p.port
			}
			if got != tt.port {
				t.Errorf("port = %d, want %d", got, tt.port)
			}
		})
	}
}

func TestLoadBalanceAddresslessEndpoints(t *testing.T) {
	f := newFixture()
	f.addService(web(snapshot.PortMap{80: 8080}))
	local := endpointOf(app("local", snapshot.TunnelHBONE, "10.0.9.1"), webKey, nil)
	local.NetworkGateway = gwAddr("192.0.2.1", 15008)
	remote := endpointOf(app("remote", snapshot.TunnelHBONE, "10.0.9.2"), webKey, nil)
	remote.Network, remote.NetworkGateway = "net2", gwAddr("192.0.2.1", 15008)
	remoteNoGW := endpointOf(app("remote-no-gw", snapshot.TunnelHBONE, "10.0.9.3"), webKey, nil)
	remoteNoGW.Network = "net2"
	f.add(local, remote, remoteNoGW)
	snap := f.build(t)
	for _, w := range []*snapshot.Workload{local, remote, remoteNoGW} {
		w.Addresses = nil
	}
	// Only the off-network endpoint with a gateway is reachable without an address.
	if got := names(picks(t, snap, f.src, snap.ServiceByKey(snapshot.NamespacedHostname{Namespace: "default", Hostname: "web.default.svc.cluster.local"}), 80, modeStandard, 100)); !slices.Equal(got, []string{"remote"}) {
		t.Errorf("picked %q, want [remote]", got)
	}
}

func TestLoadBalanceDoesNotAllocate(t *testing.T) {
	snap, src, svc := bigService(t, 1000, true)
	rnd := rand.New(rand.NewPCG(1, 1))
	allocs := testing.AllocsPerRun(100, func() {
		if _, ok := loadBalance(snap, src, svc, 80, modeStandard, rnd); !ok {
			t.Fatal("no endpoint")
		}
	})
	if allocs != 0 {
		t.Errorf("loadBalance allocates %.1f times per call, want 0", allocs)
	}
}

// bigService builds a service at 10.96.0.1 with n HBONE endpoints spread over 4 zones and
// 10 nodes; ranked adds FAILOVER by [REGION, ZONE, NODE].
func bigService(t testing.TB, n int, ranked bool) (*snapshot.Snapshot, *snapshot.Workload, *snapshot.Service) {
	f := newFixture()
	f.src.Locality = snapshot.Locality{Region: "r1", Zone: "z1"}
	svc := web(snapshot.PortMap{80: 8080})
	if ranked {
		svc.LoadBalancing = &snapshot.LoadBalancing{Mode: snapshot.LBModeFailover,
			RoutingPreference: []snapshot.LBScope{snapshot.ScopeRegion, snapshot.ScopeZone, snapshot.ScopeNode}}
	}
	f.addService(svc)
	for i := range n {
		w := endpointOf(app(fmt.Sprintf("ep-%d", i), snapshot.TunnelHBONE, fmt.Sprintf("10.%d.%d.%d", 10+i>>16, i>>8&0xff, i&0xff)), webKey, nil)
		w.Locality = snapshot.Locality{Region: "r1", Zone: fmt.Sprintf("z%d", i%4)}
		w.Node = fmt.Sprintf("node-%d", i%10)
		w.Capacity = uint32(1 + i%3)
		f.add(w)
	}
	snap := f.build(t)
	return snap, workloadNamed(snap, "src"), svc
}

func BenchmarkOutbound(b *testing.B) {
	for _, ranked := range []bool{false, true} {
		name := "standard"
		if ranked {
			name = "failover"
		}
		b.Run(name+"/1000-endpoints", func(b *testing.B) {
			snap, src, _ := bigService(b, 1000, ranked)
			rnd := rand.New(rand.NewPCG(1, 1))
			dst := netip.MustParseAddrPort("10.96.0.1:80")
			b.ReportAllocs()
			for b.Loop() {
				if _, err := Outbound(snap, src, dst, rnd); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
	b.Run("workload", func(b *testing.B) {
		f := newFixture()
		f.add(app("app", snapshot.TunnelHBONE, "10.0.1.2"))
		snap := f.build(b)
		src := workloadNamed(snap, "src")
		dst := netip.MustParseAddrPort("10.0.1.2:80")
		b.ReportAllocs()
		for b.Loop() {
			if _, err := Outbound(snap, src, dst, nil); err != nil {
				b.Fatal(err)
			}
		}
	})
}

// TestLoadBalanceBeyondCache covers services larger than the rank cache and preference lists
// too long to cache: the best endpoints sit past the cache's end.
func TestLoadBalanceBeyondCache(t *testing.T) {
	for _, nprefs := range []int{1, maxCachedScopes + 1} {
		t.Run(fmt.Sprintf("%d-scopes", nprefs), func(t *testing.T) {
			f := newFixture()
			f.src.Locality.Region = "r1"
			svc := web(snapshot.PortMap{80: 8080})
			prefs := make([]snapshot.LBScope, nprefs)
			for i := range prefs {
				prefs[i] = snapshot.ScopeRegion
			}
			svc.LoadBalancing = &snapshot.LoadBalancing{Mode: snapshot.LBModeFailover, RoutingPreference: prefs}
			f.addService(svc)
			const n = rankCache + 100
			for i := range n {
				w := endpointOf(app(fmt.Sprintf("ep-%d", i), snapshot.TunnelHBONE, fmt.Sprintf("10.1.%d.%d", i>>8, i&0xff)), webKey, nil)
				w.Locality.Region = "r2"
				if i >= n-3 {
					w.Locality.Region = "r1"
				}
				f.add(w)
			}
			snap := f.build(t)
			got := names(picks(t, snap, f.src, svc, 80, modeStandard, 300))
			want := []string{fmt.Sprintf("ep-%d", n-3), fmt.Sprintf("ep-%d", n-2), fmt.Sprintf("ep-%d", n-1)}
			if !slices.Equal(got, want) {
				t.Errorf("picked %q, want %q", got, want)
			}
		})
	}
}
