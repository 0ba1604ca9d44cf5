package snapshot

import (
	"errors"
	"fmt"
	"net/netip"
	"strings"
)

// DebugSnapshotEnv names the environment variable that turns on Store.VerifyImmutable when set to
// "1". The package never reads the environment itself: the caller does (cmd/ztgo), so tests and
// embedders decide for themselves.
const DebugSnapshotEnv = "ZTGO_DEBUG_SNAPSHOT"

// DebugFromEnv reports whether getenv (os.Getenv in cmd/ztgo) asks for the immutability check.
func DebugFromEnv(getenv func(string) string) bool { return getenv(DebugSnapshotEnv) == "1" }

// ErrMutated marks an error from the debug immutability check: something changed a snapshot
// after it was published.
var ErrMutated = errors.New("published snapshot was mutated")

// maxFound bounds the violations a Store keeps for Verify, so a writer that mutates on every
// update cannot grow them without limit.
const maxFound = 16

// maxDiffs bounds how many changed objects one error lists.
const maxDiffs = 20

// Verify fingerprints the current snapshot again and returns an error wrapping ErrMutated that
// names every object and field changed since Publish fingerprinted it, joined with the
// violations earlier Publishes found in their predecessors that Verify has not returned yet.
// Each change is reported once. Verify returns nil when nothing changed, or when VerifyImmutable
// was off at the last Publish. It walks the whole snapshot: call it from tests, an admin handler
// or a debug timer, never per flow.
func (st *Store) Verify() error {
	st.pubMu.Lock()
	defer st.pubMu.Unlock()
	errs := st.found
	if st.lost > 0 {
		errs = append(errs, fmt.Errorf("verify: %d more violations were dropped", st.lost))
	}
	st.found, st.lost = nil, 0
	if st.print != nil {
		if err := st.print.verify(); err != nil {
			errs = append(errs, fmt.Errorf("verify: %w", err))
			st.print = takeFingerprint(st.print.snap) // report this change once
		}
	}
	return errors.Join(errs...)
}

// checkBeforePublish runs under pubMu when VerifyImmutable is on: it checks the snapshot being
// replaced (the last moment this store can see it) and fingerprints s, before anyone can Load it.
func (st *Store) checkBeforePublish(s *Snapshot) {
	if st.print != nil {
		if err := st.print.verify(); err != nil {
			st.report(fmt.Errorf("publish: %w", err))
		}
	}
	if s.version != 0 {
		st.report(fmt.Errorf("publish: snapshot %d is published again; Publish needs a fresh snapshot from Build", s.version))
	}
	st.print = takeFingerprint(s)
}

// report keeps err for Verify and logs it: Publish has no error to return, and the layer that
// turned the check on (by setting Logger) decides where it goes.
func (st *Store) report(err error) {
	if len(st.found) < maxFound {
		st.found = append(st.found, err)
	} else {
		st.lost++
	}
	if st.Logger != nil {
		st.Logger.Error("snapshot immutability check failed", "err", err)
	}
}

// fingerprint is what the immutability check remembers of a snapshot: a 64-bit digest per
// object (workload, service, service endpoint list, policy, the snapshot's own lists, and its
// indexes, shared shard by shard with the snapshots Apply makes from it), which
// detects a change, and one digest byte per field, which names the changed field (a 1 in 256
// collision can hide the name, never the change). Comparing digests rather than a deep copy
// keeps the check at a few bytes per object.
type fingerprint struct {
	snap   *Snapshot
	sums   []uint64
	fields []uint8
}

// Fields per object kind, to size a fingerprint up front.
const (
	workloadFields = 25
	serviceFields  = 13
	policyFields   = 6
	listFields     = 2
	indexFields    = 13
)

func takeFingerprint(s *Snapshot) *fingerprint {
	nw, ns, np := len(s.Workloads()), len(s.Services()), len(s.Policies())
	f := &fingerprint{
		snap:   s,
		sums:   make([]uint64, 0, nw+2*ns+np+2),
		fields: make([]uint8, 0, workloadFields*nw+(serviceFields+2)*ns+policyFields*np+listFields+indexFields),
	}
	p := printer{fp: f}
	p.walk(s)
	return f
}

// verify walks f's snapshot again and returns an error naming what differs from f.
func (f *fingerprint) verify() error {
	p := printer{fp: f, verifying: true}
	p.walk(f.snap)
	if p.obj != len(f.sums) || p.fld != len(f.fields) {
		p.diff("the snapshot's lists changed length")
	}
	if len(p.diffs) == 0 {
		return nil
	}
	if p.more > 0 {
		p.diffs = append(p.diffs, fmt.Sprintf("and %d more objects", p.more))
	}
	return fmt.Errorf("snapshot %d: %w: %s", f.snap.version, ErrMutated, strings.Join(p.diffs, "; "))
}

// printer walks a snapshot in a fixed order, digesting each object field by field. Recording, it
// appends to its fingerprint; verifying, it compares against it and collects what differs.
type printer struct {
	fp        *fingerprint
	verifying bool
	obj, fld  int // verifying: the next object and field digest to compare

	// The current object: named only if it changed, so recording never formats a string.
	kind    string
	index   int
	ref     any
	sum     fnv
	changed []string

	diffs []string
	more  int
}

func (p *printer) walk(s *Snapshot) {
	for i, w := range s.Workloads() {
		p.begin("workloads", i, w)
		p.workload(w)
		p.end()
	}
	for i, svc := range s.Services() {
		p.begin("services", i, svc)
		p.service(svc)
		p.end()
	}
	for i, svc := range s.Services() {
		p.begin("endpoints", i, svc)
		p.endpoints(s.Endpoints(svc))
		p.end()
	}
	for i, pol := range s.Policies() {
		p.begin("policies", i, pol)
		p.policy(pol)
		p.end()
	}
	p.begin("lists", 0, nil)
	p.lists(s)
	p.end()
	p.begin("indexes", 0, nil)
	p.indexes(&s.idx)
	p.end()
}

func (p *printer) begin(kind string, index int, ref any) {
	p.kind, p.index, p.ref, p.sum, p.changed = kind, index, ref, fnvOffset, p.changed[:0]
}

func (p *printer) field(name string, h fnv) {
	p.sum = p.sum.u64(uint64(h))
	if !p.verifying {
		p.fp.fields = append(p.fp.fields, h.digest())
		return
	}
	if p.fld < len(p.fp.fields) && p.fp.fields[p.fld] != h.digest() {
		p.changed = append(p.changed, name)
	}
	p.fld++
}

func (p *printer) end() {
	if !p.verifying {
		p.fp.sums = append(p.fp.sums, uint64(p.sum))
		return
	}
	if p.obj < len(p.fp.sums) && p.fp.sums[p.obj] != uint64(p.sum) {
		what := "a field (which one is hidden by a digest collision)"
		if len(p.changed) > 0 {
			what = strings.Join(p.changed, ", ")
		}
		p.diff(fmt.Sprintf("%s[%d] %s: %s changed", p.kind, p.index, describe(p.ref), what))
	}
	p.obj++
}

func (p *printer) diff(d string) {
	if len(p.diffs) < maxDiffs {
		p.diffs = append(p.diffs, d)
	} else {
		p.more++
	}
}

// describe names an object by what it is now (a changed name field shows its new value; the
// position in the message still locates it).
func describe(ref any) string {
	switch r := ref.(type) {
	case *Workload:
		return "workload " + r.UID
	case *Service:
		return "service " + r.Key().String()
	case *Policy:
		return "policy " + r.Namespace + "/" + r.Name
	default:
		return "of the snapshot"
	}
}

func (p *printer) workload(w *Workload) {
	p.field("UID", fnvOffset.str(w.UID))
	p.field("Name", fnvOffset.str(w.Name))
	p.field("Namespace", fnvOffset.str(w.Namespace))
	h := fnvOffset.u64(uint64(len(w.Addresses)))
	for _, a := range w.Addresses {
		h = h.addr(a)
	}
	p.field("Addresses", h)
	p.field("Hostname", fnvOffset.str(w.Hostname))
	p.field("Network", fnvOffset.str(w.Network))
	p.field("Protocol", fnvOffset.u64(uint64(w.Protocol)))
	p.field("TrustDomain", fnvOffset.str(w.TrustDomain))
	p.field("ServiceAccount", fnvOffset.str(w.ServiceAccount))
	p.field("Waypoint", fnvOffset.gateway(w.Waypoint))
	p.field("NetworkGateway", fnvOffset.gateway(w.NetworkGateway))
	p.field("Node", fnvOffset.str(w.Node))
	p.field("CanonicalName", fnvOffset.str(w.CanonicalName))
	p.field("CanonicalRevision", fnvOffset.str(w.CanonicalRevision))
	p.field("WorkloadType", fnvOffset.u64(uint64(w.WorkloadType)))
	p.field("WorkloadName", fnvOffset.str(w.WorkloadName))
	p.field("NativeTunnel", fnvOffset.boolean(w.NativeTunnel))
	h = fnvOffset.boolean(w.ApplicationTunnel != nil)
	if t := w.ApplicationTunnel; t != nil {
		h = h.u64(uint64(t.Protocol)).u64(uint64(t.Port))
	}
	p.field("ApplicationTunnel", h)
	p.field("Services", fnvOffset.services(w.Services))
	p.field("AuthorizationPolicies", fnvOffset.strs(w.AuthorizationPolicies))
	p.field("Status", fnvOffset.u64(uint64(w.Status)))
	p.field("ClusterID", fnvOffset.str(w.ClusterID))
	p.field("Locality", fnvOffset.str(w.Locality.Region).str(w.Locality.Zone).str(w.Locality.Subzone))
	p.field("NetworkMode", fnvOffset.u64(uint64(w.NetworkMode)))
	p.field("Capacity", fnvOffset.u64(uint64(w.Capacity)))
}

func (p *printer) service(svc *Service) {
	p.field("Name", fnvOffset.str(svc.Name))
	p.field("Namespace", fnvOffset.str(svc.Namespace))
	p.field("Hostname", fnvOffset.str(svc.Hostname))
	h := fnvOffset.u64(uint64(len(svc.VIPs)))
	for _, v := range svc.VIPs {
		h = h.str(v.Network).addr(v.Addr)
	}
	p.field("VIPs", h)
	h = fnvOffset.u64(uint64(len(svc.CIDRVIPs)))
	for _, c := range svc.CIDRVIPs {
		h = h.str(c.Network).prefix(c.Prefix)
	}
	p.field("CIDRVIPs", h)
	p.field("Ports", fnvOffset.ports(svc.Ports))
	p.field("SubjectAltNames", fnvOffset.strs(svc.SubjectAltNames))
	p.field("Waypoint", fnvOffset.gateway(svc.Waypoint))
	h = fnvOffset.u64(uint64(len(svc.WeightedWaypoints)))
	for i := range svc.WeightedWaypoints {
		ww := &svc.WeightedWaypoints[i]
		h = h.gateway(&ww.Destination).u64(uint64(ww.Weight))
	}
	p.field("WeightedWaypoints", h)
	h = fnvOffset.boolean(svc.LoadBalancing != nil)
	if lb := svc.LoadBalancing; lb != nil {
		h = h.u64(uint64(len(lb.RoutingPreference)))
		for _, sc := range lb.RoutingPreference {
			h = h.u64(uint64(sc))
		}
		h = h.u64(uint64(lb.Mode)).u64(uint64(lb.HealthPolicy))
	}
	p.field("LoadBalancing", h)
	p.field("IPFamilies", fnvOffset.u64(uint64(svc.IPFamilies)))
	p.field("Canonical", fnvOffset.boolean(svc.Canonical))
	p.field("Visibility", fnvOffset.u64(uint64(svc.Visibility)))
}

// endpoints digests a service's endpoint list: the list itself is reachable (Endpoints returns
// it), so a caller writing into it is caught even though each workload is digested on its own.
func (p *printer) endpoints(eps []Endpoint) {
	wh, ph := fnvOffset.u64(uint64(len(eps))), fnvOffset
	for _, ep := range eps {
		if ep.Workload == nil {
			wh = wh.boolean(false)
		} else {
			wh = wh.boolean(true).str(ep.Workload.UID)
		}
		ph = ph.ports(ep.Ports)
	}
	p.field("Workload", wh)
	p.field("Ports", ph)
}

func (p *printer) policy(pol *Policy) {
	p.field("Name", fnvOffset.str(pol.Name))
	p.field("Namespace", fnvOffset.str(pol.Namespace))
	p.field("Scope", fnvOffset.u64(uint64(pol.Scope)))
	p.field("Action", fnvOffset.u64(uint64(pol.Action)))
	h := fnvOffset.u64(uint64(len(pol.Rules)))
	for _, r := range pol.Rules {
		h = h.u64(uint64(len(r)))
		for _, c := range r {
			h = h.u64(uint64(len(c)))
			for i := range c {
				h = h.match(&c[i])
			}
		}
	}
	p.field("Rules", h)
	p.field("DryRun", fnvOffset.boolean(pol.DryRun))
}

// lists digests the snapshot's own slices that accessors hand out: a caller writing into one
// changes what every other reader sees.
func (p *printer) lists(s *Snapshot) {
	p.field("StagedServices", fnvOffset.strs(s.StagedServices()))
	p.field("NamespacePolicies", digestTable(s.idx.policiesByNS, func(ns string, l []*Policy) fnv {
		h := fnvOffset.str(ns).u64(uint64(len(l)))
		for _, pol := range l {
			h = h.str(pol.Namespace).str(pol.Name)
		}
		return h
	}))
}

// indexes digests every index: what each key leads to (by uid or key; the objects themselves
// are digested above). Apply shares index shards between snapshots, so a write into a shard
// that should have been cloned first shows up here, in the snapshot that still holds it.
func (p *printer) indexes(x *indexes) {
	uids := func(h fnv, l []*Workload) fnv {
		h = h.u64(uint64(len(l)))
		for _, w := range l {
			h = h.str(w.UID)
		}
		return h
	}
	keys := func(h fnv, l []*Service) fnv {
		h = h.u64(uint64(len(l)))
		for _, svc := range l {
			h = h.str(svc.Namespace).str(svc.Hostname)
		}
		return h
	}
	eps := func(h fnv, l []Endpoint) fnv {
		h = h.u64(uint64(len(l)))
		for _, ep := range l {
			h = h.str(ep.Workload.UID)
		}
		return h
	}
	p.field("WorkloadByUID", digestTable(x.workloadByUID, func(k string, w *Workload) fnv { return fnvOffset.str(k).str(w.UID) }))
	p.field("WorkloadByAddr", digestTable(x.workloadByAddr, func(k NetworkAddress, w *Workload) fnv {
		return fnvOffset.str(k.Network).addr(k.Addr).str(w.UID)
	}))
	p.field("AddressClaims", digestTable(x.addrClaims, func(k NetworkAddress, l []*Workload) fnv {
		return uids(fnvOffset.str(k.Network).addr(k.Addr), l)
	}))
	p.field("WorkloadsByNode", digestTable(x.workloadsByNode, func(k string, l []*Workload) fnv { return uids(fnvOffset.str(k), l) }))
	p.field("WorkloadsByHostname", digestTable(x.workloadsByHost, func(k NamespacedHostname, l []*Workload) fnv {
		return uids(fnvOffset.str(k.Namespace).str(k.Hostname), l)
	}))
	p.field("ServiceByKey", digestTable(x.serviceByKey, func(k NamespacedHostname, svc *Service) fnv {
		return fnvOffset.str(k.Namespace).str(k.Hostname).str(svc.Namespace).str(svc.Hostname)
	}))
	p.field("ServicesByVIP", digestTable(x.servicesByVIP, func(k NetworkAddress, l []*Service) fnv {
		return keys(fnvOffset.str(k.Network).addr(k.Addr), l)
	}))
	p.field("ServicesByCIDR", digestTable(x.servicesByCIDR, func(k NetworkPrefix, l []*Service) fnv {
		return keys(fnvOffset.str(k.Network).prefix(k.Prefix), l)
	}))
	h := fnvOffset.u64(uint64(len(x.cidrBits4)))
	for _, b := range x.cidrBits4 {
		h = h.u64(uint64(b))
	}
	h = h.u64(uint64(len(x.cidrBits6)))
	for _, b := range x.cidrBits6 {
		h = h.u64(uint64(b))
	}
	p.field("CIDRLengths", h)
	p.field("ServicesByHostname", digestTable(x.servicesByHost, func(k string, l []*Service) fnv { return keys(fnvOffset.str(k), l) }))
	p.field("EndpointsByService", digestTable(x.endpoints, func(svc *Service, l []Endpoint) fnv {
		return eps(fnvOffset.str(svc.Namespace).str(svc.Hostname), l)
	}))
	p.field("StagedEndpoints", digestTable(x.staged, func(k string, l []Endpoint) fnv { return eps(fnvOffset.str(k), l) }))
	p.field("PolicyByKey", digestTable(x.policyByKey, func(k string, pol *Policy) fnv { return fnvOffset.str(k).str(pol.key) }))
}

// digestTable digests a table as a set: each entry on its own, summed, since map order varies.
func digestTable[K comparable, V any](t *table[K, V], entry func(K, V) fnv) fnv {
	var set uint64
	n := 0
	for i := range numShards {
		for k, v := range t.at(shard(i)) {
			set += entry(k, v).mix()
			n++
		}
	}
	return fnvOffset.u64(uint64(n)).u64(set)
}

// fnv is an FNV-1a 64 state that consumes a 64-bit word per step instead of a byte: a
// fingerprint of a 100k-workload snapshot then takes a few tens of milliseconds instead of a
// few hundred. It is written inline instead of using hash/fnv so that digesting a string or an
// address needs no []byte conversion and no allocation. Xor-then-multiply by an odd number is a
// bijection, so any single changed word changes the state; but a change only spreads upwards,
// and by about 40 bits per word, so whatever is cut from a state (a field's digest byte) or
// summed (map entries) goes through mix first.
type fnv uint64

const (
	fnvOffset fnv = 14695981039346656037
	fnvPrime  fnv = 1099511628211
)

func (h fnv) u64(v uint64) fnv { return (h ^ fnv(v)) * fnvPrime }

// mix is the MurmurHash3 finaliser: a bijection after which every bit depends on every bit.
func (h fnv) mix() uint64 {
	x := uint64(h)
	x ^= x >> 33
	x *= 0xff51afd7ed558ccd
	x ^= x >> 33
	x *= 0xc4ceb9fe1a85ec53
	x ^= x >> 33
	return x
}

// digest is the byte a field is remembered by.
func (h fnv) digest() uint8 { return uint8(h.mix()) }

func (h fnv) boolean(b bool) fnv {
	if b {
		return h.u64(1)
	}
	return h.u64(0)
}

// str digests s with its length first, so adjacent strings cannot trade bytes unnoticed.
func (h fnv) str(s string) fnv {
	h = h.u64(uint64(len(s)))
	for ; len(s) >= 8; s = s[8:] {
		h = h.u64(uint64(s[0]) | uint64(s[1])<<8 | uint64(s[2])<<16 | uint64(s[3])<<24 |
			uint64(s[4])<<32 | uint64(s[5])<<40 | uint64(s[6])<<48 | uint64(s[7])<<56)
	}
	if len(s) > 0 {
		var tail uint64
		for i := 0; i < len(s); i++ {
			tail |= uint64(s[i]) << (8 * i)
		}
		h = h.u64(tail)
	}
	return h
}

func (h fnv) strs(l []string) fnv {
	h = h.u64(uint64(len(l)))
	for _, s := range l {
		h = h.str(s)
	}
	return h
}

// addr digests the bit length too, so 1.2.3.4 and ::ffff:1.2.3.4 differ.
func (h fnv) addr(a netip.Addr) fnv {
	b := a.As16()
	var hi, lo uint64
	for i := range 8 {
		hi |= uint64(b[i]) << (8 * i)
		lo |= uint64(b[8+i]) << (8 * i)
	}
	return h.u64(hi).u64(lo).u64(uint64(a.BitLen())).str(a.Zone())
}

func (h fnv) prefix(p netip.Prefix) fnv { return h.addr(p.Addr()).u64(uint64(p.Bits())) }

func (h fnv) prefixes(l []netip.Prefix) fnv {
	h = h.u64(uint64(len(l)))
	for _, p := range l {
		h = h.prefix(p)
	}
	return h
}

func (h fnv) ports16(l []uint16) fnv {
	h = h.u64(uint64(len(l)))
	for _, v := range l {
		h = h.u64(uint64(v))
	}
	return h
}

// ports digests a map as a set: each entry on its own, summed, since map order varies. A nil
// map and an empty one digest alike; both mean no ports.
func (h fnv) ports(m PortMap) fnv {
	var set uint64
	for k, v := range m {
		set += fnvOffset.u64(uint64(k)).u64(uint64(v)).mix()
	}
	return h.u64(uint64(len(m))).u64(set)
}

func (h fnv) services(m map[string]PortMap) fnv {
	var set uint64
	for k, v := range m {
		set += fnvOffset.str(k).ports(v).mix()
	}
	return h.u64(uint64(len(m))).u64(set)
}

func (h fnv) gateway(g *GatewayAddress) fnv {
	h = h.boolean(g != nil)
	if g == nil {
		return h
	}
	h = h.boolean(g.Address != nil)
	if a := g.Address; a != nil {
		h = h.str(a.Network).addr(a.Addr)
	}
	h = h.boolean(g.Hostname != nil)
	if n := g.Hostname; n != nil {
		h = h.str(n.Namespace).str(n.Hostname)
	}
	return h.u64(uint64(g.HBONEPort))
}

func (h fnv) stringMatches(l []StringMatch) fnv {
	h = h.u64(uint64(len(l)))
	for _, m := range l {
		h = h.u64(uint64(m.Kind)).str(m.Value)
	}
	return h
}

func (h fnv) accounts(l []ServiceAccountMatch) fnv {
	h = h.u64(uint64(len(l)))
	for _, m := range l {
		h = h.str(m.Namespace).str(m.ServiceAccount)
	}
	return h
}

func (h fnv) match(m *Match) fnv {
	return h.stringMatches(m.Namespaces).stringMatches(m.NotNamespaces).
		accounts(m.ServiceAccounts).accounts(m.NotServiceAccounts).
		stringMatches(m.Principals).stringMatches(m.NotPrincipals).
		prefixes(m.SourceIPs).prefixes(m.NotSourceIPs).
		prefixes(m.DestinationIPs).prefixes(m.NotDestinationIPs).
		ports16(m.DestinationPorts).ports16(m.NotDestinationPorts)
}
