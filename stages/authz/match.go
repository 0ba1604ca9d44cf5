package authz

import (
	"net/netip"

	"github.com/ztgo/ztgo/control/snapshot"
	"github.com/ztgo/ztgo/tls/spiffe"
)

// evaluator holds one connection prepared for matching against many policies.
type evaluator struct {
	id    spiffe.ID
	hasID bool
	// principal is the identity's principal as its parts, and plen its length; computed once
	// per connection instead of once per principal entry.
	principal principalParts
	plen      int
	src       netip.Addr
	dst       netip.Addr
	port      uint16
}

func newEvaluator(c Conn) evaluator {
	// ztunnel canonicalizes socket addresses (IPv4-mapped IPv6 -> IPv4) before it builds the
	// connection it authorizes; an IPv4 CIDR would otherwise never contain a dual-stack
	// listener's peer address.
	e := evaluator{
		id:    c.SrcIdentity,
		hasID: !c.SrcIdentity.IsZero(),
		src:   c.SrcIP.Unmap(),
		dst:   c.DstIP.Unmap(),
		port:  c.DstPort,
	}
	if e.hasID {
		e.principal = newPrincipalParts(&c.SrcIdentity)
		e.plen = e.principal.len()
	}
	return e
}

// policy reports whether any rule of p matches. A policy without rules never matches.
func (e *evaluator) policy(p *snapshot.Policy) bool {
	for _, r := range p.Rules {
		if e.rule(r) {
			return true
		}
	}
	return false
}

// rule reports whether every clause matches; a rule with no clauses matches.
func (e *evaluator) rule(r snapshot.Rule) bool {
	for _, cl := range r {
		if !e.clause(cl) {
			return false
		}
	}
	return true
}

// clause reports whether any match holds. A clause with no matches holds (ztunnel treats it as
// "no condition"), but a match with no condition inside a non-empty clause is skipped.
func (e *evaluator) clause(cl snapshot.Clause) bool {
	if len(cl) == 0 {
		return true
	}
	for i := range cl {
		m := &cl[i]
		if m.IsEmpty() {
			continue
		}
		if e.match(m) {
			return true
		}
	}
	return false
}

// match reports whether every field of m holds. Cheap address and port checks go first.
func (e *evaluator) match(m *snapshot.Match) bool {
	return prefixes(m.DestinationIPs, m.NotDestinationIPs, e.dst) &&
		prefixes(m.SourceIPs, m.NotSourceIPs, e.src) &&
		ports(m.DestinationPorts, m.NotDestinationPorts, e.port) &&
		e.serviceAccounts(m.ServiceAccounts, m.NotServiceAccounts) &&
		e.principals(m.Principals, m.NotPrincipals) &&
		e.namespaces(m.Namespaces, m.NotNamespaces)
}

// Each field helper below holds when the positive list is empty or has a hit, and the negative
// list has no hit. They are written out per type so each loop is a direct comparison, with no
// function value on the per-connection path.

func prefixes(pos, neg []netip.Prefix, ip netip.Addr) bool {
	hit := len(pos) == 0
	for _, p := range pos {
		if p.Contains(ip) {
			hit = true
			break
		}
	}
	if !hit {
		return false
	}
	for _, p := range neg {
		if p.Contains(ip) {
			return false
		}
	}
	return true
}

func ports(pos, neg []uint16, port uint16) bool {
	hit := len(pos) == 0
	for _, p := range pos {
		if p == port {
			hit = true
			break
		}
	}
	if !hit {
		return false
	}
	for _, p := range neg {
		if p == port {
			return false
		}
	}
	return true
}

// serviceAccounts compares namespace and service account exactly; the trust domain is not part
// of the comparison. Without an identity no entry matches, so only a negative list can hold.
func (e *evaluator) serviceAccounts(pos, neg []snapshot.ServiceAccountMatch) bool {
	hit := len(pos) == 0
	for _, sa := range pos {
		if e.serviceAccount(sa) {
			hit = true
			break
		}
	}
	if !hit {
		return false
	}
	for _, sa := range neg {
		if e.serviceAccount(sa) {
			return false
		}
	}
	return true
}

func (e *evaluator) serviceAccount(sa snapshot.ServiceAccountMatch) bool {
	return e.hasID && sa.Namespace == e.id.Namespace && sa.ServiceAccount == e.id.ServiceAccount
}

// principals compares against the identity without its spiffe:// scheme. Without an identity no
// entry matches (ztunnel fails the scheme strip), so only a negative list can hold.
func (e *evaluator) principals(pos, neg []snapshot.StringMatch) bool {
	hit := len(pos) == 0
	for _, m := range pos {
		if e.principalMatch(m) {
			hit = true
			break
		}
	}
	if !hit {
		return false
	}
	for _, m := range neg {
		if e.principalMatch(m) {
			return false
		}
	}
	return true
}

func (e *evaluator) principalMatch(m snapshot.StringMatch) bool {
	return e.hasID && e.principal.matches(m, e.plen)
}

// namespaces compares against the identity's namespace, which is "" without an identity. ztunnel
// runs the string match on that empty string too, so an exact "" or an empty prefix or suffix
// matches a plaintext connection; presence does not.
func (e *evaluator) namespaces(pos, neg []snapshot.StringMatch) bool {
	hit := len(pos) == 0
	for _, m := range pos {
		if m.Matches(e.id.Namespace) {
			hit = true
			break
		}
	}
	if !hit {
		return false
	}
	for _, m := range neg {
		if m.Matches(e.id.Namespace) {
			return false
		}
	}
	return true
}

// principalParts is an identity's principal "td/ns/<ns>/sa/<sa>" kept as its parts, so that
// matching never formats the string: m.Matches(id.Principal()) without the allocation.
type principalParts [5]string

func newPrincipalParts(id *spiffe.ID) principalParts {
	return principalParts{id.TrustDomain, "/ns/", id.Namespace, "/sa/", id.ServiceAccount}
}

func (pp *principalParts) len() int {
	n := 0
	for _, p := range pp {
		n += len(p)
	}
	return n
}

// matches reports whether m matches the principal; n is pp.len().
func (pp *principalParts) matches(m snapshot.StringMatch, n int) bool {
	switch m.Kind {
	case snapshot.MatchPrefix:
		return len(m.Value) <= n && pp.hasPrefix(m.Value)
	case snapshot.MatchSuffix:
		return len(m.Value) <= n && pp.hasSuffix(m.Value)
	case snapshot.MatchPresence:
		return n > 0
	default:
		return len(m.Value) == n && pp.hasPrefix(m.Value)
	}
}

func (pp *principalParts) hasPrefix(s string) bool {
	for _, p := range pp {
		if len(s) <= len(p) {
			return p[:len(s)] == s
		}
		if s[:len(p)] != p {
			return false
		}
		s = s[len(p):]
	}
	return s == ""
}

func (pp *principalParts) hasSuffix(s string) bool {
	for i := len(pp) - 1; i >= 0; i-- {
		p := pp[i]
		if len(s) <= len(p) {
			return p[len(p)-len(s):] == s
		}
		if s[len(s)-len(p):] != p {
			return false
		}
		s = s[:len(s)-len(p)]
	}
	return s == ""
}
