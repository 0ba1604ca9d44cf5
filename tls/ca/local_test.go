package ca

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"encoding/pem"
	"math/big"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/ztgo/ztgo/tls/spiffe"
)

var testID = spiffe.ID{TrustDomain: "cluster.local", Namespace: "default", ServiceAccount: "app"}

func fixedClock(t time.Time) func() time.Time { return func() time.Time { return t } }

func newCSR(t testing.TB, key crypto.Signer, uris ...string) []byte {
	t.Helper()
	tmpl := &x509.CertificateRequest{}
	for _, u := range uris {
		p, err := url.Parse(u)
		if err != nil {
			t.Fatal(err)
		}
		tmpl.URIs = append(tmpl.URIs, p)
	}
	der, err := x509.CreateCertificateRequest(rand.Reader, tmpl, key)
	if err != nil {
		t.Fatal(err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der})
}

func ecKey(t testing.TB) *ecdsa.PrivateKey {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

func TestLoadOrCreateRoundTrip(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "cacerts")
	first, err := LoadOrCreate(dir, WithTrustDomain("cluster.local"))
	if err != nil {
		t.Fatal(err)
	}
	st, err := os.Stat(dir)
	if err != nil {
		t.Fatal(err)
	}
	if st.Mode().Perm() != 0o700 {
		t.Errorf("dir mode = %v, want 0700", st.Mode().Perm())
	}
	for _, f := range []struct {
		name string
		perm os.FileMode
	}{{CAKeyFile, 0o600}, {CACertFile, 0o644}, {RootCertFile, 0o644}, {CertChainFile, 0o644}} {
		st, err := os.Stat(filepath.Join(dir, f.name))
		if err != nil {
			t.Fatalf("%s: %v", f.name, err)
		}
		if st.Mode().Perm() != f.perm {
			t.Errorf("%s mode = %v, want %v", f.name, st.Mode().Perm(), f.perm)
		}
	}
	root := first.Certificate()
	if !root.IsCA || root.KeyUsage != x509.KeyUsageCertSign|x509.KeyUsageCRLSign {
		t.Errorf("root: IsCA=%v KeyUsage=%v", root.IsCA, root.KeyUsage)
	}
	if got := root.NotAfter.Sub(root.NotBefore); got < 10*365*24*time.Hour {
		t.Errorf("root validity %v, want >= 10 years", got)
	}
	if _, ok := root.PublicKey.(*ecdsa.PublicKey); !ok || root.PublicKey.(*ecdsa.PublicKey).Curve != elliptic.P256() {
		t.Errorf("root key is %T, want ECDSA P-256", root.PublicKey)
	}
	if got := root.Subject.Organization; len(got) != 1 || got[0] != "cluster.local" {
		t.Errorf("root organisation %v", got)
	}

	second, err := LoadOrCreate(dir)
	if err != nil {
		t.Fatalf("reload: %v", err)
	}
	if !second.Certificate().Equal(root) {
		t.Fatal("reload produced a different root")
	}
	chain, err := second.Sign(context.Background(), newCSR(t, ecKey(t), testID.String()), testID, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	if len(chain) != 2 {
		t.Fatalf("chain has %d elements, want leaf + root", len(chain))
	}
	leaf := mustParse(t, chain[0])[0]
	if _, err := leaf.Verify(x509.VerifyOptions{Roots: first.Roots(), KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}); err != nil {
		t.Fatalf("leaf from reloaded CA does not verify against the first root: %v", err)
	}
}

func TestLoadOrCreatePartialDir(t *testing.T) {
	tests := []struct {
		remove []string
		want   []string
	}{
		{remove: []string{CertChainFile}, want: []string{CertChainFile}},
		{remove: []string{CAKeyFile, RootCertFile}, want: []string{CAKeyFile, RootCertFile}},
		{remove: []string{CACertFile, CAKeyFile, RootCertFile}, want: []string{CACertFile, CAKeyFile, RootCertFile}},
	}
	for _, tt := range tests {
		t.Run(strings.Join(tt.remove, "+"), func(t *testing.T) {
			dir := t.TempDir()
			if _, err := LoadOrCreate(dir); err != nil {
				t.Fatal(err)
			}
			for _, f := range tt.remove {
				if err := os.Remove(filepath.Join(dir, f)); err != nil {
					t.Fatal(err)
				}
			}
			_, err := LoadOrCreate(dir)
			if err == nil {
				t.Fatal("want error for incomplete directory")
			}
			for _, w := range tt.want {
				if !strings.Contains(err.Error(), "missing") || !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not name missing %s", err, w)
				}
			}
			// The directory must be left alone, not silently re-created.
			if _, err := os.Stat(filepath.Join(dir, tt.remove[0])); err == nil {
				t.Error("LoadOrCreate wrote into an incomplete directory")
			}
		})
	}
}

func writePEM(t *testing.T, path, typ string, ders ...[]byte) {
	t.Helper()
	var b bytes.Buffer
	for _, d := range ders {
		pem.Encode(&b, &pem.Block{Type: typ, Bytes: d})
	}
	if err := os.WriteFile(path, b.Bytes(), 0o600); err != nil {
		t.Fatal(err)
	}
}

func mustParse(t testing.TB, s string) []*x509.Certificate {
	t.Helper()
	c, err := ParseCertificates([]byte(s))
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func TestLoadKeyFormatsAndMismatch(t *testing.T) {
	dir := t.TempDir()
	if _, err := LoadOrCreate(dir); err != nil {
		t.Fatal(err)
	}
	keyPEM, err := os.ReadFile(filepath.Join(dir, CAKeyFile))
	if err != nil {
		t.Fatal(err)
	}
	key, err := parsePrivateKey(keyPEM)
	if err != nil {
		t.Fatal(err)
	}
	sec1, err := x509.MarshalECPrivateKey(key.(*ecdsa.PrivateKey))
	if err != nil {
		t.Fatal(err)
	}
	// openssl ecparam writes an EC PARAMETERS block before the key.
	params, _ := asn1.Marshal(asn1.ObjectIdentifier{1, 2, 840, 10045, 3, 1, 7})
	var b bytes.Buffer
	pem.Encode(&b, &pem.Block{Type: "EC PARAMETERS", Bytes: params})
	pem.Encode(&b, &pem.Block{Type: "EC PRIVATE KEY", Bytes: sec1})
	if err := os.WriteFile(filepath.Join(dir, CAKeyFile), b.Bytes(), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := LoadOrCreate(dir); err != nil {
		t.Fatalf("SEC 1 key: %v", err)
	}

	other, _ := x509.MarshalPKCS8PrivateKey(ecKey(t))
	writePEM(t, filepath.Join(dir, CAKeyFile), "PRIVATE KEY", other)
	_, err = LoadOrCreate(dir)
	if err == nil || !strings.Contains(err.Error(), "does not match") {
		t.Fatalf("mismatched key: err = %v", err)
	}
}

// TestLoadPluggedIntermediate builds the layout an operator plugs into istiod: an RSA root
// (PKCS#1 key elsewhere), an ECDSA intermediate as signing CA, cert-chain = intermediate + root.
func TestLoadPluggedIntermediate(t *testing.T) {
	now := time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)
	rootKey, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	rootTmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "root"},
		NotBefore: now.Add(-time.Hour), NotAfter: now.Add(24 * 365 * time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign,
	}
	rootDER, err := x509.CreateCertificate(rand.Reader, rootTmpl, rootTmpl, &rootKey.PublicKey, rootKey)
	if err != nil {
		t.Fatal(err)
	}
	root, _ := x509.ParseCertificate(rootDER)
	interKey := ecKey(t)
	interTmpl := &x509.Certificate{
		SerialNumber: big.NewInt(2), Subject: pkix.Name{CommonName: "intermediate"},
		NotBefore: now.Add(-time.Hour), NotAfter: now.Add(48 * time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign,
	}
	interDER, err := x509.CreateCertificate(rand.Reader, interTmpl, root, &interKey.PublicKey, rootKey)
	if err != nil {
		t.Fatal(err)
	}

	dir := t.TempDir()
	sec1, _ := x509.MarshalECPrivateKey(interKey)
	writePEM(t, filepath.Join(dir, CACertFile), "CERTIFICATE", interDER)
	writePEM(t, filepath.Join(dir, CAKeyFile), "EC PRIVATE KEY", sec1)
	writePEM(t, filepath.Join(dir, RootCertFile), "CERTIFICATE", rootDER)
	writePEM(t, filepath.Join(dir, CertChainFile), "CERTIFICATE", interDER, rootDER)

	l, err := LoadOrCreate(dir, WithClock(fixedClock(now)))
	if err != nil {
		t.Fatal(err)
	}
	chain, err := l.Sign(context.Background(), newCSR(t, ecKey(t), testID.String()), testID, 72*time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	if len(chain) != 3 {
		t.Fatalf("chain has %d elements, want leaf, intermediate, root", len(chain))
	}
	leaf := mustParse(t, chain[0])[0]
	inter := mustParse(t, chain[1])
	if len(inter) != 1 || !bytes.Equal(inter[0].Raw, interDER) {
		t.Fatal("middle element is not the intermediate")
	}
	if roots := mustParse(t, chain[2]); len(roots) != 1 || !roots[0].Equal(root) {
		t.Fatal("last element is not the root bundle")
	}
	// Capped to the intermediate's NotAfter, not the 72h asked for.
	if !leaf.NotAfter.Equal(now.Add(48 * time.Hour)) {
		t.Errorf("leaf NotAfter %v, want capped to CA NotAfter %v", leaf.NotAfter, now.Add(48*time.Hour))
	}
	ip := x509.NewCertPool()
	ip.AddCert(inter[0])
	if _, err := leaf.Verify(x509.VerifyOptions{Roots: l.Roots(), Intermediates: ip, CurrentTime: now,
		KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}); err != nil {
		t.Fatal(err)
	}

	// A PKCS#1 RSA key is accepted too: plug the root itself in as a self-signed CA.
	dir2 := t.TempDir()
	writePEM(t, filepath.Join(dir2, CACertFile), "CERTIFICATE", rootDER)
	writePEM(t, filepath.Join(dir2, CAKeyFile), "RSA PRIVATE KEY", x509.MarshalPKCS1PrivateKey(rootKey))
	writePEM(t, filepath.Join(dir2, RootCertFile), "CERTIFICATE", rootDER)
	writePEM(t, filepath.Join(dir2, CertChainFile), "CERTIFICATE", rootDER)
	rl, err := LoadOrCreate(dir2, WithClock(fixedClock(now)))
	if err != nil {
		t.Fatalf("RSA PKCS#1 CA: %v", err)
	}
	chain, err = rl.Sign(context.Background(), newCSR(t, ecKey(t), testID.String()), testID, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	if got := mustParse(t, chain[0])[0].SignatureAlgorithm; got != x509.SHA256WithRSA {
		t.Errorf("RSA CA signature algorithm %v", got)
	}

	// A chain whose root is not in root-cert.pem is refused at load.
	otherRoot, err := NewEphemeral("cluster.local")
	if err != nil {
		t.Fatal(err)
	}
	writePEM(t, filepath.Join(dir, RootCertFile), "CERTIFICATE", otherRoot.Certificate().Raw)
	if _, err := LoadOrCreate(dir, WithClock(fixedClock(now))); err == nil || !strings.Contains(err.Error(), "does not verify") {
		t.Fatalf("foreign root: err = %v", err)
	}
}

func TestSignRejects(t *testing.T) {
	l, err := NewEphemeral("cluster.local")
	if err != nil {
		t.Fatal(err)
	}
	key := ecKey(t)
	good := newCSR(t, key, testID.String())
	badSig := func() []byte {
		block, _ := pem.Decode(good)
		der := bytes.Clone(block.Bytes)
		der[len(der)-1] ^= 0xff // last byte of the signature
		return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der})
	}()
	otherKey := func() []byte {
		// A valid CSR signed by a key type the CA does not issue for.
		_, edKey, _ := ed25519.GenerateKey(rand.Reader)
		return newCSR(t, edKey, testID.String())
	}()
	otherTD := spiffe.ID{TrustDomain: "other.local", Namespace: "default", ServiceAccount: "app"}

	tests := []struct {
		name string
		csr  []byte
		id   spiffe.ID
		ttl  time.Duration
		want string
	}{
		{"missing SAN", newCSR(t, key), testID, time.Hour, "no URI SAN"},
		{"wrong SAN", newCSR(t, key, "spiffe://cluster.local/ns/default/sa/other"), testID, time.Hour, "does not match"},
		{"multiple SANs", newCSR(t, key, testID.String(), "spiffe://cluster.local/ns/x/sa/y"), testID, time.Hour, "2 URI SANs"},
		{"bad signature", badSig, testID, time.Hour, "csr signature"},
		{"not PEM", []byte("hello"), testID, time.Hour, "no PEM CERTIFICATE REQUEST"},
		{"ed25519 key", otherKey, testID, time.Hour, "unsupported public key"},
		{"other trust domain", newCSR(t, key, otherTD.String()), otherTD, time.Hour, "signs only for"},
		{"zero ttl", good, testID, 0, "must be positive"},
		{"zero id", good, spiffe.ID{}, time.Hour, "empty identity"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := l.Sign(context.Background(), tt.csr, tt.id, tt.ttl)
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("err = %v, want containing %q", err, tt.want)
			}
			if !strings.HasPrefix(err.Error(), "sign ") {
				t.Errorf("err %q not prefixed with the operation", err)
			}
		})
	}

	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := l.Sign(ctx, good, testID, time.Hour); err == nil {
		t.Fatal("sign with cancelled context succeeded")
	}
}

var oidSAN = asn1.ObjectIdentifier{2, 5, 29, 17}

func TestIssuedLeaf(t *testing.T) {
	now := time.Date(2026, 5, 4, 10, 0, 0, 0, time.UTC)
	clock := now
	l, err := NewEphemeral("cluster.local", WithClock(func() time.Time { return clock }))
	if err != nil {
		t.Fatal(err)
	}
	key := ecKey(t)
	chain, err := l.Sign(context.Background(), newCSR(t, key, testID.String()), testID, 24*time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	if len(chain) != 2 || chain[1] != l.RootsPEM() {
		t.Fatalf("chain shape: %d elements", len(chain))
	}
	leaf := mustParse(t, chain[0])[0]
	checks := []struct {
		name string
		ok   bool
	}{
		{"one URI SAN = id", len(leaf.URIs) == 1 && leaf.URIs[0].String() == testID.String()},
		{"no DNS/IP/email SANs", len(leaf.DNSNames) == 0 && len(leaf.IPAddresses) == 0 && len(leaf.EmailAddresses) == 0},
		{"empty subject", len(leaf.Subject.Names) == 0},
		{"EKU server+client", len(leaf.ExtKeyUsage) == 2 && leaf.ExtKeyUsage[0] == x509.ExtKeyUsageServerAuth && leaf.ExtKeyUsage[1] == x509.ExtKeyUsageClientAuth},
		{"key usage", leaf.KeyUsage == x509.KeyUsageDigitalSignature|x509.KeyUsageKeyEncipherment},
		{"not a CA", leaf.BasicConstraintsValid && !leaf.IsCA},
		{"NotBefore now-1m", leaf.NotBefore.Equal(now.Add(-time.Minute))},
		{"NotAfter now+ttl", leaf.NotAfter.Equal(now.Add(24 * time.Hour))},
		{"ECDSA SHA-256", leaf.SignatureAlgorithm == x509.ECDSAWithSHA256},
		{"serial <= 128 bits, positive", leaf.SerialNumber.Sign() > 0 && leaf.SerialNumber.BitLen() <= 128},
		{"CSR key", key.PublicKey.Equal(leaf.PublicKey)},
	}
	for _, c := range checks {
		if !c.ok {
			t.Errorf("%s: failed", c.name)
		}
	}
	var san *pkix.Extension
	for i := range leaf.Extensions {
		if leaf.Extensions[i].Id.Equal(oidSAN) {
			san = &leaf.Extensions[i]
		}
	}
	if san == nil || !san.Critical {
		t.Error("SAN extension missing or not critical")
	}
	if _, err := leaf.Verify(x509.VerifyOptions{Roots: l.Roots(), CurrentTime: now,
		KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}); err != nil {
		t.Fatal(err)
	}

	// Near the CA's end of life the leaf is capped, and after it signing fails.
	caEnd := l.Certificate().NotAfter
	clock = caEnd.Add(-time.Hour)
	chain, err = l.Sign(context.Background(), newCSR(t, key, testID.String()), testID, 24*time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	if got := mustParse(t, chain[0])[0].NotAfter; !got.Equal(caEnd) {
		t.Errorf("NotAfter %v, want capped to %v", got, caEnd)
	}
	clock = caEnd.Add(time.Second)
	if _, err := l.Sign(context.Background(), newCSR(t, key, testID.String()), testID, time.Hour); err == nil || !strings.Contains(err.Error(), "expired") {
		t.Fatalf("sign after CA expiry: err = %v", err)
	}
}

func BenchmarkSign(b *testing.B) {
	l, err := NewEphemeral("cluster.local")
	if err != nil {
		b.Fatal(err)
	}
	csr := newCSR(b, ecKey(b), testID.String())
	b.ReportAllocs()
	for b.Loop() {
		if _, err := l.Sign(context.Background(), csr, testID, time.Hour); err != nil {
			b.Fatal(err)
		}
	}
}

// TestLoadOrCreateConcurrent: nodes starting together on one directory end up with one root.
func TestLoadOrCreateConcurrent(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "ca")
	const n = 8
	roots := make(chan string, n)
	var wg sync.WaitGroup
	for i := 0; i < n; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			l, err := LoadOrCreate(dir)
			if err != nil {
				t.Error(err)
				return
			}
			roots <- l.RootsPEM()
		}()
	}
	wg.Wait()
	close(roots)
	first := ""
	for r := range roots {
		if first == "" {
			first = r
		} else if r != first {
			t.Fatal("concurrent LoadOrCreate produced different roots")
		}
	}
}
