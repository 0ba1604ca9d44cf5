// Package certs owns the workload certificates of the identities on this node and builds the
// tls.Configs that HBONE speaks with them.
//
// # Certificates
//
// A [Manager] holds one certificate per SPIFFE identity, issued on first use by a [ca.Signer]
// (istiod or the local CA) for a fresh ECDSA P-256 key, through a CSR with an empty subject and
// exactly one URI SAN, as ztunnel sends. Concurrent first requests for an identity share one
// signing. Each identity has a goroutine that renews at half-life (NotBefore + validity/2);
// when the CA fails it retries with exponential backoff (1s doubling to 150s, ±20% jitter) and
// keeps serving the old certificate until that expires, so a CA outage shorter than half a
// certificate lifetime is invisible to traffic. At most MaxInFlight signings run at once; an
// identity without a usable certificate (a connection is waiting) goes ahead of background
// renewals.
//
// A CA response is leaf, intermediates, then the root bundle; the roots of an identity's own
// certificate are the trust store for every peer it talks to, exactly as ztunnel trusts the roots
// its CA returned. The manager checks that the leaf names the requested identity and holds the
// generated key before using it.
//
// # TLS
//
// The configs reproduce ztunnel's wire behaviour: TLS 1.3 only, ALPN "h2", X25519MLKEM768
// offered alongside X25519 and P-256, no session resumption in either direction.
//
// The client ([Manager.ClientConfig]) presents the source workload's certificate and sends no
// SNI: mesh peers are named by SPIFFE URI SANs, not DNS names, so the standard verifier (which
// needs a ServerName) is switched off and the whole check is done here: the chain must verify to
// the roots with ServerAuth, and any URI SAN of the peer must equal any expected identity.
// Dial with tls.Client, not tls.Dial, which would fill ServerName from the address.
//
// The server ([Manager.ServerConfig]) presents the certificate of the DESTINATION workload,
// chosen from the local IP the connection arrived on (with in-pod listeners and transparent
// sockets that is the pod's IP), and requires a client certificate that verifies to the roots
// with ClientAuth and whose trust domain equals the server certificate's, which is ztunnel's
// trust-domain check; authorization of the exact client identity happens later, in authz.
package certs

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"encoding/pem"
	"errors"
	"fmt"
	"strings"
	"sync"
	"time"

	"github.com/ztgo/ztgo/tls/ca"
	"github.com/ztgo/ztgo/tls/spiffe"
)

// Certificate is one issued workload certificate with its private key. It never changes after
// the manager publishes it; renewal publishes a new one. Share it by pointer.
type Certificate struct {
	// Identity is the SPIFFE identity the certificate was issued for.
	Identity spiffe.ID
	// TLS holds the leaf and intermediates (DER, leaf first), the private key, and Leaf.
	TLS tls.Certificate
	// Roots and RootCerts are the root bundle (the last element of the CA response), the trust
	// store for the peers of this identity.
	Roots     *x509.CertPool
	RootCerts []*x509.Certificate
	// NotBefore and NotAfter are the leaf's validity.
	NotBefore time.Time
	NotAfter  time.Time
	// ChainPEM is the CA response as received, for config dumps.
	ChainPEM []string

	// serverConfig is the per-certificate server tls.Config, built once on first inbound use so
	// that handshakes do not allocate a config each.
	serverOnce   sync.Once
	serverConfig *tls.Config
}

// RefreshAt returns when the certificate should be renewed: half-way through its validity.
func (c *Certificate) RefreshAt() time.Time {
	return c.NotBefore.Add(c.NotAfter.Sub(c.NotBefore) / 2)
}

// usableAt reports whether c can still be presented at now.
func (c *Certificate) usableAt(now time.Time) bool {
	return c != nil && now.Before(c.NotAfter)
}

// newKeyAndCSR generates the key of a new certificate and its PEM CSR: ECDSA P-256, SHA-256,
// empty subject, exactly one URI SAN = id, the SAN marked critical because the subject is empty
// (as ztunnel's CSR does).
func newKeyAndCSR(id spiffe.ID) (*ecdsa.PrivateKey, []byte, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, fmt.Errorf("generate key: %w", err)
	}
	csr, err := createCSR(key, id)
	if err != nil {
		return nil, nil, err
	}
	return key, csr, nil
}

func createCSR(key crypto.Signer, id spiffe.ID) ([]byte, error) {
	san, err := asn1.Marshal([]asn1.RawValue{{
		Class: asn1.ClassContextSpecific,
		Tag:   6, // uniformResourceIdentifier
		Bytes: []byte(id.String()),
	}})
	if err != nil {
		return nil, fmt.Errorf("marshal SAN: %w", err)
	}
	tmpl := &x509.CertificateRequest{
		SignatureAlgorithm: x509.ECDSAWithSHA256,
		// crypto/x509 would emit a non-critical SAN for URIs; supplying the extension ourselves
		// makes it critical and keeps the request identical in shape to ztunnel's.
		ExtraExtensions: []pkix.Extension{{Id: oidSubjectAltName, Critical: true, Value: san}},
	}
	der, err := x509.CreateCertificateRequest(rand.Reader, tmpl, key)
	if err != nil {
		return nil, fmt.Errorf("create csr: %w", err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der}), nil
}

var errShortChain = errors.New("want at least a leaf and a root bundle")

// newCertificate checks a CA response for id and key and assembles the Certificate.
func newCertificate(id spiffe.ID, key crypto.Signer, chainPEM []string, now time.Time) (*Certificate, error) {
	if len(chainPEM) < 2 {
		return nil, fmt.Errorf("ca response has %d element(s): %w", len(chainPEM), errShortChain)
	}
	leafAndMore, err := ca.ParseCertificates([]byte(chainPEM[0]))
	if err != nil {
		return nil, fmt.Errorf("ca response leaf: %w", err)
	}
	leaf := leafAndMore[0]
	var middle []*x509.Certificate
	middle = append(middle, leafAndMore[1:]...)
	for i, p := range chainPEM[1 : len(chainPEM)-1] {
		cs, err := ca.ParseCertificates([]byte(p))
		if err != nil {
			return nil, fmt.Errorf("ca response element %d: %w", i+1, err)
		}
		middle = append(middle, cs...)
	}
	roots, err := ca.ParseCertificates([]byte(chainPEM[len(chainPEM)-1]))
	if err != nil {
		return nil, fmt.Errorf("ca response root bundle: %w", err)
	}

	pub, ok := key.Public().(interface{ Equal(crypto.PublicKey) bool })
	if !ok || !pub.Equal(leaf.PublicKey) {
		return nil, errors.New("ca response leaf does not hold the requested key")
	}
	// ztunnel checks that the CA issued the identity it asked for; without this a confused or
	// hostile CA could make us present one workload's traffic as another's.
	got, ok := firstIdentity(leaf)
	if !ok {
		return nil, fmt.Errorf("ca response leaf has no SPIFFE URI SAN, want %s", id)
	}
	if got != id {
		return nil, fmt.Errorf("ca response leaf is for %s, want %s", got, id)
	}
	if !now.Before(leaf.NotAfter) {
		return nil, fmt.Errorf("ca response leaf expired at %s", leaf.NotAfter.UTC().Format(time.RFC3339))
	}

	pool := x509.NewCertPool()
	for _, r := range roots {
		pool.AddCert(r)
	}
	// Roots are not sent on the wire: the peer has them already and they only cost bytes.
	var inter []*x509.Certificate
	interPool := x509.NewCertPool()
	for _, c := range middle {
		if containsCert(roots, c) {
			continue
		}
		inter = append(inter, c)
		interPool.AddCert(c)
	}
	// Check the chain now rather than have every handshake fail. A CA whose clock runs ahead
	// issues a leaf valid only from a moment later; verify at that moment rather than reject
	// it, as ztunnel would use it.
	at := now
	if at.Before(leaf.NotBefore) {
		at = leaf.NotBefore
	}
	if _, err := leaf.Verify(x509.VerifyOptions{
		Roots:         pool,
		Intermediates: interPool,
		KeyUsages:     []x509.ExtKeyUsage{x509.ExtKeyUsageAny},
		CurrentTime:   at,
	}); err != nil {
		return nil, fmt.Errorf("ca response leaf does not verify to its root bundle: %w", err)
	}

	der := make([][]byte, 0, 1+len(inter))
	der = append(der, leaf.Raw)
	for _, c := range inter {
		der = append(der, c.Raw)
	}
	return &Certificate{
		Identity:  id,
		TLS:       tls.Certificate{Certificate: der, PrivateKey: key, Leaf: leaf},
		Roots:     pool,
		RootCerts: roots,
		NotBefore: leaf.NotBefore,
		NotAfter:  leaf.NotAfter,
		ChainPEM:  append([]string(nil), chainPEM...),
	}, nil
}

var oidSubjectAltName = asn1.ObjectIdentifier{2, 5, 29, 17}

func containsCert(set []*x509.Certificate, c *x509.Certificate) bool {
	for _, s := range set {
		if s.Equal(c) {
			return true
		}
	}
	return false
}

// firstIdentity returns the first URI SAN of c that parses as a SPIFFE identity, the rule
// ztunnel uses for a peer's identity.
func firstIdentity(c *x509.Certificate) (spiffe.ID, bool) {
	for _, u := range c.URIs {
		if id, err := spiffe.Parse(u.String()); err == nil {
			return id, true
		}
	}
	return spiffe.ID{}, false
}

func uriSANs(c *x509.Certificate) string {
	s := make([]string, len(c.URIs))
	for i, u := range c.URIs {
		s[i] = u.String()
	}
	return strings.Join(s, " ")
}
