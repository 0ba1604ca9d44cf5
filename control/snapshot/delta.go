package snapshot

import (
	"slices"
	"strings"
	"time"
)

// Delta is a set of changes to a snapshot, as an incremental source (xDS) delivers them.
// Upserts replace the resource with the same key (workload uid, service namespace/hostname,
// policy namespace/name); removals name keys. Apply takes ownership of the upserted objects.
type Delta struct {
	Workloads        []*Workload
	RemovedWorkloads []string
	Services         []*Service
	RemovedServices  []NamespacedHostname
	Policies         []*Policy
	RemovedPolicies  []string
}

// Empty reports whether d changes nothing.
func (d *Delta) Empty() bool {
	return len(d.Workloads)+len(d.RemovedWorkloads)+len(d.Services)+len(d.RemovedServices)+
		len(d.Policies)+len(d.RemovedPolicies) == 0
}

// ResourceError is the rejection of one resource of a Delta: the resource is not applied, the
// rest of the delta is.
type ResourceError struct {
	// Kind is "workload", "service" or "policy"; Name its key.
	Kind, Name string
	Err        error
}

func (e ResourceError) Error() string { return e.Kind + " " + e.Name + ": " + e.Err.Error() }
func (e ResourceError) Unwrap() error { return e.Err }

// Apply returns a new snapshot with d applied; s is not changed. Each upserted resource is
// validated on its own: an invalid one is reported in the returned errors and left out (the
// snapshot keeps its previous version of that resource, if any), and the valid ones apply.
// Removals apply before upserts, and of several upserts with one key the last wins.
//
// Apply is incremental: it costs what d touches (a few index shards, the lists d changes), not
// the size of the mesh, and the new snapshot shares everything else with s. The result is the
// one Build gives for the config s and d add up to.
func (s *Snapshot) Apply(d Delta) (*Snapshot, []ResourceError) {
	var rerrs []ResourceError
	wl := netChanges(d.RemovedWorkloads, d.Workloads, "workload", validateWorkload, workloadUID, workloadName, &rerrs)
	svcs := netChanges(d.RemovedServices, d.Services, "service", checkService, (*Service).Key, serviceName, &rerrs)
	pols := netChanges(d.RemovedPolicies, d.Policies, "policy", checkPolicy, policyKey, policyName, &rerrs)

	b := newBuilder(&s.idx, len(d.Workloads), len(d.Services), len(d.Policies))
	applyChanges(svcs, s.ServiceByKey, b.changeService)
	applyChanges(pols, s.PolicyByKey, b.changePolicy)
	applyChanges(wl, s.WorkloadByUID, b.changeWorkload)
	return b.finish(), rerrs
}

// netChanges returns a delta's net change to one kind of resource, by key: nil for a removal,
// else the last valid upsert. Each key is then changed once: a removal and an upsert of one key
// in the same delta, or two upserts, must not be applied one after the other to the lists. An
// upsert that fails check (which runs Build's checks on it alone and fills the defaults Build
// would) is added to rerrs and left out.
func netChanges[K comparable, T any](removed []K, upserts []*T, kind string, check func(*T) error,
	key func(*T) K, name func(*T) string, rerrs *[]ResourceError) map[K]*T {
	if len(removed)+len(upserts) == 0 {
		return nil
	}
	m := make(map[K]*T, len(removed)+len(upserts))
	for _, k := range removed {
		m[k] = nil
	}
	for _, v := range upserts {
		if err := check(v); err != nil {
			*rerrs = append(*rerrs, ResourceError{Kind: kind, Name: name(v), Err: err})
			continue
		}
		m[key(v)] = v
	}
	return m
}

// applyChanges hands change each net change that changes something, with the object s holds
// under its key now (lookup; nil: none).
func applyChanges[K comparable, T any](changes map[K]*T, lookup func(K) *T, change func(old, v *T)) {
	for k, v := range changes {
		if old := lookup(k); old != nil || v != nil {
			change(old, v)
		}
	}
}

// validateWorkload runs Build's checks on w alone. checkService and checkPolicy need no such
// wrapper: Build runs its duplicate check between the two halves of a workload's checks only.
func validateWorkload(w *Workload) error {
	if err := checkWorkloadName(w); err != nil {
		return err
	}
	return checkWorkload(w)
}

// builder makes a new snapshot from an old one (the empty one for Build). The simple indexes
// (by uid, by key, by address) are written as changes arrive, into shards cloned on first
// write; changes to sorted lists are collected per list and merged by finish.
type builder struct {
	old *indexes
	s   *Snapshot

	uid    cow[string, *Workload]
	addr   cow[NetworkAddress, *Workload]
	claims cow[NetworkAddress, []*Workload]
	node   cow[string, []*Workload]
	whost  cow[NamespacedHostname, []*Workload]
	svcKey cow[NamespacedHostname, *Service]
	vip    cow[NetworkAddress, []*Service]
	cidr   cow[NetworkPrefix, []*Service]
	host   cow[string, []*Service]
	ep     cow[*Service, []Endpoint]
	staged cow[string, []Endpoint]
	polKey cow[string, *Policy]
	polNS  cow[string, []*Policy]

	// ownClaims marks the claimant lists this builder allocated: it may change them in place.
	ownClaims map[NetworkAddress]bool

	nodeEd  map[string]*listEdit[*Workload, string]
	whostEd map[NamespacedHostname]*listEdit[*Workload, string]
	vipEd   map[NetworkAddress]*listEdit[*Service, NamespacedHostname]
	cidrEd  map[NetworkPrefix]*listEdit[*Service, NamespacedHostname]
	hostEd  map[string]*listEdit[*Service, NamespacedHostname]
	polNSEd map[string]*listEdit[*Policy, string]
	// epEd holds endpoint changes by Workload.Services key ("namespace/hostname"). A key with a
	// nil edit is one whose service came, went or changed: its list may have to move between
	// the service and the staged table even though no workload changed.
	epEd map[string]*listEdit[Endpoint, string]
}

// newBuilder starts a snapshot from old's indexes. The sizes (of the config, or of the delta)
// size the shards it creates and its lists of changes.
func newBuilder(old *indexes, workloads, services, policies int) *builder {
	s := &Snapshot{built: time.Now(), idx: *old}
	b := &builder{
		old: old, s: s,
		ownClaims: map[NetworkAddress]bool{},
		nodeEd:    map[string]*listEdit[*Workload, string]{},
		whostEd:   map[NamespacedHostname]*listEdit[*Workload, string]{},
		vipEd:     make(map[NetworkAddress]*listEdit[*Service, NamespacedHostname], 2*services),
		cidrEd:    map[NetworkPrefix]*listEdit[*Service, NamespacedHostname]{},
		hostEd:    make(map[string]*listEdit[*Service, NamespacedHostname], services),
		polNSEd:   map[string]*listEdit[*Policy, string]{},
		epEd:      make(map[string]*listEdit[Endpoint, string], services),
	}
	x := &s.idx
	b.uid.t, b.addr.t, b.claims.t = &x.workloadByUID, &x.workloadByAddr, &x.addrClaims
	b.node.t, b.whost.t = &x.workloadsByNode, &x.workloadsByHost
	b.svcKey.t, b.vip.t, b.cidr.t, b.host.t = &x.serviceByKey, &x.servicesByVIP, &x.servicesByCIDR, &x.servicesByHost
	b.ep.t, b.staged.t = &x.endpoints, &x.staged
	b.polKey.t, b.polNS.t = &x.policyByKey, &x.policiesByNS
	b.uid.hint, b.addr.hint = workloads/numShards, workloads/numShards
	b.svcKey.hint, b.vip.hint, b.host.hint, b.ep.hint = services/numShards, 2*services/numShards, services/numShards, services/numShards
	b.polKey.hint = policies / numShards
	return b
}

// edit returns m's edit for k, adding an empty one.
func edit[K comparable, T, X any](m map[K]*listEdit[T, X], k K) *listEdit[T, X] {
	e := m[k]
	if e == nil {
		e = &listEdit[T, X]{}
		m[k] = e
	}
	return e
}

// changeWorkload replaces old (nil: none) by w (nil: removal); both have the same uid.
func (b *builder) changeWorkload(old, w *Workload) {
	if old != nil {
		if w == nil {
			b.uid.del(shardOfString(b.s.idx.seed, old.UID), old.UID)
			b.s.idx.nWorkloads--
		}
		if old.NetworkMode != NetworkHost {
			for _, a := range old.Addresses {
				b.unclaim(NetworkAddress{Network: old.Network, Addr: a.Unmap()}, old)
			}
		}
		e := edit(b.nodeEd, old.Node)
		e.dels = append(e.dels, old.UID)
		if old.Hostname != "" {
			e := edit(b.whostEd, NamespacedHostname{Namespace: old.Namespace, Hostname: old.Hostname})
			e.dels = append(e.dels, old.UID)
		}
		for k := range old.Services {
			e := edit(b.epEd, k)
			e.dels = append(e.dels, old.UID)
		}
	}
	if w == nil {
		return
	}
	b.uid.set(shardOfString(b.s.idx.seed, w.UID), w.UID, w)
	if old == nil {
		b.s.idx.nWorkloads++
	}
	if w.NetworkMode != NetworkHost {
		for _, a := range w.Addresses {
			b.claim(NetworkAddress{Network: w.Network, Addr: a.Unmap()}, w)
		}
	}
	e := edit(b.nodeEd, w.Node)
	e.adds = append(e.adds, w)
	if w.Hostname != "" {
		e := edit(b.whostEd, NamespacedHostname{Namespace: w.Namespace, Hostname: w.Hostname})
		e.adds = append(e.adds, w)
	}
	for k, ports := range w.Services {
		e := edit(b.epEd, k)
		e.adds = append(e.adds, Endpoint{Workload: w, Ports: ports})
	}
}

// claim records that w has address k: it owns k unless a workload it does not beat
// (preferWorkload) does.
func (b *builder) claim(k NetworkAddress, w *Workload) {
	i := shardOfIP(k.Addr)
	cur, ok := b.addr.get(i, k)
	if !ok {
		b.addr.set(i, k, w)
		return
	}
	if cur.UID == w.UID {
		return // the workload lists the address twice
	}
	list, ok := b.claims.get(i, k)
	switch {
	case !ok:
		list = []*Workload{cur, w}
		b.ownClaims[k] = true
	case slices.ContainsFunc(list, func(c *Workload) bool { return c.UID == w.UID }):
		return
	case b.ownClaims[k]:
		list = append(list, w)
	default:
		list = append(slices.Clip(list), w) // copies: the list is shared
		b.ownClaims[k] = true
	}
	b.claims.set(i, k, list)
	if preferWorkload(w, cur) {
		b.addr.set(i, k, w)
	}
}

// unclaim withdraws w's claim on k; the best remaining claimant, if any, takes k.
func (b *builder) unclaim(k NetworkAddress, w *Workload) {
	i := shardOfIP(k.Addr)
	list, ok := b.claims.get(i, k)
	if !ok {
		if cur, ok := b.addr.get(i, k); ok && cur.UID == w.UID {
			b.addr.del(i, k)
		}
		return
	}
	j := slices.IndexFunc(list, func(c *Workload) bool { return c.UID == w.UID })
	if j < 0 {
		return
	}
	if b.ownClaims[k] {
		list = slices.Delete(list, j, j+1)
	} else {
		list = slices.Concat(list[:j], list[j+1:])
		b.ownClaims[k] = true
	}
	if len(list) == 1 {
		b.claims.del(i, k)
		delete(b.ownClaims, k)
		b.addr.set(i, k, list[0])
		return
	}
	b.claims.set(i, k, list)
	best := list[0]
	for _, c := range list[1:] {
		if preferWorkload(c, best) {
			best = c
		}
	}
	b.addr.set(i, k, best)
}

// changeService replaces old (nil: none) by svc (nil: removal); both have the same key.
func (b *builder) changeService(old, svc *Service) {
	if old != nil {
		key := old.Key()
		if svc == nil {
			b.svcKey.del(shardOfHost(b.s.idx.seed, key.Hostname), key)
			b.s.idx.nServices--
		}
		e := edit(b.hostEd, old.Hostname)
		e.dels = append(e.dels, key)
		for _, v := range old.VIPs {
			e := edit(b.vipEd, NetworkAddress{Network: v.Network, Addr: v.Addr.Unmap()})
			e.dels = append(e.dels, key)
		}
		for _, c := range old.CIDRVIPs {
			if p := canonicalPrefix(c.Prefix); p.IsValid() {
				e := edit(b.cidrEd, NetworkPrefix{Network: c.Network, Prefix: p})
				e.dels = append(e.dels, key)
			}
		}
		b.touchEndpoints(key)
	}
	if svc == nil {
		return
	}
	key := svc.Key()
	b.svcKey.set(shardOfHost(b.s.idx.seed, key.Hostname), key, svc)
	if old == nil {
		b.s.idx.nServices++
	}
	e := edit(b.hostEd, svc.Hostname)
	e.adds = append(e.adds, svc)
	for _, v := range svc.VIPs {
		e := edit(b.vipEd, NetworkAddress{Network: v.Network, Addr: v.Addr.Unmap()})
		e.adds = append(e.adds, svc)
	}
	for _, c := range svc.CIDRVIPs {
		if p := canonicalPrefix(c.Prefix); p.IsValid() { // an invalid range contains no address
			e := edit(b.cidrEd, NetworkPrefix{Network: c.Network, Prefix: p})
			e.adds = append(e.adds, svc)
		}
	}
	b.touchEndpoints(key)
}

// touchEndpoints marks the endpoint list of service key for finish. Workloads name services by
// "namespace/hostname" cut at the first "/", so a service whose namespace holds a "/" is never
// named and has no list.
func (b *builder) touchEndpoints(key NamespacedHostname) {
	if strings.Contains(key.Namespace, "/") {
		return
	}
	k := key.Namespace + "/" + key.Hostname
	if _, ok := b.epEd[k]; !ok {
		b.epEd[k] = nil
	}
}

// changePolicy replaces old (nil: none) by p (nil: removal); both have the same key.
func (b *builder) changePolicy(old, p *Policy) {
	if old != nil {
		if p == nil {
			b.polKey.del(shardOfString(b.s.idx.seed, old.key), old.key)
			b.s.idx.nPolicies--
		}
		if ns, ok := policyListNS(old); ok {
			e := edit(b.polNSEd, ns)
			e.dels = append(e.dels, old.key)
		}
	}
	if p == nil {
		return
	}
	b.polKey.set(shardOfString(b.s.idx.seed, p.key), p.key, p)
	if old == nil {
		b.s.idx.nPolicies++
	}
	if ns, ok := policyListNS(p); ok {
		e := edit(b.polNSEd, ns)
		e.adds = append(e.adds, p)
	}
}

// policyListNS names the NamespacePolicies list p belongs to, if any.
func policyListNS(p *Policy) (string, bool) {
	switch p.Scope {
	case ScopeGlobal:
		return "", true
	case ScopeNamespace:
		return p.Namespace, true
	}
	return "", false
}

// resolve returns the service a Workload.Services key names in x, or nil.
func resolve(x *indexes, k string) *Service {
	ns, host, ok := strings.Cut(k, "/")
	if !ok {
		return nil
	}
	return x.serviceByKey.at(shardOfHost(x.seed, host))[NamespacedHostname{Namespace: ns, Hostname: host}]
}

func workloadUID(w *Workload) string { return w.UID }
func endpointUID(ep Endpoint) string { return ep.Workload.UID }
func policyKey(p *Policy) string     { return p.key }

// finish merges the collected list changes and returns the snapshot.
func (b *builder) finish() *Snapshot {
	x := &b.s.idx
	for k, e := range b.nodeEd {
		i := shardOfString(b.s.idx.seed, k)
		setList(&b.node, i, k, editList(x.workloadsByNode.at(i)[k], e, workloadUID, strings.Compare))
	}
	for k, e := range b.whostEd {
		i := shardOfHost(b.s.idx.seed, k.Hostname)
		setList(&b.whost, i, k, editList(x.workloadsByHost.at(i)[k], e, workloadUID, strings.Compare))
	}
	for k, e := range b.hostEd {
		i := shardOfHost(b.s.idx.seed, k)
		setList(&b.host, i, k, editList(x.servicesByHost.at(i)[k], e, (*Service).Key, compareKeys))
	}
	for k, e := range b.vipEd {
		i := shardOfIP(k.Addr)
		setList(&b.vip, i, k, editList(x.servicesByVIP.at(i)[k], e, (*Service).Key, compareKeys))
	}
	cidrLens := false
	for k, e := range b.cidrEd {
		i := shardOfPrefix(k.Prefix)
		base := x.servicesByCIDR.at(i)[k]
		l := editList(base, e, (*Service).Key, compareKeys)
		setList(&b.cidr, i, k, l)
		if (len(base) > 0) != (len(l) > 0) {
			fam := 1
			if k.Prefix.Addr().Is4() {
				fam = 0
			}
			if len(l) > 0 {
				x.cidrKeys[fam][k.Prefix.Bits()]++
			} else {
				x.cidrKeys[fam][k.Prefix.Bits()]--
			}
			cidrLens = true
		}
	}
	if cidrLens { // new slices: the old snapshot's are shared
		x.cidrBits4, x.cidrBits6 = nil, nil
		for bits := 128; bits >= 0; bits-- {
			if bits <= 32 && x.cidrKeys[0][bits] > 0 {
				x.cidrBits4 = append(x.cidrBits4, uint8(bits))
			}
			if x.cidrKeys[1][bits] > 0 {
				x.cidrBits6 = append(x.cidrBits6, uint8(bits))
			}
		}
	}
	for k, e := range b.polNSEd {
		i := shardOfString(b.s.idx.seed, k)
		setList(&b.polNS, i, k, editList(x.policiesByNS.at(i)[k], e, policyKey, strings.Compare))
	}
	for k, e := range b.epEd {
		b.finishEndpoints(k, e)
	}
	return b.s
}

// finishEndpoints applies e (nil: no workload change) to the list of the workloads that name
// key k, and files the list under the service k names now, or as staged if none.
func (b *builder) finishEndpoints(k string, e *listEdit[Endpoint, string]) {
	was, now := resolve(b.old, k), resolve(&b.s.idx, k)
	var list []Endpoint
	if was != nil {
		list = b.old.endpoints.at(shardOfHost(b.s.idx.seed, was.Hostname))[was]
	} else {
		list = b.old.staged.at(shardOfString(b.s.idx.seed, k))[k]
	}
	if e != nil {
		list = editList(list, e, endpointUID, strings.Compare)
	} else if was == now {
		return // the service and its endpoints are as they were
	}
	if was != nil {
		b.ep.del(shardOfHost(b.s.idx.seed, was.Hostname), was)
	} else {
		b.staged.del(shardOfString(b.s.idx.seed, k), k)
	}
	if now != nil {
		setList(&b.ep, shardOfHost(b.s.idx.seed, now.Hostname), now, list)
	} else {
		setList(&b.staged, shardOfString(b.s.idx.seed, k), k, list)
	}
}

// setList stores l under k, or removes k if l is empty.
func setList[K comparable, T any](c *cow[K, []T], i shard, k K, l []T) {
	if len(l) == 0 {
		c.del(i, k)
	} else {
		c.set(i, k, l)
	}
}
