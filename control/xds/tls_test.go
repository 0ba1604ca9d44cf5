package xds

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// testCA is a throwaway CA that issues the test server's certificate.
type testCA struct {
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
	pem  []byte
}

func newTestCA(t *testing.T) *testCA {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "test root"},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return &testCA{cert: cert, key: key, pem: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})}
}

// serverTLS returns a server config whose certificate names dns and ips.
func (ca *testCA) serverTLS(t *testing.T, dns []string, ips []net.IP) *tls.Config {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(2),
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(time.Hour),
		DNSNames:     dns,
		IPAddresses:  ips,
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, &key.PublicKey, ca.key)
	if err != nil {
		t.Fatal(err)
	}
	return &tls.Config{Certificates: []tls.Certificate{{Certificate: [][]byte{der}, PrivateKey: key}}}
}

func TestTLS(t *testing.T) {
	ca := newTestCA(t)
	rootFile := filepath.Join(t.TempDir(), "root-cert.pem")
	if err := os.WriteFile(rootFile, ca.pem, 0o600); err != nil {
		t.Fatal(err)
	}
	other := newTestCA(t)
	loopback := []net.IP{net.ParseIP("127.0.0.1")}
	const istiod = "istiod.istio-system.svc"

	tests := []struct {
		name   string
		server *tls.Config
		root   string
		alt    string
		tls12  bool
		ok     bool
	}{
		{name: "root file", server: ca.serverTLS(t, nil, loopback), root: rootFile, ok: true},
		{name: "literal PEM", server: ca.serverTLS(t, nil, loopback), root: string(ca.pem), ok: true},
		{name: "alternate hostname", server: ca.serverTLS(t, []string{istiod}, nil), root: rootFile, alt: istiod, ok: true},
		{name: "alternate hostname, address name still accepted", server: ca.serverTLS(t, nil, loopback), root: rootFile, alt: istiod, ok: true},
		{name: "name mismatch without alternate", server: ca.serverTLS(t, []string{istiod}, nil), root: rootFile},
		{name: "wrong alternate", server: ca.serverTLS(t, []string{istiod}, nil), root: rootFile, alt: "other.example"},
		{name: "untrusted root", server: ca.serverTLS(t, nil, loopback), root: string(other.pem)},
		{name: "untrusted root with alternate", server: ca.serverTLS(t, []string{istiod}, nil), root: string(other.pem), alt: istiod},
		{name: "system roots do not trust a test CA", server: ca.serverTLS(t, nil, loopback), root: RootSystem},
		{
			name: "TLS 1.2 server refused by default",
			server: func() *tls.Config {
				c := ca.serverTLS(t, nil, loopback)
				c.MaxVersion = tls.VersionTLS12
				return c
			}(),
			root: rootFile,
		},
		{
			name: "TLS 1.2 server allowed when enabled",
			server: func() *tls.Config {
				c := ca.serverTLS(t, nil, loopback)
				c.MaxVersion = tls.VersionTLS12
				return c
			}(),
			root: rootFile, tls12: true, ok: true,
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			srv := newXDSServer(t, tc.server)
			srv.setWorkload(wl("w1", 10, 0, 0, 1))
			c, st := startClient(t, srv, func(cfg *Config) {
				cfg.RootCA = tc.root
				cfg.AltHostname = tc.alt
				cfg.AllowTLS12 = tc.tls12
			})
			if tc.ok {
				waitReady(t, c)
				if st.Load().WorkloadByUID(uid("w1")) == nil {
					t.Fatal("not synced")
				}
				return
			}
			waitConnErrors(t, c, 2, "no connection error")
			select {
			case <-c.Ready():
				t.Fatal("ready over an unverified connection")
			default:
			}
		})
	}
}

func TestRootCAFileIsReadAtEachConnect(t *testing.T) {
	ca := newTestCA(t)
	other := newTestCA(t)
	rootFile := filepath.Join(t.TempDir(), "root-cert.pem")
	if err := os.WriteFile(rootFile, other.pem, 0o600); err != nil {
		t.Fatal(err)
	}
	srv := newXDSServer(t, ca.serverTLS(t, nil, []net.IP{net.ParseIP("127.0.0.1")}))
	c, _ := startClient(t, srv, func(cfg *Config) { cfg.RootCA = rootFile })
	waitConnErrors(t, c, 1, "no connection error with the wrong root")
	// The root rotates on disk; the next connect uses it.
	if err := os.WriteFile(rootFile, ca.pem, 0o600); err != nil {
		t.Fatal(err)
	}
	waitReady(t, c)
}
