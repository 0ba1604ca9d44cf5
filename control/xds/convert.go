package xds

import (
	"errors"
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"strings"

	"istio.io/istio/pkg/workloadapi"
	"istio.io/istio/pkg/workloadapi/security"

	"github.com/ztgo/ztgo/control/snapshot"
)

// This file converts the workload API protos istiod sends into snapshot types. It follows
// ztunnel's TryFrom conversions (src/state/workload.rs, src/state/service.rs, src/rbac.rs): what
// ztunnel rejects is rejected here with an error naming the field; a few inputs ztunnel takes
// silently but wrongly are rejected too (listed in the package doc under Conversion).

// fieldError is one conversion problem: the proto field path and what is wrong with it.
type fieldError struct {
	path string
	msg  string
}

func (e *fieldError) Error() string {
	if e.path == "" {
		return e.msg
	}
	return e.path + ": " + e.msg
}

func fieldErrorf(path, format string, args ...any) error {
	return &fieldError{path: path, msg: fmt.Sprintf(format, args...)}
}

// maxPort bounds every port field: the protos carry uint32, ports are 16 bits. ztunnel casts
// with `as u16`, which would turn 65616 into 80; a value that does not fit is refused instead.
const maxPort = 1<<16 - 1

func port(path string, v uint32) (uint16, error) {
	if v > maxPort {
		return 0, fieldErrorf(path, "%d is not a port (0-65535)", v)
	}
	return uint16(v), nil
}

// ipFromBytes reads an address the way ztunnel's byte_to_ip does: 4 bytes are IPv4, 16 bytes
// IPv6 (an IPv4-mapped IPv6 address stays IPv6; lookups unmap it), any other length is an error.
func ipFromBytes(path string, b []byte) (netip.Addr, error) {
	switch len(b) {
	case 4:
		return netip.AddrFrom4([4]byte(b)), nil
	case 16:
		return netip.AddrFrom16([16]byte(b)), nil
	}
	return netip.Addr{}, fieldErrorf(path, "%d bytes is not an IPv4 or IPv6 address", len(b))
}

// prefixFromBytes reads a CIDR: an address and a prefix length no longer than the address.
func prefixFromBytes(path string, b []byte, length uint32) (netip.Prefix, error) {
	ip, err := ipFromBytes(path, b)
	if err != nil {
		return netip.Prefix{}, err
	}
	if length > uint32(ip.BitLen()) {
		return netip.Prefix{}, fieldErrorf(path, "prefix length %d is longer than the %d bits of %s", length, ip.BitLen(), ip)
	}
	return netip.PrefixFrom(ip, int(length)).Masked(), nil
}

func unknownEnum(path string, v int32) error {
	return fieldErrorf(path, "unknown value %d", v)
}

// ConvertWorkload converts a workload as ztunnel does (Workload::try_from): empty trust domain,
// service account and cluster id take their defaults, and an unknown workload type reads as
// DEPLOYMENT. The error names the workload and the field.
func ConvertWorkload(w *workloadapi.Workload) (*snapshot.Workload, error) {
	if w == nil {
		return nil, errors.New("workload: missing")
	}
	out, err := convertWorkload(w)
	if err != nil {
		return nil, fmt.Errorf("workload %s: %w", workloadLabel(w), err)
	}
	return out, nil
}

// workloadLabel names a workload in errors: namespace/name as an operator knows it, else uid.
func workloadLabel(w *workloadapi.Workload) string {
	if w.GetNamespace() != "" || w.GetName() != "" {
		return w.GetNamespace() + "/" + w.GetName()
	}
	return w.GetUid()
}

func convertWorkload(w *workloadapi.Workload) (*snapshot.Workload, error) {
	out := &snapshot.Workload{
		UID:                   w.GetUid(),
		Name:                  w.GetName(),
		Namespace:             w.GetNamespace(),
		Hostname:              w.GetHostname(),
		Network:               w.GetNetwork(),
		TrustDomain:           w.GetTrustDomain(),
		ServiceAccount:        w.GetServiceAccount(),
		Node:                  w.GetNode(),
		CanonicalName:         w.GetCanonicalName(),
		CanonicalRevision:     w.GetCanonicalRevision(),
		WorkloadName:          w.GetWorkloadName(),
		NativeTunnel:          w.GetNativeTunnel(),
		ClusterID:             w.GetClusterId(),
		AuthorizationPolicies: slices.Clone(w.GetAuthorizationPolicies()),
	}
	if out.TrustDomain == "" {
		out.TrustDomain = snapshot.DefaultTrustDomain
	}
	if out.ServiceAccount == "" {
		out.ServiceAccount = snapshot.DefaultServiceAccount
	}
	if out.ClusterID == "" {
		out.ClusterID = snapshot.DefaultClusterID
	}
	for i, b := range w.GetAddresses() {
		ip, err := ipFromBytes(fmt.Sprintf("addresses[%d]", i), b)
		if err != nil {
			return nil, err
		}
		out.Addresses = append(out.Addresses, ip)
	}
	switch p := w.GetTunnelProtocol(); p {
	case workloadapi.TunnelProtocol_NONE:
		out.Protocol = snapshot.TunnelNone
	case workloadapi.TunnelProtocol_HBONE:
		out.Protocol = snapshot.TunnelHBONE
	case workloadapi.TunnelProtocol_LEGACY_ISTIO_MTLS:
		return nil, fieldErrorf("tunnel_protocol", "LEGACY_ISTIO_MTLS is not supported")
	default:
		return nil, unknownEnum("tunnel_protocol", int32(p))
	}
	switch m := w.GetNetworkMode(); m {
	case workloadapi.NetworkMode_STANDARD:
		out.NetworkMode = snapshot.NetworkStandard
	case workloadapi.NetworkMode_HOST_NETWORK:
		out.NetworkMode = snapshot.NetworkHost
	default:
		return nil, unknownEnum("network_mode", int32(m))
	}
	switch s := w.GetStatus(); s {
	case workloadapi.WorkloadStatus_HEALTHY:
		out.Status = snapshot.Healthy
	case workloadapi.WorkloadStatus_UNHEALTHY:
		out.Status = snapshot.Unhealthy
	default:
		return nil, unknownEnum("status", int32(s))
	}
	// ztunnel reads the type with prost's getter, which turns an unknown value into the
	// default rather than an error; the field only labels metrics.
	switch w.GetWorkloadType() {
	case workloadapi.WorkloadType_CRONJOB:
		out.WorkloadType = snapshot.WorkloadCronJob
	case workloadapi.WorkloadType_POD:
		out.WorkloadType = snapshot.WorkloadPod
	case workloadapi.WorkloadType_JOB:
		out.WorkloadType = snapshot.WorkloadJob
	default:
		out.WorkloadType = snapshot.WorkloadDeployment
	}
	var err error
	if w.GetWaypoint() != nil {
		if out.Waypoint, err = convertGateway("waypoint", w.GetWaypoint()); err != nil {
			return nil, err
		}
	}
	if w.GetNetworkGateway() != nil {
		if out.NetworkGateway, err = convertGateway("network_gateway", w.GetNetworkGateway()); err != nil {
			return nil, err
		}
	}
	if at := w.GetApplicationTunnel(); at != nil {
		t := &snapshot.ApplicationTunnel{}
		switch p := at.GetProtocol(); p {
		case workloadapi.ApplicationTunnel_NONE:
			t.Protocol = snapshot.AppTunnelNone
		case workloadapi.ApplicationTunnel_PROXY:
			t.Protocol = snapshot.AppTunnelProxy
		default:
			return nil, unknownEnum("application_tunnel.protocol", int32(p))
		}
		if t.Port, err = port("application_tunnel.port", at.GetPort()); err != nil {
			return nil, err
		}
		out.ApplicationTunnel = t
	}
	if len(w.GetServices()) > 0 {
		out.Services = make(map[string]snapshot.PortMap, len(w.GetServices()))
		// Sorted so that, of several bad keys, the same one is reported every time.
		for _, k := range slices.Sorted(maps.Keys(w.GetServices())) {
			path := fmt.Sprintf("services[%q]", k)
			// ztunnel splits the key at its first "/" and rejects a key without one.
			if !strings.Contains(k, "/") {
				return nil, fieldErrorf(path, "key is not namespace/hostname")
			}
			pm, err := portMap(path+".ports", w.GetServices()[k].GetPorts())
			if err != nil {
				return nil, err
			}
			out.Services[k] = pm
		}
	}
	if l := w.GetLocality(); l != nil {
		out.Locality = snapshot.Locality{Region: l.GetRegion(), Zone: l.GetZone(), Subzone: l.GetSubzone()}
	}
	if c := w.GetCapacity(); c != nil {
		// ztunnel keeps an explicit 0 (the workload is then never picked by weight); the
		// snapshot reads 0 as "unset, weight 1", so an explicit 0 becomes weight 1 here.
		out.Capacity = c.GetValue()
	}
	return out, nil
}

// portMap converts a port list; a later entry for the same service port wins, as in ztunnel's
// collect into a HashMap. The app_protocol of each port is not used.
func portMap(path string, ports []*workloadapi.Port) (snapshot.PortMap, error) {
	pm := make(snapshot.PortMap, len(ports))
	for i, p := range ports {
		sp, err := port(fmt.Sprintf("%s[%d].service_port", path, i), p.GetServicePort())
		if err != nil {
			return nil, err
		}
		tp, err := port(fmt.Sprintf("%s[%d].target_port", path, i), p.GetTargetPort())
		if err != nil {
			return nil, err
		}
		pm[sp] = tp
	}
	return pm, nil
}

// convertGateway converts a waypoint or network gateway. A gateway without a destination is an
// error (ztunnel's MissingGatewayAddress). An hbone_mtls_port of 0 stays 0: the data path reads
// 0 as the default 15008.
func convertGateway(path string, g *workloadapi.GatewayAddress) (*snapshot.GatewayAddress, error) {
	out := &snapshot.GatewayAddress{}
	var err error
	if out.HBONEPort, err = port(path+".hbone_mtls_port", g.GetHboneMtlsPort()); err != nil {
		return nil, err
	}
	switch d := g.GetDestination().(type) {
	case *workloadapi.GatewayAddress_Address:
		ip, err := ipFromBytes(path+".address.address", d.Address.GetAddress())
		if err != nil {
			return nil, err
		}
		out.Address = &snapshot.NetworkAddress{Network: d.Address.GetNetwork(), Addr: ip}
	case *workloadapi.GatewayAddress_Hostname:
		out.Hostname = &snapshot.NamespacedHostname{Namespace: d.Hostname.GetNamespace(), Hostname: d.Hostname.GetHostname()}
	default:
		return nil, fieldErrorf(path, "no destination (address or hostname)")
	}
	return out, nil
}

// ConvertService converts a service as ztunnel does (Service::try_from): an address whose
// length is set and shorter than the address is a CIDR VIP, an unknown visibility reads as
// PUBLIC (fail open, as ztunnel), and any other unknown enum value is an error.
func ConvertService(s *workloadapi.Service) (*snapshot.Service, error) {
	if s == nil {
		return nil, errors.New("service: missing")
	}
	out, err := convertService(s)
	if err != nil {
		return nil, fmt.Errorf("service %s/%s: %w", s.GetNamespace(), s.GetHostname(), err)
	}
	return out, nil
}

func convertService(s *workloadapi.Service) (*snapshot.Service, error) {
	out := &snapshot.Service{
		Name:            s.GetName(),
		Namespace:       s.GetNamespace(),
		Hostname:        s.GetHostname(),
		SubjectAltNames: slices.Clone(s.GetSubjectAltNames()),
		Canonical:       s.GetCanonical(),
	}
	for i, a := range s.GetAddresses() {
		path := fmt.Sprintf("addresses[%d]", i)
		ip, err := ipFromBytes(path+".address", a.GetAddress())
		if err != nil {
			return nil, err
		}
		if a.Length != nil && a.GetLength() != uint32(ip.BitLen()) {
			p, err := prefixFromBytes(path, a.GetAddress(), a.GetLength())
			if err != nil {
				return nil, err
			}
			out.CIDRVIPs = append(out.CIDRVIPs, snapshot.NetworkPrefix{Network: a.GetNetwork(), Prefix: p})
			continue
		}
		out.VIPs = append(out.VIPs, snapshot.NetworkAddress{Network: a.GetNetwork(), Addr: ip})
	}
	var err error
	if out.Ports, err = portMap("ports", s.GetPorts()); err != nil {
		return nil, err
	}
	if s.GetWaypoint() != nil {
		if out.Waypoint, err = convertGateway("waypoint", s.GetWaypoint()); err != nil {
			return nil, err
		}
	}
	for i, ww := range s.GetWeightedWaypoints() {
		path := fmt.Sprintf("weighted_waypoints[%d]", i)
		if ww.GetDestination() == nil {
			return nil, fieldErrorf(path+".destination", "missing")
		}
		g, err := convertGateway(path+".destination", ww.GetDestination())
		if err != nil {
			return nil, err
		}
		out.WeightedWaypoints = append(out.WeightedWaypoints, snapshot.WeightedWaypoint{Destination: *g, Weight: ww.GetWeight()})
	}
	if lb := s.GetLoadBalancing(); lb != nil {
		if out.LoadBalancing, err = convertLoadBalancing(lb); err != nil {
			return nil, err
		}
	}
	switch f := s.GetIpFamilies(); f {
	case workloadapi.IPFamilies_AUTOMATIC:
		out.IPFamilies = snapshot.IPFamiliesAutomatic
	case workloadapi.IPFamilies_IPV4_ONLY:
		out.IPFamilies = snapshot.IPv4Only
	case workloadapi.IPFamilies_IPV6_ONLY:
		out.IPFamilies = snapshot.IPv6Only
	case workloadapi.IPFamilies_DUAL:
		out.IPFamilies = snapshot.IPFamiliesDual
	default:
		return nil, unknownEnum("ip_families", int32(f))
	}
	if s.GetVisibility() == workloadapi.Service_NAMESPACE {
		out.Visibility = snapshot.VisibilityNamespace
	}
	return out, nil
}

func convertLoadBalancing(lb *workloadapi.LoadBalancing) (*snapshot.LoadBalancing, error) {
	out := &snapshot.LoadBalancing{}
	for i, sc := range lb.GetRoutingPreference() {
		path := fmt.Sprintf("load_balancing.routing_preference[%d]", i)
		switch sc {
		case workloadapi.LoadBalancing_REGION:
			out.RoutingPreference = append(out.RoutingPreference, snapshot.ScopeRegion)
		case workloadapi.LoadBalancing_ZONE:
			out.RoutingPreference = append(out.RoutingPreference, snapshot.ScopeZone)
		case workloadapi.LoadBalancing_SUBZONE:
			out.RoutingPreference = append(out.RoutingPreference, snapshot.ScopeSubzone)
		case workloadapi.LoadBalancing_NODE:
			out.RoutingPreference = append(out.RoutingPreference, snapshot.ScopeNode)
		case workloadapi.LoadBalancing_CLUSTER:
			out.RoutingPreference = append(out.RoutingPreference, snapshot.ScopeCluster)
		case workloadapi.LoadBalancing_NETWORK:
			out.RoutingPreference = append(out.RoutingPreference, snapshot.ScopeNetwork)
		case workloadapi.LoadBalancing_UNSPECIFIED_SCOPE:
			return nil, fieldErrorf(path, "UNSPECIFIED_SCOPE is not a routing preference")
		default:
			return nil, unknownEnum(path, int32(sc))
		}
	}
	switch m := lb.GetMode(); m {
	case workloadapi.LoadBalancing_UNSPECIFIED_MODE:
		out.Mode = snapshot.LBModeUnspecified
	case workloadapi.LoadBalancing_STRICT:
		out.Mode = snapshot.LBModeStrict
	case workloadapi.LoadBalancing_FAILOVER:
		out.Mode = snapshot.LBModeFailover
	case workloadapi.LoadBalancing_PASSTHROUGH:
		out.Mode = snapshot.LBModePassthrough
	default:
		return nil, unknownEnum("load_balancing.mode", int32(m))
	}
	switch h := lb.GetHealthPolicy(); h {
	case workloadapi.LoadBalancing_ONLY_HEALTHY:
		out.HealthPolicy = snapshot.OnlyHealthy
	case workloadapi.LoadBalancing_ALLOW_ALL:
		out.HealthPolicy = snapshot.AllowAll
	default:
		return nil, unknownEnum("load_balancing.health_policy", int32(h))
	}
	return out, nil
}

// ConvertAuthorization converts an L4 authorization policy (Authorization::try_from in
// ztunnel's rbac.rs). The proto's groups are the snapshot's rules (ORed), a group's rules are
// its clauses (ANDed), and a clause's matches are ORed. Only ALLOW and DENY exist.
func ConvertAuthorization(a *security.Authorization) (*snapshot.Policy, error) {
	if a == nil {
		return nil, errors.New("policy: missing")
	}
	out, err := convertAuthorization(a)
	if err != nil {
		return nil, fmt.Errorf("policy %s/%s: %w", a.GetNamespace(), a.GetName(), err)
	}
	return out, nil
}

func convertAuthorization(a *security.Authorization) (*snapshot.Policy, error) {
	out := &snapshot.Policy{Name: a.GetName(), Namespace: a.GetNamespace(), DryRun: a.GetDryRun()}
	switch s := a.GetScope(); s {
	case security.Scope_GLOBAL:
		out.Scope = snapshot.ScopeGlobal
	case security.Scope_NAMESPACE:
		out.Scope = snapshot.ScopeNamespace
	case security.Scope_WORKLOAD_SELECTOR:
		out.Scope = snapshot.ScopeWorkloadSelector
	default:
		return nil, unknownEnum("scope", int32(s))
	}
	switch act := a.GetAction(); act {
	case security.Action_ALLOW:
		out.Action = snapshot.ActionAllow
	case security.Action_DENY:
		out.Action = snapshot.ActionDeny
	default:
		return nil, fieldErrorf("action", "unknown value %d (only ALLOW and DENY are defined)", int32(act))
	}
	for gi, g := range a.GetGroups() {
		rule := make(snapshot.Rule, 0, len(g.GetRules()))
		for ri, r := range g.GetRules() {
			clause := make(snapshot.Clause, 0, len(r.GetMatches()))
			for mi, m := range r.GetMatches() {
				cm, err := convertMatch(fmt.Sprintf("groups[%d].rules[%d].matches[%d]", gi, ri, mi), m)
				if err != nil {
					return nil, err
				}
				clause = append(clause, cm)
			}
			rule = append(rule, clause)
		}
		out.Rules = append(out.Rules, rule)
	}
	return out, nil
}

// convertMatch converts one match. ztunnel silently drops a string match without a match type
// and an address it cannot parse, and truncates ports to 16 bits; dropping an entry from a
// positive list widens the match (an ALLOW for source_ips [bad] would allow every source), so
// ztgo rejects the policy instead.
func convertMatch(path string, m *security.Match) (snapshot.Match, error) {
	var out snapshot.Match
	var err error
	strs := []struct {
		name string
		in   []*security.StringMatch
		out  *[]snapshot.StringMatch
	}{
		{"namespaces", m.GetNamespaces(), &out.Namespaces},
		{"not_namespaces", m.GetNotNamespaces(), &out.NotNamespaces},
		{"principals", m.GetPrincipals(), &out.Principals},
		{"not_principals", m.GetNotPrincipals(), &out.NotPrincipals},
	}
	for _, f := range strs {
		if *f.out, err = stringMatches(path+"."+f.name, f.in); err != nil {
			return out, err
		}
	}
	out.ServiceAccounts = serviceAccounts(m.GetServiceAccounts())
	out.NotServiceAccounts = serviceAccounts(m.GetNotServiceAccounts())
	ips := []struct {
		name string
		in   []*security.Address
		out  *[]netip.Prefix
	}{
		{"source_ips", m.GetSourceIps(), &out.SourceIPs},
		{"not_source_ips", m.GetNotSourceIps(), &out.NotSourceIPs},
		{"destination_ips", m.GetDestinationIps(), &out.DestinationIPs},
		{"not_destination_ips", m.GetNotDestinationIps(), &out.NotDestinationIPs},
	}
	for _, f := range ips {
		for i, a := range f.in {
			// length is a plain uint32 here, so 0 is /0 (every address), as in ztunnel.
			p, err := prefixFromBytes(fmt.Sprintf("%s.%s[%d]", path, f.name, i), a.GetAddress(), a.GetLength())
			if err != nil {
				return out, err
			}
			*f.out = append(*f.out, p)
		}
	}
	ports := []struct {
		name string
		in   []uint32
		out  *[]uint16
	}{
		{"destination_ports", m.GetDestinationPorts(), &out.DestinationPorts},
		{"not_destination_ports", m.GetNotDestinationPorts(), &out.NotDestinationPorts},
	}
	for _, f := range ports {
		for i, v := range f.in {
			p, err := port(fmt.Sprintf("%s.%s[%d]", path, f.name, i), v)
			if err != nil {
				return out, err
			}
			*f.out = append(*f.out, p)
		}
	}
	return out, nil
}

func stringMatches(path string, in []*security.StringMatch) ([]snapshot.StringMatch, error) {
	var out []snapshot.StringMatch
	for i, sm := range in {
		var m snapshot.StringMatch
		switch t := sm.GetMatchType().(type) {
		case *security.StringMatch_Exact:
			m = snapshot.StringMatch{Kind: snapshot.MatchExact, Value: t.Exact}
		case *security.StringMatch_Prefix:
			m = snapshot.StringMatch{Kind: snapshot.MatchPrefix, Value: t.Prefix}
		case *security.StringMatch_Suffix:
			m = snapshot.StringMatch{Kind: snapshot.MatchSuffix, Value: t.Suffix}
		case *security.StringMatch_Presence:
			m = snapshot.StringMatch{Kind: snapshot.MatchPresence}
		default:
			return nil, fieldErrorf(fmt.Sprintf("%s[%d]", path, i), "no match type (exact, prefix, suffix or presence)")
		}
		out = append(out, m)
	}
	return out, nil
}

func serviceAccounts(in []*security.ServiceAccountMatch) []snapshot.ServiceAccountMatch {
	var out []snapshot.ServiceAccountMatch
	for _, sa := range in {
		out = append(out, snapshot.ServiceAccountMatch{Namespace: sa.GetNamespace(), ServiceAccount: sa.GetServiceAccount()})
	}
	return out
}
