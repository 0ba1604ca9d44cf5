package snapshot

import (
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"
)

func addr(s string) netip.Addr { return netip.MustParseAddr(s) }

func addrs(ss ...string) []netip.Addr {
	out := make([]netip.Addr, len(ss))
	for i, s := range ss {
		out[i] = addr(s)
	}
	return out
}

// pod returns a TCP workload ns/name at ips with a //Pod/ uid, as istiod names pods.
func pod(ns, name string, ips ...string) *Workload {
	return &Workload{UID: "Kubernetes//Pod/" + ns + "/" + name, Name: name, Namespace: ns, Addresses: addrs(ips...)}
}

// service returns ns/name with hostname name.ns.svc.cluster.local at vips on the default network.
func service(ns, name string, vips ...string) *Service {
	svc := &Service{Name: name, Namespace: ns, Hostname: name + "." + ns + ".svc.cluster.local"}
	for _, v := range vips {
		svc.VIPs = append(svc.VIPs, NetworkAddress{Addr: addr(v)})
	}
	return svc
}

// serving makes w an endpoint of svc with ports.
func serving(w *Workload, svc *Service, ports PortMap) *Workload {
	if w.Services == nil {
		w.Services = map[string]PortMap{}
	}
	w.Services[svc.Key().String()] = ports
	return w
}

func mustBuild(t testing.TB, cfg Config) *Snapshot {
	t.Helper()
	s, err := Build(cfg)
	if err != nil {
		t.Fatalf("Build: %v", err)
	}
	return s
}

func uidOf(w *Workload) string {
	if w == nil {
		return "<nil>"
	}
	return w.UID
}

func keyOf(svc *Service) string {
	if svc == nil {
		return "<nil>"
	}
	return svc.Key().String()
}

func TestBuildDefaults(t *testing.T) {
	for _, tc := range []struct {
		name string
		in   Workload
		want Workload // only the defaulted fields are compared
	}{
		{
			name: "empty fields get ztunnel's defaults",
			in:   Workload{Name: "a", Namespace: "ns", Addresses: addrs("10.0.0.1")},
			want: Workload{UID: "Kubernetes//v1/Pod/ns/a", TrustDomain: "cluster.local", ServiceAccount: "default", ClusterID: "Kubernetes"},
		},
		{
			name: "set fields are kept",
			in: Workload{UID: "c1//Pod/ns/a", Name: "a", Namespace: "ns", Addresses: addrs("10.0.0.1"),
				TrustDomain: "example.org", ServiceAccount: "sa", ClusterID: "c1"},
			want: Workload{UID: "c1//Pod/ns/a", TrustDomain: "example.org", ServiceAccount: "sa", ClusterID: "c1"},
		},
		{
			name: "a hostname stands in for addresses",
			in:   Workload{Name: "vm", Namespace: "ns", Hostname: "vm.example.com"},
			want: Workload{UID: "Kubernetes//v1/Pod/ns/vm", TrustDomain: "cluster.local", ServiceAccount: "default", ClusterID: "Kubernetes"},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			w := tc.in
			s := mustBuild(t, Config{Workloads: []*Workload{&w}})
			got := Workload{UID: w.UID, TrustDomain: w.TrustDomain, ServiceAccount: w.ServiceAccount, ClusterID: w.ClusterID}
			if got.UID != tc.want.UID || got.TrustDomain != tc.want.TrustDomain ||
				got.ServiceAccount != tc.want.ServiceAccount || got.ClusterID != tc.want.ClusterID {
				t.Errorf("defaults = uid %q td %q sa %q cluster %q, want uid %q td %q sa %q cluster %q",
					got.UID, got.TrustDomain, got.ServiceAccount, got.ClusterID,
					tc.want.UID, tc.want.TrustDomain, tc.want.ServiceAccount, tc.want.ClusterID)
			}
			if s.WorkloadByUID(tc.want.UID) != &w {
				t.Errorf("WorkloadByUID(%q) does not find the workload", tc.want.UID)
			}
			if id := w.Identity(); id.TrustDomain != tc.want.TrustDomain || id.ServiceAccount != tc.want.ServiceAccount || id.Namespace != "ns" {
				t.Errorf("Identity() = %+v", id)
			}
		})
	}
}

func TestBuildEmpty(t *testing.T) {
	s := mustBuild(t, Config{})
	if len(s.Workloads())+len(s.Services())+len(s.Policies())+len(s.StagedServices()) != 0 {
		t.Error("empty config built a non-empty snapshot")
	}
	if s.Version() != 0 {
		t.Errorf("Version() = %d before Publish, want 0", s.Version())
	}
	if since := time.Since(s.Built()); since < 0 || since > time.Minute {
		t.Errorf("Built() = %v, not just now", s.Built())
	}
	if s.WorkloadByAddr("", addr("10.0.0.1")) != nil || s.ServiceByVIP("", addr("10.0.0.1"), "") != nil ||
		s.ServiceByHostname("x", "") != nil || s.PolicyByKey("a/b") != nil || s.Endpoints(nil) != nil {
		t.Error("lookup in the empty snapshot found something")
	}
}

func TestBuildInvalid(t *testing.T) {
	for _, tc := range []struct {
		name string
		cfg  func() Config
		// want are substrings of the error: the object and the field at fault.
		want []string
	}{
		{
			name: "workload without name",
			cfg:  func() Config { return Config{Workloads: []*Workload{{Namespace: "ns", Addresses: addrs("10.0.0.1")}}} },
			want: []string{"workloads[0] (ns/)", "name: must not be empty"},
		},
		{
			name: "workload without namespace",
			cfg:  func() Config { return Config{Workloads: []*Workload{{Name: "a", Addresses: addrs("10.0.0.1")}}} },
			want: []string{"workloads[0] (/a)", "namespace: must not be empty"},
		},
		{
			name: "workload with an invalid address",
			cfg: func() Config {
				return Config{Workloads: []*Workload{{Name: "a", Namespace: "ns", Addresses: []netip.Addr{{}}}}}
			},
			want: []string{"workloads[0] (Kubernetes//v1/Pod/ns/a)", "workloadIps: invalid address"},
		},
		{
			name: "duplicate uid",
			cfg: func() Config {
				return Config{Workloads: []*Workload{pod("ns", "a", "10.0.0.1"), pod("ns", "a", "10.0.0.2")}}
			},
			want: []string{"workloads[1] (Kubernetes//Pod/ns/a)", `uid: "Kubernetes//Pod/ns/a" is used by another workload`},
		},
		{
			name: "duplicate derived uid",
			cfg: func() Config {
				return Config{Workloads: []*Workload{
					{Name: "a", Namespace: "ns", Addresses: addrs("10.0.0.1")},
					{Name: "a", Namespace: "ns", Addresses: addrs("10.0.0.2")},
				}}
			},
			want: []string{"workloads[1] (Kubernetes//v1/Pod/ns/a)", "uid:"},
		},
		{
			name: "nil workload",
			cfg:  func() Config { return Config{Workloads: []*Workload{nil}} },
			want: []string{"workloads[0] (nil)", "must not be nil"},
		},
		{
			name: "service without name",
			cfg: func() Config {
				return Config{Services: []*Service{{Namespace: "ns", Hostname: "h.example.com"}}}
			},
			want: []string{"services[0] (ns/h.example.com)", "name: must not be empty"},
		},
		{
			name: "service without namespace",
			cfg:  func() Config { return Config{Services: []*Service{{Name: "h", Hostname: "h.example.com"}}} },
			want: []string{"services[0] (/h.example.com)", "namespace: must not be empty"},
		},
		{
			name: "service without hostname",
			cfg:  func() Config { return Config{Services: []*Service{{Name: "h", Namespace: "ns"}}} },
			want: []string{"services[0] (ns/)", "hostname: must not be empty"},
		},
		{
			name: "duplicate service key",
			cfg: func() Config {
				return Config{Services: []*Service{service("ns", "web", "10.96.0.1"), service("ns", "web", "10.96.0.2")}}
			},
			want: []string{"services[1] (ns/web.ns.svc.cluster.local)", "hostname: service ns/web.ns.svc.cluster.local is defined twice"},
		},
		{
			name: "nil service",
			cfg:  func() Config { return Config{Services: []*Service{nil}} },
			want: []string{"services[0] (nil)", "must not be nil"},
		},
		{
			name: "policy without name",
			cfg:  func() Config { return Config{Policies: []*Policy{{Namespace: "ns", Scope: ScopeNamespace}}} },
			want: []string{"policies[0] (ns/)", "name: must not be empty"},
		},
		{
			name: "duplicate policy key",
			cfg: func() Config {
				return Config{Policies: []*Policy{
					{Name: "p", Namespace: "ns", Scope: ScopeNamespace},
					{Name: "p", Namespace: "ns", Scope: ScopeWorkloadSelector, Action: ActionDeny},
				}}
			},
			want: []string{"policies[1] (ns/p)", "name: policy ns/p is defined twice"},
		},
		{
			name: "namespace policy without namespace",
			cfg:  func() Config { return Config{Policies: []*Policy{{Name: "p", Scope: ScopeNamespace}}} },
			want: []string{"policies[0] (/p)", "namespace: must not be empty for a Namespace or WorkloadSelector policy"},
		},
		{
			name: "selector policy without namespace",
			cfg:  func() Config { return Config{Policies: []*Policy{{Name: "p", Scope: ScopeWorkloadSelector}}} },
			want: []string{"policies[0] (/p)", "namespace: must not be empty"},
		},
		{
			name: "nil policy",
			cfg:  func() Config { return Config{Policies: []*Policy{nil}} },
			want: []string{"policies[0] (nil)", "must not be nil"},
		},
		{
			name: "every error is reported",
			cfg: func() Config {
				return Config{
					Workloads: []*Workload{{Name: "a", Namespace: "ns", Addresses: []netip.Addr{{}}}, pod("ns", "ok", "10.0.0.1")},
					Services:  []*Service{{Name: "s", Namespace: "ns"}},
					Policies:  []*Policy{{Name: "p", Scope: ScopeNamespace}},
				}
			},
			want: []string{"workloads[0]", "workloadIps:", "services[0] (ns/)", "hostname:", "policies[0] (/p)", "namespace:"},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s, err := Build(tc.cfg())
			if err == nil {
				t.Fatal("Build succeeded, want an error")
			}
			if s != nil {
				t.Error("Build returned a snapshot with its error")
			}
			if !errors.Is(err, ErrInvalid) {
				t.Errorf("error %q does not wrap ErrInvalid", err)
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not mention %q", err, w)
				}
			}
		})
	}
}

func TestBuildSortsLists(t *testing.T) {
	ws := []*Workload{pod("ns", "c", "10.0.0.3"), pod("ns", "a", "10.0.0.1"), pod("ns", "b", "10.0.0.2")}
	// "default-x" sorts before "default" as a "namespace/hostname" string ('-' < '/').
	ss := []*Service{service("default", "web"), service("b", "web"), service("default-x", "web"), service("a", "web")}
	ps := []*Policy{{Name: "z", Namespace: "ns", Scope: ScopeNamespace}, {Name: "a", Namespace: "ns", Scope: ScopeNamespace}, {Name: "g"}}
	s := mustBuild(t, Config{Workloads: ws, Services: ss, Policies: ps})

	var got []string
	for _, w := range s.Workloads() {
		got = append(got, w.Name)
	}
	if want := []string{"a", "b", "c"}; !slices.Equal(got, want) {
		t.Errorf("Workloads() = %q, want %q", got, want)
	}
	got = got[:0]
	for _, svc := range s.Services() {
		got = append(got, svc.Key().String())
	}
	want := slices.Clone(got)
	slices.Sort(want)
	if !slices.Equal(got, want) || got[1] != "b/web.b.svc.cluster.local" {
		t.Errorf("Services() = %q, want sorted as strings %q", got, want)
	}
	got = got[:0]
	for _, p := range s.Policies() {
		got = append(got, p.Key())
	}
	if want := []string{"/g", "ns/a", "ns/z"}; !slices.Equal(got, want) {
		t.Errorf("Policies() = %q, want %q", got, want)
	}
}

func TestWorkloadByAddr(t *testing.T) {
	a := pod("ns", "a", "10.0.0.1", "fd00::1")
	remote := pod("ns", "remote", "10.0.0.1")
	remote.Network = "net2"
	mapped := pod("ns", "mapped", "::ffff:10.0.0.2")
	host := pod("ns", "host", "10.0.0.3")
	host.NetworkMode = NetworkHost
	hostnameOnly := &Workload{Name: "vm", Namespace: "ns", Hostname: "vm.example.com"}
	s := mustBuild(t, Config{Workloads: []*Workload{a, remote, mapped, host, hostnameOnly}})

	for _, tc := range []struct {
		network, ip string
		want        *Workload
	}{
		{"", "10.0.0.1", a},
		{"", "fd00::1", a},
		{"", "::ffff:10.0.0.1", a}, // an IPv4-mapped query is unmapped
		{"net2", "10.0.0.1", remote},
		{"net2", "fd00::1", nil}, // addresses are per network
		{"net3", "10.0.0.1", nil},
		{"", "10.0.0.2", mapped}, // an IPv4-mapped workload address is indexed unmapped
		{"", "::ffff:10.0.0.2", mapped},
		{"", "10.0.0.3", nil}, // host-network workloads are not indexed by IP
		{"", "10.0.0.9", nil},
	} {
		if got := s.WorkloadByAddr(tc.network, addr(tc.ip)); got != tc.want {
			t.Errorf("WorkloadByAddr(%q, %s) = %s, want %s", tc.network, tc.ip, uidOf(got), uidOf(tc.want))
		}
	}
	for _, w := range []*Workload{a, remote, mapped, host, hostnameOnly} {
		if got := s.WorkloadByUID(w.UID); got != w {
			t.Errorf("WorkloadByUID(%q) = %s", w.UID, uidOf(got))
		}
	}
	if got := s.WorkloadByUID("Kubernetes//Pod/ns/none"); got != nil {
		t.Errorf("WorkloadByUID(unknown) = %s, want nil", got.UID)
	}
}

func TestWorkloadByAddrConflict(t *testing.T) {
	mk := func(uid string, proto TunnelProtocol) *Workload {
		return &Workload{UID: uid, Name: uid[strings.LastIndex(uid, "/")+1:], Namespace: "ns", Protocol: proto, Addresses: addrs("10.0.0.1")}
	}
	for _, tc := range []struct {
		name          string
		winner, loser *Workload
	}{
		{"a pod beats a workload entry", mk("c//Pod/ns/z", TunnelNone), mk("c/networking.istio.io/WorkloadEntry/ns/a", TunnelHBONE)},
		{"HBONE beats TCP between pods", mk("c//Pod/ns/z", TunnelHBONE), mk("c//Pod/ns/a", TunnelNone)},
		{"HBONE beats TCP between entries", mk("c/networking.istio.io/WorkloadEntry/ns/z", TunnelHBONE), mk("c/networking.istio.io/WorkloadEntry/ns/a", TunnelNone)},
		{"then the lower uid", mk("c//Pod/ns/a", TunnelHBONE), mk("c//Pod/ns/b", TunnelHBONE)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			for _, order := range [][]*Workload{{tc.winner, tc.loser}, {tc.loser, tc.winner}} {
				s := mustBuild(t, Config{Workloads: order})
				if got := s.WorkloadByAddr("", addr("10.0.0.1")); got != tc.winner {
					t.Errorf("input order %s, %s: WorkloadByAddr = %s, want %s", order[0].UID, order[1].UID, uidOf(got), tc.winner.UID)
				}
				if s.WorkloadByUID(tc.loser.UID) != tc.loser {
					t.Error("the losing workload is not found by uid")
				}
			}
		})
	}
	// Three-way: the winner must not depend on which pair is compared first.
	ws := []*Workload{mk("c//Pod/ns/b", TunnelNone), mk("c/x/WorkloadEntry/ns/a", TunnelHBONE), mk("c//Pod/ns/c", TunnelHBONE), mk("c//Pod/ns/a", TunnelNone)}
	for i := range len(ws) {
		order := append(slices.Clone(ws[i:]), ws[:i]...)
		if got := mustBuild(t, Config{Workloads: order}).WorkloadByAddr("", addr("10.0.0.1")); uidOf(got) != "c//Pod/ns/c" {
			t.Errorf("rotation %d: WorkloadByAddr = %s, want c//Pod/ns/c", i, uidOf(got))
		}
	}
}

func TestServiceByVIP(t *testing.T) {
	web := service("a", "web", "10.96.0.1", "fd00:96::1")
	web.Canonical = true
	remote := service("a", "remote")
	remote.VIPs = []NetworkAddress{{Network: "net2", Addr: addr("10.96.0.1")}}
	mappedVIP := service("a", "mapped", "::ffff:10.96.0.2")

	// Three services share 10.96.0.10: in namespaces b and c, and a canonical one in d.
	sharedB, sharedC, sharedD := service("b", "shared", "10.96.0.10"), service("c", "shared", "10.96.0.10"), service("d", "shared", "10.96.0.10")
	sharedD.Canonical = true
	// Two non-canonical services share 10.96.0.11: the lower key wins for other namespaces.
	tieInY, tieInX := service("y", "tie", "10.96.0.11"), service("x", "tie", "10.96.0.11")

	// A namespace-visible service hides behind a public one at the same VIP.
	private := service("p", "private", "10.96.0.20", "10.96.0.21")
	private.Visibility = VisibilityNamespace
	public := service("q", "public", "10.96.0.20")

	// CIDR VIPs: /16 and /24 nested, an exact VIP inside them, a private /28, and IPv6.
	wide := service("a", "wide")
	wide.CIDRVIPs = []NetworkPrefix{{Prefix: netip.MustParsePrefix("10.100.0.0/16")}, {Prefix: netip.MustParsePrefix("fd00:100::/48")}}
	narrow := service("a", "narrow")
	narrow.CIDRVIPs = []NetworkPrefix{{Prefix: netip.MustParsePrefix("10.100.1.9/24")}} // unmasked on purpose
	exactIn := service("a", "exact-in", "10.100.1.7")
	privCIDR := service("p", "priv-cidr")
	privCIDR.CIDRVIPs = []NetworkPrefix{{Prefix: netip.MustParsePrefix("10.100.1.0/28")}}
	privCIDR.Visibility = VisibilityNamespace
	remoteCIDR := service("a", "remote-cidr")
	remoteCIDR.CIDRVIPs = []NetworkPrefix{{Network: "net2", Prefix: netip.MustParsePrefix("10.100.1.0/25")}}
	mappedCIDR := service("a", "mapped-cidr")
	mappedCIDR.CIDRVIPs = []NetworkPrefix{{Prefix: netip.MustParsePrefix("::ffff:10.200.0.0/112")}}

	all := []*Service{web, remote, mappedVIP, sharedB, sharedC, sharedD, tieInY, tieInX, private, public, wide, narrow, exactIn, privCIDR, remoteCIDR, mappedCIDR}
	cases := []struct {
		name, network, ip, clientNS string
		want                        *Service
	}{
		{"exact", "", "10.96.0.1", "z", web},
		{"exact IPv6", "", "fd00:96::1", "z", web},
		{"IPv4-mapped query", "", "::ffff:10.96.0.1", "z", web},
		{"IPv4-mapped VIP", "", "10.96.0.2", "z", mappedVIP},
		{"other network", "net2", "10.96.0.1", "z", remote},
		{"unknown network", "net3", "10.96.0.1", "z", nil},
		{"miss", "", "10.96.0.99", "z", nil},
		{"client namespace wins", "", "10.96.0.10", "c", sharedC},
		{"client namespace wins over canonical", "", "10.96.0.10", "b", sharedB},
		{"canonical for other namespaces", "", "10.96.0.10", "z", sharedD},
		{"lower key breaks a tie", "", "10.96.0.11", "z", tieInX},
		{"namespace visibility: own namespace", "", "10.96.0.20", "p", private},
		{"namespace visibility: hidden elsewhere", "", "10.96.0.20", "z", public},
		{"namespace visibility: nothing else", "", "10.96.0.21", "z", nil},
		{"namespace visibility: no namespace", "", "10.96.0.21", "", nil},
		{"CIDR longest prefix", "", "10.100.1.200", "z", narrow},
		{"CIDR shorter prefix", "", "10.100.2.1", "z", wide},
		{"exact VIP before CIDR", "", "10.100.1.7", "z", exactIn},
		{"CIDR private in namespace", "", "10.100.1.3", "p", privCIDR},
		{"CIDR private hidden falls back", "", "10.100.1.3", "z", narrow},
		{"CIDR network scoped", "net2", "10.100.1.3", "z", remoteCIDR},
		{"CIDR other network misses", "net2", "10.100.2.1", "z", nil},
		{"CIDR IPv6", "", "fd00:100::5", "z", wide},
		{"CIDR IPv6 miss", "", "fd00:101::5", "z", nil},
		{"CIDR mapped query", "", "::ffff:10.100.2.1", "z", wide},
		{"CIDR mapped range", "", "10.200.3.4", "z", mappedCIDR},
		{"CIDR miss", "", "10.101.0.1", "z", nil},
	}
	for _, order := range []string{"forward", "reverse"} {
		in := slices.Clone(all)
		if order == "reverse" {
			slices.Reverse(in)
		}
		s := mustBuild(t, Config{Services: in})
		for _, tc := range cases {
			if got := s.ServiceByVIP(tc.network, addr(tc.ip), tc.clientNS); got != tc.want {
				t.Errorf("%s: %s: ServiceByVIP(%q, %s, %q) = %s, want %s", order, tc.name, tc.network, tc.ip, tc.clientNS, keyOf(got), keyOf(tc.want))
			}
		}
	}
}

func TestServiceByHostname(t *testing.T) {
	// example.com is defined in three namespaces; d's is canonical. private.com is namespace-visible.
	b, c, d := &Service{Name: "e", Namespace: "b", Hostname: "example.com"}, &Service{Name: "e", Namespace: "c", Hostname: "example.com"}, &Service{Name: "e", Namespace: "d", Hostname: "example.com", Canonical: true}
	private := &Service{Name: "p", Namespace: "p", Hostname: "private.com", Visibility: VisibilityNamespace}
	web := service("a", "web")
	for _, in := range [][]*Service{{b, c, d, private, web}, {web, private, d, c, b}} {
		s := mustBuild(t, Config{Services: in})
		for _, tc := range []struct {
			host, clientNS string
			want           *Service
		}{
			{"example.com", "c", c},
			{"example.com", "b", b},
			{"example.com", "z", d},
			{"private.com", "p", private},
			{"private.com", "z", nil},
			{"web.a.svc.cluster.local", "z", web},
			{"web", "a", nil},
			{"nope.example.com", "a", nil},
		} {
			if got := s.ServiceByHostname(tc.host, tc.clientNS); got != tc.want {
				t.Errorf("ServiceByHostname(%q, %q) = %s, want %s", tc.host, tc.clientNS, keyOf(got), keyOf(tc.want))
			}
		}
		if got := s.ServiceByKey(NamespacedHostname{Namespace: "c", Hostname: "example.com"}); got != c {
			t.Errorf("ServiceByKey(c/example.com) = %s", keyOf(got))
		}
		if got := s.ServiceByKey(NamespacedHostname{Namespace: "z", Hostname: "example.com"}); got != nil {
			t.Errorf("ServiceByKey(z/example.com) = %s, want nil", keyOf(got))
		}
	}
}

func TestEndpoints(t *testing.T) {
	web, db := service("ns", "web", "10.96.0.1"), service("ns", "db", "10.96.0.2")
	idle := service("ns", "idle", "10.96.0.3")
	mk := func() []*Workload {
		return []*Workload{
			serving(pod("ns", "c", "10.0.0.3"), web, PortMap{80: 8080}),
			serving(serving(pod("ns", "a", "10.0.0.1"), web, PortMap{80: 8081}), db, PortMap{5432: 5432}),
			serving(pod("ns", "b", "10.0.0.2"), web, nil),
			// Keys no service defines are staged, reported once, sorted.
			serving(serving(pod("ns", "d", "10.0.0.4"), &Service{Namespace: "ns", Hostname: "later.example.com"}, nil), &Service{Namespace: "ns", Hostname: "again.example.com"}, nil),
			serving(pod("ns", "e", "10.0.0.5"), &Service{Namespace: "ns", Hostname: "later.example.com"}, nil),
			{Name: "f", Namespace: "ns", Addresses: addrs("10.0.0.6"), Services: map[string]PortMap{"no-slash": nil}},
		}
	}
	for _, reverse := range []bool{false, true} {
		ws := mk()
		if reverse {
			slices.Reverse(ws)
		}
		s := mustBuild(t, Config{Workloads: ws, Services: []*Service{web, db, idle}})
		var got []string
		for _, ep := range s.Endpoints(web) {
			got = append(got, fmt.Sprintf("%s %v", ep.Workload.Name, ep.Ports))
		}
		if want := []string{"a map[80:8081]", "b map[]", "c map[80:8080]"}; !slices.Equal(got, want) {
			t.Errorf("reverse=%v: Endpoints(web) = %q, want %q (sorted by uid)", reverse, got, want)
		}
		if eps := s.Endpoints(db); len(eps) != 1 || eps[0].Workload.Name != "a" || eps[0].Ports[5432] != 5432 {
			t.Errorf("Endpoints(db) = %+v", eps)
		}
		if eps := s.Endpoints(idle); len(eps) != 0 {
			t.Errorf("Endpoints(idle) = %+v, want none", eps)
		}
		if eps := s.Endpoints(service("ns", "web")); eps != nil {
			t.Error("Endpoints is keyed by the service object, but a copy found endpoints")
		}
		if got, want := s.StagedServices(), []string{"no-slash", "ns/again.example.com", "ns/later.example.com"}; !slices.Equal(got, want) {
			t.Errorf("StagedServices() = %q, want %q", got, want)
		}
		// Appending to one list must not write into the next one's (they share a backing
		// array, in service order: db before web).
		first := s.Endpoints(web)[0].Workload
		_ = append(s.Endpoints(db), Endpoint{})
		if s.Endpoints(web)[0].Workload != first {
			t.Error("appending to Endpoints(db) overwrote Endpoints(web)")
		}
	}
}

func TestPolicies(t *testing.T) {
	global := &Policy{Name: "global", Namespace: "istio-system", Scope: ScopeGlobal}
	globalNoNS := &Policy{Name: "bare", Scope: ScopeGlobal, Action: ActionDeny}
	nsA1 := &Policy{Name: "a1", Namespace: "a", Scope: ScopeNamespace}
	nsA2 := &Policy{Name: "a0", Namespace: "a", Scope: ScopeNamespace}
	nsB := &Policy{Name: "b", Namespace: "b", Scope: ScopeNamespace}
	selector := &Policy{Name: "sel", Namespace: "a", Scope: ScopeWorkloadSelector}
	s := mustBuild(t, Config{Policies: []*Policy{global, nsA1, selector, nsB, globalNoNS, nsA2}})

	names := func(ps []*Policy) []string {
		var out []string
		for _, p := range ps {
			out = append(out, p.Key())
		}
		return out
	}
	for _, tc := range []struct {
		ns   string
		want []string
	}{
		{"", []string{"/bare", "istio-system/global"}}, // global policies, sorted by key
		{"a", []string{"a/a0", "a/a1"}},                // selector policies are reached through workloads
		{"b", []string{"b/b"}},
		{"istio-system", nil}, // a global policy's namespace does not make it a namespace policy
		{"z", nil},
	} {
		if got := names(s.NamespacePolicies(tc.ns)); !slices.Equal(got, tc.want) {
			t.Errorf("NamespacePolicies(%q) = %q, want %q", tc.ns, got, tc.want)
		}
	}
	for key, want := range map[string]*Policy{
		"istio-system/global": global, "/bare": globalNoNS, "a/a1": nsA1, "a/sel": selector, "b/b": nsB,
		"a/nope": nil, "sel": nil,
	} {
		if got := s.PolicyByKey(key); got != want {
			t.Errorf("PolicyByKey(%q) = %v, want %v", key, got, want)
		}
	}
	if k := (&Policy{Name: "n", Namespace: "ns"}).Key(); k != "ns/n" {
		t.Errorf("Key() of an unbuilt policy = %q, want ns/n", k)
	}
}

func TestWorkloadsOnNode(t *testing.T) {
	mk := func(name, node, ip string) *Workload {
		w := pod("ns", name, ip)
		w.Node = node
		return w
	}
	s := mustBuild(t, Config{Workloads: []*Workload{
		mk("c", "n1", "10.0.0.3"), mk("a", "n1", "10.0.0.1"), mk("b", "n2", "10.0.0.2"), mk("d", "", "10.0.0.4"),
	}})
	for node, want := range map[string][]string{"n1": {"a", "c"}, "n2": {"b"}, "n3": nil, "": {"d"}} {
		var got []string
		for _, w := range s.WorkloadsOnNode(node) {
			got = append(got, w.Name)
		}
		if !slices.Equal(got, want) {
			t.Errorf("WorkloadsOnNode(%q) = %q, want %q", node, got, want)
		}
	}
}

func TestResolveGateway(t *testing.T) {
	wpSvc := service("ns", "waypoint", "10.96.0.10")
	// Endpoints are sorted by uid: wp-a is unhealthy, wp-b has no address, wp-c is the pick.
	wpA := serving(pod("ns", "wp-a", "10.0.0.1"), wpSvc, nil)
	wpA.Status = Unhealthy
	wpB := serving(&Workload{UID: "Kubernetes//Pod/ns/wp-b", Name: "wp-b", Namespace: "ns", Hostname: "wp-b.example.com"}, wpSvc, nil)
	wpC := serving(pod("ns", "wp-c", "10.0.0.3", "fd00::3"), wpSvc, nil)
	wpD := serving(pod("ns", "wp-d", "10.0.0.4"), wpSvc, nil)
	noEndpoints := service("ns", "empty", "10.96.0.11")
	noVIPs := service("ns", "bare")
	remote := pod("ns", "remote", "10.0.0.9")
	remote.Network = "net2"
	s := mustBuild(t, Config{
		Workloads: []*Workload{wpD, wpC, wpB, wpA, remote},
		Services:  []*Service{wpSvc, noEndpoints, noVIPs},
	})

	byAddr := func(network, ip string) *GatewayAddress {
		return &GatewayAddress{Address: &NetworkAddress{Network: network, Addr: addr(ip)}, HBONEPort: 15008}
	}
	byHost := func(ns, host string) *GatewayAddress {
		return &GatewayAddress{Hostname: &NamespacedHostname{Namespace: ns, Hostname: host}, HBONEPort: 15008}
	}
	for _, tc := range []struct {
		name   string
		g      *GatewayAddress
		wantW  *Workload
		wantIP string
		wantOK bool
	}{
		{"nil", nil, nil, "", false},
		{"neither form", &GatewayAddress{}, nil, "", false},
		{"address of a workload", byAddr("", "10.0.0.3"), wpC, "10.0.0.3", true},
		{"address on another network", byAddr("net2", "10.0.0.9"), remote, "10.0.0.9", true},
		// An address is dialable whether or not the snapshot knows its owner.
		{"unknown address", byAddr("", "192.0.2.1"), nil, "192.0.2.1", true},
		{"hostname: first healthy endpoint with an address", byHost("ns", "waypoint.ns.svc.cluster.local"), wpC, "10.0.0.3", true},
		{"hostname without endpoints: the VIP", byHost("ns", "empty.ns.svc.cluster.local"), nil, "10.96.0.11", true},
		{"hostname without endpoints or VIPs", byHost("ns", "bare.ns.svc.cluster.local"), nil, "", false},
		{"unknown hostname", byHost("ns", "nope.example.com"), nil, "", false},
		{"hostname in another namespace", byHost("other", "waypoint.ns.svc.cluster.local"), nil, "", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			w, ip, ok := s.ResolveGateway(tc.g)
			var wantIP netip.Addr
			if tc.wantIP != "" {
				wantIP = addr(tc.wantIP)
			}
			if w != tc.wantW || ip != wantIP || ok != tc.wantOK {
				t.Errorf("ResolveGateway = (%s, %v, %v), want (%s, %v, %v)", uidOf(w), ip, ok, uidOf(tc.wantW), wantIP, tc.wantOK)
			}
		})
	}
}

func TestWorkloadHelpers(t *testing.T) {
	w := pod("ns", "a", "10.0.0.1", "fd00::1")
	if !w.HasAddr(addr("fd00::1")) || w.HasAddr(addr("10.0.0.2")) {
		t.Error("HasAddr is wrong")
	}
	if w.Weight() != 1 {
		t.Errorf("Weight() with no capacity = %d, want 1", w.Weight())
	}
	w.Capacity = 3
	if w.Weight() != 3 {
		t.Errorf("Weight() = %d, want 3", w.Weight())
	}
}

func TestStorePublishLoad(t *testing.T) {
	st := NewStore()
	empty := st.Load()
	if empty == nil || empty.Version() != 0 || len(empty.Workloads()) != 0 {
		t.Fatalf("new store holds %+v, want the empty snapshot at version 0", empty)
	}
	var last uint64
	for i := range 3 {
		s := mustBuild(t, Config{Workloads: []*Workload{pod("ns", fmt.Sprint("w", i), "10.0.0.1")}})
		st.Publish(s)
		if got := st.Load(); got != s {
			t.Fatalf("publish %d: Load returned another snapshot", i)
		}
		if s.Version() <= last {
			t.Errorf("publish %d: version %d after %d, want increasing", i, s.Version(), last)
		}
		last = s.Version()
	}
	if last != 3 {
		t.Errorf("third Publish stamped version %d, want 3", last)
	}
}

func TestStoreSubscribe(t *testing.T) {
	st := NewStore()
	ch1, cancel1 := st.Subscribe()
	ch2, cancel2 := st.Subscribe()
	defer cancel2()
	pending := func(ch <-chan struct{}) int {
		n := 0
		for {
			select {
			case <-ch:
				n++
			default:
				return n
			}
		}
	}
	if n := pending(ch1); n != 0 {
		t.Fatalf("%d wake-ups before any Publish", n)
	}
	for range 3 {
		st.Publish(mustBuild(t, Config{}))
	}
	if n1, n2 := pending(ch1), pending(ch2); n1 != 1 || n2 != 1 {
		t.Errorf("after 3 publishes: %d and %d wake-ups, want 1 each (coalesced)", n1, n2)
	}
	st.Publish(mustBuild(t, Config{}))
	if n := pending(ch1); n != 1 {
		t.Errorf("after another publish: %d wake-ups, want 1", n)
	}
	cancel1()
	cancel1() // idempotent
	st.Publish(mustBuild(t, Config{}))
	if n1, n2 := pending(ch1), pending(ch2); n1 != 0 || n2 != 2-1 {
		t.Errorf("after cancel: %d wake-ups on the cancelled and %d on the live subscription, want 0 and 1", n1, n2)
	}
}

// TestStoreConcurrent publishes from several goroutines while readers load: versions a reader
// sees never go backwards (run with -race to check the rest).
func TestStoreConcurrent(t *testing.T) {
	st := NewStore()
	done := make(chan struct{})
	readerDone := make(chan error)
	go func() {
		var last uint64
		for {
			select {
			case <-done:
				readerDone <- nil
				return
			default:
			}
			v := st.Load().Version()
			if v < last {
				readerDone <- fmt.Errorf("version went from %d back to %d", last, v)
				return
			}
			last = v
		}
	}()
	const writers, each = 4, 50
	errs := make(chan error, writers)
	for range writers {
		go func() {
			for range each {
				s, err := Build(Config{})
				if err != nil {
					errs <- err
					return
				}
				st.Publish(s)
			}
			errs <- nil
		}()
	}
	for range writers {
		if err := <-errs; err != nil {
			t.Fatal(err)
		}
	}
	close(done)
	if err := <-readerDone; err != nil {
		t.Error(err)
	}
	if v := st.Load().Version(); v != writers*each {
		t.Errorf("last version %d, want %d", v, writers*each)
	}
}

// TestAddresslessWorkload: istiod sends workloads with neither addresses nor a hostname for
// endpoints on another network; they are valid, indexed by uid and as service endpoints only.
func TestAddresslessWorkload(t *testing.T) {
	s, err := Build(Config{
		Workloads: []*Workload{{UID: "remote", Name: "r", Namespace: "ns", Network: "net2",
			Services: map[string]PortMap{"ns/svc.local": {80: 8080}}}},
		Services: []*Service{{Name: "svc", Namespace: "ns", Hostname: "svc.local"}},
	})
	if err != nil {
		t.Fatal(err)
	}
	svc := s.ServiceByKey(NamespacedHostname{Namespace: "ns", Hostname: "svc.local"})
	if s.WorkloadByUID("remote") == nil || len(s.Endpoints(svc)) != 1 {
		t.Fatal("address-less workload not indexed by uid and as an endpoint")
	}
}
