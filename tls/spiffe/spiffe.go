// Package spiffe parses, formats and matches the SPIFFE identities of mesh workloads.
//
// A workload identity has exactly the form spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>,
// as istiod issues and ztunnel accepts. Parse rejects anything else, so a value of type ID is
// always well formed.
package spiffe

import (
	"errors"
	"fmt"
	"strings"
)

// Scheme is the URI scheme of every identity.
const Scheme = "spiffe://"

// ID is one workload identity. The zero value is "no identity".
type ID struct {
	TrustDomain    string
	Namespace      string
	ServiceAccount string
}

// New returns the identity with the given parts, checking each.
func New(trustDomain, namespace, serviceAccount string) (ID, error) {
	id := ID{TrustDomain: trustDomain, Namespace: namespace, ServiceAccount: serviceAccount}
	if err := id.validate(); err != nil {
		return ID{}, err
	}
	return id, nil
}

// IsZero reports whether id is the empty identity.
func (id ID) IsZero() bool { return id == ID{} }

// String formats id as a SPIFFE URI; the zero ID formats as "".
func (id ID) String() string {
	if id.IsZero() {
		return ""
	}
	return Scheme + id.TrustDomain + "/ns/" + id.Namespace + "/sa/" + id.ServiceAccount
}

// Principal is the identity without its scheme, the form authorization principals match against.
func (id ID) Principal() string {
	if id.IsZero() {
		return ""
	}
	return id.TrustDomain + "/ns/" + id.Namespace + "/sa/" + id.ServiceAccount
}

var (
	errScheme   = errors.New("missing spiffe:// scheme")
	errSegments = errors.New("want spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>")
)

// Parse reads a SPIFFE URI of the form spiffe://td/ns/ns/sa/sa.
func Parse(s string) (ID, error) {
	rest, ok := strings.CutPrefix(s, Scheme)
	if !ok {
		return ID{}, fmt.Errorf("parse spiffe id %q: %w", s, errScheme)
	}
	parts := strings.Split(rest, "/")
	if len(parts) != 5 || parts[1] != "ns" || parts[3] != "sa" {
		return ID{}, fmt.Errorf("parse spiffe id %q: %w", s, errSegments)
	}
	id := ID{TrustDomain: parts[0], Namespace: parts[2], ServiceAccount: parts[4]}
	if err := id.validate(); err != nil {
		return ID{}, fmt.Errorf("parse spiffe id %q: %w", s, err)
	}
	return id, nil
}

func (id ID) validate() error {
	for _, p := range []struct{ name, v string }{
		{"trust domain", id.TrustDomain}, {"namespace", id.Namespace}, {"service account", id.ServiceAccount},
	} {
		if p.v == "" {
			return fmt.Errorf("empty %s", p.name)
		}
		for i := 0; i < len(p.v); i++ {
			c := p.v[i]
			if c == '/' || c <= ' ' || c >= 0x7f || c == '?' || c == '#' || c == '%' {
				return fmt.Errorf("%s %q: invalid character %q", p.name, p.v, c)
			}
		}
	}
	return nil
}

// MatchAny reports whether any of the peer's URIs is one of the expected identities.
// Expected entries that do not parse never match.
func MatchAny(peer []string, expected []string) bool {
	for _, p := range peer {
		for _, e := range expected {
			if p == e {
				return true
			}
		}
	}
	return false
}
