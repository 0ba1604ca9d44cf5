package identity

import (
	"errors"
	"net/http"
	"net/netip"
	"strings"
	"testing"

	"github.com/ztgo/ztgo/control/snapshot"
)

// inboundFixture: server pod default/server at 10.0.2.1 behind service web (VIP 10.96.0.1,
// ports 80->8080, 81->named, 90->15008); waypoint pod ns/wp at 10.0.0.10 fronting service
// "fronted" (VIP 10.96.0.2) and pod default/behind (10.0.2.5); a waypoint service
// ns/waypoint.ns.svc.cluster.local whose only endpoint is wp-dual, fronting service "viasvc"
// (VIP 10.96.0.3).
func inboundFixture(t *testing.T, mutate func(f *fixture)) *snapshot.Snapshot {
	t.Helper()
	f := newFixture()
	f.add(endpointOf(app("server", snapshot.TunnelHBONE, "10.0.2.1", "fd00:2::1"), webKey, snapshot.PortMap{81: 8181}))
	f.addService(web(snapshot.PortMap{80: 8080, 81: 0, 90: 15008}))

	fronted := web(snapshot.PortMap{80: 8080})
	fronted.Name, fronted.Hostname = "fronted", "fronted.default.svc.cluster.local"
	fronted.VIPs = []snapshot.NetworkAddress{{Addr: netip.MustParseAddr("10.96.0.2")}}
	fronted.Waypoint = gwAddr("10.0.0.10", 15008)
	f.addService(fronted)

	behind := app("behind", snapshot.TunnelHBONE, "10.0.2.5")
	behind.Waypoint = gwAddr("10.0.0.10", 15008)
	f.add(behind)

	f.addService(&snapshot.Service{Name: "waypoint", Namespace: "ns", Hostname: "waypoint.ns.svc.cluster.local", Ports: snapshot.PortMap{15008: 15008}})
	endpointOf(f.wpDual, "ns/waypoint.ns.svc.cluster.local", nil)
	viaSvc := web(snapshot.PortMap{80: 8080})
	viaSvc.Name, viaSvc.Hostname = "viasvc", "viasvc.default.svc.cluster.local"
	viaSvc.VIPs = []snapshot.NetworkAddress{{Addr: netip.MustParseAddr("10.96.0.3")}}
	viaSvc.Waypoint = gwHost("ns", "waypoint.ns.svc.cluster.local", 15008)
	f.addService(viaSvc)

	if mutate != nil {
		mutate(f)
	}
	return f.build(t)
}

func TestInbound(t *testing.T) {
	tests := []struct {
		name      string
		mutate    func(f *fixture)
		local     string
		authority string
		// expected outcome: status 0 means accepted
		status   int
		err      error
		dst      string
		svc      string
		tunnel   string
		workload string
	}{
		{name: "authority is the local ip", local: "10.0.2.1", authority: "10.0.2.1:80", dst: "10.0.2.1:80", workload: "server"},
		{name: "v6 authority", local: "fd00:2::1", authority: "[fd00:2::1]:80", dst: "[fd00:2::1]:80", workload: "server"},
		{name: "v4-mapped local ip", local: "::ffff:10.0.2.1", authority: "10.0.2.1:80", dst: "10.0.2.1:80", workload: "server"},
		{name: "v4-mapped authority", local: "10.0.2.1", authority: "[::ffff:10.0.2.1]:80", dst: "10.0.2.1:80", workload: "server"},
		{name: "not an authority", local: "10.0.2.1", authority: "nonsense", status: 400, err: ErrBadAuthority},
		{name: "ip without port", local: "10.0.2.1", authority: "10.0.2.1", status: 400, err: ErrBadAuthority},
		{name: "port out of range", local: "10.0.2.1", authority: "web.default.svc.cluster.local:65536", status: 400, err: ErrBadAuthority},
		{name: "empty", local: "10.0.2.1", authority: "", status: 400, err: ErrBadAuthority},
		{name: "bad authority is checked before the local workload", local: "10.9.9.9", authority: "x", status: 400, err: ErrBadAuthority},
		{name: "unknown local ip", local: "10.9.9.9", authority: "10.9.9.9:80", status: 503, err: ErrNoLocalWorkload},
		{name: "ip mismatch", local: "10.0.2.1", authority: "10.0.2.5:80", status: 400, err: ErrIPMismatch},
		{name: "ip mismatch to a service VIP", local: "10.0.2.1", authority: "10.96.0.1:80", status: 400, err: ErrIPMismatch},
		{
			name: "application tunnel accepts any authority ip",
			mutate: func(f *fixture) {
				workloadIn(f, "server").ApplicationTunnel = &snapshot.ApplicationTunnel{Protocol: snapshot.AppTunnelProxy, Port: 15088}
			},
			local: "10.0.2.1", authority: "192.0.2.7:443", dst: "10.0.2.1:15088", tunnel: "192.0.2.7:443", workload: "server",
		},
		{
			name: "application tunnel without a port keeps the target port",
			mutate: func(f *fixture) {
				workloadIn(f, "server").ApplicationTunnel = &snapshot.ApplicationTunnel{Protocol: snapshot.AppTunnelProxy}
			},
			local: "10.0.2.1", authority: "10.0.2.1:80", dst: "10.0.2.1:80", tunnel: "10.0.2.1:80", workload: "server",
		},
		{name: "sandwich: service fronted by this waypoint", local: "10.0.0.10", authority: "10.96.0.2:80", dst: "10.0.0.10:80", workload: "wp"},
		{name: "sandwich: workload fronted by this waypoint", local: "10.0.0.10", authority: "10.0.2.5:9000", dst: "10.0.0.10:9000", workload: "wp"},
		{name: "sandwich: service whose waypoint service has this endpoint", local: "10.0.0.11", authority: "10.96.0.3:80", dst: "10.0.0.11:80", workload: "wp-dual"},
		{name: "sandwich: another waypoint's service", local: "10.0.0.11", authority: "10.96.0.2:80", status: 400, err: ErrIPMismatch},
		{name: "sandwich: waypoint service without this endpoint", local: "10.0.0.10", authority: "10.96.0.3:80", status: 400, err: ErrIPMismatch},
		{
			name: "sandwich: unhealthy waypoint endpoint is not in the service",
			mutate: func(f *fixture) {
				f.wpDual.Status = snapshot.Unhealthy
			},
			local: "10.0.0.11", authority: "10.96.0.3:80", status: 400, err: ErrIPMismatch,
		},
		{
			name: "sandwich: weighted waypoints do not count",
			mutate: func(f *fixture) {
				s := serviceIn(f, "viasvc")
				s.Waypoint = nil
				s.WeightedWaypoints = []snapshot.WeightedWaypoint{{Destination: *gwHost("ns", "waypoint.ns.svc.cluster.local", 15008), Weight: 1}}
			},
			local: "10.0.0.11", authority: "10.96.0.3:80", status: 400, err: ErrIPMismatch,
		},
		{name: "hostname maps through the service target port", local: "10.0.2.1", authority: "web.default.svc.cluster.local:80", dst: "10.0.2.1:8080", svc: "web", workload: "server"},
		{name: "hostname maps through the endpoint's port", local: "10.0.2.1", authority: "web.default.svc.cluster.local:81", dst: "10.0.2.1:8181", svc: "web", workload: "server"},
		{
			name: "unhealthy endpoint's own port map is ignored",
			mutate: func(f *fixture) {
				workloadIn(f, "server").Status = snapshot.Unhealthy
			},
			local: "10.0.2.1", authority: "web.default.svc.cluster.local:81", status: 503, err: ErrNoPortForService,
		},
		{name: "unknown hostname", local: "10.0.2.1", authority: "nope.default.svc.cluster.local:80", status: 503, err: ErrNoHostname},
		{name: "port the service does not map", local: "10.0.2.1", authority: "web.default.svc.cluster.local:82", status: 503, err: ErrNoPortForService},
		{name: "hostname port mapped onto the HBONE port", local: "10.0.2.1", authority: "web.default.svc.cluster.local:90", status: 503, err: ErrSelfCall},
		{name: "HBONE port", local: "10.0.2.1", authority: "10.0.2.1:15008", status: 503, err: ErrSelfCall},
		{name: "outbound port", local: "10.0.2.1", authority: "10.0.2.1:15001", status: 503, err: ErrSelfCall},
		{name: "inbound plaintext port", local: "10.0.2.1", authority: "10.0.2.1:15006", status: 503, err: ErrSelfCall},
		{name: "other ztunnel ports are allowed", local: "10.0.2.1", authority: "10.0.2.1:15021", dst: "10.0.2.1:15021", workload: "server"},
		{
			name: "hostname prefers the local namespace",
			mutate: func(f *fixture) {
				other := web(snapshot.PortMap{80: 7070})
				other.Namespace = "ns"
				other.VIPs = nil
				f.addService(other)
				endpointOf(f.wp, "ns/web.default.svc.cluster.local", nil)
			},
			local: "10.0.0.10", authority: "web.default.svc.cluster.local:80", dst: "10.0.0.10:7070", svc: "web", workload: "wp",
		},
		{
			name: "hostname with application tunnel uses a same-network v4 VIP",
			mutate: func(f *fixture) {
				workloadIn(f, "server").ApplicationTunnel = &snapshot.ApplicationTunnel{Protocol: snapshot.AppTunnelProxy, Port: 15088}
				s := serviceIn(f, "web")
				s.VIPs = []snapshot.NetworkAddress{
					{Addr: netip.MustParseAddr("fd00:96::1")},
					{Addr: netip.MustParseAddr("10.96.0.1")},
					{Network: "net2", Addr: netip.MustParseAddr("10.200.0.1")},
				}
			},
			local: "10.0.2.1", authority: "web.default.svc.cluster.local:80", dst: "10.0.2.1:15088", svc: "web", tunnel: "10.96.0.1:80", workload: "server",
		},
		{
			name: "hostname with application tunnel and no VIP",
			mutate: func(f *fixture) {
				workloadIn(f, "server").ApplicationTunnel = &snapshot.ApplicationTunnel{Protocol: snapshot.AppTunnelProxy, Port: 15088}
				serviceIn(f, "web").VIPs = nil
			},
			local: "10.0.2.1", authority: "web.default.svc.cluster.local:80", status: 503, err: ErrNoIPForService,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			snap := inboundFixture(t, tt.mutate)
			got, rej := Inbound(snap, netip.MustParseAddr(tt.local), tt.authority)
			if tt.status != 0 {
				if rej == nil {
					t.Fatalf("accepted (%+v), want status %d", got, tt.status)
				}
				if rej.Status != tt.status || !errors.Is(rej, tt.err) {
					t.Fatalf("reject = %d %v, want %d %v", rej.Status, rej, tt.status, tt.err)
				}
				return
			}
			if rej != nil {
				t.Fatalf("rejected: %d %v", rej.Status, rej)
			}
			if got.Dst.String() != tt.dst {
				t.Errorf("dst = %v, want %v", got.Dst, tt.dst)
			}
			if n := workloadName(got.Workload); n != tt.workload {
				t.Errorf("workload = %q, want %q", n, tt.workload)
			}
			var svc string
			if got.Service != nil {
				svc = got.Service.Name
			}
			if svc != tt.svc {
				t.Errorf("service = %q, want %q", svc, tt.svc)
			}
			if a := addrPortString(got.TunnelTarget); a != tt.tunnel {
				t.Errorf("tunnel target = %q, want %q", a, tt.tunnel)
			}
		})
	}
}

func TestInboundOnNetwork(t *testing.T) {
	f := newFixture()
	w := app("server", snapshot.TunnelHBONE, "10.0.2.1")
	w.Network = "net1"
	f.add(w)
	snap := f.build(t)
	if _, rej := Inbound(snap, netip.MustParseAddr("10.0.2.1"), "10.0.2.1:80"); rej == nil || rej.Status != http.StatusServiceUnavailable {
		t.Errorf("default network: got %v, want 503", rej)
	}
	got, rej := InboundOn(snap, "net1", netip.MustParseAddr("10.0.2.1"), "10.0.2.1:80")
	if rej != nil || got.Workload.Name != "server" {
		t.Errorf("net1: got %+v, %v", got, rej)
	}
}

func TestInboundNilSnapshot(t *testing.T) {
	if _, rej := Inbound(nil, netip.MustParseAddr("10.0.2.1"), "10.0.2.1:80"); rej == nil || !errors.Is(rej, ErrNoLocalWorkload) {
		t.Errorf("got %v, want ErrNoLocalWorkload", rej)
	}
}

func TestParseAuthority(t *testing.T) {
	tests := []struct {
		in      string
		addr    string
		host    string
		port    uint16
		wantErr bool
	}{
		{in: "10.0.0.1:80", addr: "10.0.0.1:80"},
		{in: "[fd00::1]:443", addr: "[fd00::1]:443"},
		{in: "[::ffff:10.0.0.1]:80", addr: "10.0.0.1:80"},
		{in: "10.0.0.1:0", addr: "10.0.0.1:0"},
		{in: "web.default.svc.cluster.local:80", host: "web.default.svc.cluster.local", port: 80},
		{in: "web:080", host: "web", port: 80},
		{in: "web:65535", host: "web", port: 65535},
		{in: "a%2Db:1", host: "a%2Db", port: 1},
		{in: "web", wantErr: true},
		{in: "web:", wantErr: true},
		{in: ":80", wantErr: true},
		{in: "web:65536", wantErr: true},
		{in: "web:+80", wantErr: true},
		{in: "web:123456", wantErr: true},
		{in: "web:8o", wantErr: true},
		{in: "user@web:80", wantErr: true},
		{in: "web/path:80", wantErr: true},
		{in: "::1:80", wantErr: true},
		{in: "[fe80::1%eth0]:80", wantErr: true},
		{in: "[web]:80", wantErr: true},
		{in: "a%2:1", wantErr: true},
		{in: "10.0.0.1", wantErr: true},
		{in: "", wantErr: true},
	}
	for _, tt := range tests {
		got, err := ParseAuthority(tt.in)
		if tt.wantErr {
			if err == nil {
				t.Errorf("ParseAuthority(%q) = %+v, want error", tt.in, got)
			} else if !errors.Is(err, ErrBadAuthority) {
				t.Errorf("ParseAuthority(%q) error %v is not ErrBadAuthority", tt.in, err)
			}
			continue
		}
		if err != nil {
			t.Errorf("ParseAuthority(%q): %v", tt.in, err)
			continue
		}
		if a := addrPortString(got.Addr); a != tt.addr || got.Host != tt.host || got.Port != tt.port {
			t.Errorf("ParseAuthority(%q) = %+v, want addr %q host %q port %d", tt.in, got, tt.addr, tt.host, tt.port)
		}
	}
}

func FuzzParseAuthority(f *testing.F) {
	for _, s := range []string{
		"10.0.0.1:80", "[fd00::1]:443", "web.default.svc.cluster.local:80", "web:080", "a%2Db:1",
		"[fe80::1%eth0]:80", "::1:80", "web", ":80", "user@web:80", "[::ffff:1.2.3.4]:1",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		a, err := ParseAuthority(s)
		if err != nil {
			if !errors.Is(err, ErrBadAuthority) {
				t.Fatalf("ParseAuthority(%q) error %v is not ErrBadAuthority", s, err)
			}
			return
		}
		if a.IsAddr() == (a.Host != "") {
			t.Fatalf("ParseAuthority(%q) = %+v: want exactly one of addr and host", s, a)
		}
		if a.IsAddr() {
			if a.Addr.Addr().Is4In6() || a.Addr.Addr().Zone() != "" {
				t.Fatalf("ParseAuthority(%q) = %v: mapped or zoned address", s, a.Addr)
			}
		} else if strings.ContainsAny(a.Host, ":/@[]") {
			t.Fatalf("ParseAuthority(%q) host %q has a delimiter", s, a.Host)
		}
		// The canonical form parses back to the same authority.
		b, err := ParseAuthority(a.String())
		if err != nil || b != a {
			t.Fatalf("ParseAuthority(%q) = %+v; reparse of %q = %+v, %v", s, a, a.String(), b, err)
		}
	})
}

func workloadIn(f *fixture, name string) *snapshot.Workload {
	for _, w := range f.workloads {
		if w.Name == name {
			return w
		}
	}
	panic("no workload " + name)
}

func serviceIn(f *fixture, name string) *snapshot.Service {
	for _, s := range f.services {
		if s.Name == name {
			return s
		}
	}
	panic("no service " + name)
}
