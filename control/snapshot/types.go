package snapshot

import (
	"net/netip"

	"github.com/ztgo/ztgo/tls/spiffe"
)

// Defaults applied by Build to workloads that leave a field empty, as ztunnel does.
const (
	DefaultTrustDomain    = "cluster.local"
	DefaultServiceAccount = "default"
	DefaultClusterID      = "Kubernetes"
	// DefaultHBONEPort is the inbound HBONE port every node listens on.
	DefaultHBONEPort = 15008
)

// TunnelProtocol is how traffic reaches a workload.
type TunnelProtocol uint8

const (
	// TunnelNone is plain TCP to the workload (ztunnel's NONE; "TCP" in local config).
	TunnelNone TunnelProtocol = iota
	// TunnelHBONE is mTLS HTTP/2 CONNECT to the workload's node on port 15008.
	TunnelHBONE
)

func (p TunnelProtocol) String() string {
	if p == TunnelHBONE {
		return "HBONE"
	}
	return "TCP"
}

// HealthStatus of a workload; unhealthy workloads are not load-balanced to unless the
// service's health policy allows all.
type HealthStatus uint8

const (
	Healthy HealthStatus = iota
	Unhealthy
)

// WorkloadType names the kind of controller that owns a workload.
type WorkloadType uint8

const (
	WorkloadDeployment WorkloadType = iota
	WorkloadCronJob
	WorkloadPod
	WorkloadJob
)

func (t WorkloadType) String() string {
	switch t {
	case WorkloadCronJob:
		return "cronjob"
	case WorkloadPod:
		return "pod"
	case WorkloadJob:
		return "job"
	default:
		return "deployment"
	}
}

// NetworkMode of a workload; host-network workloads are not indexed by IP.
type NetworkMode uint8

const (
	NetworkStandard NetworkMode = iota
	NetworkHost
)

// AppTunnelProtocol is the protocol of a workload's application tunnel.
type AppTunnelProtocol uint8

const (
	AppTunnelNone AppTunnelProtocol = iota
	AppTunnelProxy
)

// ApplicationTunnel says the workload accepts tunnelled traffic (PROXY protocol) on Port.
type ApplicationTunnel struct {
	Protocol AppTunnelProtocol
	Port     uint16
}

// Locality of a workload, matched by routing preferences.
type Locality struct {
	Region, Zone, Subzone string
}

// NetworkAddress is an IP on a named network ("" is the default network).
type NetworkAddress struct {
	Network string
	Addr    netip.Addr
}

func (a NetworkAddress) String() string { return a.Network + "/" + a.Addr.String() }

// NamespacedHostname names a service (or workload) by namespace and hostname.
type NamespacedHostname struct {
	Namespace, Hostname string
}

func (n NamespacedHostname) String() string { return n.Namespace + "/" + n.Hostname }

// GatewayAddress locates a waypoint or network gateway: exactly one of Address or Hostname is set.
type GatewayAddress struct {
	Address   *NetworkAddress
	Hostname  *NamespacedHostname
	HBONEPort uint16
}

// WeightedWaypoint is one member of a weighted waypoint set.
type WeightedWaypoint struct {
	Destination GatewayAddress
	Weight      uint32
}

// PortMap maps a service port to a target port.
type PortMap map[uint16]uint16

// Workload is one addressable workload (usually a pod). Immutable once in a snapshot.
type Workload struct {
	UID               string
	Name              string
	Namespace         string
	Addresses         []netip.Addr
	Hostname          string
	Network           string
	Protocol          TunnelProtocol
	TrustDomain       string
	ServiceAccount    string
	Waypoint          *GatewayAddress
	NetworkGateway    *GatewayAddress
	Node              string
	CanonicalName     string
	CanonicalRevision string
	WorkloadType      WorkloadType
	WorkloadName      string
	NativeTunnel      bool
	ApplicationTunnel *ApplicationTunnel
	// Services maps "namespace/hostname" to the ports this workload serves for that service.
	Services              map[string]PortMap
	AuthorizationPolicies []string
	Status                HealthStatus
	ClusterID             string
	Locality              Locality
	NetworkMode           NetworkMode
	// Capacity weighs the workload in load balancing; 0 means the default of 1.
	Capacity uint32
}

// Identity is the workload's SPIFFE identity.
func (w *Workload) Identity() spiffe.ID {
	return spiffe.ID{TrustDomain: w.TrustDomain, Namespace: w.Namespace, ServiceAccount: w.ServiceAccount}
}

// HasAddr reports whether ip is one of the workload's addresses.
func (w *Workload) HasAddr(ip netip.Addr) bool {
	for _, a := range w.Addresses {
		if a == ip {
			return true
		}
	}
	return false
}

// Weight is the workload's load-balancing weight (capacity, default 1).
func (w *Workload) Weight() uint32 {
	if w.Capacity == 0 {
		return 1
	}
	return w.Capacity
}

// IPFamilies restricts which address families a service uses.
type IPFamilies uint8

const (
	IPFamiliesAutomatic IPFamilies = iota
	IPv4Only
	IPv6Only
	IPFamiliesDual
)

// Visibility of a service; Namespace-visible services are hidden from other namespaces.
type Visibility uint8

const (
	VisibilityPublic Visibility = iota
	VisibilityNamespace
)

// LBScope is one routing preference scope.
type LBScope uint8

const (
	ScopeUnspecified LBScope = iota
	ScopeRegion
	ScopeZone
	ScopeSubzone
	ScopeNode
	ScopeCluster
	ScopeNetwork
)

// LBMode selects how routing preferences are applied.
type LBMode uint8

const (
	LBModeUnspecified LBMode = iota
	LBModeStrict
	LBModeFailover
	LBModePassthrough
)

// LBHealthPolicy says whether unhealthy endpoints are eligible.
type LBHealthPolicy uint8

const (
	OnlyHealthy LBHealthPolicy = iota
	AllowAll
)

// LoadBalancing is a service's load-balancing configuration.
type LoadBalancing struct {
	RoutingPreference []LBScope
	Mode              LBMode
	HealthPolicy      LBHealthPolicy
}

// Service is a mesh service: VIPs, ports and the endpoints (workloads) behind it.
type Service struct {
	Name      string
	Namespace string
	Hostname  string
	VIPs      []NetworkAddress
	// CIDRVIPs are VIP ranges, matched by longest prefix after an exact VIP miss.
	CIDRVIPs          []NetworkPrefix
	Ports             PortMap
	SubjectAltNames   []string
	Waypoint          *GatewayAddress
	WeightedWaypoints []WeightedWaypoint
	LoadBalancing     *LoadBalancing
	IPFamilies        IPFamilies
	Canonical         bool
	Visibility        Visibility
}

// Key is the service's "namespace/hostname" name.
func (s *Service) Key() NamespacedHostname {
	return NamespacedHostname{Namespace: s.Namespace, Hostname: s.Hostname}
}

// NetworkPrefix is a CIDR on a named network.
type NetworkPrefix struct {
	Network string
	Prefix  netip.Prefix
}

// Endpoint is one workload behind a service, with the port map it declared for that service.
type Endpoint struct {
	Workload *Workload
	Ports    PortMap
}

// PolicyScope says which workloads a policy applies to.
type PolicyScope uint8

const (
	ScopeGlobal PolicyScope = iota
	ScopeNamespace
	ScopeWorkloadSelector
)

func (s PolicyScope) String() string {
	switch s {
	case ScopeNamespace:
		return "Namespace"
	case ScopeWorkloadSelector:
		return "WorkloadSelector"
	default:
		return "Global"
	}
}

// PolicyAction is ALLOW or DENY.
type PolicyAction uint8

const (
	ActionAllow PolicyAction = iota
	ActionDeny
)

func (a PolicyAction) String() string {
	if a == ActionDeny {
		return "Deny"
	}
	return "Allow"
}

// Policy is one L4 authorization policy. Rules are ORed; each rule is a list of clauses that
// are ANDed; each clause is a list of matches that are ORed.
type Policy struct {
	Name      string
	Namespace string
	Scope     PolicyScope
	Action    PolicyAction
	Rules     []Rule
	DryRun    bool

	key string // "namespace/name", set by Build so lookups do not allocate
}

// Key is the policy's "namespace/name", the key workloads reference it by.
func (p *Policy) Key() string {
	if p.key != "" {
		return p.key
	}
	return p.Namespace + "/" + p.Name
}

// Rule is a list of clauses, all of which must match.
type Rule []Clause

// Clause is a list of matches, any of which may match.
type Clause []Match

// StringMatchKind selects how a StringMatch compares.
type StringMatchKind uint8

const (
	MatchExact StringMatchKind = iota
	MatchPrefix
	MatchSuffix
	MatchPresence
)

// StringMatch compares one string: exact, prefix, suffix, or presence (non-empty).
type StringMatch struct {
	Kind  StringMatchKind
	Value string
}

// Matches reports whether s satisfies m.
func (m StringMatch) Matches(s string) bool {
	switch m.Kind {
	case MatchPrefix:
		return len(s) >= len(m.Value) && s[:len(m.Value)] == m.Value
	case MatchSuffix:
		return len(s) >= len(m.Value) && s[len(s)-len(m.Value):] == m.Value
	case MatchPresence:
		return s != ""
	default:
		return s == m.Value
	}
}

// ServiceAccountMatch matches an identity's namespace and service account exactly.
type ServiceAccountMatch struct {
	Namespace, ServiceAccount string
}

// Match is a set of conditions that must all hold. Each positive list is satisfied when empty or
// when any entry matches; each not_ list is satisfied when no entry matches.
type Match struct {
	Namespaces          []StringMatch
	NotNamespaces       []StringMatch
	ServiceAccounts     []ServiceAccountMatch
	NotServiceAccounts  []ServiceAccountMatch
	Principals          []StringMatch
	NotPrincipals       []StringMatch
	SourceIPs           []netip.Prefix
	NotSourceIPs        []netip.Prefix
	DestinationIPs      []netip.Prefix
	NotDestinationIPs   []netip.Prefix
	DestinationPorts    []uint16
	NotDestinationPorts []uint16
}

// IsEmpty reports whether m has no condition at all (such a match never matches).
func (m *Match) IsEmpty() bool {
	return len(m.Namespaces) == 0 && len(m.NotNamespaces) == 0 &&
		len(m.ServiceAccounts) == 0 && len(m.NotServiceAccounts) == 0 &&
		len(m.Principals) == 0 && len(m.NotPrincipals) == 0 &&
		len(m.SourceIPs) == 0 && len(m.NotSourceIPs) == 0 &&
		len(m.DestinationIPs) == 0 && len(m.NotDestinationIPs) == 0 &&
		len(m.DestinationPorts) == 0 && len(m.NotDestinationPorts) == 0
}
