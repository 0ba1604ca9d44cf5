package authz

import (
	"fmt"
	"net/netip"
	"reflect"
	"testing"

	"github.com/ztgo/ztgo/control/snapshot"
	"github.com/ztgo/ztgo/tls/spiffe"
)

// The three connections mirror the fixtures of ztunnel's rbac.rs tests, so the expectations of
// the field table can be read against them.

func plainConn() Conn {
	return Conn{SrcIP: ip("127.0.0.1"), DstIP: ip("127.0.0.2"), DstPort: 8080}
}

func tlsConn() Conn {
	return Conn{
		SrcIdentity: spiffe.ID{TrustDomain: "td", Namespace: "namespace", ServiceAccount: "account"},
		SrcIP:       ip("127.0.0.1"), DstIP: ip("127.0.0.2"), DstPort: 8080,
	}
}

func altConn() Conn {
	return Conn{
		SrcIdentity: spiffe.ID{TrustDomain: "td-alt", Namespace: "ns-alt", ServiceAccount: "sa-alt"},
		SrcIP:       ip("127.0.0.3"), DstIP: ip("127.0.0.4"), DstPort: 9090,
	}
}

func ip(s string) netip.Addr     { return netip.MustParseAddr(s) }
func cidr(s string) netip.Prefix { return netip.MustParsePrefix(s) }
func exact(s string) snapshot.StringMatch {
	return snapshot.StringMatch{Kind: snapshot.MatchExact, Value: s}
}
func prefix(s string) snapshot.StringMatch {
	return snapshot.StringMatch{Kind: snapshot.MatchPrefix, Value: s}
}
func suffix(s string) snapshot.StringMatch {
	return snapshot.StringMatch{Kind: snapshot.MatchSuffix, Value: s}
}
func presence() snapshot.StringMatch { return snapshot.StringMatch{Kind: snapshot.MatchPresence} }

const dstNS = "dst-ns"

// dstWorkload is built fresh each time because snapshot.Build takes ownership of its input.
func dstWorkload(policyKeys ...string) *snapshot.Workload {
	return &snapshot.Workload{
		Name: "dst", Namespace: dstNS,
		Addresses:             []netip.Addr{ip("127.0.0.2"), ip("127.0.0.4")},
		AuthorizationPolicies: policyKeys,
	}
}

func policy(ns, name string, scope snapshot.PolicyScope, action snapshot.PolicyAction, rules ...snapshot.Rule) *snapshot.Policy {
	return &snapshot.Policy{Name: name, Namespace: ns, Scope: scope, Action: action, Rules: rules}
}

func dryRun(p *snapshot.Policy) *snapshot.Policy { p.DryRun = true; return p }

// one is a rule with one clause holding one match.
func one(m snapshot.Match) snapshot.Rule { return snapshot.Rule{snapshot.Clause{m}} }

// any is a rule with no clauses: it matches every connection.
func anyConn() snapshot.Rule { return snapshot.Rule{} }

func build(t testing.TB, w *snapshot.Workload, policies ...*snapshot.Policy) (*snapshot.Snapshot, *snapshot.Workload) {
	t.Helper()
	snap, err := snapshot.Build(snapshot.Config{Workloads: []*snapshot.Workload{w}, Policies: policies})
	if err != nil {
		t.Fatalf("build snapshot: %v", err)
	}
	return snap, snap.WorkloadByUID(w.UID)
}

// TestMatchFields runs each match under a single ALLOW policy and checks which of the three
// fixture connections it lets through.
func TestMatchFields(t *testing.T) {
	type want struct{ plain, tls, alt bool }
	cases := []struct {
		name  string
		rules []snapshot.Rule
		want  want
	}{
		// namespaces, every StringMatch kind, and the plaintext comparison with "".
		{"namespaces exact", []snapshot.Rule{one(snapshot.Match{Namespaces: []snapshot.StringMatch{exact("namespace")}})}, want{false, true, false}},
		{"not namespaces exact", []snapshot.Rule{one(snapshot.Match{NotNamespaces: []snapshot.StringMatch{exact("namespace")}})}, want{true, false, true}},
		{"namespaces prefix", []snapshot.Rule{one(snapshot.Match{Namespaces: []snapshot.StringMatch{prefix("name")}})}, want{false, true, false}},
		{"namespaces suffix", []snapshot.Rule{one(snapshot.Match{Namespaces: []snapshot.StringMatch{suffix("alt")}})}, want{false, false, true}},
		{"namespaces presence", []snapshot.Rule{one(snapshot.Match{Namespaces: []snapshot.StringMatch{presence()}})}, want{false, true, true}},
		{"not namespaces presence", []snapshot.Rule{one(snapshot.Match{NotNamespaces: []snapshot.StringMatch{presence()}})}, want{true, false, false}},
		{"namespaces any of list", []snapshot.Rule{one(snapshot.Match{Namespaces: []snapshot.StringMatch{exact("x"), exact("ns-alt")}})}, want{false, false, true}},
		{"not namespaces any of list", []snapshot.Rule{one(snapshot.Match{NotNamespaces: []snapshot.StringMatch{exact("x"), exact("ns-alt")}})}, want{true, true, false}},
		// ztunnel matches a missing identity's namespace as "": an empty exact or prefix holds.
		{"namespaces exact empty matches plaintext", []snapshot.Rule{one(snapshot.Match{Namespaces: []snapshot.StringMatch{exact("")}})}, want{true, false, false}},
		{"namespaces prefix empty matches all", []snapshot.Rule{one(snapshot.Match{Namespaces: []snapshot.StringMatch{prefix("")}})}, want{true, true, true}},
		{"namespaces positive and negative", []snapshot.Rule{one(snapshot.Match{Namespaces: []snapshot.StringMatch{presence()}, NotNamespaces: []snapshot.StringMatch{exact("ns-alt")}})}, want{false, true, false}},

		// service accounts: namespace and name exact, trust domain ignored, no identity never matches.
		{"service accounts", []snapshot.Rule{one(snapshot.Match{ServiceAccounts: []snapshot.ServiceAccountMatch{{Namespace: "namespace", ServiceAccount: "account"}}})}, want{false, true, false}},
		{"not service accounts", []snapshot.Rule{one(snapshot.Match{NotServiceAccounts: []snapshot.ServiceAccountMatch{{Namespace: "namespace", ServiceAccount: "account"}}})}, want{true, false, true}},
		{"service accounts other trust domain", []snapshot.Rule{one(snapshot.Match{ServiceAccounts: []snapshot.ServiceAccountMatch{{Namespace: "ns-alt", ServiceAccount: "sa-alt"}}})}, want{false, false, true}},
		{"service accounts namespace must match", []snapshot.Rule{one(snapshot.Match{ServiceAccounts: []snapshot.ServiceAccountMatch{{Namespace: "ns-alt", ServiceAccount: "account"}}})}, want{false, false, false}},
		{"service accounts empty entry never matches plaintext", []snapshot.Rule{one(snapshot.Match{ServiceAccounts: []snapshot.ServiceAccountMatch{{}}})}, want{false, false, false}},
		{"not service accounts empty entry", []snapshot.Rule{one(snapshot.Match{NotServiceAccounts: []snapshot.ServiceAccountMatch{{}}})}, want{true, true, true}},

		// principals: identity without spiffe://, every kind, no identity never matches.
		{"principals exact", []snapshot.Rule{one(snapshot.Match{Principals: []snapshot.StringMatch{exact("td/ns/namespace/sa/account")}})}, want{false, true, false}},
		{"not principals exact", []snapshot.Rule{one(snapshot.Match{NotPrincipals: []snapshot.StringMatch{exact("td/ns/namespace/sa/account")}})}, want{true, false, true}},
		{"principals exact with scheme never matches", []snapshot.Rule{one(snapshot.Match{Principals: []snapshot.StringMatch{exact("spiffe://td/ns/namespace/sa/account")}})}, want{false, false, false}},
		{"principals exact longer", []snapshot.Rule{one(snapshot.Match{Principals: []snapshot.StringMatch{exact("td/ns/namespace/sa/accountx")}})}, want{false, false, false}},
		{"principals exact shorter", []snapshot.Rule{one(snapshot.Match{Principals: []snapshot.StringMatch{exact("td/ns/namespace/sa/accoun")}})}, want{false, false, false}},
		{"principals prefix trust domain", []snapshot.Rule{one(snapshot.Match{Principals: []snapshot.StringMatch{prefix("td/")}})}, want{false, true, false}},
		{"principals prefix across parts", []snapshot.Rule{one(snapshot.Match{Principals: []snapshot.StringMatch{prefix("td-alt/ns/ns-")}})}, want{false, false, true}},
		{"principals prefix empty", []snapshot.Rule{one(snapshot.Match{Principals: []snapshot.StringMatch{prefix("")}})}, want{false, true, true}},
		{"principals suffix", []snapshot.Rule{one(snapshot.Match{Principals: []snapshot.StringMatch{suffix("/sa/account")}})}, want{false, true, false}},
		{"principals suffix across parts", []snapshot.Rule{one(snapshot.Match{Principals: []snapshot.StringMatch{suffix("space/sa/account")}})}, want{false, true, false}},
		{"principals suffix whole", []snapshot.Rule{one(snapshot.Match{Principals: []snapshot.StringMatch{suffix("td-alt/ns/ns-alt/sa/sa-alt")}})}, want{false, false, true}},
		{"principals presence", []snapshot.Rule{one(snapshot.Match{Principals: []snapshot.StringMatch{presence()}})}, want{false, true, true}},
		{"not principals presence", []snapshot.Rule{one(snapshot.Match{NotPrincipals: []snapshot.StringMatch{presence()}})}, want{true, false, false}},
		{"not principals prefix", []snapshot.Rule{one(snapshot.Match{NotPrincipals: []snapshot.StringMatch{prefix("td-alt/")}})}, want{true, true, false}},

		// source and destination IPs: CIDR containment, unmasked prefixes, families.
		{"source ips", []snapshot.Rule{one(snapshot.Match{SourceIPs: []netip.Prefix{cidr("127.0.0.1/32")}})}, want{true, true, false}},
		{"not source ips", []snapshot.Rule{one(snapshot.Match{NotSourceIPs: []netip.Prefix{cidr("127.0.0.1/32")}})}, want{false, false, true}},
		{"source ips range", []snapshot.Rule{one(snapshot.Match{SourceIPs: []netip.Prefix{cidr("127.0.0.0/30")}})}, want{true, true, true}},
		{"source ips any of list", []snapshot.Rule{one(snapshot.Match{SourceIPs: []netip.Prefix{cidr("10.0.0.0/8"), cidr("127.0.0.3/32")}})}, want{false, false, true}},
		{"destination ips", []snapshot.Rule{one(snapshot.Match{DestinationIPs: []netip.Prefix{cidr("127.0.0.2/32")}})}, want{true, true, false}},
		{"not destination ips", []snapshot.Rule{one(snapshot.Match{NotDestinationIPs: []netip.Prefix{cidr("127.0.0.2/32")}})}, want{false, false, true}},
		{"destination ips unmasked range", []snapshot.Rule{one(snapshot.Match{DestinationIPs: []netip.Prefix{cidr("127.0.0.1/24")}})}, want{true, true, true}},
		{"destination ips other family", []snapshot.Rule{one(snapshot.Match{DestinationIPs: []netip.Prefix{cidr("::/0")}})}, want{false, false, false}},
		{"not destination ips range", []snapshot.Rule{one(snapshot.Match{NotDestinationIPs: []netip.Prefix{cidr("127.0.0.4/31")}})}, want{true, true, false}},

		// destination ports.
		{"destination ports", []snapshot.Rule{one(snapshot.Match{DestinationPorts: []uint16{8080}})}, want{true, true, false}},
		{"not destination ports", []snapshot.Rule{one(snapshot.Match{NotDestinationPorts: []uint16{8080}})}, want{false, false, true}},
		{"destination ports any of list", []snapshot.Rule{one(snapshot.Match{DestinationPorts: []uint16{80, 9090}})}, want{false, false, true}},
		{"not destination ports any of list", []snapshot.Rule{one(snapshot.Match{NotDestinationPorts: []uint16{80, 9090}})}, want{true, true, false}},

		// fields in one match are ANDed.
		{"fields ANDed", []snapshot.Rule{one(snapshot.Match{Namespaces: []snapshot.StringMatch{exact("namespace")}, DestinationPorts: []uint16{9090}})}, want{false, false, false}},
		{"fields ANDed hold", []snapshot.Rule{one(snapshot.Match{Namespaces: []snapshot.StringMatch{exact("namespace")}, DestinationPorts: []uint16{8080}, SourceIPs: []netip.Prefix{cidr("127.0.0.0/8")}})}, want{false, true, false}},

		// structure: matches ORed, clauses ANDed, rules ORed, and the empty cases.
		{"empty match never matches", []snapshot.Rule{one(snapshot.Match{})}, want{false, false, false}},
		{"empty match skipped beside a real one", []snapshot.Rule{{snapshot.Clause{{}, {DestinationPorts: []uint16{8080}}}}}, want{true, true, false}},
		{"matches ORed", []snapshot.Rule{{snapshot.Clause{{Namespaces: []snapshot.StringMatch{exact("namespace")}}, {DestinationPorts: []uint16{9090}}}}}, want{false, true, true}},
		{"clauses ANDed", []snapshot.Rule{{
			snapshot.Clause{{Namespaces: []snapshot.StringMatch{exact("namespace")}}, {Namespaces: []snapshot.StringMatch{exact("ns-alt")}}},
			snapshot.Clause{{DestinationPorts: []uint16{9090}}},
		}}, want{false, false, true}},
		{"rules ORed", []snapshot.Rule{
			one(snapshot.Match{Namespaces: []snapshot.StringMatch{exact("namespace")}}),
			one(snapshot.Match{DestinationPorts: []uint16{9090}}),
		}, want{false, true, true}},
		{"zero-clause rule matches", []snapshot.Rule{anyConn()}, want{true, true, true}},
		{"zero-match clause holds", []snapshot.Rule{{snapshot.Clause{}}}, want{true, true, true}},
		{"zero-match clause beside a failing one", []snapshot.Rule{{snapshot.Clause{}, snapshot.Clause{{DestinationPorts: []uint16{1}}}}}, want{false, false, false}},
		{"empty rules never match", nil, want{false, false, false}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			for _, c := range []struct {
				name string
				conn Conn
				want bool
			}{{"plaintext", plainConn(), tc.want.plain}, {"tls", tlsConn(), tc.want.tls}, {"alt", altConn(), tc.want.alt}} {
				snap, dst := build(t, dstWorkload(), policy(dstNS, "allow", snapshot.ScopeNamespace, snapshot.ActionAllow, tc.rules...))
				d := Evaluate(snap, dst, c.conn)
				if d.Allow != c.want {
					t.Errorf("%s: Allow = %v, want %v (%s)", c.name, d.Allow, c.want, d.Reason)
				}
				wantOutcome := DeniedNotAllowed
				if c.want {
					wantOutcome = AllowedByPolicy
				}
				if d.Outcome != wantOutcome {
					t.Errorf("%s: Outcome = %v, want %v", c.name, d.Outcome, wantOutcome)
				}
			}
		})
	}
}

// TestMappedAddresses checks that IPv4-mapped IPv6 connection addresses match IPv4 CIDRs, as the
// canonicalized addresses ztunnel authorizes do.
func TestMappedAddresses(t *testing.T) {
	snap, dst := build(t, dstWorkload(), policy(dstNS, "allow", snapshot.ScopeNamespace, snapshot.ActionAllow,
		one(snapshot.Match{SourceIPs: []netip.Prefix{cidr("10.0.0.0/8")}, DestinationIPs: []netip.Prefix{cidr("127.0.0.2/32")}})))
	c := Conn{SrcIP: ip("::ffff:10.1.2.3"), DstIP: ip("::ffff:127.0.0.2"), DstPort: 80}
	if d := Evaluate(snap, dst, c); !d.Allow {
		t.Fatalf("mapped addresses: %+v, want allowed", d)
	}
}

// TestEvaluatePolicySet covers which policies apply to a destination and the decision order.
func TestEvaluatePolicySet(t *testing.T) {
	principal := func(p string) snapshot.Rule {
		return one(snapshot.Match{Principals: []snapshot.StringMatch{exact(p)}})
	}
	const tlsPrincipal = "td/ns/namespace/sa/account"
	other := "td/ns/other/sa/other"
	ns, global, ws := snapshot.ScopeNamespace, snapshot.ScopeGlobal, snapshot.ScopeWorkloadSelector
	allow, deny := snapshot.ActionAllow, snapshot.ActionDeny

	cases := []struct {
		name     string
		keys     []string // the destination's AuthorizationPolicies
		policies []*snapshot.Policy
		conn     Conn
		want     Decision
	}{
		{
			name: "no policies allow",
			conn: tlsConn(),
			want: Decision{Allow: true, Outcome: AllowedNoPolicy, Reason: ReasonNoAllowPolicies},
		},
		{
			name:     "namespace deny matches",
			policies: []*snapshot.Policy{policy(dstNS, "deny", ns, deny, principal(tlsPrincipal))},
			conn:     tlsConn(),
			want:     Decision{Outcome: DeniedExplicitly, Policy: "dst-ns/deny", Reason: "explicitly denied by: dst-ns/deny"},
		},
		{
			name:     "namespace deny does not match, no allow",
			policies: []*snapshot.Policy{policy(dstNS, "deny", ns, deny, principal(other))},
			conn:     tlsConn(),
			want:     Decision{Allow: true, Outcome: AllowedNoPolicy, Reason: ReasonNoAllowPolicies},
		},
		{
			name:     "namespace allow matches",
			policies: []*snapshot.Policy{policy(dstNS, "allow", ns, allow, principal(tlsPrincipal))},
			conn:     tlsConn(),
			want:     Decision{Allow: true, Outcome: AllowedByPolicy, Policy: "dst-ns/allow", Reason: ReasonAllowMatch},
		},
		{
			name: "allow exists but none match",
			policies: []*snapshot.Policy{
				policy(dstNS, "a1", ns, allow, principal(other)),
				policy(dstNS, "a2", ns, allow, one(snapshot.Match{DestinationPorts: []uint16{1}})),
			},
			conn: tlsConn(),
			want: Decision{Outcome: DeniedNotAllowed, Reason: ReasonNotAllowed},
		},
		{
			name: "deny wins over allow",
			policies: []*snapshot.Policy{
				policy(dstNS, "allow-all", ns, allow, anyConn()),
				policy(dstNS, "deny", ns, deny, principal(tlsPrincipal)),
			},
			conn: tlsConn(),
			want: Decision{Outcome: DeniedExplicitly, Policy: "dst-ns/deny", Reason: "explicitly denied by: dst-ns/deny"},
		},
		{
			name: "second allow matches",
			policies: []*snapshot.Policy{
				policy(dstNS, "a1", ns, allow, principal(other)),
				policy(dstNS, "a2", ns, allow, principal(tlsPrincipal)),
			},
			conn: tlsConn(),
			want: Decision{Allow: true, Outcome: AllowedByPolicy, Policy: "dst-ns/a2", Reason: ReasonAllowMatch},
		},
		{
			name:     "global deny applies",
			policies: []*snapshot.Policy{policy("istio-system", "global-deny", global, deny, anyConn())},
			conn:     tlsConn(),
			want:     Decision{Outcome: DeniedExplicitly, Policy: "istio-system/global-deny", Reason: "explicitly denied by: istio-system/global-deny"},
		},
		{
			name:     "global allow applies",
			policies: []*snapshot.Policy{policy("istio-system", "global-allow", global, allow, principal(other))},
			conn:     tlsConn(),
			want:     Decision{Outcome: DeniedNotAllowed, Reason: ReasonNotAllowed},
		},
		{
			name:     "other namespace deny ignored",
			policies: []*snapshot.Policy{policy("other", "deny", ns, deny, anyConn())},
			conn:     tlsConn(),
			want:     Decision{Allow: true, Outcome: AllowedNoPolicy, Reason: ReasonNoAllowPolicies},
		},
		{
			name:     "other namespace allow ignored",
			policies: []*snapshot.Policy{policy("other", "allow", ns, allow, principal(other))},
			conn:     tlsConn(),
			want:     Decision{Allow: true, Outcome: AllowedNoPolicy, Reason: ReasonNoAllowPolicies},
		},
		{
			name:     "workload selector policy referenced",
			keys:     []string{"dst-ns/ws-deny"},
			policies: []*snapshot.Policy{policy(dstNS, "ws-deny", ws, deny, anyConn())},
			conn:     tlsConn(),
			want:     Decision{Outcome: DeniedExplicitly, Policy: "dst-ns/ws-deny", Reason: "explicitly denied by: dst-ns/ws-deny"},
		},
		{
			name:     "workload selector allow referenced",
			keys:     []string{"dst-ns/ws-allow"},
			policies: []*snapshot.Policy{policy(dstNS, "ws-allow", ws, allow, principal(tlsPrincipal))},
			conn:     tlsConn(),
			want:     Decision{Allow: true, Outcome: AllowedByPolicy, Policy: "dst-ns/ws-allow", Reason: ReasonAllowMatch},
		},
		{
			name:     "workload selector policy not referenced is ignored",
			policies: []*snapshot.Policy{policy(dstNS, "ws-deny", ws, deny, anyConn())},
			conn:     tlsConn(),
			want:     Decision{Allow: true, Outcome: AllowedNoPolicy, Reason: ReasonNoAllowPolicies},
		},
		{
			name:     "workload selector key from another namespace applies",
			keys:     []string{"other/ws-deny"},
			policies: []*snapshot.Policy{policy("other", "ws-deny", ws, deny, anyConn())},
			conn:     tlsConn(),
			want:     Decision{Outcome: DeniedExplicitly, Policy: "other/ws-deny", Reason: "explicitly denied by: other/ws-deny"},
		},
		{
			name:     "unknown workload key skipped",
			keys:     []string{"dst-ns/missing", "dst-ns/ws-allow"},
			policies: []*snapshot.Policy{policy(dstNS, "ws-allow", ws, allow, principal(tlsPrincipal))},
			conn:     tlsConn(),
			want:     Decision{Allow: true, Outcome: AllowedByPolicy, Policy: "dst-ns/ws-allow", Reason: ReasonAllowMatch},
		},
		{
			name: "all scopes combine",
			keys: []string{"dst-ns/ws-allow"},
			policies: []*snapshot.Policy{
				policy(dstNS, "ns-allow", ns, allow, principal(other)),
				policy("istio-system", "global-allow", global, allow, principal(other)),
				policy(dstNS, "ws-allow", ws, allow, principal(tlsPrincipal)),
			},
			conn: tlsConn(),
			want: Decision{Allow: true, Outcome: AllowedByPolicy, Policy: "dst-ns/ws-allow", Reason: ReasonAllowMatch},
		},
		{
			name:     "plaintext fails a principal allow",
			policies: []*snapshot.Policy{policy(dstNS, "allow", ns, allow, one(snapshot.Match{Principals: []snapshot.StringMatch{presence()}}))},
			conn:     plainConn(),
			want:     Decision{Outcome: DeniedNotAllowed, Reason: ReasonNotAllowed},
		},
		{
			// Istio's "deny requests without an identity": notPrincipals ["*"] becomes presence.
			name:     "not principals deny rejects plaintext",
			policies: []*snapshot.Policy{policy(dstNS, "require-mtls", ns, deny, one(snapshot.Match{NotPrincipals: []snapshot.StringMatch{presence()}}))},
			conn:     plainConn(),
			want:     Decision{Outcome: DeniedExplicitly, Policy: "dst-ns/require-mtls", Reason: "explicitly denied by: dst-ns/require-mtls"},
		},
		{
			name:     "not principals deny lets mtls through",
			policies: []*snapshot.Policy{policy(dstNS, "require-mtls", ns, deny, one(snapshot.Match{NotPrincipals: []snapshot.StringMatch{presence()}}))},
			conn:     tlsConn(),
			want:     Decision{Allow: true, Outcome: AllowedNoPolicy, Reason: ReasonNoAllowPolicies},
		},
		{
			name:     "empty rules deny never matches",
			policies: []*snapshot.Policy{policy(dstNS, "deny", ns, deny)},
			conn:     tlsConn(),
			want:     Decision{Allow: true, Outcome: AllowedNoPolicy, Reason: ReasonNoAllowPolicies},
		},
		{
			name:     "empty rules allow still counts as an allow policy",
			policies: []*snapshot.Policy{policy(dstNS, "allow", ns, allow)},
			conn:     tlsConn(),
			want:     Decision{Outcome: DeniedNotAllowed, Reason: ReasonNotAllowed},
		},

		// dry run
		{
			name:     "dry-run deny not enforced",
			policies: []*snapshot.Policy{dryRun(policy(dstNS, "dry-deny", ns, deny, anyConn()))},
			conn:     tlsConn(),
			want: Decision{Allow: true, Outcome: AllowedNoPolicy, Reason: ReasonNoAllowPolicies,
				DryRun: []DryRunResult{{Policy: "dst-ns/dry-deny", Action: deny, Message: DryRunDenyMatch}}},
		},
		{
			name:     "dry-run deny not matching reports nothing",
			policies: []*snapshot.Policy{dryRun(policy(dstNS, "dry-deny", ns, deny, principal(other)))},
			conn:     tlsConn(),
			want:     Decision{Allow: true, Outcome: AllowedNoPolicy, Reason: ReasonNoAllowPolicies},
		},
		{
			name:     "dry-run allow not matching is not enforced",
			policies: []*snapshot.Policy{dryRun(policy(dstNS, "dry-allow", ns, allow, principal(other)))},
			conn:     tlsConn(),
			want: Decision{Allow: true, Outcome: AllowedNoPolicy, Reason: ReasonNoAllowPolicies,
				DryRun: []DryRunResult{{Action: deny, Message: DryRunNoAllowMatch}}},
		},
		{
			name:     "dry-run allow matching",
			policies: []*snapshot.Policy{dryRun(policy(dstNS, "dry-allow", ns, allow, principal(tlsPrincipal)))},
			conn:     tlsConn(),
			want: Decision{Allow: true, Outcome: AllowedNoPolicy, Reason: ReasonNoAllowPolicies,
				DryRun: []DryRunResult{{Policy: "dst-ns/dry-allow", Action: allow, Message: DryRunAllowMatch}}},
		},
		{
			name: "dry-run allow not matching beside an enforced allow",
			policies: []*snapshot.Policy{
				dryRun(policy(dstNS, "dry-allow", ns, allow, principal(other))),
				policy(dstNS, "allow", ns, allow, principal(tlsPrincipal)),
			},
			conn: tlsConn(),
			want: Decision{Allow: true, Outcome: AllowedByPolicy, Policy: "dst-ns/allow", Reason: ReasonAllowMatch},
		},
		{
			name: "dry-run deny beside an enforced allow that fails",
			keys: []string{"dst-ns/ws-dry-deny"},
			policies: []*snapshot.Policy{
				dryRun(policy(dstNS, "ws-dry-deny", ws, deny, anyConn())),
				policy(dstNS, "allow", ns, allow, principal(other)),
			},
			conn: tlsConn(),
			want: Decision{Outcome: DeniedNotAllowed, Reason: ReasonNotAllowed,
				DryRun: []DryRunResult{{Policy: "dst-ns/ws-dry-deny", Action: deny, Message: DryRunDenyMatch}}},
		},
		{
			// ztunnel returns on the enforced deny before it looks at dry-run ALLOWs.
			name: "enforced deny stops before dry-run allows",
			policies: []*snapshot.Policy{
				dryRun(policy(dstNS, "dry-allow", ns, allow, anyConn())),
				policy(dstNS, "deny", ns, deny, anyConn()),
				dryRun(policy("istio-system", "dry-deny", global, deny, anyConn())),
			},
			conn: tlsConn(),
			want: Decision{Outcome: DeniedExplicitly, Policy: "dst-ns/deny", Reason: "explicitly denied by: dst-ns/deny",
				DryRun: []DryRunResult{{Policy: "istio-system/dry-deny", Action: deny, Message: DryRunDenyMatch}}},
		},
		{
			name: "dry-run deny and allow both reported",
			policies: []*snapshot.Policy{
				dryRun(policy(dstNS, "dry-deny", ns, deny, principal(tlsPrincipal))),
				dryRun(policy(dstNS, "dry-allow", ns, allow, principal(tlsPrincipal))),
				policy(dstNS, "allow", ns, allow, principal(tlsPrincipal)),
			},
			conn: tlsConn(),
			want: Decision{Allow: true, Outcome: AllowedByPolicy, Policy: "dst-ns/allow", Reason: ReasonAllowMatch,
				DryRun: []DryRunResult{
					{Policy: "dst-ns/dry-deny", Action: deny, Message: DryRunDenyMatch},
					{Policy: "dst-ns/dry-allow", Action: allow, Message: DryRunAllowMatch},
				}},
		},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			snap, dst := build(t, dstWorkload(tc.keys...), tc.policies...)
			got := Evaluate(snap, dst, tc.conn)
			if !reflect.DeepEqual(got, tc.want) {
				t.Errorf("Evaluate:\n got %+v\nwant %+v", got, tc.want)
			}
			if got.Outcome.ResponseFlag() == "DENY" == got.Allow {
				t.Errorf("ResponseFlag %q disagrees with Allow %v", got.Outcome.ResponseFlag(), got.Allow)
			}
		})
	}
}

func TestEvaluateNoWorkload(t *testing.T) {
	snap, _ := build(t, dstWorkload())
	d := Evaluate(snap, nil, tlsConn())
	if d.Allow || d.Outcome != DeniedNoWorkload || d.Reason != ReasonWorkloadNotFound {
		t.Fatalf("nil destination: %+v", d)
	}
}

func TestConnString(t *testing.T) {
	if got, want := tlsConn().String(), "127.0.0.1(spiffe://td/ns/namespace/sa/account)->127.0.0.2:8080"; got != want {
		t.Errorf("tls: %q, want %q", got, want)
	}
	if got, want := plainConn().String(), "127.0.0.1(None)->127.0.0.2:8080"; got != want {
		t.Errorf("plaintext: %q, want %q", got, want)
	}
}

// TestEvaluateAllocs holds Evaluate to no allocation on the paths without dry-run hits. The one
// thing that may allocate there is naming a namespace- or global-scoped deciding policy
// (Policy.Key concatenates); that case is bounded by Key's own cost, so the test tightens by
// itself if the snapshot starts caching keys.
func TestEvaluateAllocs(t *testing.T) {
	tlsP := one(snapshot.Match{Principals: []snapshot.StringMatch{exact("td/ns/namespace/sa/account")}})
	nsAllow := policy(dstNS, "allow", snapshot.ScopeNamespace, snapshot.ActionAllow, tlsP)
	var key string // a sink, so the compiler cannot drop the concatenation
	keyAllocs := testing.AllocsPerRun(100, func() { key = nsAllow.Key() })
	_ = key

	cases := []struct {
		name     string
		keys     []string
		policies []*snapshot.Policy
		max      float64
	}{
		{name: "no policies"},
		{name: "allow by workload selector", keys: []string{"dst-ns/ws"},
			policies: []*snapshot.Policy{policy(dstNS, "ws", snapshot.ScopeWorkloadSelector, snapshot.ActionAllow, tlsP)}},
		{name: "allow policies exist, none match",
			policies: []*snapshot.Policy{policy(dstNS, "a", snapshot.ScopeNamespace, snapshot.ActionAllow, one(snapshot.Match{DestinationPorts: []uint16{1}}))}},
		{name: "deny not matching, dry-run not matching", keys: []string{"dst-ns/ws"},
			policies: []*snapshot.Policy{
				policy(dstNS, "d", snapshot.ScopeNamespace, snapshot.ActionDeny, one(snapshot.Match{NotPrincipals: []snapshot.StringMatch{suffix("/sa/account")}})),
				dryRun(policy(dstNS, "dry", snapshot.ScopeNamespace, snapshot.ActionAllow, one(snapshot.Match{DestinationPorts: []uint16{1}}))),
				policy(dstNS, "ws", snapshot.ScopeWorkloadSelector, snapshot.ActionAllow, tlsP),
			}},
		{name: "allow by namespace policy", policies: []*snapshot.Policy{nsAllow}, max: keyAllocs},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			snap, dst := build(t, dstWorkload(tc.keys...), tc.policies...)
			c := tlsConn()
			if d := Evaluate(snap, dst, c); len(d.DryRun) != 0 {
				t.Fatalf("case has dry-run hits: %+v", d)
			}
			if got := testing.AllocsPerRun(1000, func() { _ = Evaluate(snap, dst, c) }); got > tc.max {
				t.Errorf("Evaluate allocates %v times per run, want <= %v", got, tc.max)
			}
		})
	}
}

// FuzzPrincipalMatch checks the part-wise principal comparison against matching the formatted
// principal string.
func FuzzPrincipalMatch(f *testing.F) {
	f.Add("td", "ns", "sa", uint8(snapshot.MatchExact), "td/ns/ns/sa/sa")
	f.Add("td", "ns", "sa", uint8(snapshot.MatchPrefix), "td/ns/n")
	f.Add("td", "ns", "sa", uint8(snapshot.MatchSuffix), "s/sa/sa")
	f.Add("td", "ns", "sa", uint8(snapshot.MatchPresence), "")
	f.Add("cluster.local", "default", "app", uint8(snapshot.MatchPrefix), "cluster.local/ns/default/sa/app/extra")
	f.Add("a", "b", "c", uint8(snapshot.MatchSuffix), "xa/ns/b/sa/c")
	f.Fuzz(func(t *testing.T, td, ns, sa string, kind uint8, value string) {
		id := spiffe.ID{TrustDomain: td, Namespace: ns, ServiceAccount: sa}
		if id.IsZero() {
			return // Principal() is "" for the zero ID, which is never matched part-wise
		}
		m := snapshot.StringMatch{Kind: snapshot.StringMatchKind(kind % 4), Value: value}
		pp := newPrincipalParts(&id)
		if got, want := pp.matches(m, pp.len()), m.Matches(id.Principal()); got != want {
			t.Fatalf("principal match (%+v, %q) = %v, want %v", m, id.Principal(), got, want)
		}
	})
}

// BenchmarkEvaluate measures a destination with 100 ALLOW policies of 10 rules each: "none
// match" walks every rule, "last matches" allows on the last one.
func BenchmarkEvaluate(b *testing.B) {
	policies := func(lastMatches bool) []*snapshot.Policy {
		var ps []*snapshot.Policy
		for i := range 100 {
			var rules []snapshot.Rule
			for j := range 10 {
				p := fmt.Sprintf("cluster.local/ns/n%d/sa/s%d", i, j)
				if lastMatches && i == 99 && j == 9 {
					p = "cluster.local/ns/client/sa/app"
				}
				rules = append(rules, snapshot.Rule{
					snapshot.Clause{
						{Principals: []snapshot.StringMatch{exact(p)}},
						{Namespaces: []snapshot.StringMatch{prefix(fmt.Sprintf("team-%d-", j))}, NotSourceIPs: []netip.Prefix{cidr("192.168.0.0/16")}},
					},
					snapshot.Clause{{DestinationPorts: []uint16{8080, 8443}}},
				})
			}
			ps = append(ps, policy(dstNS, fmt.Sprintf("p%03d", i), snapshot.ScopeNamespace, snapshot.ActionAllow, rules...))
		}
		return ps
	}
	c := Conn{
		SrcIdentity: spiffe.ID{TrustDomain: "cluster.local", Namespace: "client", ServiceAccount: "app"},
		SrcIP:       ip("10.0.0.1"), DstIP: ip("127.0.0.2"), DstPort: 8080,
	}
	for _, bc := range []struct {
		name      string
		last      bool
		wantAllow bool
	}{{"none match", false, false}, {"last matches", true, true}} {
		b.Run(bc.name, func(b *testing.B) {
			snap, dst := build(b, dstWorkload(), policies(bc.last)...)
			if d := Evaluate(snap, dst, c); d.Allow != bc.wantAllow {
				b.Fatalf("Allow = %v, want %v", d.Allow, bc.wantAllow)
			}
			b.ReportAllocs()
			for b.Loop() {
				_ = Evaluate(snap, dst, c)
			}
		})
	}
	b.Run("no policies", func(b *testing.B) {
		snap, dst := build(b, dstWorkload())
		b.ReportAllocs()
		for b.Loop() {
			_ = Evaluate(snap, dst, c)
		}
	})
}
