// Package snapshot is ztgo's immutable, indexed view of the mesh: workloads, services and
// authorization policies, with the indexes the data path needs (workloads by address and uid,
// services by VIP and by namespace/hostname, policies by key and by namespace).
//
// A Snapshot is built off the hot path by Build, validated, and published through a Store with
// one atomic pointer store. A flow loads the pointer once and uses that view for every decision.
// Nothing mutates a published Snapshot or anything reachable from it; sources that change the
// mesh build a new one. Store.VerifyImmutable (ZTGO_DEBUG_SNAPSHOT=1) checks this rule: Publish
// fingerprints each snapshot and the next Publish, or Verify, reports any object that changed.
//
// Build's result does not depend on the order of its input: lists are sorted, and every tie a
// lookup breaks (address conflicts, several services at one VIP or hostname) is broken by a
// rule, never by position.
package snapshot

import (
	"cmp"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"time"
)

// Config is the input to Build: the mesh as a source (local file, xDS) describes it.
type Config struct {
	Workloads []*Workload
	Services  []*Service
	Policies  []*Policy
}

// Snapshot is one immutable view of the mesh. Its methods are safe for concurrent use and do not
// allocate on the lookup paths.
type Snapshot struct {
	version uint64
	built   time.Time

	workloads []*Workload // sorted by UID
	services  []*Service  // sorted by key
	policies  []*Policy   // sorted by key

	workloadByUID  map[string]*Workload
	workloadByAddr map[NetworkAddress]*Workload
	servicesByVIP  map[NetworkAddress][]*Service
	// servicesByCIDR holds CIDR VIPs by masked prefix; cidrBits4 and cidrBits6 list the prefix
	// lengths in use, longest first, so a lookup costs one map probe per length in use (at most
	// 33 or 129) rather than a scan of every CIDR VIP in the mesh.
	servicesByCIDR map[NetworkPrefix][]*Service
	cidrBits4      []uint8
	cidrBits6      []uint8
	serviceByKey   map[NamespacedHostname]*Service
	servicesByHost map[string][]*Service
	endpoints      map[*Service][]Endpoint
	policyByKey    map[string]*Policy
	// policiesByNS holds namespace-scoped policies by namespace, and global ones under "".
	policiesByNS map[string][]*Policy
	// staged lists "namespace/hostname" keys that workloads reference but no service defines yet.
	staged []string
}

// ErrInvalid marks errors that are about the content of a Config.
var ErrInvalid = errors.New("invalid config")

// Build validates cfg, fills ztunnel's defaults, and returns the indexed snapshot. Build takes
// ownership of cfg's objects: callers must not change them afterwards. An object may be passed
// to several Builds (a source that keeps unchanged objects across updates): Build writes a
// field only while it still differs from what Build would set, so rebuilding with an object a
// published snapshot holds never writes to it.
func Build(cfg Config) (*Snapshot, error) {
	s := &Snapshot{
		built:          time.Now(),
		workloadByUID:  make(map[string]*Workload, len(cfg.Workloads)),
		workloadByAddr: make(map[NetworkAddress]*Workload, len(cfg.Workloads)),
		servicesByVIP:  make(map[NetworkAddress][]*Service, len(cfg.Services)),
		servicesByCIDR: make(map[NetworkPrefix][]*Service),
		serviceByKey:   make(map[NamespacedHostname]*Service, len(cfg.Services)),
		servicesByHost: make(map[string][]*Service, len(cfg.Services)),
		endpoints:      make(map[*Service][]Endpoint, len(cfg.Services)),
		policyByKey:    make(map[string]*Policy, len(cfg.Policies)),
		policiesByNS:   make(map[string][]*Policy),
	}
	var errs []error
	for i, w := range cfg.Workloads {
		if err := s.addWorkload(w); err != nil {
			errs = append(errs, fmt.Errorf("workloads[%d] (%s): %w", i, workloadName(w), err))
		}
	}
	var cidrLens [2][129]bool // [0] IPv4, [1] IPv6: which prefix lengths CIDR VIPs use
	for i, svc := range cfg.Services {
		if err := s.addService(svc, &cidrLens); err != nil {
			errs = append(errs, fmt.Errorf("services[%d] (%s): %w", i, serviceName(svc), err))
		}
	}
	for i, p := range cfg.Policies {
		if err := s.addPolicy(p); err != nil {
			errs = append(errs, fmt.Errorf("policies[%d] (%s): %w", i, policyName(p), err))
		}
	}
	if len(errs) > 0 {
		return nil, fmt.Errorf("%w: %w", ErrInvalid, errors.Join(errs...))
	}
	// Everything below makes the result independent of input order (xDS delivers resources in
	// map order): workloads first, because endpoint lists are built in workload order.
	slices.SortFunc(s.workloads, func(a, b *Workload) int { return cmp.Compare(a.UID, b.UID) })
	slices.SortFunc(s.services, compareServices)
	slices.SortFunc(s.policies, func(a, b *Policy) int { return cmp.Compare(a.Key(), b.Key()) })
	// Candidate lists decide ties in pickService (first visible wins among equals), so they are
	// sorted too.
	for _, l := range s.servicesByVIP {
		slices.SortFunc(l, compareServices)
	}
	for _, l := range s.servicesByCIDR {
		slices.SortFunc(l, compareServices)
	}
	for _, l := range s.servicesByHost {
		slices.SortFunc(l, compareServices)
	}
	for _, l := range s.policiesByNS {
		slices.SortFunc(l, func(a, b *Policy) int { return cmp.Compare(a.Key(), b.Key()) })
	}
	for bits := 128; bits >= 0; bits-- {
		if bits <= 32 && cidrLens[0][bits] {
			s.cidrBits4 = append(s.cidrBits4, uint8(bits))
		}
		if cidrLens[1][bits] {
			s.cidrBits6 = append(s.cidrBits6, uint8(bits))
		}
	}
	s.linkEndpoints()
	return s, nil
}

// workloadName, serviceName and policyName name an object in a Build error. A workload's uid
// may be empty (Build derives it), so its namespace/name stands in.
func workloadName(w *Workload) string {
	switch {
	case w == nil:
		return "nil"
	case w.UID != "":
		return w.UID
	default:
		return w.Namespace + "/" + w.Name
	}
}

func serviceName(svc *Service) string {
	if svc == nil {
		return "nil"
	}
	return svc.Namespace + "/" + svc.Hostname
}

func policyName(p *Policy) string {
	if p == nil {
		return "nil"
	}
	return p.Namespace + "/" + p.Name
}

// compareServices orders services by their "namespace/hostname" string, as Services documents,
// without building the string: Build sorts every service and every candidate list with it.
func compareServices(a, b *Service) int {
	if a.Namespace == b.Namespace {
		return strings.Compare(a.Hostname, b.Hostname)
	}
	// Unless one namespace is a prefix of the other, the namespaces differ before either "/".
	if !strings.HasPrefix(a.Namespace, b.Namespace) && !strings.HasPrefix(b.Namespace, a.Namespace) {
		return strings.Compare(a.Namespace, b.Namespace)
	}
	return strings.Compare(a.Key().String(), b.Key().String())
}

func (s *Snapshot) addWorkload(w *Workload) error {
	if w == nil {
		return errors.New("must not be nil")
	}
	if w.Name == "" {
		return errors.New("name: must not be empty")
	}
	if w.Namespace == "" {
		return errors.New("namespace: must not be empty")
	}
	if w.UID == "" {
		w.UID = DefaultClusterID + "//v1/Pod/" + w.Namespace + "/" + w.Name
	}
	if _, dup := s.workloadByUID[w.UID]; dup {
		return fmt.Errorf("uid: %q is used by another workload", w.UID)
	}
	if w.TrustDomain == "" {
		w.TrustDomain = DefaultTrustDomain
	}
	if w.ServiceAccount == "" {
		w.ServiceAccount = DefaultServiceAccount
	}
	if w.ClusterID == "" {
		w.ClusterID = DefaultClusterID
	}
	if len(w.Addresses) == 0 && w.Hostname == "" {
		return errors.New("workloadIps: a workload needs at least one address (or a hostname)")
	}
	for _, a := range w.Addresses {
		if !a.IsValid() {
			return errors.New("workloadIps: invalid address")
		}
	}
	s.workloadByUID[w.UID] = w
	s.workloads = append(s.workloads, w)
	if w.NetworkMode == NetworkHost {
		return nil
	}
	for _, a := range w.Addresses {
		key := NetworkAddress{Network: w.Network, Addr: a.Unmap()}
		if prev, ok := s.workloadByAddr[key]; ok && !preferWorkload(w, prev) {
			continue
		}
		s.workloadByAddr[key] = w
	}
	return nil
}

// preferWorkload decides an address conflict as ztunnel does: pods first, then HBONE workloads,
// then the lower uid so the choice never depends on input order.
func preferWorkload(a, b *Workload) bool {
	ap, bp := strings.Contains(a.UID, "//Pod/"), strings.Contains(b.UID, "//Pod/")
	if ap != bp {
		return ap
	}
	ah, bh := a.Protocol == TunnelHBONE, b.Protocol == TunnelHBONE
	if ah != bh {
		return ah
	}
	return a.UID < b.UID
}

func (s *Snapshot) addService(svc *Service, cidrLens *[2][129]bool) error {
	if svc == nil {
		return errors.New("must not be nil")
	}
	if svc.Name == "" {
		return errors.New("name: must not be empty")
	}
	if svc.Namespace == "" {
		return errors.New("namespace: must not be empty")
	}
	if svc.Hostname == "" {
		return errors.New("hostname: must not be empty")
	}
	key := svc.Key()
	if _, dup := s.serviceByKey[key]; dup {
		return fmt.Errorf("hostname: service %s is defined twice", key)
	}
	s.serviceByKey[key] = svc
	s.servicesByHost[svc.Hostname] = append(s.servicesByHost[svc.Hostname], svc)
	s.services = append(s.services, svc)
	for _, v := range svc.VIPs {
		k := NetworkAddress{Network: v.Network, Addr: v.Addr.Unmap()}
		s.servicesByVIP[k] = append(s.servicesByVIP[k], svc)
	}
	for _, c := range svc.CIDRVIPs {
		p := canonicalPrefix(c.Prefix)
		if !p.IsValid() {
			continue // an invalid range contains no address
		}
		k := NetworkPrefix{Network: c.Network, Prefix: p}
		s.servicesByCIDR[k] = append(s.servicesByCIDR[k], svc)
		if p.Addr().Is4() {
			cidrLens[0][p.Bits()] = true
		} else {
			cidrLens[1][p.Bits()] = true
		}
	}
	return nil
}

// canonicalPrefix masks p and turns an IPv4-mapped IPv6 range into its IPv4 form, because
// lookups unmap the address they look for (as exact VIPs are unmapped when indexed).
func canonicalPrefix(p netip.Prefix) netip.Prefix {
	p = p.Masked()
	if a := p.Addr(); a.Is4In6() && p.Bits() >= 96 {
		return netip.PrefixFrom(a.Unmap(), p.Bits()-96)
	}
	return p
}

func (s *Snapshot) addPolicy(p *Policy) error {
	if p == nil {
		return errors.New("must not be nil")
	}
	if p.Name == "" {
		return errors.New("name: must not be empty")
	}
	if p.Scope != ScopeGlobal && p.Namespace == "" {
		return errors.New("namespace: must not be empty for a Namespace or WorkloadSelector policy")
	}
	// Written only when it differs: a policy reused from a published snapshot is being read
	// by flows right now, and even an identical write would race with them.
	if key := p.Namespace + "/" + p.Name; p.key != key {
		p.key = key
	}
	if _, dup := s.policyByKey[p.Key()]; dup {
		return fmt.Errorf("name: policy %s is defined twice", p.Key())
	}
	s.policyByKey[p.Key()] = p
	s.policies = append(s.policies, p)
	switch p.Scope {
	case ScopeGlobal:
		s.policiesByNS[""] = append(s.policiesByNS[""], p)
	case ScopeNamespace:
		s.policiesByNS[p.Namespace] = append(s.policiesByNS[p.Namespace], p)
	}
	return nil
}

// linkEndpoints fills the endpoint lists from the workloads' service keys. It walks the
// workloads in uid order, so every list is sorted by workload uid and, for a workload naming
// several services, by key. All lists share one backing array, sized by a counting pass, which
// saves one growing slice per service; each list is capped so that an append by a caller copies
// instead of overwriting the next service's endpoints.
func (s *Snapshot) linkEndpoints() {
	counts := make(map[*Service]int, len(s.services))
	total := 0
	stagedSet := map[string]bool{}
	for _, w := range s.workloads {
		for k := range w.Services {
			if svc := s.serviceByServicesKey(k); svc != nil {
				counts[svc]++
				total++
			} else {
				stagedSet[k] = true
			}
		}
	}
	all := make([]Endpoint, total)
	off := 0
	for _, svc := range s.services {
		if n := counts[svc]; n > 0 {
			s.endpoints[svc] = all[off : off : off+n]
			off += n
		}
	}
	var keys []string // reused: most workloads name one or two services
	for _, w := range s.workloads {
		keys = keys[:0]
		for k := range w.Services {
			keys = append(keys, k)
		}
		slices.Sort(keys)
		for _, k := range keys {
			if svc := s.serviceByServicesKey(k); svc != nil {
				s.endpoints[svc] = append(s.endpoints[svc], Endpoint{Workload: w, Ports: w.Services[k]})
			}
		}
	}
	for k := range stagedSet {
		s.staged = append(s.staged, k)
	}
	slices.Sort(s.staged)
}

// serviceByServicesKey resolves a Workload.Services key ("namespace/hostname").
func (s *Snapshot) serviceByServicesKey(k string) *Service {
	ns, host, ok := strings.Cut(k, "/")
	if !ok {
		return nil
	}
	return s.serviceByKey[NamespacedHostname{Namespace: ns, Hostname: host}]
}

// Version is the number the Store gave this snapshot when it was published (0 before).
func (s *Snapshot) Version() uint64 { return s.version }

// Built is when the snapshot was built.
func (s *Snapshot) Built() time.Time { return s.built }

// Workloads returns every workload, sorted by uid. The slice must not be modified.
func (s *Snapshot) Workloads() []*Workload { return s.workloads }

// Services returns every service, sorted by namespace/hostname. The slice must not be modified.
func (s *Snapshot) Services() []*Service { return s.services }

// Policies returns every policy, sorted by namespace/name. The slice must not be modified.
func (s *Snapshot) Policies() []*Policy { return s.policies }

// StagedServices lists service keys that workloads reference but that no service defines.
func (s *Snapshot) StagedServices() []string { return s.staged }

// WorkloadByUID returns the workload with uid, or nil.
func (s *Snapshot) WorkloadByUID(uid string) *Workload { return s.workloadByUID[uid] }

// WorkloadByAddr returns the workload that owns ip on network, or nil.
func (s *Snapshot) WorkloadByAddr(network string, ip netip.Addr) *Workload {
	return s.workloadByAddr[NetworkAddress{Network: network, Addr: ip.Unmap()}]
}

// ServiceByKey returns the service namespace/hostname, or nil.
func (s *Snapshot) ServiceByKey(key NamespacedHostname) *Service { return s.serviceByKey[key] }

// ServiceByVIP returns the service that owns ip on network as seen from clientNS: exact VIPs
// first, then the longest CIDR VIP. Services visible only in their namespace are skipped for
// other clients; among several, the client's namespace wins, then a canonical service.
func (s *Snapshot) ServiceByVIP(network string, ip netip.Addr, clientNS string) *Service {
	ip = ip.Unmap()
	if svc := pickService(s.servicesByVIP[NetworkAddress{Network: network, Addr: ip}], clientNS); svc != nil {
		return svc
	}
	lens := s.cidrBits6
	if ip.Is4() {
		lens = s.cidrBits4
	}
	for _, bits := range lens {
		p, err := ip.Prefix(int(bits))
		if err != nil {
			continue // not reached: lens hold only lengths valid for ip's family
		}
		if svc := pickService(s.servicesByCIDR[NetworkPrefix{Network: network, Prefix: p}], clientNS); svc != nil {
			return svc
		}
	}
	return nil
}

// ServiceByHostname returns the service with hostname as seen from clientNS.
func (s *Snapshot) ServiceByHostname(hostname, clientNS string) *Service {
	return pickService(s.servicesByHost[hostname], clientNS)
}

func visible(svc *Service, clientNS string) bool {
	return svc.Visibility != VisibilityNamespace || svc.Namespace == clientNS
}

func pickService(cands []*Service, clientNS string) *Service {
	var best *Service
	for _, svc := range cands {
		if !visible(svc, clientNS) {
			continue
		}
		if svc.Namespace == clientNS {
			return svc
		}
		if best == nil || (svc.Canonical && !best.Canonical) {
			best = svc
		}
	}
	return best
}

// Endpoints returns the workloads behind svc. The slice must not be modified.
func (s *Snapshot) Endpoints(svc *Service) []Endpoint { return s.endpoints[svc] }

// PolicyByKey returns the policy "namespace/name", or nil.
func (s *Snapshot) PolicyByKey(key string) *Policy { return s.policyByKey[key] }

// NamespacePolicies returns the namespace-scoped policies of ns, sorted by key; ns "" returns
// the global ones. The slice must not be modified.
func (s *Snapshot) NamespacePolicies(ns string) []*Policy { return s.policiesByNS[ns] }

// WorkloadsOnNode returns the workloads scheduled on node, sorted by uid.
func (s *Snapshot) WorkloadsOnNode(node string) []*Workload {
	var out []*Workload
	for _, w := range s.workloads {
		if w.Node == node {
			out = append(out, w)
		}
	}
	return out
}

// ResolveGateway returns the workload a gateway address (waypoint or network gateway) names:
// by address, the workload with that IP; by hostname, an endpoint of that service. It returns
// the address to dial as well. ok is false when nothing in the snapshot matches.
func (s *Snapshot) ResolveGateway(g *GatewayAddress) (w *Workload, addr netip.Addr, ok bool) {
	switch {
	case g == nil:
		return nil, netip.Addr{}, false
	case g.Address != nil:
		w = s.WorkloadByAddr(g.Address.Network, g.Address.Addr)
		return w, g.Address.Addr, true
	case g.Hostname != nil:
		svc := s.serviceByKey[*g.Hostname]
		if svc == nil {
			return nil, netip.Addr{}, false
		}
		for _, ep := range s.endpoints[svc] {
			if ep.Workload.Status == Healthy && len(ep.Workload.Addresses) > 0 {
				return ep.Workload, ep.Workload.Addresses[0], true
			}
		}
		if len(svc.VIPs) > 0 {
			return nil, svc.VIPs[0].Addr, true
		}
	}
	return nil, netip.Addr{}, false
}
