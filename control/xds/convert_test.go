package xds

import (
	"net/netip"
	"reflect"
	"strings"
	"testing"

	"google.golang.org/protobuf/types/known/emptypb"
	"google.golang.org/protobuf/types/known/wrapperspb"
	"istio.io/istio/pkg/workloadapi"
	"istio.io/istio/pkg/workloadapi/security"

	"github.com/ztgo/ztgo/control/snapshot"
)

var (
	ip4  = []byte{10, 0, 0, 1}
	ip6  = netip.MustParseAddr("fd00::1").AsSlice()
	addr = netip.MustParseAddr
)

func baseWorkload() *workloadapi.Workload {
	return &workloadapi.Workload{
		Uid:       "Kubernetes//Pod/ns/name",
		Name:      "name",
		Namespace: "ns",
		Addresses: [][]byte{ip4},
	}
}

func wantBaseWorkload() *snapshot.Workload {
	return &snapshot.Workload{
		UID:            "Kubernetes//Pod/ns/name",
		Name:           "name",
		Namespace:      "ns",
		Addresses:      []netip.Addr{addr("10.0.0.1")},
		TrustDomain:    "cluster.local",
		ServiceAccount: "default",
		ClusterID:      "Kubernetes",
	}
}

// checkConverted checks the result of one conversion: with wantErr, an error that contains it;
// otherwise no error and the value want returns.
func checkConverted[T any](t *testing.T, got T, err error, wantErr string, want func() T) {
	t.Helper()
	if wantErr != "" {
		if err == nil || !strings.Contains(err.Error(), wantErr) {
			t.Fatalf("err = %v, want it to contain %q", err, wantErr)
		}
		return
	}
	if err != nil {
		t.Fatal(err)
	}
	if w := want(); !reflect.DeepEqual(got, w) {
		t.Fatalf("got  %+v\nwant %+v", got, w)
	}
}

func TestConvertWorkload(t *testing.T) {
	hbonePort := func(p uint32) *workloadapi.GatewayAddress {
		return &workloadapi.GatewayAddress{
			Destination:   &workloadapi.GatewayAddress_Address{Address: &workloadapi.NetworkAddress{Network: "n1", Address: ip4}},
			HboneMtlsPort: p,
		}
	}
	tests := []struct {
		name    string
		edit    func(w *workloadapi.Workload)
		want    func(w *snapshot.Workload)
		wantErr string
	}{
		{name: "defaults", edit: func(*workloadapi.Workload) {}, want: func(*snapshot.Workload) {}},
		{
			name: "strings",
			edit: func(w *workloadapi.Workload) {
				w.Hostname, w.Network, w.TrustDomain, w.ServiceAccount = "h.example", "net1", "td", "sa"
				w.Node, w.CanonicalName, w.CanonicalRevision, w.WorkloadName = "node1", "cn", "v1", "deploy"
				w.ClusterId, w.NativeTunnel = "c2", true
				w.AuthorizationPolicies = []string{"ns/p1", "ns/p2"}
			},
			want: func(w *snapshot.Workload) {
				w.Hostname, w.Network, w.TrustDomain, w.ServiceAccount = "h.example", "net1", "td", "sa"
				w.Node, w.CanonicalName, w.CanonicalRevision, w.WorkloadName = "node1", "cn", "v1", "deploy"
				w.ClusterID, w.NativeTunnel = "c2", true
				w.AuthorizationPolicies = []string{"ns/p1", "ns/p2"}
			},
		},
		{
			name: "addresses v4 v6 and mapped",
			edit: func(w *workloadapi.Workload) {
				w.Addresses = [][]byte{ip4, ip6, netip.MustParseAddr("::ffff:10.0.0.2").AsSlice()}
			},
			want: func(w *snapshot.Workload) {
				w.Addresses = []netip.Addr{addr("10.0.0.1"), addr("fd00::1"), addr("::ffff:10.0.0.2")}
			},
		},
		{
			name: "no addresses",
			edit: func(w *workloadapi.Workload) { w.Addresses = nil; w.Hostname = "x.example" },
			want: func(w *snapshot.Workload) { w.Addresses = nil; w.Hostname = "x.example" },
		},
		{
			name:    "bad address length",
			edit:    func(w *workloadapi.Workload) { w.Addresses = [][]byte{ip4, {1, 2, 3}} },
			wantErr: "workload ns/name: addresses[1]: 3 bytes is not an IPv4 or IPv6 address",
		},
		{
			name:    "empty address",
			edit:    func(w *workloadapi.Workload) { w.Addresses = [][]byte{{}} },
			wantErr: "addresses[0]: 0 bytes is not an IPv4 or IPv6 address",
		},
		{
			name: "tunnel HBONE",
			edit: func(w *workloadapi.Workload) { w.TunnelProtocol = workloadapi.TunnelProtocol_HBONE },
			want: func(w *snapshot.Workload) { w.Protocol = snapshot.TunnelHBONE },
		},
		{
			name:    "tunnel legacy mtls",
			edit:    func(w *workloadapi.Workload) { w.TunnelProtocol = workloadapi.TunnelProtocol_LEGACY_ISTIO_MTLS },
			wantErr: "workload ns/name: tunnel_protocol: LEGACY_ISTIO_MTLS is not supported",
		},
		{
			name:    "tunnel unknown",
			edit:    func(w *workloadapi.Workload) { w.TunnelProtocol = 9 },
			wantErr: "tunnel_protocol: unknown value 9",
		},
		{
			name: "host network",
			edit: func(w *workloadapi.Workload) { w.NetworkMode = workloadapi.NetworkMode_HOST_NETWORK },
			want: func(w *snapshot.Workload) { w.NetworkMode = snapshot.NetworkHost },
		},
		{
			name:    "network mode unknown",
			edit:    func(w *workloadapi.Workload) { w.NetworkMode = 5 },
			wantErr: "network_mode: unknown value 5",
		},
		{
			name: "unhealthy",
			edit: func(w *workloadapi.Workload) { w.Status = workloadapi.WorkloadStatus_UNHEALTHY },
			want: func(w *snapshot.Workload) { w.Status = snapshot.Unhealthy },
		},
		{
			name:    "status unknown",
			edit:    func(w *workloadapi.Workload) { w.Status = 3 },
			wantErr: "status: unknown value 3",
		},
		{
			name: "workload type pod",
			edit: func(w *workloadapi.Workload) { w.WorkloadType = workloadapi.WorkloadType_POD },
			want: func(w *snapshot.Workload) { w.WorkloadType = snapshot.WorkloadPod },
		},
		{
			name: "workload type cronjob",
			edit: func(w *workloadapi.Workload) { w.WorkloadType = workloadapi.WorkloadType_CRONJOB },
			want: func(w *snapshot.Workload) { w.WorkloadType = snapshot.WorkloadCronJob },
		},
		{
			name: "workload type job",
			edit: func(w *workloadapi.Workload) { w.WorkloadType = workloadapi.WorkloadType_JOB },
			want: func(w *snapshot.Workload) { w.WorkloadType = snapshot.WorkloadJob },
		},
		{
			// prost's getter defaults an unknown value; so does ztgo.
			name: "workload type unknown is deployment",
			edit: func(w *workloadapi.Workload) { w.WorkloadType = 42 },
			want: func(w *snapshot.Workload) { w.WorkloadType = snapshot.WorkloadDeployment },
		},
		{
			name: "waypoint by address",
			edit: func(w *workloadapi.Workload) { w.Waypoint = hbonePort(15008) },
			want: func(w *snapshot.Workload) {
				w.Waypoint = &snapshot.GatewayAddress{Address: &snapshot.NetworkAddress{Network: "n1", Addr: addr("10.0.0.1")}, HBONEPort: 15008}
			},
		},
		{
			name: "waypoint by hostname",
			edit: func(w *workloadapi.Workload) {
				w.Waypoint = &workloadapi.GatewayAddress{
					Destination:   &workloadapi.GatewayAddress_Hostname{Hostname: &workloadapi.NamespacedHostname{Namespace: "wns", Hostname: "wp.example"}},
					HboneMtlsPort: 15008,
				}
			},
			want: func(w *snapshot.Workload) {
				w.Waypoint = &snapshot.GatewayAddress{Hostname: &snapshot.NamespacedHostname{Namespace: "wns", Hostname: "wp.example"}, HBONEPort: 15008}
			},
		},
		{
			name: "waypoint port 0 kept",
			edit: func(w *workloadapi.Workload) { w.Waypoint = hbonePort(0) },
			want: func(w *snapshot.Workload) {
				w.Waypoint = &snapshot.GatewayAddress{Address: &snapshot.NetworkAddress{Network: "n1", Addr: addr("10.0.0.1")}}
			},
		},
		{
			name:    "waypoint port too big",
			edit:    func(w *workloadapi.Workload) { w.Waypoint = hbonePort(70000) },
			wantErr: "waypoint.hbone_mtls_port: 70000 is not a port",
		},
		{
			name:    "waypoint without destination",
			edit:    func(w *workloadapi.Workload) { w.Waypoint = &workloadapi.GatewayAddress{HboneMtlsPort: 15008} },
			wantErr: "waypoint: no destination",
		},
		{
			name: "waypoint bad address",
			edit: func(w *workloadapi.Workload) {
				w.Waypoint = &workloadapi.GatewayAddress{Destination: &workloadapi.GatewayAddress_Address{Address: &workloadapi.NetworkAddress{Address: []byte{1}}}}
			},
			wantErr: "waypoint.address.address: 1 bytes is not an IPv4 or IPv6 address",
		},
		{
			name: "network gateway",
			edit: func(w *workloadapi.Workload) { w.NetworkGateway = hbonePort(15009) },
			want: func(w *snapshot.Workload) {
				w.NetworkGateway = &snapshot.GatewayAddress{Address: &snapshot.NetworkAddress{Network: "n1", Addr: addr("10.0.0.1")}, HBONEPort: 15009}
			},
		},
		{
			name:    "network gateway without destination",
			edit:    func(w *workloadapi.Workload) { w.NetworkGateway = &workloadapi.GatewayAddress{} },
			wantErr: "network_gateway: no destination",
		},
		{
			name: "application tunnel",
			edit: func(w *workloadapi.Workload) {
				w.ApplicationTunnel = &workloadapi.ApplicationTunnel{Protocol: workloadapi.ApplicationTunnel_PROXY, Port: 15088}
			},
			want: func(w *snapshot.Workload) {
				w.ApplicationTunnel = &snapshot.ApplicationTunnel{Protocol: snapshot.AppTunnelProxy, Port: 15088}
			},
		},
		{
			name: "application tunnel none",
			edit: func(w *workloadapi.Workload) { w.ApplicationTunnel = &workloadapi.ApplicationTunnel{} },
			want: func(w *snapshot.Workload) { w.ApplicationTunnel = &snapshot.ApplicationTunnel{} },
		},
		{
			name:    "application tunnel unknown protocol",
			edit:    func(w *workloadapi.Workload) { w.ApplicationTunnel = &workloadapi.ApplicationTunnel{Protocol: 2} },
			wantErr: "application_tunnel.protocol: unknown value 2",
		},
		{
			name:    "application tunnel port too big",
			edit:    func(w *workloadapi.Workload) { w.ApplicationTunnel = &workloadapi.ApplicationTunnel{Port: 65536} },
			wantErr: "application_tunnel.port: 65536 is not a port",
		},
		{
			name: "services",
			edit: func(w *workloadapi.Workload) {
				w.Services = map[string]*workloadapi.PortList{
					"ns/svc.example": {Ports: []*workloadapi.Port{{ServicePort: 80, TargetPort: 8080}, {ServicePort: 443}, {ServicePort: 80, TargetPort: 9090, AppProtocol: workloadapi.AppProtocol_HTTP2}}},
					"/bare.example":  {},
				}
			},
			want: func(w *snapshot.Workload) {
				// A later entry for the same service port wins; an empty namespace is
				// allowed, as ztunnel only needs the "/".
				w.Services = map[string]snapshot.PortMap{"ns/svc.example": {80: 9090, 443: 0}, "/bare.example": {}}
			},
		},
		{
			name:    "service key without slash",
			edit:    func(w *workloadapi.Workload) { w.Services = map[string]*workloadapi.PortList{"svc.example": {}} },
			wantErr: `services["svc.example"]: key is not namespace/hostname`,
		},
		{
			name: "service port too big",
			edit: func(w *workloadapi.Workload) {
				w.Services = map[string]*workloadapi.PortList{"ns/s": {Ports: []*workloadapi.Port{{ServicePort: 80, TargetPort: 1 << 16}}}}
			},
			wantErr: `services["ns/s"].ports[0].target_port: 65536 is not a port`,
		},
		{
			name: "locality",
			edit: func(w *workloadapi.Workload) {
				w.Locality = &workloadapi.Locality{Region: "r", Zone: "z", Subzone: "s"}
			},
			want: func(w *snapshot.Workload) { w.Locality = snapshot.Locality{Region: "r", Zone: "z", Subzone: "s"} },
		},
		{
			name: "capacity",
			edit: func(w *workloadapi.Workload) { w.Capacity = wrapperspb.UInt32(7) },
			want: func(w *snapshot.Workload) { w.Capacity = 7 },
		},
		{
			name: "uid empty kept (the client fills it from the resource name)",
			edit: func(w *workloadapi.Workload) { w.Uid = "" },
			want: func(w *snapshot.Workload) { w.UID = "" },
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			in := baseWorkload()
			tc.edit(in)
			got, err := ConvertWorkload(in)
			checkConverted(t, got, err, tc.wantErr, func() *snapshot.Workload {
				want := wantBaseWorkload()
				tc.want(want)
				return want
			})
		})
	}
	if _, err := ConvertWorkload(nil); err == nil {
		t.Fatal("nil workload accepted")
	}
}

func baseService() *workloadapi.Service {
	return &workloadapi.Service{
		Name:      "svc",
		Namespace: "ns",
		Hostname:  "svc.ns.svc.cluster.local",
		Addresses: []*workloadapi.NetworkAddress{{Network: "", Address: []byte{10, 96, 0, 1}}},
		Ports:     []*workloadapi.Port{{ServicePort: 80, TargetPort: 8080}},
	}
}

func wantBaseService() *snapshot.Service {
	return &snapshot.Service{
		Name:      "svc",
		Namespace: "ns",
		Hostname:  "svc.ns.svc.cluster.local",
		VIPs:      []snapshot.NetworkAddress{{Addr: addr("10.96.0.1")}},
		Ports:     snapshot.PortMap{80: 8080},
	}
}

func TestConvertService(t *testing.T) {
	u32 := func(v uint32) *uint32 { return &v }
	gw := &workloadapi.GatewayAddress{
		Destination:   &workloadapi.GatewayAddress_Hostname{Hostname: &workloadapi.NamespacedHostname{Namespace: "wns", Hostname: "wp"}},
		HboneMtlsPort: 15008,
	}
	wantGW := snapshot.GatewayAddress{Hostname: &snapshot.NamespacedHostname{Namespace: "wns", Hostname: "wp"}, HBONEPort: 15008}
	tests := []struct {
		name    string
		edit    func(s *workloadapi.Service)
		want    func(s *snapshot.Service)
		wantErr string
	}{
		{name: "base", edit: func(*workloadapi.Service) {}, want: func(*snapshot.Service) {}},
		{
			name: "plain fields",
			edit: func(s *workloadapi.Service) {
				s.SubjectAltNames = []string{"spiffe://td/ns/a/sa/b"}
				s.Canonical = true
				s.IngressUseWaypoint = true // ignored, as in ztunnel
			},
			want: func(s *snapshot.Service) {
				s.SubjectAltNames = []string{"spiffe://td/ns/a/sa/b"}
				s.Canonical = true
			},
		},
		{
			name: "vips and cidr vips",
			edit: func(s *workloadapi.Service) {
				s.Addresses = []*workloadapi.NetworkAddress{
					{Network: "n1", Address: []byte{10, 96, 0, 1}, Length: u32(32)}, // full length: a VIP
					{Address: ip6},
					{Network: "n2", Address: []byte{10, 97, 1, 2}, Length: u32(16)},
					{Address: ip6, Length: u32(64)},
					{Address: []byte{10, 0, 0, 0}, Length: u32(0)},
				}
			},
			want: func(s *snapshot.Service) {
				s.VIPs = []snapshot.NetworkAddress{{Network: "n1", Addr: addr("10.96.0.1")}, {Addr: addr("fd00::1")}}
				s.CIDRVIPs = []snapshot.NetworkPrefix{
					{Network: "n2", Prefix: netip.MustParsePrefix("10.97.0.0/16")},
					{Prefix: netip.MustParsePrefix("fd00::/64")},
					{Prefix: netip.MustParsePrefix("0.0.0.0/0")},
				}
			},
		},
		{
			name: "bad vip",
			edit: func(s *workloadapi.Service) {
				s.Addresses = []*workloadapi.NetworkAddress{{Address: []byte{1, 2, 3, 4, 5}}}
			},
			wantErr: "service ns/svc.ns.svc.cluster.local: addresses[0].address: 5 bytes is not an IPv4 or IPv6 address",
		},
		{
			name: "cidr too long",
			edit: func(s *workloadapi.Service) {
				s.Addresses = []*workloadapi.NetworkAddress{{Address: ip4, Length: u32(33)}}
			},
			wantErr: "addresses[0]: prefix length 33 is longer than the 32 bits of 10.0.0.1",
		},
		{
			name: "ports",
			edit: func(s *workloadapi.Service) {
				s.Ports = []*workloadapi.Port{{ServicePort: 80}, {ServicePort: 443, TargetPort: 8443}}
			},
			want: func(s *snapshot.Service) { s.Ports = snapshot.PortMap{80: 0, 443: 8443} },
		},
		{
			name:    "port too big",
			edit:    func(s *workloadapi.Service) { s.Ports = []*workloadapi.Port{{ServicePort: 99999}} },
			wantErr: "ports[0].service_port: 99999 is not a port",
		},
		{
			name: "waypoint",
			edit: func(s *workloadapi.Service) { s.Waypoint = gw },
			want: func(s *snapshot.Service) { g := wantGW; s.Waypoint = &g },
		},
		{
			name:    "waypoint without destination",
			edit:    func(s *workloadapi.Service) { s.Waypoint = &workloadapi.GatewayAddress{} },
			wantErr: "waypoint: no destination",
		},
		{
			name: "weighted waypoints",
			edit: func(s *workloadapi.Service) {
				s.WeightedWaypoints = []*workloadapi.WeightedWaypoint{{Destination: gw, Weight: 3}, {Destination: gw}}
			},
			want: func(s *snapshot.Service) {
				s.WeightedWaypoints = []snapshot.WeightedWaypoint{{Destination: wantGW, Weight: 3}, {Destination: wantGW}}
			},
		},
		{
			name:    "weighted waypoint without destination",
			edit:    func(s *workloadapi.Service) { s.WeightedWaypoints = []*workloadapi.WeightedWaypoint{{Weight: 1}} },
			wantErr: "weighted_waypoints[0].destination: missing",
		},
		{
			name: "load balancing",
			edit: func(s *workloadapi.Service) {
				s.LoadBalancing = &workloadapi.LoadBalancing{
					RoutingPreference: []workloadapi.LoadBalancing_Scope{
						workloadapi.LoadBalancing_REGION, workloadapi.LoadBalancing_ZONE, workloadapi.LoadBalancing_SUBZONE,
						workloadapi.LoadBalancing_NODE, workloadapi.LoadBalancing_CLUSTER, workloadapi.LoadBalancing_NETWORK,
					},
					Mode:         workloadapi.LoadBalancing_FAILOVER,
					HealthPolicy: workloadapi.LoadBalancing_ALLOW_ALL,
				}
			},
			want: func(s *snapshot.Service) {
				s.LoadBalancing = &snapshot.LoadBalancing{
					RoutingPreference: []snapshot.LBScope{snapshot.ScopeRegion, snapshot.ScopeZone, snapshot.ScopeSubzone, snapshot.ScopeNode, snapshot.ScopeCluster, snapshot.ScopeNetwork},
					Mode:              snapshot.LBModeFailover,
					HealthPolicy:      snapshot.AllowAll,
				}
			},
		},
		{
			name: "load balancing modes",
			edit: func(s *workloadapi.Service) {
				s.LoadBalancing = &workloadapi.LoadBalancing{Mode: workloadapi.LoadBalancing_STRICT}
			},
			want: func(s *snapshot.Service) { s.LoadBalancing = &snapshot.LoadBalancing{Mode: snapshot.LBModeStrict} },
		},
		{
			name: "load balancing passthrough",
			edit: func(s *workloadapi.Service) {
				s.LoadBalancing = &workloadapi.LoadBalancing{Mode: workloadapi.LoadBalancing_PASSTHROUGH}
			},
			want: func(s *snapshot.Service) { s.LoadBalancing = &snapshot.LoadBalancing{Mode: snapshot.LBModePassthrough} },
		},
		{
			name: "load balancing empty",
			edit: func(s *workloadapi.Service) { s.LoadBalancing = &workloadapi.LoadBalancing{} },
			want: func(s *snapshot.Service) { s.LoadBalancing = &snapshot.LoadBalancing{} },
		},
		{
			name: "routing preference unspecified",
			edit: func(s *workloadapi.Service) {
				s.LoadBalancing = &workloadapi.LoadBalancing{RoutingPreference: []workloadapi.LoadBalancing_Scope{workloadapi.LoadBalancing_ZONE, workloadapi.LoadBalancing_UNSPECIFIED_SCOPE}}
			},
			wantErr: "load_balancing.routing_preference[1]: UNSPECIFIED_SCOPE is not a routing preference",
		},
		{
			name: "routing preference unknown",
			edit: func(s *workloadapi.Service) {
				s.LoadBalancing = &workloadapi.LoadBalancing{RoutingPreference: []workloadapi.LoadBalancing_Scope{7}}
			},
			wantErr: "load_balancing.routing_preference[0]: unknown value 7",
		},
		{
			name:    "lb mode unknown",
			edit:    func(s *workloadapi.Service) { s.LoadBalancing = &workloadapi.LoadBalancing{Mode: 4} },
			wantErr: "load_balancing.mode: unknown value 4",
		},
		{
			name:    "health policy unknown",
			edit:    func(s *workloadapi.Service) { s.LoadBalancing = &workloadapi.LoadBalancing{HealthPolicy: 2} },
			wantErr: "load_balancing.health_policy: unknown value 2",
		},
		{
			name: "ip families v4",
			edit: func(s *workloadapi.Service) { s.IpFamilies = workloadapi.IPFamilies_IPV4_ONLY },
			want: func(s *snapshot.Service) { s.IPFamilies = snapshot.IPv4Only },
		},
		{
			name: "ip families v6",
			edit: func(s *workloadapi.Service) { s.IpFamilies = workloadapi.IPFamilies_IPV6_ONLY },
			want: func(s *snapshot.Service) { s.IPFamilies = snapshot.IPv6Only },
		},
		{
			name: "ip families dual",
			edit: func(s *workloadapi.Service) { s.IpFamilies = workloadapi.IPFamilies_DUAL },
			want: func(s *snapshot.Service) { s.IPFamilies = snapshot.IPFamiliesDual },
		},
		{
			name:    "ip families unknown",
			edit:    func(s *workloadapi.Service) { s.IpFamilies = 4 },
			wantErr: "ip_families: unknown value 4",
		},
		{
			name: "visibility namespace",
			edit: func(s *workloadapi.Service) { s.Visibility = workloadapi.Service_NAMESPACE },
			want: func(s *snapshot.Service) { s.Visibility = snapshot.VisibilityNamespace },
		},
		{
			// ztunnel fails open on an unknown visibility.
			name: "visibility unknown is public",
			edit: func(s *workloadapi.Service) { s.Visibility = 9 },
			want: func(s *snapshot.Service) { s.Visibility = snapshot.VisibilityPublic },
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			in := baseService()
			tc.edit(in)
			got, err := ConvertService(in)
			checkConverted(t, got, err, tc.wantErr, func() *snapshot.Service {
				want := wantBaseService()
				tc.want(want)
				return want
			})
		})
	}
	if _, err := ConvertService(nil); err == nil {
		t.Fatal("nil service accepted")
	}
}

func TestConvertAuthorization(t *testing.T) {
	exact := func(s string) *security.StringMatch {
		return &security.StringMatch{MatchType: &security.StringMatch_Exact{Exact: s}}
	}
	policy := func(m *security.Match) *security.Authorization {
		return &security.Authorization{
			Name: "p", Namespace: "ns", Scope: security.Scope_NAMESPACE, Action: security.Action_DENY,
			Groups: []*security.Group{{Rules: []*security.Rules{{Matches: []*security.Match{m}}}}},
		}
	}
	wantPolicy := func(m snapshot.Match) *snapshot.Policy {
		return &snapshot.Policy{
			Name: "p", Namespace: "ns", Scope: snapshot.ScopeNamespace, Action: snapshot.ActionDeny,
			Rules: []snapshot.Rule{{{m}}},
		}
	}
	tests := []struct {
		name    string
		in      *security.Authorization
		want    *snapshot.Policy
		wantErr string
	}{
		{
			name: "global allow, no rules, dry run",
			in:   &security.Authorization{Name: "p", Namespace: "istio-system", Scope: security.Scope_GLOBAL, DryRun: true},
			want: &snapshot.Policy{Name: "p", Namespace: "istio-system", Scope: snapshot.ScopeGlobal, Action: snapshot.ActionAllow, DryRun: true},
		},
		{
			name: "workload selector",
			in:   &security.Authorization{Name: "p", Namespace: "ns", Scope: security.Scope_WORKLOAD_SELECTOR},
			want: &snapshot.Policy{Name: "p", Namespace: "ns", Scope: snapshot.ScopeWorkloadSelector},
		},
		{
			name:    "scope unknown",
			in:      &security.Authorization{Name: "p", Namespace: "ns", Scope: 3},
			wantErr: "policy ns/p: scope: unknown value 3",
		},
		{
			name:    "action other than allow and deny",
			in:      &security.Authorization{Name: "p", Namespace: "ns", Action: 2},
			wantErr: "policy ns/p: action: unknown value 2 (only ALLOW and DENY are defined)",
		},
		{
			name: "rule structure",
			in: &security.Authorization{
				Name: "p", Namespace: "ns",
				Groups: []*security.Group{
					{Rules: []*security.Rules{
						{Matches: []*security.Match{{DestinationPorts: []uint32{80}}, {DestinationPorts: []uint32{81}}}},
						{Matches: []*security.Match{{NotDestinationPorts: []uint32{82}}}},
					}},
					{}, // a rule with no clauses
				},
			},
			want: &snapshot.Policy{
				Name: "p", Namespace: "ns",
				Rules: []snapshot.Rule{
					{
						{{DestinationPorts: []uint16{80}}, {DestinationPorts: []uint16{81}}},
						{{NotDestinationPorts: []uint16{82}}},
					},
					{},
				},
			},
		},
		{
			name: "string matches",
			in: policy(&security.Match{
				Namespaces: []*security.StringMatch{
					exact("a"),
					{MatchType: &security.StringMatch_Prefix{Prefix: "b"}},
					{MatchType: &security.StringMatch_Suffix{Suffix: "c"}},
					{MatchType: &security.StringMatch_Presence{Presence: &emptypb.Empty{}}},
				},
				NotNamespaces: []*security.StringMatch{exact("d")},
				Principals:    []*security.StringMatch{exact("td/ns/x/sa/y")},
				NotPrincipals: []*security.StringMatch{exact("td/ns/x/sa/z")},
			}),
			want: wantPolicy(snapshot.Match{
				Namespaces: []snapshot.StringMatch{
					{Kind: snapshot.MatchExact, Value: "a"},
					{Kind: snapshot.MatchPrefix, Value: "b"},
					{Kind: snapshot.MatchSuffix, Value: "c"},
					{Kind: snapshot.MatchPresence},
				},
				NotNamespaces: []snapshot.StringMatch{{Kind: snapshot.MatchExact, Value: "d"}},
				Principals:    []snapshot.StringMatch{{Kind: snapshot.MatchExact, Value: "td/ns/x/sa/y"}},
				NotPrincipals: []snapshot.StringMatch{{Kind: snapshot.MatchExact, Value: "td/ns/x/sa/z"}},
			}),
		},
		{
			name:    "string match without type",
			in:      policy(&security.Match{Principals: []*security.StringMatch{exact("a"), {}}}),
			wantErr: "policy ns/p: groups[0].rules[0].matches[0].principals[1]: no match type",
		},
		{
			name:    "not string match without type",
			in:      policy(&security.Match{NotNamespaces: []*security.StringMatch{{}}}),
			wantErr: "matches[0].not_namespaces[0]: no match type",
		},
		{
			name: "service accounts",
			in: policy(&security.Match{
				ServiceAccounts:    []*security.ServiceAccountMatch{{Namespace: "a", ServiceAccount: "b"}},
				NotServiceAccounts: []*security.ServiceAccountMatch{{Namespace: "c", ServiceAccount: "d"}},
			}),
			want: wantPolicy(snapshot.Match{
				ServiceAccounts:    []snapshot.ServiceAccountMatch{{Namespace: "a", ServiceAccount: "b"}},
				NotServiceAccounts: []snapshot.ServiceAccountMatch{{Namespace: "c", ServiceAccount: "d"}},
			}),
		},
		{
			name: "ips",
			in: policy(&security.Match{
				SourceIps:         []*security.Address{{Address: []byte{10, 1, 2, 3}, Length: 8}},
				NotSourceIps:      []*security.Address{{Address: ip4, Length: 32}},
				DestinationIps:    []*security.Address{{Address: ip6, Length: 48}},
				NotDestinationIps: []*security.Address{{Address: ip4}}, // length 0 is /0
			}),
			want: wantPolicy(snapshot.Match{
				SourceIPs:         []netip.Prefix{netip.MustParsePrefix("10.0.0.0/8")},
				NotSourceIPs:      []netip.Prefix{netip.MustParsePrefix("10.0.0.1/32")},
				DestinationIPs:    []netip.Prefix{netip.MustParsePrefix("fd00::/48")},
				NotDestinationIPs: []netip.Prefix{netip.MustParsePrefix("0.0.0.0/0")},
			}),
		},
		{
			name:    "source ip bad length",
			in:      policy(&security.Match{SourceIps: []*security.Address{{Address: []byte{1, 2}, Length: 8}}}),
			wantErr: "matches[0].source_ips[0]: 2 bytes is not an IPv4 or IPv6 address",
		},
		{
			name:    "destination ip prefix too long",
			in:      policy(&security.Match{NotDestinationIps: []*security.Address{{Address: ip6, Length: 129}}}),
			wantErr: "matches[0].not_destination_ips[0]: prefix length 129 is longer than the 128 bits",
		},
		{
			name: "ports",
			in:   policy(&security.Match{DestinationPorts: []uint32{80, 443}, NotDestinationPorts: []uint32{0, 65535}}),
			want: wantPolicy(snapshot.Match{DestinationPorts: []uint16{80, 443}, NotDestinationPorts: []uint16{0, 65535}}),
		},
		{
			name:    "port too big",
			in:      policy(&security.Match{NotDestinationPorts: []uint32{65616}}),
			wantErr: "matches[0].not_destination_ports[0]: 65616 is not a port",
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, err := ConvertAuthorization(tc.in)
			checkConverted(t, got, err, tc.wantErr, func() *snapshot.Policy { return tc.want })
		})
	}
	if _, err := ConvertAuthorization(nil); err == nil {
		t.Fatal("nil policy accepted")
	}
}

// TestConvertedApplies checks that what the conversion produces passes the snapshot's own
// checks, so a valid proto is never rejected by Apply.
func TestConvertedApplies(t *testing.T) {
	w, err := ConvertWorkload(&workloadapi.Workload{
		Uid: "c//Pod/ns/a", Name: "a", Namespace: "ns", Addresses: [][]byte{ip4},
		TunnelProtocol: workloadapi.TunnelProtocol_HBONE,
		Services:       map[string]*workloadapi.PortList{"ns/svc.ns.svc.cluster.local": {Ports: []*workloadapi.Port{{ServicePort: 80, TargetPort: 8080}}}},
	})
	if err != nil {
		t.Fatal(err)
	}
	s, err := ConvertService(baseService())
	if err != nil {
		t.Fatal(err)
	}
	p, err := ConvertAuthorization(&security.Authorization{Name: "p", Namespace: "ns", Scope: security.Scope_NAMESPACE})
	if err != nil {
		t.Fatal(err)
	}
	empty, err := snapshot.Build(snapshot.Config{})
	if err != nil {
		t.Fatal(err)
	}
	next, rerrs := empty.Apply(snapshot.Delta{Workloads: []*snapshot.Workload{w}, Services: []*snapshot.Service{s}, Policies: []*snapshot.Policy{p}})
	if len(rerrs) > 0 {
		t.Fatal(rerrs)
	}
	svc := next.ServiceByKey(snapshot.NamespacedHostname{Namespace: "ns", Hostname: "svc.ns.svc.cluster.local"})
	if eps := next.Endpoints(svc); len(eps) != 1 || eps[0].Workload.UID != "c//Pod/ns/a" {
		t.Fatalf("endpoints = %+v", eps)
	}
}
