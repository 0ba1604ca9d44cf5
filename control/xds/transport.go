package xds

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"net/url"
	"os"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/metadata"
)

// RootSystem is the RootCA value that trusts the system's root store (ztunnel's "SYSTEM").
const RootSystem = "SYSTEM"

// rootSource is where the server's trust anchors come from.
type rootSource struct {
	system bool
	file   string // read at every connect, so a rotated root is picked up on reconnect
	pem    []byte // literal PEM given in the config
}

// parseRoot interprets Config.RootCA as ztunnel interprets XDS_ROOT_CA: an existing file, else
// SYSTEM, else literal PEM. Unlike ztunnel, text that is none of these is an error here rather
// than at the first connect.
func parseRoot(s string) (rootSource, error) {
	switch {
	case s == "":
		return rootSource{}, errors.New("root CA: empty (want a PEM file path, literal PEM, or SYSTEM)")
	case s == RootSystem:
		return rootSource{system: true}, nil
	}
	if st, err := os.Stat(s); err == nil && !st.IsDir() {
		return rootSource{file: s}, nil
	}
	if strings.Contains(s, "-----BEGIN") {
		if _, err := certPool([]byte(s)); err != nil {
			return rootSource{}, fmt.Errorf("root CA: literal PEM: %w", err)
		}
		return rootSource{pem: []byte(s)}, nil
	}
	return rootSource{}, fmt.Errorf("root CA %q: not an existing file, PEM, or %s", s, RootSystem)
}

func (r rootSource) pool() (*x509.CertPool, error) {
	switch {
	case r.system:
		p, err := x509.SystemCertPool()
		if err != nil {
			return nil, fmt.Errorf("load system roots: %w", err)
		}
		return p, nil
	case r.file != "":
		b, err := os.ReadFile(r.file)
		if err != nil {
			return nil, fmt.Errorf("read root CA: %w", err)
		}
		p, err := certPool(b)
		if err != nil {
			return nil, fmt.Errorf("root CA %s: %w", r.file, err)
		}
		return p, nil
	default:
		return certPool(r.pem)
	}
}

func certPool(pemBytes []byte) (*x509.CertPool, error) {
	p := x509.NewCertPool()
	if !p.AppendCertsFromPEM(pemBytes) {
		return nil, errors.New("no certificate in PEM")
	}
	return p, nil
}

// target is the parsed server address.
type target struct {
	tls      bool
	hostPort string
	host     string
}

func parseAddress(s string) (target, error) {
	u, err := url.Parse(s)
	if err != nil {
		return target{}, fmt.Errorf("address %q: %w", s, err)
	}
	var t target
	switch u.Scheme {
	case "https":
		t.tls = true
	case "http":
	default:
		return target{}, fmt.Errorf("address %q: scheme must be https or http", s)
	}
	if u.Host == "" || (u.Path != "" && u.Path != "/") || u.RawQuery != "" || u.User != nil {
		return target{}, fmt.Errorf("address %q: want scheme://host:port", s)
	}
	t.host = u.Hostname()
	port := u.Port()
	if port == "" {
		port = "80"
		if t.tls {
			port = "443"
		}
	}
	t.hostPort = net.JoinHostPort(t.host, port)
	return t, nil
}

// tlsConfig builds the client TLS config for one connection: server authentication only, the
// roots read now, TLS 1.3 unless TLS 1.2 is allowed (ztunnel's tls_versions). With an
// alternate hostname the certificate must chain to the roots and name either the address's
// host or the alternate, as ztunnel's AltHostnameVerifier accepts.
func (c *Client) tlsConfig() (*tls.Config, error) {
	roots, err := c.root.pool()
	if err != nil {
		return nil, err
	}
	cfg := &tls.Config{RootCAs: roots, MinVersion: tls.VersionTLS13}
	if c.cfg.AllowTLS12 {
		cfg.MinVersion = tls.VersionTLS12
	}
	if alt := c.cfg.AltHostname; alt != "" {
		// The standard verification checks one name; this one checks two, so it is done
		// by hand in VerifyConnection. InsecureSkipVerify only turns off the built-in check.
		cfg.InsecureSkipVerify = true
		host := c.target.host
		cfg.VerifyConnection = func(cs tls.ConnectionState) error {
			return verifyWithAlt(cs, roots, host, alt)
		}
	}
	return cfg, nil
}

// verifyWithAlt checks the chain, then the name: host (the address's host, which for an IP
// address is not in cs.ServerName, as no SNI is sent for one), else alt.
func verifyWithAlt(cs tls.ConnectionState, roots *x509.CertPool, host, alt string) error {
	if len(cs.PeerCertificates) == 0 {
		return errors.New("xds server presented no certificate")
	}
	inter := x509.NewCertPool()
	for _, c := range cs.PeerCertificates[1:] {
		inter.AddCert(c)
	}
	leaf := cs.PeerCertificates[0]
	if _, err := leaf.Verify(x509.VerifyOptions{Roots: roots, Intermediates: inter}); err != nil {
		return fmt.Errorf("verify xds server certificate: %w", err)
	}
	if err := leaf.VerifyHostname(host); err == nil {
		return nil
	}
	if err := leaf.VerifyHostname(alt); err != nil {
		return fmt.Errorf("verify xds server certificate: names neither %q nor %q: %w", host, alt, err)
	}
	return nil
}

// dial creates the gRPC channel for one stream. A new channel per stream, as ztunnel builds a
// new one per connection, so roots are re-read and a reconnect never reuses a broken transport.
func (c *Client) dial() (*grpc.ClientConn, error) {
	creds := insecure.NewCredentials()
	if c.target.tls {
		tc, err := c.tlsConfig()
		if err != nil {
			return nil, err
		}
		creds = credentials.NewTLS(tc)
	}
	opts := []grpc.DialOption{
		grpc.WithTransportCredentials(creds),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(c.cfg.MaxMessageSize)),
		grpc.WithContextDialer(dialTCP),
		grpc.WithConnectParams(grpc.ConnectParams{Backoff: backoff.DefaultConfig, MinConnectTimeout: connectTimeout}),
		// HTTP/2 pings find a dead server (a black-holed route, a vanished node) long before
		// TCP would; ztunnel pings every 30 s and gives up after 10 s. istiod accepts pings
		// every 15 s or slower (its keepalive enforcement is half its 30 s interval).
		grpc.WithKeepaliveParams(keepalive.ClientParameters{Time: 30 * time.Second, Timeout: 10 * time.Second}),
	}
	// passthrough: the address is dialled as given, with the system resolver, like ztunnel.
	cc, err := grpc.NewClient("passthrough:///"+c.target.hostPort, opts...)
	if err != nil {
		return nil, fmt.Errorf("create grpc client for %s: %w", c.target.hostPort, err)
	}
	return cc, nil
}

// connectTimeout bounds one connection attempt, ztunnel's connect timeout.
const connectTimeout = 5 * time.Second

// dialTCP dials with ztunnel's TCP keepalives for the control plane (300 s idle, 75 s
// interval, 9 probes: Envoy's bootstrap values).
func dialTCP(ctx context.Context, addr string) (net.Conn, error) {
	d := net.Dialer{
		Timeout:         connectTimeout,
		KeepAliveConfig: net.KeepAliveConfig{Enable: true, Idle: 300 * time.Second, Interval: 75 * time.Second, Count: 9},
	}
	return d.DialContext(ctx, "tcp", addr)
}

// streamMetadata builds the gRPC metadata of one stream: the extra headers, then
// authorization and clusterid, which override an extra header of the same name (ztunnel adds
// them per request, after the configured headers). The token file is read now, so a rotated
// token is used on the next reconnect.
func (c *Client) streamMetadata() (metadata.MD, error) {
	md := metadata.MD{}
	for k, v := range c.cfg.Headers {
		md.Set(k, v)
	}
	token := c.cfg.Token
	if c.cfg.TokenFile != "" {
		b, err := os.ReadFile(c.cfg.TokenFile)
		if err != nil {
			return nil, fmt.Errorf("read token: %w", err)
		}
		// A token file written by hand often ends in a newline, which is not valid in a
		// header; Kubernetes tokens have none, so trimming changes nothing for them.
		b = bytes.TrimSpace(b)
		if len(b) == 0 {
			return nil, fmt.Errorf("read token: %s is empty", c.cfg.TokenFile)
		}
		token = string(b)
	}
	if token != "" {
		if !validHeaderValue(token) {
			return nil, errors.New("token: not a valid header value")
		}
		// As ztunnel's AuthSource: clusterid travels with the token, not without it.
		md.Set("authorization", "Bearer "+token)
		md.Set("clusterid", c.cfg.ClusterID)
	}
	return md, nil
}

func (c *Client) streamContext(ctx context.Context) (context.Context, error) {
	md, err := c.streamMetadata()
	if err != nil {
		return nil, err
	}
	return metadata.NewOutgoingContext(ctx, md), nil
}

// validHeaderKey accepts what gRPC accepts as a metadata key once lower-cased (ztunnel parses
// XDS_HEADER_ names as tonic AsciiMetadataKeys, which lower-case too).
func validHeaderKey(k string) bool {
	if k == "" || strings.HasPrefix(k, "grpc-") || strings.HasSuffix(k, "-bin") {
		return false
	}
	for i := 0; i < len(k); i++ {
		c := k[i]
		if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '-' || c == '_' || c == '.') {
			return false
		}
	}
	return true
}

// validHeaderValue accepts printable ASCII, as an AsciiMetadataValue does.
func validHeaderValue(v string) bool {
	for i := 0; i < len(v); i++ {
		if v[i] < 0x20 || v[i] > 0x7e {
			return false
		}
	}
	return true
}
