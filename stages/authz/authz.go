// Package authz is ztgo's L4 authorization: the decision whether a connection may reach a
// destination workload, as a pure function of a snapshot and the connection, plus a tracker
// that re-checks established flows whenever a new snapshot is published.
//
// # Semantics
//
// Evaluate follows ztunnel's assert_rbac (src/state.rs) and Authorization::matches
// (src/rbac.rs), so that a mesh moved from ztunnel to ztgo allows and denies the same
// connections:
//
//   - The policy set of a destination is the namespace-scoped policies of its namespace, then
//     the global policies, then the policies the workload names in AuthorizationPolicies
//     (workload-selector scope). Names that the snapshot does not know are skipped: istiod may
//     send a workload before the policy it references.
//   - Any matching DENY policy denies. Otherwise, with no ALLOW policy the connection is
//     allowed; with ALLOW policies one of them must match, or the connection is denied.
//   - Dry-run policies never change the decision. Every dry-run DENY is evaluated; dry-run ALLOWs
//     are evaluated only when no enforced DENY matched, as in ztunnel. What they would have done
//     is returned in Decision.DryRun for the caller to log.
//
// Within a policy, rules are ORed (no rules: never matches); the clauses of a rule are ANDed (no
// clauses: matches); the matches of a clause are ORed (no matches: the clause holds) and a match
// with no condition at all never matches. Inside a match every present field must hold; a field
// holds when its positive list is empty or any entry matches, and no entry of its not_ list
// matches.
//
// A connection without a peer identity (plaintext) is compared as ztunnel compares it: its
// namespace is the empty string, a principal or service-account entry never matches it, and so
// every not_ list of those kinds holds for it.
//
// # Cost
//
// Evaluate allocates only to report: a dry-run hit (the DryRun slice), an explicit deny (one
// string holds Reason and, as its tail, Policy), and the name of a deciding namespace- or
// global-scoped ALLOW policy, since Policy.Key concatenates. A workload-selector policy is named
// by the workload's own key string, for free. So allowing with no policy, allowing by a
// workload-selector policy and "allow policies exist, but none allowed" allocate nothing;
// principals are compared part by part, never formatted.
//
// # Re-checking established flows
//
// ztunnel keeps every inbound connection registered and, when policies change, re-asserts each
// one and closes those now denied (PolicyWatcher, src/proxy/connection_manager.rs). Tracker does
// the same on every snapshot publish. Register a flow with Add before the initial Evaluate, as
// ztunnel registers before its first assert: a snapshot published between the two is then seen
// by either the caller's check or the tracker's re-check, never by neither.
package authz

import (
	"net/netip"

	"github.com/ztgo/ztgo/control/snapshot"
	"github.com/ztgo/ztgo/tls/spiffe"
)

// Conn is what authorization knows about a connection.
type Conn struct {
	// SrcIdentity is the peer's identity from its client certificate; zero for plaintext.
	SrcIdentity spiffe.ID
	SrcIP       netip.Addr
	DstIP       netip.Addr
	// DstPort is the resolved target port on the destination workload (after service port
	// mapping), the port destination_ports match against.
	DstPort uint16
}

// String formats c as ztunnel prints a connection: src(identity)->dst:port.
func (c Conn) String() string {
	id := "None"
	if !c.SrcIdentity.IsZero() {
		id = c.SrcIdentity.String()
	}
	return c.SrcIP.String() + "(" + id + ")->" + netip.AddrPortFrom(c.DstIP, c.DstPort).String()
}

// Outcome says which rule of the evaluation order decided. It is the typed deny reason the
// metrics and access logs label with.
type Outcome uint8

const (
	// AllowedNoPolicy: no enforced ALLOW policy applies and no DENY matched.
	AllowedNoPolicy Outcome = iota
	// AllowedByPolicy: an ALLOW policy matched.
	AllowedByPolicy
	// DeniedExplicitly: a DENY policy matched.
	DeniedExplicitly
	// DeniedNotAllowed: ALLOW policies apply but none matched.
	DeniedNotAllowed
	// DeniedNoWorkload: there is no destination workload to authorize against.
	DeniedNoWorkload
)

func (o Outcome) String() string {
	switch o {
	case AllowedByPolicy:
		return "allowed_by_policy"
	case DeniedExplicitly:
		return "denied_explicitly"
	case DeniedNotAllowed:
		return "denied_not_allowed"
	case DeniedNoWorkload:
		return "denied_no_workload"
	default:
		return "allowed_no_policy"
	}
}

// ResponseFlag is the value of the response_flags label for this outcome: ztunnel marks every
// authorization rejection "DENY" and a success "-".
func (o Outcome) ResponseFlag() string {
	if o >= DeniedExplicitly {
		return "DENY"
	}
	return "-"
}

// Reasons, worded as ztunnel words them (AuthorizationRejectionError's Display in src/proxy.rs
// and assert_rbac's log lines) so that logs read the same after a swap.
const (
	ReasonNoAllowPolicies  = "no allow policies, allow"
	ReasonAllowMatch       = "allow policy match"
	ReasonDeniedPrefix     = "explicitly denied by: "
	ReasonNotAllowed       = "allow policies exist, but none allowed"
	ReasonWorkloadNotFound = "workload not found"
)

// Dry-run messages, as ztunnel logs them.
const (
	DryRunDenyMatch    = "dry-run: deny policy match"
	DryRunAllowMatch   = "dry-run: allow policy match"
	DryRunNoAllowMatch = "dry-run: no allow policies match"
)

// DryRunResult is what one dry-run policy would have done.
type DryRunResult struct {
	// Policy is the "ns/name" of the dry-run policy that matched; "" for the DryRunNoAllowMatch
	// summary, which says the connection would be denied if the dry-run ALLOWs were enforced.
	Policy string
	// Action is the action the policy would have taken (Deny for the summary).
	Action snapshot.PolicyAction
	// Message is one of the DryRun* messages.
	Message string
}

// Decision is the result of Evaluate.
type Decision struct {
	Allow   bool
	Outcome Outcome
	// Policy is the "ns/name" of the deciding policy, "" when no single policy decided.
	Policy string
	// Reason is human text for logs, e.g. "explicitly denied by: ns/name".
	Reason string
	// DryRun lists what dry-run policies would have done; nil when none matched.
	DryRun []DryRunResult
}

// Evaluate decides whether c may reach dst under the policies of snap. snap must not be nil; a
// nil dst is denied, as ztunnel rejects a connection whose destination workload is unknown.
func Evaluate(snap *snapshot.Snapshot, dst *snapshot.Workload, c Conn) Decision {
	if dst == nil {
		return Decision{Outcome: DeniedNoWorkload, Reason: ReasonWorkloadNotFound}
	}
	e := newEvaluator(c)
	var d Decision

	// First pass: DENY policies. ztunnel evaluates every dry-run DENY, and the enforced ones
	// until the first match; the set of matches (hence the logs) is the same done in one pass.
	var (
		deny                    found
		haveAllow, haveDryAllow bool
	)
	it := newPolicyIter(snap, dst)
	for p, key, ok := it.next(); ok; p, key, ok = it.next() {
		if p.Action == snapshot.ActionAllow {
			haveAllow = haveAllow || !p.DryRun
			haveDryAllow = haveDryAllow || p.DryRun
			continue
		}
		if p.Action != snapshot.ActionDeny {
			continue // ztunnel rejects a policy with any other action when it receives it
		}
		switch {
		case p.DryRun:
			if e.policy(p) {
				d.DryRun = append(d.DryRun, DryRunResult{Policy: keyOf(p, key), Action: snapshot.ActionDeny, Message: DryRunDenyMatch})
			}
		case deny.p == nil && e.policy(p):
			deny = found{p, key}
		}
	}
	if deny.p != nil {
		// One allocation serves both strings: Policy is the tail of Reason.
		var reason string
		if deny.key != "" {
			reason = ReasonDeniedPrefix + deny.key
		} else {
			reason = ReasonDeniedPrefix + deny.p.Namespace + "/" + deny.p.Name
		}
		d.Outcome, d.Reason, d.Policy = DeniedExplicitly, reason, reason[len(ReasonDeniedPrefix):]
		return d
	}
	if !haveAllow && !haveDryAllow {
		d.Allow, d.Outcome, d.Reason = true, AllowedNoPolicy, ReasonNoAllowPolicies
		return d
	}

	// Second pass: ALLOW policies. Every dry-run ALLOW is evaluated; enforced ones until one
	// matches.
	var allow found
	dryAllowMatched := false
	it = newPolicyIter(snap, dst)
	for p, key, ok := it.next(); ok; p, key, ok = it.next() {
		if p.Action != snapshot.ActionAllow {
			continue
		}
		switch {
		case p.DryRun:
			if e.policy(p) {
				dryAllowMatched = true
				d.DryRun = append(d.DryRun, DryRunResult{Policy: keyOf(p, key), Action: snapshot.ActionAllow, Message: DryRunAllowMatch})
			}
		case allow.p == nil && e.policy(p):
			allow = found{p, key}
		}
	}
	// ztunnel reports this only when no enforced ALLOW exists: then the connection is allowed
	// today but would be denied if the dry-run ALLOWs were enforced.
	if !haveAllow && haveDryAllow && !dryAllowMatched {
		d.DryRun = append(d.DryRun, DryRunResult{Action: snapshot.ActionDeny, Message: DryRunNoAllowMatch})
	}
	switch {
	case !haveAllow:
		d.Allow, d.Outcome, d.Reason = true, AllowedNoPolicy, ReasonNoAllowPolicies
	case allow.p != nil:
		d.Allow, d.Outcome, d.Reason, d.Policy = true, AllowedByPolicy, ReasonAllowMatch, keyOf(allow.p, allow.key)
	default:
		d.Outcome, d.Reason = DeniedNotAllowed, ReasonNotAllowed
	}
	return d
}

// found is a policy that decided, with the key it was referenced by ("" when it came from a
// namespace or global list and has no key string at hand).
type found struct {
	p   *snapshot.Policy
	key string
}

func keyOf(p *snapshot.Policy, key string) string {
	if key != "" {
		return key
	}
	return p.Key()
}

// policyIter walks a destination's policy set in ztunnel's order (namespace, global, workload
// keys) without building a slice, so that Evaluate stays allocation-free.
type policyIter struct {
	snap  *snapshot.Snapshot
	lists [2][]*snapshot.Policy
	keys  []string
	list  int
	i     int
}

func newPolicyIter(snap *snapshot.Snapshot, dst *snapshot.Workload) policyIter {
	return policyIter{
		snap:  snap,
		lists: [2][]*snapshot.Policy{snap.NamespacePolicies(dst.Namespace), snap.NamespacePolicies("")},
		keys:  dst.AuthorizationPolicies,
	}
}

// next returns the next policy; key is set only for policies found through the workload's keys.
func (it *policyIter) next() (p *snapshot.Policy, key string, ok bool) {
	for it.list < len(it.lists) {
		if l := it.lists[it.list]; it.i < len(l) {
			it.i++
			return l[it.i-1], "", true
		}
		it.list, it.i = it.list+1, 0
	}
	for it.i < len(it.keys) {
		k := it.keys[it.i]
		it.i++
		// An unknown key is a policy istiod has not sent yet or just removed: skip it.
		if p := it.snap.PolicyByKey(k); p != nil {
			return p, k, true
		}
	}
	return nil, "", false
}

// String formats r for a log line.
func (r DryRunResult) String() string {
	if r.Policy == "" {
		return r.Message
	}
	return r.Message + " (" + r.Policy + ")"
}
