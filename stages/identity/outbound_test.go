package identity

import (
	"errors"
	"math/rand/v2"
	"net/netip"
	"slices"
	"testing"

	"github.com/ztgo/ztgo/control/snapshot"
)

const (
	appID      = "spiffe://cluster.local/ns/default/sa/default"
	waypointID = "spiffe://cluster.local/ns/ns/sa/waypoint-sa"
	webSAN     = "spiffe://cluster.local/ns/default/sa/web"
)

// want describes an expected Route by names, so cases stay readable.
type want struct {
	kind      Kind
	dial      string
	authority string // "" for the zero value
	sans      []string
	dstWL     string
	dstSvc    string
	waypoint  string
	err       error
}

func TestOutbound(t *testing.T) {
	tests := []struct {
		name  string
		setup func(f *fixture)
		after func(f *fixture) // runs after the snapshot is built
		from  string           // source workload name; "src" when empty
		dst   string
		want  want
	}{
		{
			name: "unknown destination passes through",
			dst:  "192.0.2.1:80",
			want: want{kind: Passthrough, dial: "192.0.2.1:80"},
		},
		{
			name: "v4-mapped destination is unmapped",
			dst:  "[::ffff:192.0.2.1]:80",
			want: want{kind: Passthrough, dial: "192.0.2.1:80"},
		},
		{
			name:  "TCP workload is dialled directly",
			setup: func(f *fixture) { f.add(app("app", snapshot.TunnelNone, "10.0.1.2")) },
			dst:   "10.0.1.2:80",
			want:  want{kind: Direct, dial: "10.0.1.2:80", dstWL: "app"},
		},
		{
			name:  "HBONE workload goes to its node on 15008",
			setup: func(f *fixture) { f.add(app("app", snapshot.TunnelHBONE, "10.0.1.2")) },
			dst:   "10.0.1.2:80",
			want:  want{kind: HBONE, dial: "10.0.1.2:15008", authority: "10.0.1.2:80", sans: []string{appID}, dstWL: "app"},
		},
		{
			name: "host-network workload is not addressable by IP",
			setup: func(f *fixture) {
				w := app("app", snapshot.TunnelHBONE, "10.0.1.2")
				w.NetworkMode = snapshot.NetworkHost
				f.add(w)
			},
			dst:  "10.0.1.2:80",
			want: want{kind: Passthrough, dial: "10.0.1.2:80"},
		},
		{
			name:  "dual-stack workload keeps the original IP",
			setup: func(f *fixture) { f.add(app("app", snapshot.TunnelHBONE, "10.0.1.2", "fd00:1::2")) },
			dst:   "[fd00:1::2]:80",
			want:  want{kind: HBONE, dial: "[fd00:1::2]:15008", authority: "[fd00:1::2]:80", sans: []string{appID}, dstWL: "app"},
		},
		{
			name: "workload waypoint",
			setup: func(f *fixture) {
				w := app("app", snapshot.TunnelHBONE, "10.0.1.2")
				w.Waypoint = gwAddr("10.0.0.10", 15008)
				f.add(w)
			},
			dst:  "10.0.1.2:80",
			want: want{kind: Waypoint, dial: "10.0.0.10:15008", authority: "10.0.1.2:80", sans: []string{waypointID}, dstWL: "app", waypoint: "wp"},
		},
		{
			name: "waypoint by IP is dialled on that IP whatever the request family",
			setup: func(f *fixture) {
				w := app("app", snapshot.TunnelHBONE, "10.0.1.2", "fd00:1::2")
				w.Waypoint = gwAddr("10.0.0.11", 15008)
				f.add(w)
			},
			dst:  "[fd00:1::2]:80",
			want: want{kind: Waypoint, dial: "10.0.0.11:15008", authority: "[fd00:1::2]:80", sans: []string{waypointID}, dstWL: "app", waypoint: "wp-dual"},
		},
		{
			name: "waypoint hbone port 0 means 15008",
			setup: func(f *fixture) {
				w := app("app", snapshot.TunnelHBONE, "10.0.1.2")
				w.Waypoint = gwAddr("10.0.0.10", 0)
				f.add(w)
			},
			dst:  "10.0.1.2:80",
			want: want{kind: Waypoint, dial: "10.0.0.10:15008", authority: "10.0.1.2:80", sans: []string{waypointID}, dstWL: "app", waypoint: "wp"},
		},
		{
			name: "waypoint custom hbone port",
			setup: func(f *fixture) {
				w := app("app", snapshot.TunnelHBONE, "10.0.1.2")
				w.Waypoint = gwAddr("10.0.0.10", 15009)
				f.add(w)
			},
			dst:  "10.0.1.2:80",
			want: want{kind: Waypoint, dial: "10.0.0.10:15009", authority: "10.0.1.2:80", sans: []string{waypointID}, dstWL: "app", waypoint: "wp"},
		},
		{
			name: "traffic from the waypoint does not traverse it again",
			setup: func(f *fixture) {
				w := app("app", snapshot.TunnelHBONE, "10.0.1.2")
				w.Waypoint = gwAddr("10.0.0.10", 15008)
				f.add(w)
			},
			from: "wp",
			dst:  "10.0.1.2:80",
			want: want{kind: HBONE, dial: "10.0.1.2:15008", authority: "10.0.1.2:80", sans: []string{appID}, dstWL: "app"},
		},
		{
			name: "same identity at another address is not the waypoint",
			setup: func(f *fixture) {
				w := app("app", snapshot.TunnelHBONE, "10.0.1.2")
				w.Waypoint = gwAddr("10.0.0.10", 15008)
				f.add(w)
			},
			from: "wp-dual",
			dst:  "10.0.1.2:80",
			want: want{kind: Waypoint, dial: "10.0.0.10:15008", authority: "10.0.1.2:80", sans: []string{waypointID}, dstWL: "app", waypoint: "wp"},
		},
		{
			name: "the source's own waypoint is not used",
			setup: func(f *fixture) {
				c := app("client", snapshot.TunnelHBONE, "10.0.1.9")
				c.Waypoint = gwAddr("10.0.0.10", 15008)
				f.add(c, app("app", snapshot.TunnelNone, "10.0.1.2"))
			},
			from: "client",
			dst:  "10.0.1.2:80",
			want: want{kind: Direct, dial: "10.0.1.2:80", dstWL: "app"},
		},
		{
			name: "workload waypoint by waypoint service hostname",
			setup: func(f *fixture) {
				w := app("app", snapshot.TunnelHBONE, "10.0.1.2")
				w.Waypoint = gwHost("ns", "waypoint.ns.svc.cluster.local", 15008)
				f.add(w)
				f.addService(&snapshot.Service{Name: "waypoint", Namespace: "ns", Hostname: "waypoint.ns.svc.cluster.local", Ports: snapshot.PortMap{15008: 15008}})
				endpointOf(f.wp, "ns/waypoint.ns.svc.cluster.local", nil)
			},
			dst:  "10.0.1.2:80",
			want: want{kind: Waypoint, dial: "10.0.0.10:15008", authority: "10.0.1.2:80", sans: []string{waypointID}, dstWL: "app", waypoint: "wp"},
		},
		{
			name: "traffic from an endpoint of the waypoint service does not traverse it again",
			setup: func(f *fixture) {
				w := app("app", snapshot.TunnelHBONE, "10.0.1.2")
				w.Waypoint = gwHost("ns", "waypoint.ns.svc.cluster.local", 15008)
				f.add(w)
				f.addService(&snapshot.Service{Name: "waypoint", Namespace: "ns", Hostname: "waypoint.ns.svc.cluster.local", Ports: snapshot.PortMap{15008: 15008}})
				endpointOf(f.wp, "ns/waypoint.ns.svc.cluster.local", nil)
			},
			from: "wp",
			dst:  "10.0.1.2:80",
			want: want{kind: HBONE, dial: "10.0.1.2:15008", authority: "10.0.1.2:80", sans: []string{appID}, dstWL: "app"},
		},
		{
			name: "unresolvable workload waypoint",
			setup: func(f *fixture) {
				w := app("app", snapshot.TunnelHBONE, "10.0.1.2")
				w.Waypoint = gwAddr("10.9.9.9", 15008)
				f.add(w)
			},
			dst:  "10.0.1.2:80",
			want: want{err: ErrUnknownWaypoint},
		},
		{
			name: "service waypoint keeps the VIP as authority",
			setup: func(f *fixture) {
				s := web(snapshot.PortMap{80: 8080})
				s.Waypoint = gwAddr("10.0.0.10", 15008)
				f.addService(s)
			},
			dst:  "10.96.0.1:80",
			want: want{kind: Waypoint, dial: "10.0.0.10:15008", authority: "10.96.0.1:80", sans: []string{waypointID}, dstSvc: "web", waypoint: "wp"},
		},
		{
			name: "service waypoint wins over PASSTHROUGH",
			setup: func(f *fixture) {
				s := web(snapshot.PortMap{80: 80})
				s.Waypoint = gwAddr("10.0.0.10", 15008)
				s.LoadBalancing = &snapshot.LoadBalancing{Mode: snapshot.LBModePassthrough}
				f.addService(s)
			},
			dst:  "10.96.0.1:80",
			want: want{kind: Waypoint, dial: "10.0.0.10:15008", authority: "10.96.0.1:80", sans: []string{waypointID}, dstSvc: "web", waypoint: "wp"},
		},
		{
			name: "weighted waypoint with weight zero is never picked",
			setup: func(f *fixture) {
				s := web(snapshot.PortMap{80: 8080})
				s.Waypoint = gwAddr("10.0.0.11", 15008)
				s.WeightedWaypoints = []snapshot.WeightedWaypoint{
					{Destination: *gwAddr("10.0.0.11", 15008), Weight: 0},
					{Destination: *gwAddr("10.0.0.10", 15008), Weight: 5},
				}
				f.addService(s)
			},
			dst:  "10.96.0.1:80",
			want: want{kind: Waypoint, dial: "10.0.0.10:15008", authority: "10.96.0.1:80", sans: []string{waypointID}, dstSvc: "web", waypoint: "wp"},
		},
		{
			name: "all-zero weighted waypoints fall back to the waypoint",
			setup: func(f *fixture) {
				s := web(snapshot.PortMap{80: 8080})
				s.Waypoint = gwAddr("10.0.0.11", 15008)
				s.WeightedWaypoints = []snapshot.WeightedWaypoint{{Destination: *gwAddr("10.0.0.10", 15008)}}
				f.addService(s)
			},
			dst:  "10.96.0.1:80",
			want: want{kind: Waypoint, dial: "10.0.0.11:15008", authority: "10.96.0.1:80", sans: []string{waypointID}, dstSvc: "web", waypoint: "wp-dual"},
		},
		{
			name: "service waypoint by hostname load balances the waypoint service",
			setup: func(f *fixture) {
				s := web(snapshot.PortMap{80: 8080})
				s.Waypoint = gwHost("ns", "waypoint.ns.svc.cluster.local", 15008)
				f.addService(s, &snapshot.Service{
					Name: "waypoint", Namespace: "ns", Hostname: "waypoint.ns.svc.cluster.local",
					Ports:           snapshot.PortMap{15008: 15008},
					SubjectAltNames: []string{"spiffe://cluster.local/ns/ns/sa/waypoint-svc"},
				})
				endpointOf(f.wp, "ns/waypoint.ns.svc.cluster.local", nil)
			},
			dst: "10.96.0.1:80",
			want: want{kind: Waypoint, dial: "10.0.0.10:15008", authority: "10.96.0.1:80",
				sans: []string{"spiffe://cluster.local/ns/ns/sa/waypoint-svc", waypointID}, dstSvc: "web", waypoint: "wp"},
		},
		{
			name: "waypoint service must declare the hbone port",
			setup: func(f *fixture) {
				s := web(snapshot.PortMap{80: 8080})
				s.Waypoint = gwHost("ns", "waypoint.ns.svc.cluster.local", 15008)
				f.addService(s, &snapshot.Service{Name: "waypoint", Namespace: "ns", Hostname: "waypoint.ns.svc.cluster.local"})
				endpointOf(f.wp, "ns/waypoint.ns.svc.cluster.local", nil)
			},
			dst:  "10.96.0.1:80",
			want: want{err: ErrUnknownWaypoint},
		},
		{
			name: "waypoint with an application tunnel needs no declared port",
			setup: func(f *fixture) {
				s := web(snapshot.PortMap{80: 8080})
				s.Waypoint = gwHost("ns", "waypoint.ns.svc.cluster.local", 15008)
				f.addService(s, &snapshot.Service{Name: "waypoint", Namespace: "ns", Hostname: "waypoint.ns.svc.cluster.local"})
				endpointOf(f.wp, "ns/waypoint.ns.svc.cluster.local", nil)
				f.wp.ApplicationTunnel = &snapshot.ApplicationTunnel{Protocol: snapshot.AppTunnelProxy, Port: 15088}
			},
			dst:  "10.96.0.1:80",
			want: want{kind: Waypoint, dial: "10.0.0.10:15008", authority: "10.96.0.1:80", sans: []string{waypointID}, dstSvc: "web", waypoint: "wp"},
		},
		{
			name: "waypoint hostname naming a workload",
			setup: func(f *fixture) {
				f.wpDual.Hostname = "wp.example"
				w := app("app", snapshot.TunnelHBONE, "10.0.1.2", "fd00:1::2")
				w.Waypoint = gwHost("ns", "wp.example", 15008)
				f.add(w)
			},
			dst:  "[fd00:1::2]:80",
			want: want{kind: Waypoint, dial: "[fd00::11]:15008", authority: "[fd00:1::2]:80", sans: []string{waypointID}, dstWL: "app", waypoint: "wp-dual"},
		},
		{
			name: "unknown waypoint hostname",
			setup: func(f *fixture) {
				s := web(snapshot.PortMap{80: 8080})
				s.Waypoint = gwHost("ns", "missing", 15008)
				f.addService(s)
			},
			dst:  "10.96.0.1:80",
			want: want{err: ErrUnknownWaypoint},
		},
		{
			name: "service waypoint on another network",
			setup: func(f *fixture) {
				remote := app("remote-wp", snapshot.TunnelHBONE, "10.0.0.50")
				remote.Network = "net2"
				f.add(remote)
				s := web(snapshot.PortMap{80: 8080})
				s.Waypoint = &snapshot.GatewayAddress{Address: &snapshot.NetworkAddress{Network: "net2", Addr: netip.MustParseAddr("10.0.0.50")}, HBONEPort: 15008}
				f.addService(s)
			},
			dst:  "10.96.0.1:80",
			want: want{err: ErrCrossNetwork},
		},
		{
			name: "service to HBONE endpoint maps the target port and carries service SANs",
			setup: func(f *fixture) {
				s := web(snapshot.PortMap{80: 8080})
				s.SubjectAltNames = []string{webSAN, "not-a-spiffe-id"}
				f.addService(s)
				f.add(endpointOf(app("app", snapshot.TunnelHBONE, "10.0.1.2"), webKey, nil))
			},
			dst: "10.96.0.1:80",
			want: want{kind: HBONE, dial: "10.0.1.2:15008", authority: "10.0.1.2:8080",
				sans: []string{webSAN, appID}, dstWL: "app", dstSvc: "web"},
		},
		{
			name: "endpoint port map wins over the service target port",
			setup: func(f *fixture) {
				f.addService(web(snapshot.PortMap{80: 8080}))
				f.add(endpointOf(app("app", snapshot.TunnelNone, "10.0.1.2"), webKey, snapshot.PortMap{80: 9090}))
			},
			dst:  "10.96.0.1:80",
			want: want{kind: Direct, dial: "10.0.1.2:9090", dstWL: "app", dstSvc: "web"},
		},
		{
			name: "named target port picks only endpoints that map it",
			setup: func(f *fixture) {
				f.addService(web(snapshot.PortMap{80: 0, 8080: 0}))
				f.add(
					endpointOf(app("matching", snapshot.TunnelNone, "10.0.1.2"), webKey, snapshot.PortMap{80: 1234}),
					endpointOf(app("unmatching", snapshot.TunnelNone, "10.0.1.4"), webKey, snapshot.PortMap{8080: 9999}),
				)
			},
			dst:  "10.96.0.1:80",
			want: want{kind: Direct, dial: "10.0.1.2:1234", dstWL: "matching", dstSvc: "web"},
		},
		{
			name: "named target port that no endpoint maps",
			setup: func(f *fixture) {
				f.addService(web(snapshot.PortMap{80: 0}))
				f.add(endpointOf(app("app", snapshot.TunnelNone, "10.0.1.2"), webKey, nil))
			},
			dst:  "10.96.0.1:80",
			want: want{err: ErrNoHealthyUpstream},
		},
		{
			name: "port the service does not declare",
			setup: func(f *fixture) {
				f.addService(web(snapshot.PortMap{80: 8080}))
				f.add(endpointOf(app("app", snapshot.TunnelNone, "10.0.1.2"), webKey, snapshot.PortMap{81: 8181}))
			},
			dst:  "10.96.0.1:81",
			want: want{err: ErrNoHealthyUpstream},
		},
		{
			name:  "service without endpoints",
			setup: func(f *fixture) { f.addService(web(snapshot.PortMap{80: 8080})) },
			dst:   "10.96.0.1:80",
			want:  want{err: ErrNoHealthyUpstream},
		},
		{
			name: "PASSTHROUGH service keeps the original destination",
			setup: func(f *fixture) {
				s := web(snapshot.PortMap{80: 80})
				s.LoadBalancing = &snapshot.LoadBalancing{Mode: snapshot.LBModePassthrough}
				f.addService(s)
				f.add(endpointOf(app("app", snapshot.TunnelHBONE, "10.0.1.2"), webKey, nil))
			},
			dst:  "10.96.0.1:80",
			want: want{kind: Passthrough, dial: "10.96.0.1:80"},
		},
		{
			name: "unhealthy endpoint is skipped",
			setup: func(f *fixture) {
				f.addService(web(snapshot.PortMap{80: 8080}))
				w := endpointOf(app("app", snapshot.TunnelNone, "10.0.1.2"), webKey, nil)
				w.Status = snapshot.Unhealthy
				f.add(w)
			},
			dst:  "10.96.0.1:80",
			want: want{err: ErrNoHealthyUpstream},
		},
		{
			name: "unhealthy endpoint is used under AllowAll",
			setup: func(f *fixture) {
				s := web(snapshot.PortMap{80: 8080})
				s.LoadBalancing = &snapshot.LoadBalancing{HealthPolicy: snapshot.AllowAll}
				f.addService(s)
				w := endpointOf(app("app", snapshot.TunnelNone, "10.0.1.2"), webKey, nil)
				w.Status = snapshot.Unhealthy
				f.add(w)
			},
			dst:  "10.96.0.1:80",
			want: want{kind: Direct, dial: "10.0.1.2:8080", dstWL: "app", dstSvc: "web"},
		},
		{
			name: "v4 VIP prefers the endpoint's v4 address",
			setup: func(f *fixture) {
				f.addService(web(snapshot.PortMap{80: 8080}))
				f.add(endpointOf(app("app", snapshot.TunnelNone, "fd00:1::2", "10.0.1.2"), webKey, nil))
			},
			dst:  "10.96.0.1:80",
			want: want{kind: Direct, dial: "10.0.1.2:8080", dstWL: "app", dstSvc: "web"},
		},
		{
			name: "service IP family restriction beats the request family",
			setup: func(f *fixture) {
				s := web(snapshot.PortMap{80: 8080})
				s.IPFamilies = snapshot.IPv6Only
				f.addService(s)
				f.add(endpointOf(app("app", snapshot.TunnelNone, "10.0.1.2", "fd00:1::2"), webKey, nil))
			},
			dst:  "10.96.0.1:80",
			want: want{kind: Direct, dial: "[fd00:1::2]:8080", dstWL: "app", dstSvc: "web"},
		},
		{
			name: "namespace-visible service is hidden from other namespaces",
			setup: func(f *fixture) {
				s := web(snapshot.PortMap{80: 8080})
				s.Visibility = snapshot.VisibilityNamespace
				f.addService(s)
				f.add(endpointOf(app("app", snapshot.TunnelNone, "10.0.1.2"), webKey, nil))
			},
			dst:  "10.96.0.1:80",
			want: want{kind: Passthrough, dial: "10.96.0.1:80"},
		},
		{
			name: "CIDR VIP",
			setup: func(f *fixture) {
				s := web(snapshot.PortMap{80: 8080})
				s.VIPs = nil
				s.CIDRVIPs = []snapshot.NetworkPrefix{{Prefix: netip.MustParsePrefix("10.97.0.0/16")}}
				f.addService(s)
				f.add(endpointOf(app("app", snapshot.TunnelNone, "10.0.1.2"), webKey, nil))
			},
			dst:  "10.97.3.4:80",
			want: want{kind: Direct, dial: "10.0.1.2:8080", dstWL: "app", dstSvc: "web"},
		},
		{
			name: "service-addressed traffic ignores the endpoint's workload waypoint",
			setup: func(f *fixture) {
				f.addService(web(snapshot.PortMap{80: 8080}))
				w := endpointOf(app("app", snapshot.TunnelHBONE, "10.0.1.2"), webKey, nil)
				w.Waypoint = gwAddr("10.0.0.10", 15008)
				f.add(w)
			},
			dst:  "10.96.0.1:80",
			want: want{kind: HBONE, dial: "10.0.1.2:15008", authority: "10.0.1.2:8080", sans: []string{appID}, dstWL: "app", dstSvc: "web"},
		},
		{
			name: "endpoint on another network needs double HBONE",
			setup: func(f *fixture) {
				f.addService(web(snapshot.PortMap{80: 8080}))
				w := endpointOf(app("remote", snapshot.TunnelHBONE, "10.1.0.2"), webKey, nil)
				w.Network = "net2"
				w.NetworkGateway = gwAddr("192.0.2.100", 15008)
				f.add(w)
			},
			dst:  "10.96.0.1:80",
			want: want{err: ErrCrossNetwork},
		},
		{
			name: "address-less endpoint behind a network gateway needs double HBONE",
			setup: func(f *fixture) {
				f.addService(web(snapshot.PortMap{80: 8080}))
				w := endpointOf(&snapshot.Workload{Name: "remote", Namespace: "default", Hostname: "placeholder"}, webKey, nil)
				w.Network = "net2"
				w.NetworkGateway = gwAddr("192.0.2.100", 15008)
				f.add(w)
			},
			// Build needs an address or a hostname; clear it afterwards to model a workload
			// that only its network gateway can reach.
			after: func(f *fixture) { f.workloads[len(f.workloads)-1].Hostname = "" },
			dst:   "10.96.0.1:80",
			want:  want{err: ErrCrossNetwork},
		},
		{
			name: "hostname-only endpoint needs DNS",
			setup: func(f *fixture) {
				f.addService(web(snapshot.PortMap{80: 8080}))
				f.add(endpointOf(&snapshot.Workload{Name: "ext", Namespace: "default", Hostname: "ext.example.com"}, webKey, nil))
			},
			dst:  "10.96.0.1:80",
			want: want{err: ErrNeedsDNS},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := newFixture()
			if tt.setup != nil {
				tt.setup(f)
			}
			snap := f.build(t)
			if tt.after != nil {
				tt.after(f)
			}
			from := tt.from
			if from == "" {
				from = "src"
			}
			src := workloadNamed(snap, from)
			rnd := rand.New(rand.NewPCG(1, 2))
			// Several draws: a rule that holds only by luck of the sample would show.
			for range 20 {
				got, err := Outbound(snap, src, netip.MustParseAddrPort(tt.dst), rnd)
				checkRoute(t, got, err, tt.want)
			}
		})
	}
}

func checkRoute(t *testing.T, got Route, err error, w want) {
	t.Helper()
	if w.err != nil {
		if !errors.Is(err, w.err) {
			t.Fatalf("err = %v, want %v", err, w.err)
		}
		return
	}
	if err != nil {
		t.Fatalf("unexpected error: %v", err)
	}
	if got.Kind != w.kind {
		t.Errorf("kind = %v, want %v", got.Kind, w.kind)
	}
	if got.Dial.String() != w.dial {
		t.Errorf("dial = %v, want %v", got.Dial, w.dial)
	}
	if a := addrPortString(got.Authority); a != w.authority {
		t.Errorf("authority = %q, want %q", a, w.authority)
	}
	if !slices.Equal(got.ExpectedSANs, w.sans) {
		t.Errorf("sans = %q, want %q", got.ExpectedSANs, w.sans)
	}
	if n := workloadName(got.DstWorkload); n != w.dstWL {
		t.Errorf("dst workload = %q, want %q", n, w.dstWL)
	}
	if n := workloadName(got.Waypoint); n != w.waypoint {
		t.Errorf("waypoint = %q, want %q", n, w.waypoint)
	}
	var svc string
	if got.DstService != nil {
		svc = got.DstService.Name
	}
	if svc != w.dstSvc {
		t.Errorf("dst service = %q, want %q", svc, w.dstSvc)
	}
}

func addrPortString(ap netip.AddrPort) string {
	if !ap.IsValid() {
		return ""
	}
	return ap.String()
}

func workloadName(w *snapshot.Workload) string {
	if w == nil {
		return ""
	}
	return w.Name
}

func TestOutboundNoSource(t *testing.T) {
	snap := newFixture().build(t)
	if _, err := Outbound(snap, nil, netip.MustParseAddrPort("10.0.0.1:80"), nil); !errors.Is(err, ErrNoSourceWorkload) {
		t.Fatalf("err = %v, want ErrNoSourceWorkload", err)
	}
}

func TestOutboundWeightedWaypoints(t *testing.T) {
	f := newFixture()
	s := web(snapshot.PortMap{80: 8080})
	s.WeightedWaypoints = []snapshot.WeightedWaypoint{
		{Destination: *gwAddr("10.0.0.10", 15008), Weight: 90},
		{Destination: *gwAddr("10.0.0.11", 15008), Weight: 10},
	}
	f.addService(s)
	snap := f.build(t)
	src := workloadNamed(snap, "src")
	rnd := rand.New(rand.NewPCG(3, 4))
	const n = 20000
	counts := map[string]int{}
	for range n {
		r, err := Outbound(snap, src, netip.MustParseAddrPort("10.96.0.1:80"), rnd)
		if err != nil {
			t.Fatal(err)
		}
		counts[r.Waypoint.Name]++
	}
	if got := float64(counts["wp-dual"]) / n; got < 0.08 || got > 0.12 {
		t.Errorf("share of the weight-10 waypoint = %.3f, want about 0.10 (counts %v)", got, counts)
	}
}

func TestKindString(t *testing.T) {
	for k, want := range map[Kind]string{Passthrough: "passthrough", Direct: "direct", HBONE: "hbone", Waypoint: "waypoint"} {
		if k.String() != want {
			t.Errorf("%d.String() = %q, want %q", k, k.String(), want)
		}
	}
}
