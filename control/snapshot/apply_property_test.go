package snapshot

import (
	"cmp"
	"fmt"
	"maps"
	"math/rand/v2"
	"net/netip"
	"slices"
	"strings"
	"testing"
)

// meshModel is the config a sequence of deltas adds up to, kept the simple way: one map per
// kind, changed as Apply documents (removals, then valid upserts in order).
type meshModel struct {
	workloads map[string]*Workload
	services  map[NamespacedHostname]*Service
	policies  map[string]*Policy
}

func (m *meshModel) apply(d Delta, invalid map[any]bool) {
	for _, uid := range d.RemovedWorkloads {
		delete(m.workloads, uid)
	}
	for _, w := range d.Workloads {
		if !invalid[w] {
			m.workloads[w.UID] = w
		}
	}
	for _, k := range d.RemovedServices {
		delete(m.services, k)
	}
	for _, svc := range d.Services {
		if !invalid[svc] {
			m.services[svc.Key()] = svc
		}
	}
	for _, k := range d.RemovedPolicies {
		delete(m.policies, k)
	}
	for _, p := range d.Policies {
		if !invalid[p] {
			m.policies[p.Key()] = p
		}
	}
}

// config returns the model as a Config in a random order: Build must not care.
func (m *meshModel) config(rng *rand.Rand) Config {
	cfg := Config{
		Workloads: slices.Collect(maps.Values(m.workloads)),
		Services:  slices.Collect(maps.Values(m.services)),
		Policies:  slices.Collect(maps.Values(m.policies)),
	}
	rng.Shuffle(len(cfg.Workloads), func(i, j int) { cfg.Workloads[i], cfg.Workloads[j] = cfg.Workloads[j], cfg.Workloads[i] })
	rng.Shuffle(len(cfg.Services), func(i, j int) { cfg.Services[i], cfg.Services[j] = cfg.Services[j], cfg.Services[i] })
	rng.Shuffle(len(cfg.Policies), func(i, j int) { cfg.Policies[i], cfg.Policies[j] = cfg.Policies[j], cfg.Policies[i] })
	return cfg
}

// The key spaces of the property test are small, so that address conflicts, shared VIPs and
// hostnames, and staged services happen all the time.
var (
	propUIDs = []string{
		"c//Pod/ns-a/w0", "c//Pod/ns-a/w1", "c//Pod/ns-a/w2", "c//Pod/ns-b/w3", "c//Pod/ns-b/w4", "c//Pod/ns-b/w5",
		"c/networking.istio.io/WorkloadEntry/ns-a/e0", "c/networking.istio.io/WorkloadEntry/ns-b/e1",
		"c/networking.istio.io/WorkloadEntry/ns-a/e2",
		"", // derived: Kubernetes//v1/Pod/<ns>/<name>, which does not count as a pod
	}
	propAddrs = []string{"10.0.0.1", "10.0.0.2", "10.0.0.3", "::ffff:10.0.0.1", "fd00::1", "10.9.1.7"}
	propNets  = []string{"", "", "", "n2"}
	propNodes = []string{"", "n1", "n2"}
	propHosts = []string{"", "", "h1.example", "h2.example"}
	// Workload.Services keys: defined services, one never defined, one without a slash, and
	// "x/y/h", which names service x/"y/h" (and never service "x/y"/h).
	propSvcRefs = []string{"ns-a/s1.example", "ns-b/s1.example", "ns-a/s2.example", "ns-a/s3.example", "ns-a/later.example", "no-slash", "x/y/h"}
	propSvcKeys = []NamespacedHostname{
		{"ns-a", "s1.example"}, {"ns-b", "s1.example"}, {"ns-a", "s2.example"}, {"ns-a", "s3.example"},
		{"x", "y/h"}, {"x/y", "h"},
	}
	propVIPs = []NetworkAddress{
		{Addr: netip.MustParseAddr("10.96.0.1")}, {Addr: netip.MustParseAddr("10.96.0.2")},
		{Addr: netip.MustParseAddr("::ffff:10.96.0.1")}, {Network: "n2", Addr: netip.MustParseAddr("10.96.0.1")},
		{Addr: netip.MustParseAddr("fd00:96::1")},
	}
	propCIDRs = []NetworkPrefix{
		{Prefix: netip.MustParsePrefix("10.9.0.0/16")}, {Prefix: netip.MustParsePrefix("10.9.1.5/24")},
		{Prefix: netip.MustParsePrefix("10.9.1.0/24")}, {Prefix: netip.MustParsePrefix("::ffff:10.9.0.0/112")},
		{Prefix: netip.MustParsePrefix("fd00:9::/48")}, {Network: "n2", Prefix: netip.MustParsePrefix("10.9.0.0/16")},
		{}, // invalid: contains nothing
	}
	propProbeIPs = []string{
		"10.0.0.1", "::ffff:10.0.0.1", "10.0.0.2", "10.0.0.3", "fd00::1", "10.0.0.9",
		"10.96.0.1", "10.96.0.2", "fd00:96::1", "10.96.0.3",
		"10.9.1.7", "10.9.2.7", "10.9.1.200", "fd00:9::5", "fd00:8::5", "10.8.0.1",
	}
	propClientNS = []string{"", "ns-a", "ns-b", "x", "z"}
	propPolKeys  = []struct{ ns, name string }{{"ns-a", "p1"}, {"ns-a", "p2"}, {"ns-b", "p1"}, {"", "g1"}, {"istio-system", "g2"}}
	propPolNS    = []string{"", "ns-a", "ns-b", "istio-system", "x"}
)

func pick[T any](rng *rand.Rand, l []T) T { return l[rng.IntN(len(l))] }

// propGen makes random resources; invalid records the ones it made invalid on purpose (the
// only invalid ones it makes).
type propGen struct {
	rng     *rand.Rand
	invalid map[any]bool
	seen    []*Service // the service objects made last, to ask Endpoints about stale ones
}

func (g *propGen) workload() *Workload {
	rng := g.rng
	uid := pick(rng, propUIDs)
	ns, name := "ns-a", "d"+fmt.Sprint(rng.IntN(2))
	if uid != "" {
		parts := strings.Split(uid, "/")
		ns, name = parts[len(parts)-2], parts[len(parts)-1]
	}
	w := &Workload{
		UID: uid, Name: name, Namespace: ns, Network: pick(rng, propNets), Node: pick(rng, propNodes),
		Hostname: pick(rng, propHosts), Protocol: TunnelProtocol(rng.IntN(2)), Status: HealthStatus(rng.IntN(2)),
	}
	for range rng.IntN(3) {
		w.Addresses = append(w.Addresses, netip.MustParseAddr(pick(rng, propAddrs)))
	}
	if len(w.Addresses) == 0 && w.Hostname == "" {
		w.Hostname = "vm.example"
	}
	if rng.IntN(10) == 0 {
		w.NetworkMode = NetworkHost
	}
	if n := rng.IntN(3); n > 0 {
		w.Services = map[string]PortMap{}
		for range n {
			var ports PortMap
			if rng.IntN(2) == 0 {
				ports = PortMap{80: uint16(8000 + rng.IntN(3))}
			}
			w.Services[pick(rng, propSvcRefs)] = ports
		}
	}
	if rng.IntN(20) == 0 {
		w.Name = "" // invalid
		g.invalid[w] = true
	}
	return w
}

func (g *propGen) service() *Service {
	rng := g.rng
	key := pick(rng, propSvcKeys)
	svc := &Service{Name: "svc", Namespace: key.Namespace, Hostname: key.Hostname, Canonical: rng.IntN(3) == 0}
	if rng.IntN(4) == 0 {
		svc.Visibility = VisibilityNamespace
	}
	for range rng.IntN(3) {
		svc.VIPs = append(svc.VIPs, pick(rng, propVIPs))
	}
	for range rng.IntN(3) {
		svc.CIDRVIPs = append(svc.CIDRVIPs, pick(rng, propCIDRs))
	}
	if rng.IntN(20) == 0 {
		svc.Hostname = "" // invalid
		g.invalid[svc] = true
	}
	if g.seen = append(g.seen, svc); len(g.seen) > 48 { // recent ones: replaced and removed among them
		g.seen = g.seen[1:]
	}
	return svc
}

func (g *propGen) policy() *Policy {
	rng := g.rng
	k := pick(rng, propPolKeys)
	p := &Policy{Name: k.name, Namespace: k.ns, Scope: PolicyScope(rng.IntN(3)), Action: PolicyAction(rng.IntN(2))}
	if k.ns == "" {
		p.Scope = ScopeGlobal
	}
	if rng.IntN(20) == 0 {
		p.Name = "" // invalid
		g.invalid[p] = true
	}
	return p
}

// delta makes a random delta; some upserts re-send an object the model already holds, as a
// source does for an unchanged resource.
func (g *propGen) delta(m *meshModel) Delta {
	rng := g.rng
	var d Delta
	for range rng.IntN(4) {
		switch rng.IntN(6) {
		case 0:
			d.RemovedWorkloads = append(d.RemovedWorkloads, pick(rng, propUIDs))
		case 1:
			if len(m.workloads) > 0 {
				ws := slices.SortedFunc(maps.Values(m.workloads), func(a, b *Workload) int { return cmp.Compare(a.UID, b.UID) })
				d.Workloads = append(d.Workloads, pick(rng, ws))
				break
			}
			fallthrough
		default:
			d.Workloads = append(d.Workloads, g.workload())
		}
	}
	for range rng.IntN(3) {
		switch rng.IntN(4) {
		case 0:
			d.RemovedServices = append(d.RemovedServices, pick(rng, propSvcKeys))
		default:
			d.Services = append(d.Services, g.service())
		}
	}
	for range rng.IntN(2) {
		switch rng.IntN(3) {
		case 0:
			k := pick(rng, propPolKeys)
			d.RemovedPolicies = append(d.RemovedPolicies, k.ns+"/"+k.name)
		default:
			d.Policies = append(d.Policies, g.policy())
		}
	}
	return d
}

// TestApplyMatchesBuild applies thousands of random deltas one after the other and checks,
// after each, that the incremental snapshot answers every lookup over the whole key space as
// Build of the config the deltas add up to does, and as a naive scan of that config does; and
// that Apply left the snapshot it started from exactly as it was.
func TestApplyMatchesBuild(t *testing.T) {
	steps := 3000
	if testing.Short() {
		steps = 500
	}
	rng := rand.New(rand.NewPCG(20251122, 1))
	g := &propGen{rng: rng, invalid: map[any]bool{}}
	m := &meshModel{workloads: map[string]*Workload{}, services: map[NamespacedHostname]*Service{}, policies: map[string]*Policy{}}
	cur := mustBuild(t, Config{})
	type kept struct {
		s    *Snapshot
		want *Snapshot
	}
	var old []kept
	var stats struct{ conflicts, staged, cidr int }
	for step := range steps {
		d := g.delta(m)
		fp := takeFingerprint(cur)
		next, rerrs := cur.Apply(d)
		if err := fp.verify(); err != nil {
			t.Fatalf("step %d: Apply changed the snapshot it started from: %v", step, err)
		}
		wantErrs := 0
		for _, o := range []any{d.Workloads, d.Services, d.Policies} {
			switch l := o.(type) {
			case []*Workload:
				for _, w := range l {
					if g.invalid[w] {
						wantErrs++
					}
				}
			case []*Service:
				for _, svc := range l {
					if g.invalid[svc] {
						wantErrs++
					}
				}
			case []*Policy:
				for _, p := range l {
					if g.invalid[p] {
						wantErrs++
					}
				}
			}
		}
		if len(rerrs) != wantErrs {
			t.Fatalf("step %d: %d resource errors (%v), want %d", step, len(rerrs), rerrs, wantErrs)
		}
		m.apply(d, g.invalid)
		built, err := Build(m.config(rng))
		if err != nil {
			t.Fatalf("step %d: Build of the model: %v", step, err)
		}
		where := fmt.Sprintf("step %d", step)
		compareSnapshots(t, where, next, built, g.seen)
		compareNaive(t, where, next, m, g.seen)
		if t.Failed() {
			t.Fatalf("%s: delta %+v", where, d)
		}
		if step%100 == 0 {
			old = append(old, kept{cur, mustBuild(t, Config{Workloads: cur.Workloads(), Services: cur.Services(), Policies: cur.Policies()})})
		}
		if len(next.idx.addrClaims.at(shardOfIP(netip.MustParseAddr("10.0.0.1")))) > 0 {
			stats.conflicts++
		}
		if len(next.StagedServices()) > 0 {
			stats.staged++
		}
		if len(next.idx.cidrBits4) > 0 {
			stats.cidr++
		}
		cur = next
	}
	// Snapshots from long ago still answer as they did.
	for i, k := range old {
		compareSnapshots(t, fmt.Sprintf("kept snapshot %d", i), k.s, k.want, g.seen)
	}
	t.Logf("%d steps: %d with an address conflict, %d with staged services, %d with CIDR VIPs; final mesh %d workloads, %d services, %d policies",
		steps, stats.conflicts, stats.staged, stats.cidr, len(m.workloads), len(m.services), len(m.policies))
	if stats.conflicts < steps/10 || stats.staged < steps/10 || stats.cidr < steps/10 {
		t.Error("the random meshes do not exercise conflicts, staging and CIDRs often enough")
	}
}

// tableSizes counts the entries of every index, so that an entry Build would not have (a stale
// key, an empty list) shows up.
func tableSizes(s *Snapshot) []int {
	x := &s.idx
	return []int{
		countTable(x.workloadByUID), countTable(x.workloadByAddr), countTable(x.addrClaims), countTable(x.workloadsByNode),
		countTable(x.workloadsByHost), countTable(x.serviceByKey), countTable(x.servicesByVIP), countTable(x.servicesByCIDR),
		countTable(x.servicesByHost), countTable(x.endpoints), countTable(x.staged), countTable(x.policyByKey),
		countTable(x.policiesByNS), x.nWorkloads, x.nServices, x.nPolicies,
	}
}

func countTable[K comparable, V any](t *table[K, V]) int {
	n := 0
	for i := range numShards {
		n += len(t.at(shard(i)))
	}
	return n
}

func workloadList(l []*Workload) string {
	var b strings.Builder
	for _, w := range l {
		fmt.Fprintf(&b, "%s;", uidOf(w))
	}
	return b.String()
}

func endpointList(l []Endpoint) string {
	var b strings.Builder
	for _, ep := range l {
		fmt.Fprintf(&b, "%s%v;", uidOf(ep.Workload), ep.Ports)
	}
	return b.String()
}

func sameEndpoints(a, b []Endpoint) bool {
	return slices.EqualFunc(a, b, func(x, y Endpoint) bool { return x.Workload == y.Workload && maps.Equal(x.Ports, y.Ports) })
}

// compareSnapshots checks that got answers every lookup of the property test's key space as
// want does, object for object.
func compareSnapshots(t *testing.T, where string, got, want *Snapshot, services []*Service) {
	t.Helper()
	if g, w := tableSizes(got), tableSizes(want); !slices.Equal(g, w) {
		t.Errorf("%s: index sizes %v, want %v", where, g, w)
	}
	if !slices.Equal(got.Workloads(), want.Workloads()) {
		t.Errorf("%s: Workloads %s, want %s", where, workloadList(got.Workloads()), workloadList(want.Workloads()))
	}
	if !slices.Equal(got.Services(), want.Services()) || !slices.Equal(got.Policies(), want.Policies()) {
		t.Errorf("%s: Services or Policies differ", where)
	}
	if !slices.Equal(got.StagedServices(), want.StagedServices()) {
		t.Errorf("%s: StagedServices %q, want %q", where, got.StagedServices(), want.StagedServices())
	}
	if !slices.Equal(got.idx.cidrBits4, want.idx.cidrBits4) || !slices.Equal(got.idx.cidrBits6, want.idx.cidrBits6) {
		t.Errorf("%s: CIDR lengths %v %v, want %v %v", where, got.idx.cidrBits4, got.idx.cidrBits6, want.idx.cidrBits4, want.idx.cidrBits6)
	}
	for _, w := range want.Workloads() {
		if got.WorkloadByUID(w.UID) != w {
			t.Errorf("%s: WorkloadByUID(%s) = %s", where, w.UID, uidOf(got.WorkloadByUID(w.UID)))
		}
	}
	for _, uid := range propUIDs {
		if g, w := got.WorkloadByUID(uid), want.WorkloadByUID(uid); g != w {
			t.Errorf("%s: WorkloadByUID(%s) = %s, want %s", where, uid, uidOf(g), uidOf(w))
		}
	}
	for _, network := range []string{"", "n2", "n3"} {
		for _, ip := range propProbeIPs {
			a := netip.MustParseAddr(ip)
			if g, w := got.WorkloadByAddr(network, a), want.WorkloadByAddr(network, a); g != w {
				t.Errorf("%s: WorkloadByAddr(%q, %s) = %s, want %s", where, network, ip, uidOf(g), uidOf(w))
			}
			for _, ns := range propClientNS {
				if g, w := got.ServiceByVIP(network, a, ns), want.ServiceByVIP(network, a, ns); g != w {
					t.Errorf("%s: ServiceByVIP(%q, %s, %q) = %s, want %s", where, network, ip, ns, keyOf(g), keyOf(w))
				}
			}
		}
	}
	for _, ns := range []string{"ns-a", "ns-b"} {
		for _, h := range propHosts {
			nh := NamespacedHostname{Namespace: ns, Hostname: h}
			if g, w := got.WorkloadByHostname(nh), want.WorkloadByHostname(nh); g != w {
				t.Errorf("%s: WorkloadByHostname(%s) = %s, want %s", where, nh, uidOf(g), uidOf(w))
			}
		}
	}
	for _, node := range append(slices.Clone(propNodes), "n3") {
		if g, w := got.WorkloadsOnNode(node), want.WorkloadsOnNode(node); !slices.Equal(g, w) {
			t.Errorf("%s: WorkloadsOnNode(%q) = %s, want %s", where, node, workloadList(g), workloadList(w))
		}
	}
	for _, key := range append(slices.Clone(propSvcKeys), NamespacedHostname{"ns-a", "later.example"}) {
		g, w := got.ServiceByKey(key), want.ServiceByKey(key)
		if g != w {
			t.Errorf("%s: ServiceByKey(%s) = %s, want %s", where, key, keyOf(g), keyOf(w))
		}
		for _, ns := range propClientNS {
			if g, w := got.ServiceByHostname(key.Hostname, ns), want.ServiceByHostname(key.Hostname, ns); g != w {
				t.Errorf("%s: ServiceByHostname(%q, %q) = %s, want %s", where, key.Hostname, ns, keyOf(g), keyOf(w))
			}
		}
		gw := &GatewayAddress{Hostname: &key}
		gotW, gotIP, gotOK := got.ResolveGateway(gw)
		wantW, wantIP, wantOK := want.ResolveGateway(gw)
		if gotW != wantW || gotIP != wantIP || gotOK != wantOK {
			t.Errorf("%s: ResolveGateway(%s) = %s %v %v, want %s %v %v", where, key, uidOf(gotW), gotIP, gotOK, uidOf(wantW), wantIP, wantOK)
		}
	}
	// Recently made service objects: the current ones have their endpoints, replaced and
	// removed ones have none.
	for _, svc := range services {
		if g, w := got.Endpoints(svc), want.Endpoints(svc); !sameEndpoints(g, w) {
			t.Errorf("%s: Endpoints(%s %p) = %s, want %s", where, svc.Key(), svc, endpointList(g), endpointList(w))
		}
	}
	for _, k := range propPolKeys {
		key := k.ns + "/" + k.name
		if g, w := got.PolicyByKey(key), want.PolicyByKey(key); g != w {
			t.Errorf("%s: PolicyByKey(%s) differs", where, key)
		}
	}
	for _, ns := range propPolNS {
		if g, w := got.NamespacePolicies(ns), want.NamespacePolicies(ns); !slices.Equal(g, w) {
			t.Errorf("%s: NamespacePolicies(%q) differ", where, ns)
		}
	}
}

// compareNaive checks s against answers computed by scanning the model, with no index: the
// rules as the package documents them, independent of how Build and Apply index.
func compareNaive(t *testing.T, where string, s *Snapshot, m *meshModel, services []*Service) {
	t.Helper()
	byUID := func(a, b *Workload) int { return cmp.Compare(a.UID, b.UID) }
	ws := slices.SortedFunc(maps.Values(m.workloads), byUID)
	svcs := slices.SortedFunc(maps.Values(m.services), compareServices)
	type cidr struct {
		network string
		p       netip.Prefix
		svc     *Service
	}
	var cidrs []cidr // in service order
	var lens []int   // the prefix lengths in use, longest first
	for _, svc := range svcs {
		for _, c := range svc.CIDRVIPs {
			if p := canonicalPrefix(c.Prefix); p.IsValid() {
				cidrs = append(cidrs, cidr{c.Network, p, svc})
				lens = append(lens, p.Bits())
			}
		}
	}
	slices.Sort(lens)
	lens = slices.Compact(lens)
	slices.Reverse(lens)
	for _, network := range []string{"", "n2", "n3"} {
		for _, ip := range propProbeIPs {
			a := netip.MustParseAddr(ip).Unmap()
			var want *Workload
			for _, w := range ws {
				if w.NetworkMode == NetworkHost || w.Network != network {
					continue
				}
				if slices.ContainsFunc(w.Addresses, func(x netip.Addr) bool { return x.Unmap() == a }) &&
					(want == nil || preferWorkload(w, want)) {
					want = w
				}
			}
			if got := s.WorkloadByAddr(network, a); got != want {
				t.Errorf("%s: naive WorkloadByAddr(%q, %s) = %s, want %s", where, network, ip, uidOf(got), uidOf(want))
			}
			for _, ns := range propClientNS {
				var cands []*Service
				for _, svc := range svcs {
					if slices.ContainsFunc(svc.VIPs, func(v NetworkAddress) bool { return v.Network == network && v.Addr.Unmap() == a }) {
						cands = append(cands, svc)
					}
				}
				want := pickService(cands, ns)
				// Then the longest CIDR holding a whose candidates include a visible one.
				for _, bits := range lens {
					if want != nil {
						break
					}
					cands = cands[:0]
					for _, c := range cidrs {
						if c.network == network && c.p.Bits() == bits && c.p.Contains(a) && !slices.Contains(cands, c.svc) {
							cands = append(cands, c.svc)
						}
					}
					want = pickService(cands, ns)
				}
				if got := s.ServiceByVIP(network, a, ns); got != want {
					t.Errorf("%s: naive ServiceByVIP(%q, %s, %q) = %s, want %s", where, network, ip, ns, keyOf(got), keyOf(want))
				}
			}
		}
	}
	staged := map[string]bool{}
	for _, w := range ws {
		for k := range w.Services {
			ns, host, ok := strings.Cut(k, "/")
			if !ok || m.services[NamespacedHostname{Namespace: ns, Hostname: host}] == nil {
				staged[k] = true
			}
		}
	}
	if want := slices.Sorted(maps.Keys(staged)); !slices.Equal(s.StagedServices(), want) {
		t.Errorf("%s: naive StagedServices %q, want %q", where, s.StagedServices(), want)
	}
	for _, svc := range services {
		var want []Endpoint
		if m.services[svc.Key()] == svc {
			for _, w := range ws {
				for k, ports := range w.Services {
					if ns, host, ok := strings.Cut(k, "/"); ok && ns == svc.Namespace && host == svc.Hostname {
						want = append(want, Endpoint{Workload: w, Ports: ports})
					}
				}
			}
		}
		if got := s.Endpoints(svc); !sameEndpoints(got, want) {
			t.Errorf("%s: naive Endpoints(%s %p) = %s, want %s", where, svc.Key(), svc, endpointList(got), endpointList(want))
		}
	}
	for _, node := range propNodes {
		var want []*Workload
		for _, w := range ws {
			if w.Node == node {
				want = append(want, w)
			}
		}
		if got := s.WorkloadsOnNode(node); !slices.Equal(got, want) {
			t.Errorf("%s: naive WorkloadsOnNode(%q) = %s, want %s", where, node, workloadList(got), workloadList(want))
		}
	}
	for _, ns := range propPolNS {
		var want []*Policy
		for _, p := range slices.SortedFunc(maps.Values(m.policies), func(a, b *Policy) int { return cmp.Compare(a.Key(), b.Key()) }) {
			if (p.Scope == ScopeGlobal && ns == "") || (p.Scope == ScopeNamespace && p.Namespace == ns) {
				want = append(want, p)
			}
		}
		if got := s.NamespacePolicies(ns); !slices.Equal(got, want) {
			t.Errorf("%s: naive NamespacePolicies(%q) differ", where, ns)
		}
	}
	if !slices.Equal(s.Workloads(), ws) || !slices.Equal(s.Services(), svcs) {
		t.Errorf("%s: naive Workloads or Services differ", where)
	}
}
