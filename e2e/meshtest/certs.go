package meshtest

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"net/url"
	"testing"
	"time"

	"github.com/ztgo/ztgo/tls/ca"
	"github.com/ztgo/ztgo/tls/spiffe"
)

// IssueCert has signer sign a fresh ECDSA P-256 key for id (a CSR with one URI SAN, valid for
// an hour) and returns the certificate with its chain, without the root bundle, ready for a
// tls.Config. The signer's trust anchors are signer.Roots().
func IssueCert(t testing.TB, signer *ca.Local, id spiffe.ID) tls.Certificate {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	u, err := url.Parse(id.String())
	if err != nil {
		t.Fatal(err)
	}
	csr, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{URIs: []*url.URL{u}}, key)
	if err != nil {
		t.Fatal(err)
	}
	chain, err := signer.Sign(context.Background(), pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: csr}), id, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	if len(chain) < 2 {
		t.Fatalf("CA returned %d PEM elements, want leaf + roots", len(chain))
	}
	var cert tls.Certificate
	for _, p := range chain[:len(chain)-1] { // the last element is the root bundle
		b, _ := pem.Decode([]byte(p))
		if b == nil {
			t.Fatalf("CA returned a non-PEM element %q", p)
		}
		cert.Certificate = append(cert.Certificate, b.Bytes)
	}
	cert.PrivateKey = key
	return cert
}

// VerifyPeer checks the peer chain of cs against roots for usage and that its leaf carries
// wantURI among its URI SANs. Mesh certificates have no DNS names, so Go's hostname check
// cannot be used: configs set InsecureSkipVerify and call this from VerifyConnection.
func VerifyPeer(cs tls.ConnectionState, roots *x509.CertPool, usage x509.ExtKeyUsage, wantURI string) error {
	if len(cs.PeerCertificates) == 0 {
		return errors.New("peer presented no certificate")
	}
	leaf := cs.PeerCertificates[0]
	inter := x509.NewCertPool()
	for _, c := range cs.PeerCertificates[1:] {
		inter.AddCert(c)
	}
	if _, err := leaf.Verify(x509.VerifyOptions{Roots: roots, Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{usage}}); err != nil {
		return fmt.Errorf("peer chain: %w", err)
	}
	var got []string
	for _, u := range leaf.URIs {
		if u.String() == wantURI {
			return nil
		}
		got = append(got, u.String())
	}
	return fmt.Errorf("peer identity is %v, want %s", got, wantURI)
}

// ClientTLS is an HBONE client's mTLS config (TLS 1.3, ALPN h2, as ztgo and ztunnel speak it):
// it presents cert and accepts only a server chaining to roots whose URI SAN is wantServer.
func ClientTLS(cert tls.Certificate, roots *x509.CertPool, wantServer string) *tls.Config {
	return &tls.Config{
		Certificates:       []tls.Certificate{cert},
		NextProtos:         []string{"h2"},
		MinVersion:         tls.VersionTLS13,
		InsecureSkipVerify: true, // the chain and URI SAN are checked in VerifyConnection
		VerifyConnection: func(cs tls.ConnectionState) error {
			return VerifyPeer(cs, roots, x509.ExtKeyUsageServerAuth, wantServer)
		},
	}
}
