package identity

import (
	"fmt"
	"net/http"
	"net/netip"
	"strconv"
	"strings"

	"github.com/ztgo/ztgo/control/snapshot"
)

// Ports of the proxy itself that an HBONE request may not target: connecting to them would
// stack HBONE on HBONE or loop through capture (ztunnel's illegal_ports: its inbound, inbound
// plaintext and outbound ports; SOCKS5 too when enabled, which ztgo does not implement).
const (
	portOutbound         = 15001
	portInboundPlaintext = 15006
	portInboundHBONE     = snapshot.DefaultHBONEPort
)

// PortSOCKS5 is ztgo's SOCKS5 entry port (ztunnel's 15080), illegal as a target when the
// SOCKS5 listener is enabled.
const PortSOCKS5 = 15080

// IsProxyPort reports whether port is one of the proxy's own ports, which no captured
// connection may target (ztunnel's illegal_ports: 15001, 15006, 15008, and 15080 when SOCKS5
// is enabled). Such a call would loop through capture or stack tunnels.
func IsProxyPort(port uint16, socks5 bool) bool {
	switch port {
	case portOutbound, portInboundPlaintext, portInboundHBONE:
		return true
	case PortSOCKS5:
		return socks5
	}
	return false
}

// InboundTarget is where an accepted HBONE CONNECT is delivered.
type InboundTarget struct {
	// Workload is the local workload the connection was made to.
	Workload *snapshot.Workload
	// Dst is where to deliver: the local IP and the target port, or the application tunnel's
	// port when the workload has one. (With LOCALHOST_APP_TUNNEL the dialer swaps the IP for
	// loopback; that is the dialer's business.)
	Dst netip.AddrPort
	// Service is the service a hostname authority named; nil for an ip:port authority.
	Service *snapshot.Service
	// TunnelTarget is the destination to write into the PROXY header when the workload has an
	// application tunnel: the authority, with a hostname replaced by a service VIP. Invalid
	// otherwise.
	TunnelTarget netip.AddrPort
}

// Authority is a parsed HBONE :authority: either Addr (ip:port) or Host and Port.
type Authority struct {
	Addr netip.AddrPort
	Host string
	Port uint16
}

// IsAddr reports whether the authority is ip:port.
func (a Authority) IsAddr() bool { return a.Addr.IsValid() }

func (a Authority) String() string {
	if a.IsAddr() {
		return a.Addr.String()
	}
	return a.Host + ":" + strconv.Itoa(int(a.Port))
}

// ParseAuthority reads an HBONE :authority as ztunnel does: ip:port (IPv6 in brackets), else
// host:port. The host must be a URI reg-name (no userinfo, no path) and the port decimal.
func ParseAuthority(s string) (Authority, error) {
	if ap, err := netip.ParseAddrPort(s); err == nil {
		// Zones never name a pod address, and ztunnel's parser rejects names like "fe80::1%eth0".
		if ap.Addr().Zone() != "" {
			return Authority{}, fmt.Errorf("authority %q: %w", s, ErrBadAuthority)
		}
		return Authority{Addr: netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())}, nil
	}
	i := strings.LastIndexByte(s, ':')
	if i <= 0 {
		return Authority{}, fmt.Errorf("authority %q: want host:port: %w", s, ErrBadAuthority)
	}
	host, portStr := s[:i], s[i+1:]
	if !validRegName(host) {
		return Authority{}, fmt.Errorf("authority %q: invalid host: %w", s, ErrBadAuthority)
	}
	port, ok := parsePort(portStr)
	if !ok {
		return Authority{}, fmt.Errorf("authority %q: invalid port: %w", s, ErrBadAuthority)
	}
	return Authority{Host: host, Port: port}, nil
}

// parsePort accepts 1 to 5 decimal digits up to 65535 (leading zeros allowed, as a URI port).
func parsePort(s string) (uint16, bool) {
	if len(s) == 0 || len(s) > 5 {
		return 0, false
	}
	n := 0
	for i := 0; i < len(s); i++ {
		c := s[i]
		if c < '0' || c > '9' {
			return 0, false
		}
		n = n*10 + int(c-'0')
	}
	if n > 65535 {
		return 0, false
	}
	return uint16(n), true
}

// validRegName reports whether host is a URI reg-name (RFC 3986 unreserved, sub-delims and
// percent escapes). Bracketed literals that are not IPs, userinfo and paths are refused.
func validRegName(host string) bool {
	if host == "" {
		return false
	}
	for i := 0; i < len(host); i++ {
		c := host[i]
		switch {
		case 'a' <= c && c <= 'z', 'A' <= c && c <= 'Z', '0' <= c && c <= '9':
		case strings.IndexByte("-._~!$&'()*+,;=", c) >= 0:
		case c == '%':
			if i+2 >= len(host) || !isHex(host[i+1]) || !isHex(host[i+2]) {
				return false
			}
			i += 2
		default:
			return false
		}
	}
	return true
}

func isHex(c byte) bool {
	return '0' <= c && c <= '9' || 'a' <= c && c <= 'f' || 'A' <= c && c <= 'F'
}

// Inbound checks an HBONE CONNECT that arrived on the default network ("") at localIP with the
// given :authority, and says where to deliver it. See InboundOn.
func Inbound(snap *snapshot.Snapshot, localIP netip.Addr, authority string) (InboundTarget, *Reject) {
	return InboundOn(snap, "", localIP, authority)
}

// InboundOn checks an HBONE CONNECT that arrived at localIP on network with the given
// :authority, as ztunnel's build_inbound_request does, and says where to deliver it. A non-nil
// Reject carries the HTTP status to answer with. Authorization is not checked here.
func InboundOn(snap *snapshot.Snapshot, network string, localIP netip.Addr, authority string) (InboundTarget, *Reject) {
	auth, err := ParseAuthority(authority)
	if err != nil {
		return InboundTarget{}, &Reject{Status: http.StatusBadRequest, Reason: err.Error(), Err: ErrBadAuthority}
	}
	localIP = localIP.Unmap()
	var local *snapshot.Workload
	if snap != nil {
		local = snap.WorkloadByAddr(network, localIP)
	}
	if local == nil {
		return InboundTarget{}, reject(http.StatusServiceUnavailable, ErrNoLocalWorkload, "local ip %s", localIP)
	}
	if auth.IsAddr() && auth.Addr.Addr() != localIP && !destinationAllowed(snap, network, localIP, local, auth.Addr.Addr()) {
		return InboundTarget{}, reject(http.StatusBadRequest, ErrIPMismatch, "local ip %s, authority %s", localIP, auth.Addr)
	}

	// Deliver to the local IP; only the port comes from the authority (ztunnel's
	// find_inbound_upstream).
	out := InboundTarget{Workload: local}
	var port uint16
	if auth.IsAddr() {
		port = auth.Addr.Port()
	} else {
		svc := snap.ServiceByHostname(auth.Host, local.Namespace)
		if svc == nil {
			return InboundTarget{}, reject(http.StatusServiceUnavailable, ErrNoHostname, "hostname %s", auth.Host)
		}
		out.Service = svc
		if p, ok := endpointPort(svc, local, auth.Port); ok {
			port = p
		} else if p := svc.Ports[auth.Port]; p != 0 {
			// A numeric target port works without the endpoint's own map.
			port = p
		} else {
			return InboundTarget{}, reject(http.StatusServiceUnavailable, ErrNoPortForService, "service %s port %d", svc.Key(), auth.Port)
		}
	}
	// Checked on the resolved port: a hostname authority can map onto a proxy port.
	switch port {
	case portOutbound, portInboundPlaintext, portInboundHBONE:
		return InboundTarget{}, reject(http.StatusServiceUnavailable, ErrSelfCall, "target port %d", port)
	}
	out.Dst = netip.AddrPortFrom(localIP, port)

	if at := local.ApplicationTunnel; at != nil {
		// A tunnel without its own port keeps the target port.
		if at.Port != 0 {
			out.Dst = netip.AddrPortFrom(localIP, at.Port)
		}
		if auth.IsAddr() {
			out.TunnelTarget = auth.Addr
		} else {
			vip, ok := tunnelVIP(out.Service, network)
			if !ok {
				return InboundTarget{}, reject(http.StatusServiceUnavailable, ErrNoIPForService, "service %s", out.Service.Key())
			}
			out.TunnelTarget = netip.AddrPortFrom(vip, auth.Port)
		}
	}
	return out, nil
}

func reject(status int, err error, format string, args ...any) *Reject {
	return &Reject{Status: status, Reason: fmt.Sprintf("%s: %s", err, fmt.Sprintf(format, args...)), Err: err}
}

// destinationAllowed is the exception part of ztunnel's validate_destination, for an
// authority IP that is not the local IP: a workload with an application tunnel gets the
// target in the PROXY header and decides itself; otherwise this workload must be the waypoint
// of the authority's target (a waypoint "sandwiched" by ztunnel receives traffic addressed to
// the services and workloads it fronts).
func destinationAllowed(snap *snapshot.Snapshot, network string, localIP netip.Addr, local *snapshot.Workload, target netip.Addr) bool {
	if local.ApplicationTunnel != nil {
		return true
	}
	// ztunnel looks the target up with no client namespace: workload first, then service VIP.
	var gw *snapshot.GatewayAddress
	if wl := snap.WorkloadByAddr(network, target); wl != nil {
		gw = wl.Waypoint
	} else if svc := snap.ServiceByVIP(network, target, ""); svc != nil {
		// Only the single waypoint field counts here, not the weighted set, as in ztunnel.
		gw = svc.Waypoint
	}
	if gw == nil {
		return false
	}
	wl, svc := resolveGateway(snap, gw)
	switch {
	case wl != nil:
		return wl.HasAddr(localIP)
	case svc != nil:
		for _, ep := range snap.Endpoints(svc) {
			if ep.Workload == local && includeEndpoint(svc, local) {
				return true
			}
		}
	}
	return false
}

// endpointPort is the local workload's own mapping of svcPort for svc, if it is an endpoint
// the service accepts (ztunnel's endpoint set holds only included endpoints).
func endpointPort(svc *snapshot.Service, local *snapshot.Workload, svcPort uint16) (uint16, bool) {
	if !includeEndpoint(svc, local) {
		return 0, false
	}
	// Compare "namespace/hostname" keys in place instead of building one per request.
	ns, host := svc.Namespace, svc.Hostname
	for key, pm := range local.Services {
		if len(key) == len(ns)+1+len(host) && key[:len(ns)] == ns && key[len(ns)] == '/' && key[len(ns)+1:] == host {
			p, ok := pm[svcPort]
			return p, ok
		}
	}
	return 0, false
}

// tunnelVIP picks the VIP to put in a PROXY header for a hostname authority as ztunnel does:
// a VIP on our network, IPv4 first; ties go to the last one (Rust's max_by_key).
func tunnelVIP(svc *snapshot.Service, network string) (netip.Addr, bool) {
	best, bestKey := netip.Addr{}, -1
	for _, v := range svc.VIPs {
		key := 0
		if v.Network == network {
			key = 1
			if v.Addr.Unmap().Is4() {
				key = 2
			}
		}
		if key >= bestKey {
			best, bestKey = v.Addr.Unmap(), key
		}
	}
	return best, bestKey >= 0
}
