// Package snapshot is ztgo's immutable, indexed view of the mesh: workloads, services and
// authorization policies, with the indexes the data path needs (workloads by address and uid,
// services by VIP and by namespace/hostname, policies by key and by namespace).
//
// A Snapshot is built off the hot path by Build, or from the previous one by Apply, validated,
// and published through a Store with one atomic pointer store. A flow loads the pointer once and
// uses that view for every decision. Nothing mutates a published Snapshot or anything reachable
// from it; sources that change the mesh make a new one. Apply shares every index shard it does
// not change with the snapshot it started from, so one change to a 100k-workload mesh costs
// tens of microseconds, and both snapshots stay valid. Store.VerifyImmutable
// (ZTGO_DEBUG_SNAPSHOT=1) checks this rule: Publish fingerprints each snapshot and the next
// Publish, or Verify, reports any object or index that changed.
//
// Build's result does not depend on the order of its input: lists are sorted, and every tie a
// lookup breaks (address conflicts, several services at one VIP or hostname) is broken by a
// rule, never by position. Apply gives the same result as Build on the config the deltas add up
// to.
package snapshot

import (
	"cmp"
	"errors"
	"fmt"
	"hash/maphash"
	"net/netip"
	"slices"
	"strings"
	"sync"
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
//
// Its indexes are sharded tables (index.go) that a snapshot made by Apply shares with the one it
// came from, shard by shard: Apply clones only the shards it writes. The sorted lists
// (Workloads, Services, Policies, StagedServices) are not indexes: each is computed on first
// use and kept, because only dumps and tests want them and sorting 100k workloads on every
// Apply would cost more than the rest of it. That memo, behind a sync.Once, is the only write
// to a snapshot after Publish, and no reader can see it happen.
type Snapshot struct {
	version uint64
	built   time.Time
	idx     indexes
	lazy    lazyLists
}

// indexes are a snapshot's tables. Copying the struct shares the tables; Apply copies a table
// (and a shard of it) only to write it.
type indexes struct {
	seed                             maphash.Seed // of the string shard hashes
	nWorkloads, nServices, nPolicies int

	workloadByUID  *table[string, *Workload]
	workloadByAddr *table[NetworkAddress, *Workload]
	// addrClaims lists every workload that claims an address two or more workloads claim (in no
	// order), so that when the winner leaves, the next in preference takes the address back.
	addrClaims *table[NetworkAddress, []*Workload]
	// workloadsByNode lists the workloads of each node, and workloadsByHost those with a
	// hostname by namespace/hostname, both sorted by uid.
	workloadsByNode *table[string, []*Workload]
	workloadsByHost *table[NamespacedHostname, []*Workload]

	serviceByKey  *table[NamespacedHostname, *Service]
	servicesByVIP *table[NetworkAddress, []*Service]
	// servicesByCIDR holds CIDR VIPs by masked prefix; cidrBits4 and cidrBits6 list the prefix
	// lengths in use, longest first, so a lookup costs one map probe per length in use (at most
	// 33 or 129) rather than a scan of every CIDR VIP in the mesh. cidrKeys counts the keys of
	// each length ([0] IPv4, [1] IPv6), so Apply knows when a length comes into or out of use.
	servicesByCIDR *table[NetworkPrefix, []*Service]
	cidrKeys       [2][129]int32
	cidrBits4      []uint8
	cidrBits6      []uint8
	servicesByHost *table[string, []*Service]
	// Candidate lists (by VIP, CIDR, hostname) are sorted by service key: they decide ties in
	// pickService (first visible wins among equals).

	// endpoints holds each service's endpoints, keyed by the service object, sharded by its
	// hostname; staged holds, by Workload.Services key, the would-be endpoints of keys that
	// name no service, ready to move to endpoints when the service arrives. Both sorted by uid.
	endpoints *table[*Service, []Endpoint]
	staged    *table[string, []Endpoint]

	policyByKey *table[string, *Policy]
	// policiesByNS holds namespace-scoped policies by namespace, and global ones under "",
	// sorted by key.
	policiesByNS *table[string, []*Policy]
}

// lazyLists are a snapshot's sorted lists, each computed once, on first use.
type lazyLists struct {
	workloadsOnce, servicesOnce, policiesOnce, stagedOnce sync.Once

	workloads []*Workload // sorted by UID
	services  []*Service  // sorted by key
	policies  []*Policy   // sorted by key
	staged    []string    // sorted
}

// ErrInvalid marks errors that are about the content of a Config.
var ErrInvalid = errors.New("invalid config")

// Build validates cfg, fills ztunnel's defaults, and returns the indexed snapshot. Build takes
// ownership of cfg's objects: callers must not change them afterwards. An object may be passed
// to several Builds (a source that keeps unchanged objects across updates): Build writes a
// field only while it still differs from what Build would set, so rebuilding with an object a
// published snapshot holds never writes to it.
//
// Build is Apply of every object to the empty snapshot, with the stricter checks of a whole
// config (a duplicate key is an error, and any error fails the Build), so the two cannot
// disagree about what a mesh looks like.
func Build(cfg Config) (*Snapshot, error) {
	b := newBuilder(&indexes{seed: maphash.MakeSeed()}, len(cfg.Workloads), len(cfg.Services), len(cfg.Policies))
	var errs []error
	for i, w := range cfg.Workloads {
		if err := b.buildWorkload(w); err != nil {
			errs = append(errs, fmt.Errorf("workloads[%d] (%s): %w", i, workloadName(w), err))
		}
	}
	for i, svc := range cfg.Services {
		if err := b.buildService(svc); err != nil {
			errs = append(errs, fmt.Errorf("services[%d] (%s): %w", i, serviceName(svc), err))
		}
	}
	for i, p := range cfg.Policies {
		if err := b.buildPolicy(p); err != nil {
			errs = append(errs, fmt.Errorf("policies[%d] (%s): %w", i, policyName(p), err))
		}
	}
	if len(errs) > 0 {
		return nil, fmt.Errorf("%w: %w", ErrInvalid, errors.Join(errs...))
	}
	return b.finish(), nil
}

func (b *builder) buildWorkload(w *Workload) error {
	if err := checkWorkloadName(w); err != nil {
		return err
	}
	if _, dup := b.uid.get(shardOfString(b.s.idx.seed, w.UID), w.UID); dup {
		return fmt.Errorf("uid: %q is used by another workload", w.UID)
	}
	if err := checkWorkload(w); err != nil {
		return err
	}
	b.changeWorkload(nil, w)
	return nil
}

func (b *builder) buildService(svc *Service) error {
	if err := checkService(svc); err != nil {
		return err
	}
	key := svc.Key()
	if _, dup := b.svcKey.get(shardOfHost(b.s.idx.seed, key.Hostname), key); dup {
		return fmt.Errorf("hostname: service %s is defined twice", key)
	}
	b.changeService(nil, svc)
	return nil
}

func (b *builder) buildPolicy(p *Policy) error {
	if err := checkPolicy(p); err != nil {
		return err
	}
	if _, dup := b.polKey.get(shardOfString(b.s.idx.seed, p.key), p.key); dup {
		return fmt.Errorf("name: policy %s is defined twice", p.Key())
	}
	b.changePolicy(nil, p)
	return nil
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

// compareServices orders services by their "namespace/hostname" string, as Services documents.
func compareServices(a, b *Service) int { return compareKeys(a.Key(), b.Key()) }

// compareKeys orders service keys as their "namespace/hostname" strings, without building the
// strings: every candidate list is kept sorted with it. It returns 0 only for equal keys.
func compareKeys(a, b NamespacedHostname) int {
	if a.Namespace == b.Namespace {
		return strings.Compare(a.Hostname, b.Hostname)
	}
	// Unless one namespace is a prefix of the other, the namespaces differ before either "/".
	if !strings.HasPrefix(a.Namespace, b.Namespace) && !strings.HasPrefix(b.Namespace, a.Namespace) {
		return strings.Compare(a.Namespace, b.Namespace)
	}
	if c := strings.Compare(a.String(), b.String()); c != 0 {
		return c
	}
	// Namespace "a/b" with hostname "c" and namespace "a" with hostname "b/c" read alike:
	// the shorter namespace first, so that only equal keys compare equal.
	return cmp.Compare(len(a.Namespace), len(b.Namespace))
}

// checkWorkloadName checks a workload's name and derives its uid: what Build needs before it can
// tell a duplicate. Like every check, it writes a default only into an empty field.
func checkWorkloadName(w *Workload) error {
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
	return nil
}

// checkWorkload fills the remaining defaults and checks the addresses.
func checkWorkload(w *Workload) error {
	if w.TrustDomain == "" {
		w.TrustDomain = DefaultTrustDomain
	}
	if w.ServiceAccount == "" {
		w.ServiceAccount = DefaultServiceAccount
	}
	if w.ClusterID == "" {
		w.ClusterID = DefaultClusterID
	}
	// A workload with neither addresses nor a hostname is valid: istiod sends such
	// workloads for endpoints on another network, reached only through their network
	// gateway (ztunnel accepts them; its load balancing keeps them only in that case).
	for _, a := range w.Addresses {
		if !a.IsValid() {
			return errors.New("workloadIps: invalid address")
		}
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

func checkService(svc *Service) error {
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

// checkPolicy checks p and sets its key.
func checkPolicy(p *Policy) error {
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
	return nil
}

// Version is the number the Store gave this snapshot when it was published (0 before).
func (s *Snapshot) Version() uint64 { return s.version }

// Counts returns how many workloads, services and policies the snapshot holds, without
// building the sorted lists.
func (s *Snapshot) Counts() (workloads, services, policies int) {
	return s.idx.nWorkloads, s.idx.nServices, s.idx.nPolicies
}

// Built is when the snapshot was built.
func (s *Snapshot) Built() time.Time { return s.built }

// Workloads returns every workload, sorted by uid. The slice must not be modified. The first
// call on a snapshot sorts (~30 ms at 100k workloads); later ones return the same slice. Code
// on the data path should use an index instead (WorkloadByUID, WorkloadByAddr,
// WorkloadByHostname, WorkloadsOnNode).
func (s *Snapshot) Workloads() []*Workload {
	s.lazy.workloadsOnce.Do(func() {
		if s.idx.nWorkloads == 0 {
			return
		}
		// Sorting (uid, workload) pairs reads the uids from the table, not through each
		// workload: a third faster than sorting the pointers.
		type entry struct {
			uid string
			w   *Workload
		}
		es := make([]entry, 0, s.idx.nWorkloads)
		for i := range numShards {
			for uid, w := range s.idx.workloadByUID.at(shard(i)) {
				es = append(es, entry{uid, w})
			}
		}
		slices.SortFunc(es, func(a, b entry) int { return strings.Compare(a.uid, b.uid) })
		l := make([]*Workload, len(es))
		for i, e := range es {
			l[i] = e.w
		}
		s.lazy.workloads = l
	})
	return s.lazy.workloads
}

// Services returns every service, sorted by namespace/hostname. The slice must not be modified.
func (s *Snapshot) Services() []*Service {
	s.lazy.servicesOnce.Do(func() {
		s.lazy.services = values(s.idx.serviceByKey, s.idx.nServices, compareServices)
	})
	return s.lazy.services
}

// Policies returns every policy, sorted by namespace/name. The slice must not be modified.
func (s *Snapshot) Policies() []*Policy {
	s.lazy.policiesOnce.Do(func() {
		s.lazy.policies = values(s.idx.policyByKey, s.idx.nPolicies, func(a, b *Policy) int { return cmp.Compare(a.key, b.key) })
	})
	return s.lazy.policies
}

// StagedServices lists service keys that workloads reference but that no service defines,
// sorted. The slice must not be modified.
func (s *Snapshot) StagedServices() []string {
	s.lazy.stagedOnce.Do(func() {
		var keys []string
		for i := range numShards {
			for k := range s.idx.staged.at(shard(i)) {
				keys = append(keys, k)
			}
		}
		slices.Sort(keys)
		s.lazy.staged = keys
	})
	return s.lazy.staged
}

// values returns the values of t sorted by cmp, or nil if there are none.
func values[K comparable, V any](t *table[K, V], n int, cmp func(a, b V) int) []V {
	if n == 0 {
		return nil
	}
	out := make([]V, 0, n)
	for i := range numShards {
		for _, v := range t.at(shard(i)) {
			out = append(out, v)
		}
	}
	slices.SortFunc(out, cmp)
	return out
}

// WorkloadByUID returns the workload with uid, or nil.
func (s *Snapshot) WorkloadByUID(uid string) *Workload {
	return s.idx.workloadByUID.at(shardOfString(s.idx.seed, uid))[uid]
}

// WorkloadByAddr returns the workload that owns ip on network, or nil.
func (s *Snapshot) WorkloadByAddr(network string, ip netip.Addr) *Workload {
	ip = ip.Unmap()
	m := s.idx.workloadByAddr.at(shardOfIP(ip)) // hashed before the key is built: faster
	return m[NetworkAddress{Network: network, Addr: ip}]
}

// WorkloadByHostname returns the workload with the lowest uid among those whose namespace and
// hostname are nh, or nil (always for an empty hostname). It is the index behind resolving a
// gateway that names a workload by hostname, which otherwise scans Workloads.
func (s *Snapshot) WorkloadByHostname(nh NamespacedHostname) *Workload {
	if l := s.idx.workloadsByHost.at(shardOfHost(s.idx.seed, nh.Hostname))[nh]; len(l) > 0 {
		return l[0]
	}
	return nil
}

// ServiceByKey returns the service namespace/hostname, or nil.
func (s *Snapshot) ServiceByKey(key NamespacedHostname) *Service {
	return s.idx.serviceByKey.at(shardOfHost(s.idx.seed, key.Hostname))[key]
}

// ServiceByVIP returns the service that owns ip on network as seen from clientNS: exact VIPs
// first, then the longest CIDR VIP. Services visible only in their namespace are skipped for
// other clients; among several, the client's namespace wins, then a canonical service.
func (s *Snapshot) ServiceByVIP(network string, ip netip.Addr, clientNS string) *Service {
	ip = ip.Unmap()
	m := s.idx.servicesByVIP.at(shardOfIP(ip))
	if svc := pickService(m[NetworkAddress{Network: network, Addr: ip}], clientNS); svc != nil {
		return svc
	}
	lens := s.idx.cidrBits6
	if ip.Is4() {
		lens = s.idx.cidrBits4
	}
	for _, bits := range lens {
		p, err := ip.Prefix(int(bits))
		if err != nil {
			continue // not reached: lens hold only lengths valid for ip's family
		}
		m := s.idx.servicesByCIDR.at(shardOfPrefix(p))
		if svc := pickService(m[NetworkPrefix{Network: network, Prefix: p}], clientNS); svc != nil {
			return svc
		}
	}
	return nil
}

// ServiceByHostname returns the service with hostname as seen from clientNS.
func (s *Snapshot) ServiceByHostname(hostname, clientNS string) *Service {
	return pickService(s.idx.servicesByHost.at(shardOfHost(s.idx.seed, hostname))[hostname], clientNS)
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

// Endpoints returns the workloads behind svc, sorted by uid. The slice must not be modified.
func (s *Snapshot) Endpoints(svc *Service) []Endpoint {
	if svc == nil {
		return nil
	}
	return s.idx.endpoints.at(shardOfHost(s.idx.seed, svc.Hostname))[svc]
}

// PolicyByKey returns the policy "namespace/name", or nil.
func (s *Snapshot) PolicyByKey(key string) *Policy {
	return s.idx.policyByKey.at(shardOfString(s.idx.seed, key))[key]
}

// NamespacePolicies returns the namespace-scoped policies of ns, sorted by key; ns "" returns
// the global ones. The slice must not be modified.
func (s *Snapshot) NamespacePolicies(ns string) []*Policy {
	return s.idx.policiesByNS.at(shardOfString(s.idx.seed, ns))[ns]
}

// WorkloadsOnNode returns the workloads scheduled on node, sorted by uid, in a new slice the
// caller may keep and change. It reads a per-node index: the cost is the node's workloads, not
// the mesh's.
func (s *Snapshot) WorkloadsOnNode(node string) []*Workload {
	return slices.Clone(s.idx.workloadsByNode.at(shardOfString(s.idx.seed, node))[node])
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
		svc := s.ServiceByKey(*g.Hostname)
		if svc == nil {
			return nil, netip.Addr{}, false
		}
		for _, ep := range s.Endpoints(svc) {
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
