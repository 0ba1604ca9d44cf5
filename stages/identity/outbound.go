package identity

import (
	"fmt"
	"math/rand/v2"
	"net/netip"

	"github.com/ztgo/ztgo/control/snapshot"
	"github.com/ztgo/ztgo/tls/spiffe"
)

// Outbound decides where a connection from src to the original destination dst goes, as
// ztunnel's build_request does (see the package doc for the rules). rnd drives load balancing
// and weighted waypoint sampling; nil uses the runtime's random source.
//
// The downstream (connection source) IP that ztunnel's check_from_waypoint compares is taken
// to be one of src's addresses, which holds for in-pod capture: the connection comes from the
// pod that owns the listener.
func Outbound(snap *snapshot.Snapshot, src *snapshot.Workload, dst netip.AddrPort, rnd *rand.Rand) (Route, error) {
	if snap == nil || src == nil {
		return Route{}, fmt.Errorf("route %s: %w", dst, ErrNoSourceWorkload)
	}
	// SO_ORIGINAL_DST on a dual-stack socket can report v4 as v4-mapped v6; the snapshot keys
	// are plain v4.
	dst = netip.AddrPortFrom(dst.Addr().Unmap(), dst.Port())
	network := src.Network

	// Service-addressed is decided like ztunnel's fetch_address: a workload owning the IP wins
	// over a service VIP.
	var svc *snapshot.Service
	if snap.WorkloadByAddr(network, dst.Addr()) == nil {
		svc = snap.ServiceByVIP(network, dst.Addr(), src.Namespace)
	}
	if svc != nil {
		if gw := serviceWaypoint(svc, rnd); gw != nil {
			wp, err := fetchWaypoint(snap, gw, src, dst, rnd)
			if err != nil {
				return Route{}, fmt.Errorf("route %s: waypoint of service %s: %w", dst, svc.Key(), err)
			}
			if wp.wl.Network != src.Network {
				return Route{}, fmt.Errorf("route %s: waypoint %s of service %s: %w", dst, wp.wl.UID, svc.Key(), ErrCrossNetwork)
			}
			if !wp.ip.IsValid() {
				return Route{}, fmt.Errorf("route %s: waypoint %s: %w", dst, wp.wl.UID, ErrNoValidDestination)
			}
			return Route{
				Kind:         Waypoint,
				Dial:         netip.AddrPortFrom(wp.ip, wp.port),
				Authority:    dst,
				ExpectedSANs: wp.sans(),
				DstService:   svc,
				Waypoint:     wp.wl,
			}, nil
		}
	}

	p, found := findUpstream(snap, network, src, dst, modeStandard, rnd)
	if !found {
		if svc != nil && (svc.LoadBalancing == nil || svc.LoadBalancing.Mode != snapshot.LBModePassthrough) {
			return Route{}, fmt.Errorf("route %s: service %s: %w", dst, svc.Key(), ErrNoHealthyUpstream)
		}
		// Not in the mesh (or a PASSTHROUGH service): plain TCP to where the app asked.
		return Route{Kind: Passthrough, Dial: dst}, nil
	}
	us, err := finalize(src, dst, p)
	if err != nil {
		return Route{}, fmt.Errorf("route %s: %w", dst, err)
	}
	if us.wl.Network != src.Network {
		return Route{}, fmt.Errorf("route %s: workload %s on network %q: %w", dst, us.wl.UID, us.wl.Network, ErrCrossNetwork)
	}

	// A workload waypoint applies only to traffic addressed to the workload itself (service
	// waypoints were handled above) and must not be traversed twice when the waypoint is
	// the one sending.
	if svc == nil && us.wl.Waypoint != nil && !fromWaypoint(snap, us.wl, src) {
		wp, err := fetchWaypoint(snap, us.wl.Waypoint, src, dst, rnd)
		if err != nil {
			return Route{}, fmt.Errorf("route %s: waypoint of workload %s: %w", dst, us.wl.UID, err)
		}
		// ztunnel does not check the network of a workload waypoint, so neither do we.
		if !wp.ip.IsValid() {
			return Route{}, fmt.Errorf("route %s: waypoint %s: %w", dst, wp.wl.UID, ErrNoValidDestination)
		}
		return Route{
			Kind:         Waypoint,
			Dial:         netip.AddrPortFrom(wp.ip, wp.port),
			Authority:    dst,
			ExpectedSANs: wp.sans(),
			DstWorkload:  us.wl,
			DstService:   us.svc,
			Waypoint:     wp.wl,
		}, nil
	}

	if !us.ip.IsValid() {
		return Route{}, fmt.Errorf("route %s: workload %s: %w", dst, us.wl.UID, ErrNoValidDestination)
	}
	target := netip.AddrPortFrom(us.ip, us.port)
	if us.wl.Protocol == snapshot.TunnelHBONE {
		return Route{
			Kind:         HBONE,
			Dial:         netip.AddrPortFrom(us.ip, snapshot.DefaultHBONEPort),
			Authority:    target,
			ExpectedSANs: us.sans(),
			DstWorkload:  us.wl,
			DstService:   us.svc,
		}, nil
	}
	return Route{Kind: Direct, Dial: target, DstWorkload: us.wl, DstService: us.svc}, nil
}

// parts is an upstream before an IP is chosen: ztunnel's UpstreamParts.
type parts struct {
	wl   *snapshot.Workload
	port uint16
	svc  *snapshot.Service
}

// upstream is a resolved next hop: ztunnel's Upstream. ip is invalid when the workload is
// reachable only through its network gateway.
type upstream struct {
	parts
	ip netip.Addr
}

// sans is ztunnel's workload_and_services_san: the service's SANs that are SPIFFE identities,
// then the workload's identity.
func (u *upstream) sans() []string {
	var n int
	if u.svc != nil {
		n = len(u.svc.SubjectAltNames)
	}
	out := make([]string, 0, n+1)
	if u.svc != nil {
		for _, san := range u.svc.SubjectAltNames {
			// ztunnel drops (and warns about) SANs that do not parse as identities.
			if _, err := spiffe.Parse(san); err == nil {
				out = append(out, san)
			}
		}
	}
	return append(out, u.wl.Identity().String())
}

// findUpstream is ztunnel's find_upstream: a service VIP on network is load balanced, a
// PASSTHROUGH service and an unknown address yield nothing, else the workload owning the IP.
func findUpstream(snap *snapshot.Snapshot, network string, src *snapshot.Workload, addr netip.AddrPort, mode resolveMode, rnd *rand.Rand) (parts, bool) {
	if svc := snap.ServiceByVIP(network, addr.Addr(), src.Namespace); svc != nil {
		if svc.LoadBalancing != nil && svc.LoadBalancing.Mode == snapshot.LBModePassthrough {
			return parts{}, false
		}
		return findUpstreamFromService(snap, src, addr.Port(), mode, svc, rnd)
	}
	if wl := snap.WorkloadByAddr(network, addr.Addr()); wl != nil {
		return parts{wl: wl, port: addr.Port()}, true
	}
	return parts{}, false
}

// findUpstreamFromService is ztunnel's find_upstream_from_service: load balance, then map the
// service port to the endpoint's port (endpoint map, service target port, or the service port
// itself for an application tunnel).
func findUpstreamFromService(snap *snapshot.Snapshot, src *snapshot.Workload, svcPort uint16, mode resolveMode, svc *snapshot.Service, rnd *rand.Rand) (parts, bool) {
	ep, ok := loadBalance(snap, src, svc, svcPort, mode, rnd)
	if !ok {
		return parts{}, false
	}
	var port uint16
	if p, ok := ep.Ports[svcPort]; ok {
		port = p
	} else if p := svc.Ports[svcPort]; p > 0 {
		port = p
	} else if at := ep.Workload.ApplicationTunnel; at != nil && at.Port != 0 {
		port = svcPort
	} else {
		return parts{}, false
	}
	return parts{wl: ep.Workload, port: port, svc: svc}, true
}

// finalize is ztunnel's finalize_upstream: choose the IP to connect to.
func finalize(src *snapshot.Workload, orig netip.AddrPort, p parts) (upstream, error) {
	fam := snapshot.IPFamiliesAutomatic
	if p.svc != nil {
		fam = p.svc.IPFamilies
	}
	ip, err := pickIP(p.wl, orig.Addr(), fam)
	if err != nil {
		return upstream{}, fmt.Errorf("workload %s: %w", p.wl.UID, err)
	}
	return upstream{parts: p, ip: ip}, nil
}

// pickIP is ztunnel's pick_workload_destination_or_resolve without DNS: the original IP if the
// workload owns it, else the first IP the service's families allow, preferring the family of
// the original IP. An invalid IP with a nil error means "only through the network gateway".
func pickIP(wl *snapshot.Workload, orig netip.Addr, fam snapshot.IPFamilies) (netip.Addr, error) {
	for _, a := range wl.Addresses {
		if a.Unmap() == orig {
			return orig, nil
		}
	}
	var first netip.Addr
	for _, a := range wl.Addresses {
		a = a.Unmap()
		if !familyAccepts(fam, a) {
			continue
		}
		if a.Is6() == orig.Is6() {
			return a, nil
		}
		if !first.IsValid() {
			first = a
		}
	}
	if first.IsValid() {
		return first, nil
	}
	if wl.Hostname == "" {
		if wl.NetworkGateway == nil {
			return netip.Addr{}, ErrNoValidDestination
		}
		return netip.Addr{}, nil
	}
	return netip.Addr{}, ErrNeedsDNS
}

func familyAccepts(fam snapshot.IPFamilies, a netip.Addr) bool {
	switch fam {
	case snapshot.IPv4Only:
		return a.Is4()
	case snapshot.IPv6Only:
		return a.Is6()
	default:
		return true
	}
}

// serviceWaypoint is the waypoint of svc for this connection: a member of the weighted set
// sampled by weight, or the single waypoint when the set is empty or all weights are zero.
func serviceWaypoint(svc *snapshot.Service, rnd *rand.Rand) *snapshot.GatewayAddress {
	var total uint64
	for i := range svc.WeightedWaypoints {
		total += uint64(svc.WeightedWaypoints[i].Weight)
	}
	if total == 0 {
		return svc.Waypoint
	}
	x := uint64N(rnd, total)
	for i := range svc.WeightedWaypoints {
		w := uint64(svc.WeightedWaypoints[i].Weight)
		if x < w {
			return &svc.WeightedWaypoints[i].Destination
		}
		x -= w
	}
	return svc.Waypoint // unreachable: x < total
}

// hbonePort is the gateway's HBONE port. ztunnel uses the field as sent; a zero port could
// never be dialled, so ztgo reads it as the standard 15008.
func hbonePort(gw *snapshot.GatewayAddress) uint16 {
	if gw.HBONEPort == 0 {
		return snapshot.DefaultHBONEPort
	}
	return gw.HBONEPort
}

// fetchWaypoint is ztunnel's fetch_waypoint: resolve a waypoint reference to one waypoint
// workload and the address to reach it.
func fetchWaypoint(snap *snapshot.Snapshot, gw *snapshot.GatewayAddress, src *snapshot.Workload, orig netip.AddrPort, rnd *rand.Rand) (upstream, error) {
	port := hbonePort(gw)
	var (
		p      parts
		ok     bool
		target netip.AddrPort
	)
	switch {
	case gw.Address != nil:
		// By IP, that IP is the destination (so a v6 call may reach a v4 waypoint); it may be
		// the waypoint service's VIP, load balanced over the waypoint pods.
		target = netip.AddrPortFrom(gw.Address.Addr.Unmap(), port)
		p, ok = findUpstream(snap, gw.Address.Network, src, target, modeWaypoint, rnd)
	case gw.Hostname != nil:
		// By hostname, the original destination picks the IP family.
		target = orig
		if svc := snap.ServiceByKey(*gw.Hostname); svc != nil {
			p, ok = findUpstreamFromService(snap, src, port, modeWaypoint, svc, rnd)
		} else if wl := workloadByHostname(snap, *gw.Hostname); wl != nil {
			p, ok = parts{wl: wl, port: port}, true
		}
	}
	if !ok {
		return upstream{}, fmt.Errorf("%s: %w", gatewayString(gw), ErrUnknownWaypoint)
	}
	return finalize(src, target, p)
}

// workloadByHostname finds a workload by namespace/hostname (the snapshot indexes it; ztunnel
// scans, "uncommon path").
func workloadByHostname(snap *snapshot.Snapshot, nh snapshot.NamespacedHostname) *snapshot.Workload {
	return snap.WorkloadByHostname(nh)
}

// fromWaypoint is ztunnel's check_from_waypoint: src is (one of the workloads behind) the
// upstream's waypoint, judged by identity and address.
func fromWaypoint(snap *snapshot.Snapshot, us, src *snapshot.Workload) bool {
	srcID := src.Identity()
	return gatewayHas(snap, us.Waypoint, func(w *snapshot.Workload) bool {
		return w.Identity() == srcID && sharesAddr(w, src)
	})
}

// gatewayHas is ztunnel's check_gateway_address: does pred hold for the workload the gateway
// names, or for any endpoint of the service it names. The lookup uses no client namespace in
// ztunnel; ServiceByVIP with "" applies visibility as for a client outside every namespace.
func gatewayHas(snap *snapshot.Snapshot, gw *snapshot.GatewayAddress, pred func(*snapshot.Workload) bool) bool {
	if gw == nil {
		return false
	}
	wl, svc := resolveGateway(snap, gw)
	if wl != nil {
		return pred(wl)
	}
	if svc != nil {
		for _, ep := range snap.Endpoints(svc) {
			if includeEndpoint(svc, ep.Workload) && pred(ep.Workload) {
				return true
			}
		}
	}
	return false
}

// resolveGateway is ztunnel's find_destination for a gateway reference: by IP a workload owning
// it, else a service with that VIP; by hostname the service namespace/hostname, else a workload
// with that hostname.
func resolveGateway(snap *snapshot.Snapshot, gw *snapshot.GatewayAddress) (*snapshot.Workload, *snapshot.Service) {
	switch {
	case gw.Address != nil:
		if wl := snap.WorkloadByAddr(gw.Address.Network, gw.Address.Addr); wl != nil {
			return wl, nil
		}
		return nil, snap.ServiceByVIP(gw.Address.Network, gw.Address.Addr, "")
	case gw.Hostname != nil:
		if svc := snap.ServiceByKey(*gw.Hostname); svc != nil {
			return nil, svc
		}
		return workloadByHostname(snap, *gw.Hostname), nil
	}
	return nil, nil
}

func sharesAddr(a, b *snapshot.Workload) bool {
	for _, x := range a.Addresses {
		for _, y := range b.Addresses {
			if x.Unmap() == y.Unmap() {
				return true
			}
		}
	}
	return false
}

func gatewayString(gw *snapshot.GatewayAddress) string {
	switch {
	case gw.Address != nil:
		return "waypoint " + gw.Address.String()
	case gw.Hostname != nil:
		return "waypoint " + gw.Hostname.String()
	}
	return "waypoint (empty)"
}
