package certs

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"strings"
	"time"

	"github.com/ztgo/ztgo/tls/spiffe"
)

// ALPN is the only application protocol HBONE negotiates.
const ALPN = "h2"

// baseConfig is the part common to both directions.
func baseConfig() *tls.Config {
	return &tls.Config{
		// ztunnel speaks TLS 1.3 only unless TLS12_ENABLED; 1.3 also hides the certificates
		// from on-path observers, which matters because they carry workload identities.
		MinVersion: tls.VersionTLS13,
		MaxVersion: tls.VersionTLS13,
		NextProtos: []string{ALPN},
		// The hybrid post-quantum group first; Go picks by its own preference among these,
		// which also puts X25519MLKEM768 first, and sends key shares for it and X25519.
		CurvePreferences: []tls.CurveID{tls.X25519MLKEM768, tls.X25519, tls.CurveP256},
		// Resumption would skip the certificate checks below on later connections, and
		// ztunnel disables it; pooled HTTP/2 connections make the full handshake rare anyway.
		SessionTicketsDisabled: true,
	}
}

// ClientConfig returns the config for an outbound HBONE connection from workload src to a peer
// that must hold one of expectedSANs (SPIFFE URIs: the destination workload's identity and the
// service's subject alt names). It issues src's certificate first, so a CA failure is reported
// here rather than mid-handshake. The config presents src's current certificate on every
// handshake, so it can be kept across renewals.
func (m *Manager) ClientConfig(ctx context.Context, src spiffe.ID, expectedSANs []string) (*tls.Config, error) {
	if len(expectedSANs) == 0 {
		// An empty list would make every peer fail; refusing here gives a clearer error.
		return nil, fmt.Errorf("client config for %s: no expected peer identities", src)
	}
	if _, err := m.Get(ctx, src); err != nil {
		return nil, fmt.Errorf("client config for %s: %w", src, err)
	}
	expected := slices.Clone(expectedSANs)

	cfg := baseConfig()
	// No SNI, as ztunnel: with ServerName empty crypto/tls sends none, but then its verifier
	// has no name to check, so it is switched off and VerifyConnection does the whole check.
	cfg.InsecureSkipVerify = true
	cfg.ClientSessionCache = nil
	cfg.GetClientCertificate = func(cri *tls.CertificateRequestInfo) (*tls.Certificate, error) {
		c, err := m.Get(cri.Context(), src)
		if err != nil {
			return nil, fmt.Errorf("client certificate: %w", err)
		}
		return &c.TLS, nil
	}
	cfg.VerifyConnection = func(cs tls.ConnectionState) error {
		// Trust the roots that came with our own certificate, as ztunnel does.
		own, err := m.current(src)
		if err != nil {
			return fmt.Errorf("verify server: %w", err)
		}
		return verifyServer(cs, own.Roots, expected, m.now())
	}
	return cfg, nil
}

func verifyServer(cs tls.ConnectionState, roots *x509.CertPool, expected []string, now time.Time) error {
	if err := verifyChain(cs.PeerCertificates, roots, x509.ExtKeyUsageServerAuth, now); err != nil {
		return fmt.Errorf("verify server certificate: %w", err)
	}
	leaf := cs.PeerCertificates[0]
	for _, u := range leaf.URIs {
		if slices.Contains(expected, u.String()) {
			return nil
		}
	}
	return fmt.Errorf("verify server identity: peer is [%s], expected one of [%s]", uriSANs(leaf), strings.Join(expected, " "))
}

// ServerConfig returns the config of the inbound HBONE listener. certFor maps the local IP a
// connection arrived on to the identity of the workload that owns it; the handshake presents
// that workload's certificate and fails if certFor does. Client certificates are required and
// must belong to the trust domain of the presented certificate.
func (m *Manager) ServerConfig(certFor func(local netip.Addr) (spiffe.ID, error)) *tls.Config {
	cfg := baseConfig()
	cfg.ClientAuth = tls.RequireAnyClientCert
	cfg.GetConfigForClient = func(hello *tls.ClientHelloInfo) (*tls.Config, error) {
		// crypto/tls lets a client offering only http/1.1 through to an h2 server without ALPN;
		// rustls (ztunnel) refuses any offer without overlap, and so do we. A client offering
		// no ALPN at all is accepted by both.
		if len(hello.SupportedProtos) > 0 && !slices.Contains(hello.SupportedProtos, ALPN) {
			return nil, fmt.Errorf("client offered application protocols [%s], want %s", strings.Join(hello.SupportedProtos, " "), ALPN)
		}
		local, err := localIP(hello.Conn)
		if err != nil {
			return nil, fmt.Errorf("select server certificate: %w", err)
		}
		id, err := certFor(local)
		if err != nil {
			return nil, fmt.Errorf("select server certificate for %s: %w", local, err)
		}
		c, err := m.Get(hello.Context(), id)
		if err != nil {
			return nil, fmt.Errorf("select server certificate for %s: %w", local, err)
		}
		return m.serverConfigFor(c), nil
	}
	// The returned config always replaces this one; should that ever not happen, refuse rather
	// than accept an unverified client.
	cfg.VerifyConnection = func(tls.ConnectionState) error {
		return errors.New("verify client: no server certificate selected")
	}
	return cfg
}

// serverConfigFor returns the config that presents c. It is built once per certificate: the
// verifier needs c's roots and trust domain, which a shared config cannot know.
func (m *Manager) serverConfigFor(c *Certificate) *tls.Config {
	c.serverOnce.Do(func() {
		cfg := baseConfig()
		cfg.Certificates = []tls.Certificate{c.TLS}
		cfg.ClientAuth = tls.RequireAnyClientCert
		cfg.VerifyConnection = func(cs tls.ConnectionState) error {
			return verifyClient(cs, c, m.now())
		}
		c.serverConfig = cfg
	})
	return c.serverConfig
}

func verifyClient(cs tls.ConnectionState, own *Certificate, now time.Time) error {
	if err := verifyChain(cs.PeerCertificates, own.Roots, x509.ExtKeyUsageClientAuth, now); err != nil {
		return fmt.Errorf("verify client certificate: %w", err)
	}
	// ztunnel's TrustDomainVerifier. The identity checked is the one PeerIdentity returns and
	// authorization uses (the first SPIFFE URI SAN), so a certificate cannot pass with one
	// identity and be authorized as another. Which identities may connect is authz's decision.
	leaf := cs.PeerCertificates[0]
	want := own.Identity.TrustDomain
	if id, ok := firstIdentity(leaf); ok && id.TrustDomain == want {
		return nil
	}
	return fmt.Errorf("verify client trust domain: client is [%s], want trust domain %q of %s", uriSANs(leaf), want, own.Identity)
}

// verifyChain checks that certs[0] chains to roots through the other certs with usage.
func verifyChain(certs []*x509.Certificate, roots *x509.CertPool, usage x509.ExtKeyUsage, now time.Time) error {
	if len(certs) == 0 {
		return errors.New("peer presented no certificate")
	}
	opts := x509.VerifyOptions{
		Roots:       roots,
		KeyUsages:   []x509.ExtKeyUsage{usage},
		CurrentTime: now,
	}
	if len(certs) > 1 {
		opts.Intermediates = x509.NewCertPool()
		for _, c := range certs[1:] {
			opts.Intermediates.AddCert(c)
		}
	}
	_, err := certs[0].Verify(opts)
	return err
}

// localIP is the IP the connection was accepted on.
func localIP(c net.Conn) (netip.Addr, error) {
	if c == nil {
		return netip.Addr{}, errors.New("no connection")
	}
	a := c.LocalAddr()
	if t, ok := a.(*net.TCPAddr); ok {
		if ip, ok := netip.AddrFromSlice(t.IP); ok {
			return ip.Unmap(), nil
		}
	}
	if a != nil {
		if ap, err := netip.ParseAddrPort(a.String()); err == nil {
			return ap.Addr().Unmap(), nil
		}
	}
	return netip.Addr{}, fmt.Errorf("local address %v is not an IP address", a)
}

// PeerIdentity returns the identity of the peer of a completed handshake: the first URI SAN of
// its leaf that parses as a SPIFFE identity, the identity ztunnel uses for authorization and
// logs.
func PeerIdentity(cs tls.ConnectionState) (spiffe.ID, error) {
	if len(cs.PeerCertificates) == 0 {
		return spiffe.ID{}, errors.New("peer identity: no peer certificate")
	}
	id, ok := firstIdentity(cs.PeerCertificates[0])
	if !ok {
		return spiffe.ID{}, fmt.Errorf("peer identity: no SPIFFE URI SAN among [%s]", uriSANs(cs.PeerCertificates[0]))
	}
	return id, nil
}
