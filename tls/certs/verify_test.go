package certs

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"math/big"
	"net/url"
	"testing"
	"time"

	"github.com/ztgo/ztgo/tls/spiffe"
)

// TestClientTrustDomainUsesAuthorizedIdentity: the trust-domain check must look at the same
// identity authorization will use (the first SPIFFE URI), not at any URI of the certificate.
func TestClientTrustDomainUsesAuthorizedIdentity(t *testing.T) {
	now := time.Now()
	rootKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	rootTmpl := &x509.Certificate{SerialNumber: big.NewInt(1), NotBefore: now.Add(-time.Hour), NotAfter: now.Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign}
	rootDER, _ := x509.CreateCertificate(rand.Reader, rootTmpl, rootTmpl, &rootKey.PublicKey, rootKey)
	root, _ := x509.ParseCertificate(rootDER)
	pool := x509.NewCertPool()
	pool.AddCert(root)

	leaf := func(uris ...string) *x509.Certificate {
		k, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		tmpl := &x509.Certificate{SerialNumber: big.NewInt(2), NotBefore: now.Add(-time.Hour), NotAfter: now.Add(time.Hour),
			ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}, KeyUsage: x509.KeyUsageDigitalSignature}
		for _, u := range uris {
			pu, _ := url.Parse(u)
			tmpl.URIs = append(tmpl.URIs, pu)
		}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, root, &k.PublicKey, rootKey)
		if err != nil {
			t.Fatal(err)
		}
		c, _ := x509.ParseCertificate(der)
		return c
	}
	own := &Certificate{Identity: spiffe.ID{TrustDomain: "cluster.local", Namespace: "ns", ServiceAccount: "srv"}, Roots: pool}
	for _, tc := range []struct {
		name string
		uris []string
		ok   bool
	}{
		{"ours", []string{"spiffe://cluster.local/ns/a/sa/b"}, true},
		{"foreign", []string{"spiffe://other.local/ns/a/sa/b"}, false},
		{"foreign first, ours second", []string{"spiffe://other.local/ns/a/sa/b", "spiffe://cluster.local/ns/a/sa/b"}, false},
		{"junk first, ours second", []string{"https://example.com/x", "spiffe://cluster.local/ns/a/sa/b"}, true},
		{"no spiffe id", []string{"https://example.com/x"}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cs := tls.ConnectionState{PeerCertificates: []*x509.Certificate{leaf(tc.uris...)}}
			err := verifyClient(cs, own, now)
			if (err == nil) != tc.ok {
				t.Fatalf("verifyClient = %v, want ok=%v", err, tc.ok)
			}
			if err == nil {
				id, perr := PeerIdentity(cs)
				if perr != nil || id.TrustDomain != "cluster.local" {
					t.Fatalf("accepted a client whose authorized identity is %v (%v)", id, perr)
				}
			}
		})
	}
}
