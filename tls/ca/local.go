package ca

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"math/big"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/ztgo/ztgo/tls/spiffe"
)

// File names of Istio's plug-in CA layout (the "cacerts" secret istiod mounts).
const (
	CACertFile    = "ca-cert.pem"
	CAKeyFile     = "ca-key.pem"
	RootCertFile  = "root-cert.pem"
	CertChainFile = "cert-chain.pem"
)

const (
	// rootValidity is the lifetime of a root that LoadOrCreate generates; istiod's self-signed
	// root also defaults to ten years.
	rootValidity = 10 * 365 * 24 * time.Hour
	// clockSkew backdates NotBefore so peers whose clocks lag a little still accept a
	// certificate issued a moment ago.
	clockSkew = time.Minute
	// defaultOrg names the organisation of a generated root when no trust domain is given,
	// matching istiod's default trust domain.
	defaultOrg = "cluster.local"
	// minRSABits refuses CSR and CA keys that no current verifier should trust.
	minRSABits = 2048
)

// Option adjusts a Local CA.
type Option func(*options)

type options struct {
	now         func() time.Time
	trustDomain string
}

// WithClock makes the CA read the time from now; tests use it to issue certificates at a
// chosen instant.
func WithClock(now func() time.Time) Option {
	return func(o *options) {
		if now != nil {
			o.now = now
		}
	}
}

// WithTrustDomain restricts signing to identities of trust domain td, as istiod only signs for
// its own trust domain, and names td as the organisation of a root that LoadOrCreate generates.
// Without it LoadOrCreate signs for any trust domain.
func WithTrustDomain(td string) Option {
	return func(o *options) { o.trustDomain = td }
}

// Local is the built-in CA: it signs workload CSRs with a key held in memory. It is safe for
// concurrent use; its state never changes after construction.
type Local struct {
	now         func() time.Time
	trustDomain string // "" signs for every trust domain

	cert *x509.Certificate
	key  crypto.Signer

	// intermediatesPEM holds ca-cert and its issuers below the root, one PEM certificate per
	// element, ready to be placed between the leaf and the root bundle of a response.
	intermediatesPEM []string
	rootsPEM         string
	roots            []*x509.Certificate
	pool             *x509.CertPool
}

var _ Signer = (*Local)(nil)

// NewEphemeral returns a CA with a fresh self-signed ECDSA P-256 root that lives only in memory.
// It signs only identities of trustDomain. Tests and throw-away meshes use it.
func NewEphemeral(trustDomain string, opts ...Option) (*Local, error) {
	if trustDomain == "" {
		return nil, errors.New("new ephemeral ca: empty trust domain")
	}
	o := buildOptions(append(opts, WithTrustDomain(trustDomain)))
	cert, key, err := newRoot(o)
	if err != nil {
		return nil, fmt.Errorf("new ephemeral ca: %w", err)
	}
	l, err := newLocal(cert, key, []*x509.Certificate{cert}, []*x509.Certificate{cert}, o)
	if err != nil {
		return nil, fmt.Errorf("new ephemeral ca: %w", err)
	}
	return l, nil
}

// LoadOrCreate loads the plug-in CA files from dir. When none of them exists it generates a
// self-signed ECDSA P-256 root valid for ten years and writes all four files (the key 0600, a
// newly made dir 0700), so the next start, or istiod given the same files, uses the same root.
// When only some exist it refuses rather than guess: a half-written directory usually means a
// broken secret mount, and replacing it would silently split the mesh into two trust roots.
func LoadOrCreate(dir string, opts ...Option) (*Local, error) {
	o := buildOptions(opts)
	// Nodes sharing a directory may start together: only one may create the root, and the
	// others must load what it wrote, so the check and the creation run under a file lock.
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("create ca directory %s: %w", dir, err)
	}
	unlock, err := lockDir(dir)
	if err != nil {
		return nil, fmt.Errorf("lock ca directory %s: %w", dir, err)
	}
	defer unlock()
	names := []string{CACertFile, CAKeyFile, RootCertFile, CertChainFile}
	var have, missing []string
	for _, n := range names {
		_, err := os.Stat(filepath.Join(dir, n))
		switch {
		case err == nil:
			have = append(have, n)
		case errors.Is(err, fs.ErrNotExist):
			missing = append(missing, n)
		default:
			return nil, fmt.Errorf("load ca from %s: %w", dir, err)
		}
	}
	switch {
	case len(have) == 0:
		l, err := create(dir, o)
		if err != nil {
			return nil, fmt.Errorf("create ca in %s: %w", dir, err)
		}
		return l, nil
	case len(missing) > 0:
		return nil, fmt.Errorf("load ca from %s: incomplete plug-in CA directory: missing %s (found %s); provide all of %s or none to generate a new root",
			dir, strings.Join(missing, ", "), strings.Join(have, ", "), strings.Join(names, ", "))
	}
	l, err := load(dir, o)
	if err != nil {
		return nil, fmt.Errorf("load ca from %s: %w", dir, err)
	}
	return l, nil
}

func buildOptions(opts []Option) options {
	o := options{now: time.Now}
	for _, opt := range opts {
		opt(&o)
	}
	return o
}

func newRoot(o options) (*x509.Certificate, crypto.Signer, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, fmt.Errorf("generate root key: %w", err)
	}
	serial, err := randomSerial()
	if err != nil {
		return nil, nil, err
	}
	org := o.trustDomain
	if org == "" {
		org = defaultOrg
	}
	now := o.now()
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{Organization: []string{org}},
		NotBefore:             now.Add(-clockSkew),
		NotAfter:              now.Add(rootValidity),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		SignatureAlgorithm:    x509.ECDSAWithSHA256,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return nil, nil, fmt.Errorf("create root certificate: %w", err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, nil, fmt.Errorf("parse root certificate: %w", err)
	}
	return cert, key, nil
}

func create(dir string, o options) (*Local, error) {
	cert, key, err := newRoot(o)
	if err != nil {
		return nil, err
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return nil, fmt.Errorf("marshal root key: %w", err)
	}
	l, err := newLocal(cert, key, []*x509.Certificate{cert}, []*x509.Certificate{cert}, o)
	if err != nil {
		return nil, err
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	certPEM := encodeCert(cert.Raw)
	files := []struct {
		name string
		data []byte
		perm fs.FileMode
	}{
		// The key goes first and the root last: a crash in between leaves an incomplete
		// directory, which the next start reports instead of silently using.
		{CAKeyFile, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER}), 0o600},
		{CACertFile, []byte(certPEM), 0o644},
		{CertChainFile, []byte(certPEM), 0o644},
		{RootCertFile, []byte(certPEM), 0o644},
	}
	for _, f := range files {
		if err := writeFileAtomic(filepath.Join(dir, f.name), f.data, f.perm); err != nil {
			return nil, err
		}
	}
	return l, nil
}

// writeFileAtomic writes through a temporary file and a rename so a reader never sees a
// truncated PEM file.
func writeFileAtomic(path string, data []byte, perm fs.FileMode) error {
	tmp, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".tmp*")
	if err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	defer os.Remove(tmp.Name()) // no-op after a successful rename
	if err := tmp.Chmod(perm); err != nil {
		tmp.Close()
		return fmt.Errorf("write %s: %w", path, err)
	}
	if _, err := tmp.Write(data); err != nil {
		tmp.Close()
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	return nil
}

func load(dir string, o options) (*Local, error) {
	read := func(name string) ([]byte, error) {
		b, err := os.ReadFile(filepath.Join(dir, name))
		if err != nil {
			return nil, err
		}
		return b, nil
	}
	certPEM, err := read(CACertFile)
	if err != nil {
		return nil, err
	}
	keyPEM, err := read(CAKeyFile)
	if err != nil {
		return nil, err
	}
	rootPEM, err := read(RootCertFile)
	if err != nil {
		return nil, err
	}
	chainPEM, err := read(CertChainFile)
	if err != nil {
		return nil, err
	}

	certs, err := ParseCertificates(certPEM)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", CACertFile, err)
	}
	if len(certs) != 1 {
		return nil, fmt.Errorf("%s: want exactly one certificate, found %d", CACertFile, len(certs))
	}
	key, err := parsePrivateKey(keyPEM)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", CAKeyFile, err)
	}
	roots, err := ParseCertificates(rootPEM)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", RootCertFile, err)
	}
	chain, err := ParseCertificates(chainPEM)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", CertChainFile, err)
	}
	if !chain[0].Equal(certs[0]) {
		return nil, fmt.Errorf("%s: first certificate (subject %q) is not %s (subject %q); the chain must start at the signing certificate",
			CertChainFile, chain[0].Subject, CACertFile, certs[0].Subject)
	}
	return newLocal(certs[0], key, chain, roots, o)
}

// newLocal checks that cert, key, chain and roots form a usable CA and assembles it.
func newLocal(cert *x509.Certificate, key crypto.Signer, chain, roots []*x509.Certificate, o options) (*Local, error) {
	pub, ok := key.Public().(interface{ Equal(crypto.PublicKey) bool })
	if !ok || !pub.Equal(cert.PublicKey) {
		return nil, fmt.Errorf("%s does not match the public key of %s (subject %q)", CAKeyFile, CACertFile, cert.Subject)
	}
	if !cert.BasicConstraintsValid || !cert.IsCA {
		return nil, fmt.Errorf("%s (subject %q) is not a CA certificate (basic constraints CA:true missing)", CACertFile, cert.Subject)
	}
	if cert.KeyUsage != 0 && cert.KeyUsage&x509.KeyUsageCertSign == 0 {
		return nil, fmt.Errorf("%s (subject %q) lacks key usage CertSign", CACertFile, cert.Subject)
	}
	if k, ok := key.Public().(*rsa.PublicKey); ok && k.N.BitLen() < minRSABits {
		return nil, fmt.Errorf("%s: RSA key of %d bits, want at least %d", CAKeyFile, k.N.BitLen(), minRSABits)
	}

	pool := x509.NewCertPool()
	for _, r := range roots {
		pool.AddCert(r)
	}
	inter := x509.NewCertPool()
	for _, c := range chain[1:] {
		inter.AddCert(c)
	}
	// Verifying now catches an expired CA and a root bundle that does not anchor the chain,
	// either of which would otherwise surface later as every mesh handshake failing.
	if _, err := cert.Verify(x509.VerifyOptions{
		Roots:         pool,
		Intermediates: inter,
		KeyUsages:     []x509.ExtKeyUsage{x509.ExtKeyUsageAny},
		CurrentTime:   o.now(),
	}); err != nil {
		return nil, fmt.Errorf("%s (subject %q) does not verify against %s: %w", CACertFile, cert.Subject, RootCertFile, err)
	}

	l := &Local{
		now:         o.now,
		trustDomain: o.trustDomain,
		cert:        cert,
		key:         key,
		roots:       roots,
		pool:        pool,
	}
	isRoot := func(c *x509.Certificate) bool {
		for _, r := range roots {
			if r.Equal(c) {
				return true
			}
		}
		return false
	}
	for _, c := range chain {
		if !isRoot(c) {
			l.intermediatesPEM = append(l.intermediatesPEM, encodeCert(c.Raw))
		}
	}
	var b strings.Builder
	for _, r := range roots {
		b.WriteString(encodeCert(r.Raw))
	}
	l.rootsPEM = b.String()
	return l, nil
}

// Sign implements [Signer]. It signs only a CSR whose signature verifies and which carries
// exactly one URI SAN equal to id, so a caller cannot obtain a certificate for an identity other
// than the one it asked for by name.
func (l *Local) Sign(ctx context.Context, csrPEM []byte, id spiffe.ID, ttl time.Duration) ([]string, error) {
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("sign %s: %w", id, err)
	}
	chain, err := l.sign(csrPEM, id, ttl)
	if err != nil {
		return nil, fmt.Errorf("sign %s: %w", id, err)
	}
	return chain, nil
}

func (l *Local) sign(csrPEM []byte, id spiffe.ID, ttl time.Duration) ([]string, error) {
	if id.IsZero() {
		return nil, errors.New("empty identity")
	}
	if l.trustDomain != "" && id.TrustDomain != l.trustDomain {
		return nil, fmt.Errorf("identity is in trust domain %q, this CA signs only for %q", id.TrustDomain, l.trustDomain)
	}
	if ttl <= 0 {
		return nil, fmt.Errorf("ttl %v: must be positive", ttl)
	}
	block, _ := pem.Decode(csrPEM)
	if block == nil || block.Type != "CERTIFICATE REQUEST" {
		return nil, errors.New("csr: no PEM CERTIFICATE REQUEST block")
	}
	csr, err := x509.ParseCertificateRequest(block.Bytes)
	if err != nil {
		return nil, fmt.Errorf("csr: %w", err)
	}
	if err := csr.CheckSignature(); err != nil {
		return nil, fmt.Errorf("csr signature: %w", err)
	}
	if err := checkLeafKey(csr.PublicKey); err != nil {
		return nil, fmt.Errorf("csr: %w", err)
	}
	want := id.String()
	switch {
	case len(csr.URIs) == 0:
		return nil, fmt.Errorf("csr has no URI SAN, want exactly one: %s", want)
	case len(csr.URIs) > 1:
		got := make([]string, len(csr.URIs))
		for i, u := range csr.URIs {
			got[i] = u.String()
		}
		return nil, fmt.Errorf("csr has %d URI SANs [%s], want exactly one: %s", len(got), strings.Join(got, " "), want)
	case csr.URIs[0].String() != want:
		return nil, fmt.Errorf("csr URI SAN %q does not match the identity %q", csr.URIs[0].String(), want)
	}
	// Build the SAN from the identity itself rather than copying the CSR's, so the issued
	// certificate carries exactly the canonical form.
	uri, err := url.Parse(want)
	if err != nil {
		return nil, fmt.Errorf("identity uri: %w", err)
	}

	now := l.now()
	notAfter := now.Add(ttl)
	// A leaf must not outlive its issuer: verifiers would reject it after the CA expires anyway,
	// and the shorter validity makes the manager renew (against a new CA) in time.
	if notAfter.After(l.cert.NotAfter) {
		notAfter = l.cert.NotAfter
	}
	if !notAfter.After(now) {
		return nil, fmt.Errorf("signing certificate expired at %s", l.cert.NotAfter.UTC().Format(time.RFC3339))
	}
	serial, err := randomSerial()
	if err != nil {
		return nil, err
	}
	tmpl := &x509.Certificate{
		SerialNumber: serial,
		// An empty subject makes crypto/x509 mark the SAN extension critical, as RFC 5280 and
		// the SPIFFE X.509-SVID spec require and as istiod does.
		NotBefore:             now.Add(-clockSkew),
		NotAfter:              notAfter,
		KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		BasicConstraintsValid: true,
		IsCA:                  false,
		URIs:                  []*url.URL{uri},
		SignatureAlgorithm:    signatureAlgorithm(l.key),
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, l.cert, csr.PublicKey, l.key)
	if err != nil {
		return nil, fmt.Errorf("create certificate: %w", err)
	}
	out := make([]string, 0, len(l.intermediatesPEM)+2)
	out = append(out, encodeCert(der))
	out = append(out, l.intermediatesPEM...)
	out = append(out, l.rootsPEM)
	return out, nil
}

// Roots returns a copy of the pool of trust anchors, for callers that verify mesh peers.
func (l *Local) Roots() *x509.CertPool { return l.pool.Clone() }

// RootCerts returns the trust anchors; the certificates must not be modified.
func (l *Local) RootCerts() []*x509.Certificate {
	return append([]*x509.Certificate(nil), l.roots...)
}

// RootsPEM returns the trust anchors as concatenated PEM, the last element of every response.
func (l *Local) RootsPEM() string { return l.rootsPEM }

// Certificate returns the signing certificate; it must not be modified.
func (l *Local) Certificate() *x509.Certificate { return l.cert }

// TrustDomain returns the only trust domain the CA signs for, or "" when it signs for any.
func (l *Local) TrustDomain() string { return l.trustDomain }

// checkLeafKey accepts the key types Istio's CA accepts, refusing weak RSA.
func checkLeafKey(pub any) error {
	switch k := pub.(type) {
	case *ecdsa.PublicKey:
		switch k.Curve {
		case elliptic.P256(), elliptic.P384():
			return nil
		}
		return fmt.Errorf("unsupported ECDSA curve %s, want P-256 or P-384", k.Curve.Params().Name)
	case *rsa.PublicKey:
		if k.N.BitLen() < minRSABits {
			return fmt.Errorf("RSA key of %d bits, want at least %d", k.N.BitLen(), minRSABits)
		}
		return nil
	default:
		return fmt.Errorf("unsupported public key type %T, want ECDSA or RSA", pub)
	}
}

// signatureAlgorithm pins SHA-256, which every mesh peer (including rustls/webpki in ztunnel)
// accepts; other key types fall back to crypto/x509's choice.
func signatureAlgorithm(key crypto.Signer) x509.SignatureAlgorithm {
	switch key.Public().(type) {
	case *ecdsa.PublicKey:
		return x509.ECDSAWithSHA256
	case *rsa.PublicKey:
		return x509.SHA256WithRSA
	default:
		return x509.UnknownSignatureAlgorithm
	}
}

// randomSerial returns a positive random serial of at most 128 bits, as RFC 5280 allows at most
// 20 octets and CAs use random serials to make issued certificates unpredictable.
func randomSerial() (*big.Int, error) {
	limit := new(big.Int).Lsh(big.NewInt(1), 128)
	for {
		n, err := rand.Int(rand.Reader, limit)
		if err != nil {
			return nil, fmt.Errorf("serial: %w", err)
		}
		if n.Sign() > 0 {
			return n, nil
		}
	}
}

func encodeCert(der []byte) string {
	return string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}))
}

// ParseCertificates parses every PEM CERTIFICATE block in data, ignoring other block types, and
// fails if there is none. CA responses and plug-in CA files both use it.
func ParseCertificates(data []byte) ([]*x509.Certificate, error) {
	var certs []*x509.Certificate
	rest := data
	for {
		var block *pem.Block
		block, rest = pem.Decode(rest)
		if block == nil {
			break
		}
		if block.Type != "CERTIFICATE" {
			continue
		}
		c, err := x509.ParseCertificate(block.Bytes)
		if err != nil {
			return nil, fmt.Errorf("parse certificate %d: %w", len(certs), err)
		}
		certs = append(certs, c)
	}
	if len(certs) == 0 {
		if len(bytes.TrimSpace(rest)) > 0 {
			return nil, errors.New("no PEM certificate found (is the data PEM?)")
		}
		return nil, errors.New("no PEM certificate found")
	}
	return certs, nil
}

// parsePrivateKey reads the key formats Istio's plug-in CA accepts: PKCS#8, SEC 1 EC and PKCS#1
// RSA.
func parsePrivateKey(data []byte) (crypto.Signer, error) {
	rest := data
	for {
		var block *pem.Block
		block, rest = pem.Decode(rest)
		if block == nil {
			return nil, errors.New("no PEM private key found")
		}
		var (
			key any
			err error
		)
		switch block.Type {
		case "PRIVATE KEY":
			key, err = x509.ParsePKCS8PrivateKey(block.Bytes)
		case "EC PRIVATE KEY":
			key, err = x509.ParseECPrivateKey(block.Bytes)
		case "RSA PRIVATE KEY":
			key, err = x509.ParsePKCS1PrivateKey(block.Bytes)
		default:
			continue // e.g. "EC PARAMETERS" that openssl writes before the key
		}
		if err != nil {
			return nil, fmt.Errorf("parse %s: %w", block.Type, err)
		}
		s, ok := key.(crypto.Signer)
		if !ok {
			return nil, fmt.Errorf("unsupported private key type %T", key)
		}
		return s, nil
	}
}
