// Package identity is the routing logic of ztgo's identity stage: given a snapshot of the mesh
// it decides where a captured connection goes (outbound) and whether an HBONE CONNECT may be
// delivered to a local workload (inbound). Everything here is a pure function of the snapshot
// and its arguments; the stage actor that wraps it owns the mailbox, the workers and the timing.
//
// # Outbound
//
// Outbound follows ztunnel's build_request (src/proxy/outbound.rs) rule by rule:
//
//  1. If the original destination is a service VIP on the source's network (and no workload owns
//     that IP), and the service has a waypoint (a weighted set sampled by weight, else the single
//     waypoint), the route is HBONE to the waypoint with :authority = the original VIP:port.
//  2. Otherwise the upstream is found: a service VIP is load balanced (see below) and its port
//     mapped (endpoint port map, else the service target port, else the service port when the
//     endpoint has an application tunnel); a PASSTHROUGH service keeps the original
//     destination; otherwise a workload that owns the IP.
//  3. No upstream: a service-addressed connection fails with ErrNoHealthyUpstream unless the
//     service is PASSTHROUGH; anything else is passed through as plain TCP to the original
//     destination.
//  4. A workload-addressed connection to a workload with a waypoint goes to that waypoint,
//     unless the connection comes from that waypoint (ztunnel's check_from_waypoint).
//  5. Otherwise HBONE to the workload's node (workloadIP:15008, :authority workloadIP:port) or
//     plain TCP to workloadIP:port, by the workload's tunnel protocol.
//
// Load balancing follows ztunnel's load_balance (src/state.rs): unhealthy endpoints are dropped
// unless the health policy is AllowAll, endpoints without a usable port are dropped, STRICT and
// FAILOVER keep only the endpoints of the best locality rank, and the pick is weighted random by
// capacity. It allocates nothing: it walks the endpoints twice (sum the weights of the best
// rank, then find the sampled one) instead of collecting candidates.
//
// Not implemented yet, and reported as errors so a flow fails closed rather than going
// somewhere wrong: upstreams on another network (ztunnel's double HBONE through a network
// gateway) return ErrCrossNetwork, and workloads known only by hostname (ztunnel resolves them
// with on-demand DNS) return ErrNeedsDNS.
//
// # Inbound
//
// Inbound follows ztunnel's build_inbound_request, validate_destination and
// find_inbound_upstream (src/proxy/inbound.rs): the :authority must parse, the local workload
// must exist, the authority IP must be the connection's local IP unless the local workload has
// an application tunnel or is the waypoint of the authority's target (the "sandwich"), a
// hostname authority is mapped through its service's ports, and ztunnel's own ports are
// refused. Failures carry the HTTP status ztunnel answers with (400 or 503).
package identity

import (
	"errors"
	"net/netip"

	"github.com/ztgo/ztgo/control/snapshot"
)

// Kind is how a routed connection leaves this node.
type Kind uint8

const (
	// Passthrough is plain TCP to the original destination: the destination is not in the mesh.
	Passthrough Kind = iota
	// Direct is plain TCP to a workload that does not speak HBONE.
	Direct
	// HBONE is mTLS HTTP/2 CONNECT to the destination workload's node (workloadIP:15008).
	HBONE
	// Waypoint is HBONE to a waypoint proxy, which forwards to the real destination.
	Waypoint
)

func (k Kind) String() string {
	switch k {
	case Direct:
		return "direct"
	case HBONE:
		return "hbone"
	case Waypoint:
		return "waypoint"
	default:
		return "passthrough"
	}
}

// Route is where an outbound connection goes. It points into the snapshot it was computed
// from, so it is valid as long as that snapshot is.
type Route struct {
	Kind Kind
	// Dial is the TCP address to connect to: workloadIP:15008 for HBONE, the waypoint's
	// IP:hbone port for Waypoint, workloadIP:targetPort for Direct, the original destination
	// for Passthrough.
	Dial netip.AddrPort
	// Authority is the HBONE :authority: workloadIP:targetPort for HBONE, the original
	// destination for Waypoint. It is the zero value for plain TCP routes.
	Authority netip.AddrPort
	// ExpectedSANs are the SPIFFE identities the peer may present: the service's subject alt
	// names, then the destination (or waypoint) workload's identity. Nil for plain TCP routes.
	ExpectedSANs []string
	// DstWorkload is the destination workload: the load-balanced endpoint or the workload
	// addressed by IP. Nil for Passthrough and for service waypoints (the waypoint picks it).
	DstWorkload *snapshot.Workload
	// DstService is the service the connection was addressed to, if any.
	DstService *snapshot.Service
	// Waypoint is the waypoint workload for Waypoint routes.
	Waypoint *snapshot.Workload
}

// Errors of Outbound. They are returned wrapped with the destination; test with errors.Is.
var (
	// ErrNoSourceWorkload: the connection has no source workload, so it cannot be routed
	// (ztunnel denies it too).
	ErrNoSourceWorkload = errors.New("no source workload")
	// ErrNoHealthyUpstream: the destination is a service with no endpoint that can take the
	// connection (ztunnel's NoHealthyUpstream).
	ErrNoHealthyUpstream = errors.New("no healthy upstream")
	// ErrUnknownWaypoint: the destination names a waypoint the snapshot cannot resolve to a
	// usable workload (ztunnel's UnknownWaypoint).
	ErrUnknownWaypoint = errors.New("unknown waypoint")
	// ErrNoValidDestination: the chosen workload has no address to connect to (ztunnel's
	// NoValidDestination).
	ErrNoValidDestination = errors.New("no valid destination")
	// ErrCrossNetwork: the upstream or its service waypoint is on another network. ztunnel
	// reaches it with double HBONE through the network gateway; ztgo does not implement that
	// yet.
	ErrCrossNetwork = errors.New("upstream on another network: double HBONE through a network gateway is not implemented")
	// ErrNeedsDNS: the chosen workload is known only by hostname. ztunnel resolves it with
	// on-demand DNS; ztgo does not implement that yet.
	ErrNeedsDNS = errors.New("workload has only a hostname: on-demand DNS is not implemented")
)

// Errors carried by an inbound Reject; test with errors.Is.
var (
	// ErrBadAuthority: :authority is neither ip:port nor host:port (400).
	ErrBadAuthority = errors.New("invalid :authority")
	// ErrNoLocalWorkload: no workload owns the connection's local IP (503).
	ErrNoLocalWorkload = errors.New("no local workload")
	// ErrIPMismatch: the authority IP is not the local IP and no exception applies (400).
	ErrIPMismatch = errors.New("authority ip does not match local ip")
	// ErrNoHostname: no service has the authority's hostname (503).
	ErrNoHostname = errors.New("no service for hostname")
	// ErrNoPortForService: the service does not map the authority's port (503).
	ErrNoPortForService = errors.New("no target port for service port")
	// ErrSelfCall: the target port is one of the proxy's own ports (503).
	ErrSelfCall = errors.New("call to a proxy port")
	// ErrNoIPForService: an application tunnel needs a VIP for the PROXY header and the
	// service has none (503).
	ErrNoIPForService = errors.New("service has no vip")
)

// Reject is why an inbound CONNECT is refused and the HTTP status to answer with.
type Reject struct {
	// Status is the HTTP status ztunnel answers with: 400 or 503.
	Status int
	// Reason is a human-readable explanation for logs.
	Reason string
	// Err is one of the Err* sentinels above, for metrics and errors.Is.
	Err error
}

func (r *Reject) Error() string { return r.Reason }

// Unwrap returns the sentinel error, so errors.Is works on a *Reject.
func (r *Reject) Unwrap() error { return r.Err }
