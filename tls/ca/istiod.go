package ca

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/url"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
	"google.golang.org/grpc/connectivity"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/metadata"
	"google.golang.org/protobuf/types/known/structpb"
	pb "istio.io/api/security/v1alpha1"

	"github.com/ztgo/ztgo/tls/spiffe"
)

// Values of the istiod client's configuration, as ztunnel uses them.
const (
	// DefaultClusterID is sent as "clusterid" when IstiodConfig.ClusterID is empty; it is
	// ztunnel's default CLUSTER_ID.
	DefaultClusterID = "Kubernetes"
	// SystemRoots as IstiodConfig.RootCA verifies istiod against the operating system's trust
	// store (CA_ROOT_CA=SYSTEM).
	SystemRoots = "SYSTEM"
	// ImpersonatedIdentityKey is the request metadata field that asks istiod, in shared mode,
	// for a certificate of a workload other than the caller (istio.io/istio security.ImpersonatedIdentity).
	ImpersonatedIdentityKey = "ImpersonatedIdentity"

	// DefaultConnectTimeout bounds one connection attempt to the CA (ztunnel's control-plane
	// connector: 5 s).
	DefaultConnectTimeout = 5 * time.Second

	// TCP keepalive of the control-plane connection, as ztunnel (which copies Envoy's
	// bootstrap): first probe after 300 s idle, then every 75 s, 9 probes.
	caTCPKeepAliveIdle     = 300 * time.Second
	caTCPKeepAliveInterval = 75 * time.Second
	caTCPKeepAliveCount    = 9
	// HTTP/2 PING every 30 s, connection dropped when unanswered for 10 s; only while a call
	// is open (hyper's keep_alive_while_idle defaults to false, and istiod's enforcement policy
	// answers idle pings with GOAWAY too_many_pings).
	caH2KeepAliveTime    = 30 * time.Second
	caH2KeepAliveTimeout = 10 * time.Second
)

var (
	// ErrClosed is returned by Sign after Close.
	ErrClosed = errors.New("ca client closed")
	// ErrEmptyResponse: the CA answered with no certificate at all.
	ErrEmptyResponse = errors.New("ca returned an empty certificate chain")
	// ErrIdentityMismatch: in shared mode the CA issued a leaf for an identity other than the
	// one requested. Using it would let this node present one workload's traffic as another's.
	ErrIdentityMismatch = errors.New("ca issued a certificate for a different identity")
)

// IstiodConfig configures an [Istiod] client. Address and, unless Plaintext, RootCA are
// required; the zero values of the rest take ztunnel's defaults. The package reads no
// environment variables: the caller maps ztunnel's (named on each field) to this struct.
type IstiodConfig struct {
	// Address is the CA endpoint (CA_ADDRESS): "host:port" or "https://host:port"; a missing
	// port means 443. "http://" is accepted only with Plaintext.
	Address string
	// RootCA is what istiod's serving certificate must chain to (CA_ROOT_CA), classified as
	// ztunnel does: a path that exists is a PEM file, re-read whenever it changes; "SYSTEM"
	// is the operating system's trust store; anything else is literal PEM.
	RootCA string
	// AltHostname (ALT_CA_HOSTNAME) is a second name accepted in istiod's certificate when
	// the certificate does not match the host of Address. SNI still carries Address's host.
	AltHostname string

	// TokenFile (AUTH_TOKEN naming a file) is read on every request and sent as
	// "authorization: Bearer <token>"; a missing or empty file fails the request. Token is a
	// literal token instead (AUTH_TOKEN naming no file). With neither, no authorization
	// header is sent.
	TokenFile string
	Token     string
	// ClusterID (CLUSTER_ID) is sent as "clusterid" beside the token (default "Kubernetes");
	// without a token neither is sent, as in ztunnel.
	ClusterID string
	// Headers are extra gRPC metadata sent on every request (CA_HEADER_<KEY>=<value>, with
	// the prefix stripped). Keys are lower-cased. authorization and clusterid set from the
	// fields above take precedence over a header of the same name, as in ztunnel.
	Headers map[string]string

	// Dedicated (PROXY_MODE=dedicated) asks for the caller's own identity: no
	// ImpersonatedIdentity is sent and the leaf's identity is not checked here (the
	// certificate manager still checks it). The zero value is shared mode, ztunnel's default.
	Dedicated bool
	// TLS12 (TLS12_ENABLED) allows TLS 1.2 to istiod; otherwise only TLS 1.3 is offered.
	TLS12 bool
	// Plaintext speaks gRPC over cleartext HTTP/2 without TLS. For tests only: istiod's CA
	// port requires TLS, and ztunnel cannot be configured this way.
	Plaintext bool
	// ConnectTimeout bounds one connection attempt (TCP, TLS and HTTP/2 preface) and how long
	// a call waits for a connection before failing (default 5 s).
	ConnectTimeout time.Duration

	// Logger receives connection events (root rotation); nil discards them.
	Logger *slog.Logger
}

// Istiod is a [Signer] that asks istiod (or any Istio-compatible CA) for certificates with
// the gRPC call /istio.v1.auth.IstioCertificateService/CreateCertificate, as ztunnel's
// CaClient does. It is safe for concurrent use.
//
// One HTTP/2 connection carries all calls; it is dialled on demand and, while the CA is
// unreachable, each call makes one fresh connection attempt of at most ConnectTimeout
// rather than waiting for gRPC's reconnect backoff, so the certificate manager's own retry
// schedule decides when istiod is asked again. When RootCA is a file, each call re-reads it
// and, if its contents changed (a rotated istio-ca-root-cert ConfigMap), moves to a new
// connection verified against the new roots; every TLS handshake also reads the file, so
// reconnects never use stale roots. A file that cannot be read or parsed keeps the last good
// roots and connection, as ztunnel keeps its old channel.
type Istiod struct {
	log            *slog.Logger
	target         string // host:port
	serverName     string // host of Address
	altHostname    string
	plaintext      bool
	tls12          bool
	connectTimeout time.Duration

	tokenFile string
	token     string
	clusterID string
	headers   metadata.MD
	dedicated bool

	roots *rootSource // nil when Plaintext

	mu       sync.Mutex
	conn     *caConn
	retiring map[*caConn]struct{}
	closed   bool
	wg       sync.WaitGroup // retiring connections
}

var _ Signer = (*Istiod)(nil)

// NewIstiod validates cfg and builds the client. It reads the root bundle but does not
// connect: the first Sign does.
func NewIstiod(cfg IstiodConfig) (*Istiod, error) {
	c := &Istiod{
		log:            cfg.Logger,
		altHostname:    cfg.AltHostname,
		plaintext:      cfg.Plaintext,
		tls12:          cfg.TLS12,
		connectTimeout: cfg.ConnectTimeout,
		tokenFile:      cfg.TokenFile,
		token:          cfg.Token,
		clusterID:      cfg.ClusterID,
		dedicated:      cfg.Dedicated,
		retiring:       make(map[*caConn]struct{}),
	}
	if c.log == nil {
		c.log = slog.New(slog.DiscardHandler)
	}
	if c.clusterID == "" {
		c.clusterID = DefaultClusterID
	}
	if c.connectTimeout < 0 {
		return nil, fmt.Errorf("new istiod ca client: negative ConnectTimeout %v", cfg.ConnectTimeout)
	}
	if c.connectTimeout == 0 {
		c.connectTimeout = DefaultConnectTimeout
	}
	var err error
	if c.target, c.serverName, err = parseCAAddress(cfg.Address, cfg.Plaintext); err != nil {
		return nil, fmt.Errorf("new istiod ca client: %w", err)
	}
	if cfg.TokenFile != "" && cfg.Token != "" {
		return nil, errors.New("new istiod ca client: both TokenFile and Token set")
	}
	if cfg.Token != "" {
		if err := checkHeaderValue(cfg.Token); err != nil {
			return nil, fmt.Errorf("new istiod ca client: token: %w", err)
		}
	}
	if err := checkHeaderValue(c.clusterID); err != nil {
		return nil, fmt.Errorf("new istiod ca client: cluster id: %w", err)
	}
	if c.headers, err = buildHeaders(cfg.Headers); err != nil {
		return nil, fmt.Errorf("new istiod ca client: %w", err)
	}
	var rootPEM []byte
	if !cfg.Plaintext {
		if c.roots, err = newRootSource(cfg.RootCA); err != nil {
			return nil, fmt.Errorf("new istiod ca client: %w", err)
		}
		rootPEM = c.roots.lastPEM()
	}
	if c.conn, err = c.newConn(rootPEM); err != nil {
		return nil, fmt.Errorf("new istiod ca client: %w", err)
	}
	return c, nil
}

// Sign implements [Signer] with one CreateCertificate call. ctx bounds the whole call,
// including waiting for a connection.
func (c *Istiod) Sign(ctx context.Context, csrPEM []byte, id spiffe.ID, ttl time.Duration) ([]string, error) {
	chain, err := c.sign(ctx, csrPEM, id, ttl)
	if err != nil {
		return nil, fmt.Errorf("istiod CreateCertificate at %s: %w", c.target, err)
	}
	return chain, nil
}

func (c *Istiod) sign(ctx context.Context, csrPEM []byte, id spiffe.ID, ttl time.Duration) ([]string, error) {
	switch {
	case id.IsZero():
		return nil, errors.New("empty identity")
	case len(csrPEM) == 0:
		return nil, errors.New("empty csr")
	case ttl < 0:
		return nil, fmt.Errorf("negative ttl %v", ttl)
	}
	md, err := c.requestMetadata()
	if err != nil {
		return nil, err
	}
	req := &pb.IstioCertificateRequest{
		Csr:              string(csrPEM),
		ValidityDuration: int64(ttl / time.Second),
	}
	if !c.dedicated {
		req.Metadata = &structpb.Struct{Fields: map[string]*structpb.Value{
			ImpersonatedIdentityKey: structpb.NewStringValue(id.String()),
		}}
	}

	conn, err := c.acquire()
	if err != nil {
		return nil, err
	}
	defer conn.active.Done()
	conn.awaitReady(ctx, c.connectTimeout)
	resp, err := pb.NewIstioCertificateServiceClient(conn.cc).CreateCertificate(metadata.NewOutgoingContext(ctx, md), req)
	if err != nil {
		return nil, err
	}
	return checkResponse(resp.GetCertChain(), id, !c.dedicated)
}

// checkResponse applies ztunnel's checks to a CreateCertificate response: at least a leaf,
// a root bundle as the last element, and in shared mode a leaf naming the requested identity.
func checkResponse(chain []string, id spiffe.ID, checkIdentity bool) ([]string, error) {
	if len(chain) == 0 {
		return nil, ErrEmptyResponse
	}
	leaves, err := ParseCertificates([]byte(chain[0]))
	if err != nil {
		return nil, fmt.Errorf("response leaf: %w", err)
	}
	if checkIdentity {
		// ztunnel takes the leaf's first URI SAN as its identity.
		var got string
		if uris := leaves[0].URIs; len(uris) > 0 {
			got = uris[0].String()
		}
		if gotID, err := spiffe.Parse(got); err != nil || gotID != id {
			if got == "" {
				got = "no URI SAN"
			}
			return nil, fmt.Errorf("%w: leaf is for %s, requested %s", ErrIdentityMismatch, got, id)
		}
	}
	if len(chain) < 2 {
		// The last element is the root bundle that peers are verified against; a response
		// without one is unusable (ztunnel: "no root certificate present").
		return nil, errors.New("response has no root bundle: only a leaf")
	}
	return chain, nil
}

// requestMetadata builds the gRPC metadata of one call, reading the token file afresh so a
// rotated projected token is used as soon as the kubelet writes it.
func (c *Istiod) requestMetadata() (metadata.MD, error) {
	md := c.headers.Copy()
	var token string
	switch {
	case c.tokenFile != "":
		b, err := os.ReadFile(c.tokenFile)
		if err != nil {
			return nil, fmt.Errorf("read token: %w", err)
		}
		token = strings.TrimSpace(string(b))
		if token == "" {
			return nil, fmt.Errorf("read token: token file %s is empty", c.tokenFile)
		}
		if err := checkHeaderValue(token); err != nil {
			return nil, fmt.Errorf("read token: token file %s: %w", c.tokenFile, err)
		}
	case c.token != "":
		token = c.token
	}
	if token != "" {
		// As ztunnel's AuthSource: clusterid travels with the token, not without it.
		md.Set("authorization", "Bearer "+token)
		md.Set("clusterid", c.clusterID)
	}
	return md, nil
}

// acquire returns the connection for one call, with its active count raised; the caller
// calls active.Done. With a root file it first moves to a new connection if the file changed.
func (c *Istiod) acquire() (*caConn, error) {
	var (
		data    []byte
		readErr error
	)
	fileRoots := c.roots != nil && c.roots.kind == rootFile
	if fileRoots {
		data, _, readErr = c.roots.load()
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return nil, ErrClosed
	}
	switch {
	case !fileRoots:
	case readErr != nil:
		c.log.Warn("cannot reload CA root certificates; keeping the current connection",
			"path", c.roots.path, "error", readErr)
	case !bytes.Equal(data, c.conn.rootPEM):
		nc, err := c.newConn(data)
		if err != nil {
			c.log.Warn("cannot reconnect to the CA after a root certificate change; keeping the current connection",
				"path", c.roots.path, "error", err)
			break
		}
		c.log.Info("CA root certificates changed; reconnecting", "path", c.roots.path, "address", c.target)
		c.retire(c.conn)
		c.conn = nc
	}
	c.conn.active.Add(1)
	return c.conn, nil
}

// retire closes old once its calls have finished. Called with c.mu held.
func (c *Istiod) retire(old *caConn) {
	c.retiring[old] = struct{}{}
	c.wg.Add(1)
	go func() {
		defer c.wg.Done()
		old.active.Wait()
		_ = old.cc.Close()
		c.mu.Lock()
		delete(c.retiring, old)
		c.mu.Unlock()
	}()
}

// Close releases the connection; calls in flight fail. Sign then returns ErrClosed. It is
// safe to call more than once.
func (c *Istiod) Close() error {
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return nil
	}
	c.closed = true
	conns := []*caConn{c.conn}
	for r := range c.retiring {
		conns = append(conns, r)
	}
	c.mu.Unlock()
	var err error
	for i, cn := range conns {
		if cerr := cn.cc.Close(); cerr != nil && i == 0 {
			err = fmt.Errorf("close istiod ca client: %w", cerr)
		}
	}
	c.wg.Wait()
	return err
}

// caConn is one gRPC channel to the CA and what it was built with.
type caConn struct {
	cc      *grpc.ClientConn
	rootPEM []byte         // root file contents the channel verifies with (nil otherwise)
	active  sync.WaitGroup // calls using cc

	failMu sync.Mutex
	failed chan struct{} // closed and replaced when a connection attempt fails
}

func (cn *caConn) attemptFailed() {
	cn.failMu.Lock()
	close(cn.failed)
	cn.failed = make(chan struct{})
	cn.failMu.Unlock()
}

func (cn *caConn) failures() <-chan struct{} {
	cn.failMu.Lock()
	defer cn.failMu.Unlock()
	return cn.failed
}

// awaitReady makes sure a connection attempt is under way and waits, at most timeout, for
// the channel to become ready or for an attempt to fail. gRPC otherwise fails calls at once
// while it waits out its reconnect backoff; ztunnel dials on demand, so after an outage the
// first retry of the certificate manager reaches the recovered CA. The call that follows
// reports the failure, if any.
func (cn *caConn) awaitReady(ctx context.Context, timeout time.Duration) {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	failed := cn.failures()
	kicked := false
	for {
		s := cn.cc.GetState()
		switch s {
		case connectivity.Ready, connectivity.Shutdown:
			return
		case connectivity.Idle:
			cn.cc.Connect()
		case connectivity.TransientFailure:
			// The channel stays in TRANSIENT_FAILURE while it retries (sticky), so only the
			// failure signal, not a state change, ends a failed attempt.
			if kicked {
				return
			}
			cn.cc.ResetConnectBackoff()
			kicked = true
		}
		wctx, wcancel := context.WithCancel(ctx)
		go func() {
			select {
			case <-failed:
				wcancel()
			case <-wctx.Done():
			}
		}()
		changed := cn.cc.WaitForStateChange(wctx, s)
		wcancel()
		if !changed {
			return
		}
	}
}

// newConn builds a channel. It does not dial.
func (c *Istiod) newConn(rootPEM []byte) (*caConn, error) {
	cn := &caConn{rootPEM: rootPEM, failed: make(chan struct{})}
	var creds credentials.TransportCredentials
	if c.plaintext {
		creds = insecure.NewCredentials()
	} else {
		creds = credentials.NewTLS(c.tlsConfig())
	}
	dialer := &net.Dialer{
		Timeout: c.connectTimeout,
		KeepAliveConfig: net.KeepAliveConfig{
			Enable:   true,
			Idle:     caTCPKeepAliveIdle,
			Interval: caTCPKeepAliveInterval,
			Count:    caTCPKeepAliveCount,
		},
	}
	// passthrough: the address is resolved on each dial, as ztunnel's connector does.
	cc, err := grpc.NewClient("passthrough:///"+c.target,
		grpc.WithTransportCredentials(failureNotifier{creds, cn.attemptFailed}),
		grpc.WithContextDialer(func(ctx context.Context, addr string) (net.Conn, error) {
			conn, err := dialer.DialContext(ctx, "tcp", addr)
			if err != nil {
				cn.attemptFailed()
			}
			return conn, err
		}),
		grpc.WithKeepaliveParams(keepalive.ClientParameters{
			Time:    caH2KeepAliveTime,
			Timeout: caH2KeepAliveTimeout,
		}),
		grpc.WithConnectParams(grpc.ConnectParams{
			Backoff:           backoff.DefaultConfig,
			MinConnectTimeout: c.connectTimeout,
		}),
	)
	if err != nil {
		return nil, fmt.Errorf("create grpc channel to %s: %w", c.target, err)
	}
	cn.cc = cc
	return cn, nil
}

// tlsConfig verifies istiod like ztunnel's control-plane client: the chain against the
// current roots, then the host of Address, else AltHostname. No client certificate.
func (c *Istiod) tlsConfig() *tls.Config {
	cfg := &tls.Config{
		ServerName: c.serverName,
		MinVersion: tls.VersionTLS13,
		// The standard verifier takes its roots once, at config time; this one reads the
		// root file on every handshake and accepts the alternate name, so it replaces it.
		InsecureSkipVerify: true,
		VerifyConnection:   c.verifyServer,
	}
	if c.tls12 {
		cfg.MinVersion = tls.VersionTLS12
	}
	return cfg
}

func (c *Istiod) verifyServer(cs tls.ConnectionState) error {
	if len(cs.PeerCertificates) == 0 {
		return errors.New("verify ca server: no certificate")
	}
	leaf := cs.PeerCertificates[0]
	inter := x509.NewCertPool()
	for _, ic := range cs.PeerCertificates[1:] {
		inter.AddCert(ic)
	}
	_, pool, err := c.roots.load()
	if err != nil {
		c.log.Debug("cannot reload CA root certificates; verifying with the last good ones", "error", err)
	}
	if _, err := leaf.Verify(x509.VerifyOptions{
		Roots:         pool,
		Intermediates: inter,
		KeyUsages:     []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}); err != nil {
		return fmt.Errorf("verify ca server certificate: %w", err)
	}
	if err := leaf.VerifyHostname(c.serverName); err != nil {
		if c.altHostname == "" {
			return fmt.Errorf("verify ca server certificate: %w", err)
		}
		if altErr := leaf.VerifyHostname(c.altHostname); altErr != nil {
			return fmt.Errorf("verify ca server certificate: %w; alternate name: %w", err, altErr)
		}
	}
	return nil
}

// failureNotifier reports failed handshakes of a channel's connection attempts.
type failureNotifier struct {
	credentials.TransportCredentials
	onFail func()
}

func (f failureNotifier) ClientHandshake(ctx context.Context, authority string, raw net.Conn) (net.Conn, credentials.AuthInfo, error) {
	conn, info, err := f.TransportCredentials.ClientHandshake(ctx, authority, raw)
	if err != nil {
		f.onFail()
	}
	return conn, info, err
}

func (f failureNotifier) Clone() credentials.TransportCredentials {
	return failureNotifier{f.TransportCredentials.Clone(), f.onFail}
}

type rootKind int

const (
	rootFile rootKind = iota
	rootPEM
	rootSystem
)

// rootSource holds the trust anchors for istiod's certificate and, for a file, the last
// contents that parsed.
type rootSource struct {
	kind rootKind
	path string

	mu   sync.Mutex
	pem  []byte
	pool *x509.CertPool
}

// newRootSource classifies v as ztunnel's CA_ROOT_CA: an existing path, "SYSTEM", or PEM.
func newRootSource(v string) (*rootSource, error) {
	if v == "" {
		return nil, errors.New("no CA root certificate (RootCA) configured")
	}
	if fi, err := os.Stat(v); err == nil && !fi.IsDir() {
		r := &rootSource{kind: rootFile, path: v}
		if _, _, err := r.load(); err != nil {
			return nil, err
		}
		return r, nil
	}
	if v == SystemRoots {
		pool, err := x509.SystemCertPool()
		if err != nil {
			return nil, fmt.Errorf("load system CA roots: %w", err)
		}
		return &rootSource{kind: rootSystem, pool: pool}, nil
	}
	pool, err := parsePool([]byte(v))
	if err != nil {
		if !strings.Contains(v, "-----BEGIN") {
			return nil, fmt.Errorf("CA root certificate %q is neither an existing file, %q, nor PEM", v, SystemRoots)
		}
		return nil, fmt.Errorf("CA root certificate: %w", err)
	}
	return &rootSource{kind: rootPEM, pem: []byte(v), pool: pool}, nil
}

// load returns the current roots: a file is read and parsed again, and on failure the last
// good contents are returned with the error.
func (r *rootSource) load() ([]byte, *x509.CertPool, error) {
	if r.kind != rootFile {
		return r.pem, r.pool, nil
	}
	data, err := os.ReadFile(r.path)
	var pool *x509.CertPool
	if err == nil {
		pool, err = parsePool(data)
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if err != nil {
		return r.pem, r.pool, fmt.Errorf("CA root certificate %s: %w", r.path, err)
	}
	if !bytes.Equal(data, r.pem) {
		r.pem, r.pool = data, pool
	}
	return r.pem, r.pool, nil
}

func (r *rootSource) lastPEM() []byte {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.pem
}

func parsePool(data []byte) (*x509.CertPool, error) {
	certs, err := ParseCertificates(data)
	if err != nil {
		return nil, err
	}
	pool := x509.NewCertPool()
	for _, c := range certs {
		pool.AddCert(c)
	}
	return pool, nil
}

// parseCAAddress returns the dial target (host:port) and the host to verify.
func parseCAAddress(addr string, plaintext bool) (target, host string, err error) {
	if addr == "" {
		return "", "", errors.New("empty CA address")
	}
	scheme := "https"
	rest := addr
	if i := strings.Index(addr, "://"); i >= 0 {
		scheme, rest = strings.ToLower(addr[:i]), addr[i+3:]
	}
	switch scheme {
	case "https":
	case "http":
		if !plaintext {
			return "", "", fmt.Errorf("CA address %q: http is allowed only with Plaintext; istiod's CA needs TLS", addr)
		}
	default:
		return "", "", fmt.Errorf("CA address %q: unsupported scheme %q", addr, scheme)
	}
	u, err := url.Parse("//" + rest)
	if err != nil {
		return "", "", fmt.Errorf("CA address %q: %w", addr, err)
	}
	if u.Hostname() == "" || (u.Path != "" && u.Path != "/") || u.User != nil || u.RawQuery != "" {
		return "", "", fmt.Errorf("CA address %q: want [scheme://]host[:port]", addr)
	}
	port := u.Port()
	if port == "" {
		port = "443"
		if scheme == "http" {
			port = "80"
		}
	}
	if n, err := strconv.Atoi(port); err != nil || n < 1 || n > 65535 {
		return "", "", fmt.Errorf("CA address %q: bad port %q", addr, port)
	}
	return net.JoinHostPort(u.Hostname(), port), u.Hostname(), nil
}

// buildHeaders validates the extra headers as ztunnel's ASCII metadata keys and values. Two
// names that differ only in case are refused: one would silently replace the other, whichever
// came last in map order.
func buildHeaders(h map[string]string) (metadata.MD, error) {
	md := metadata.MD{}
	for k, v := range h {
		key := strings.ToLower(k)
		switch {
		case key == "":
			return nil, errors.New("empty header name")
		case strings.HasPrefix(key, "grpc-"):
			return nil, fmt.Errorf("header %q: names starting grpc- are reserved", k)
		case strings.HasSuffix(key, "-bin"):
			return nil, fmt.Errorf("header %q: binary (-bin) headers are not supported", k)
		}
		// k, not key: strings.ToLower turns some non-ASCII letters (the Kelvin sign) into
		// ASCII ones.
		for i := 0; i < len(k); i++ {
			if b := k[i]; !(b >= 'a' && b <= 'z' || b >= 'A' && b <= 'Z' || b >= '0' && b <= '9' || b == '-' || b == '_' || b == '.') {
				return nil, fmt.Errorf("header %q: name may hold only letters, digits, dash, underscore and dot", k)
			}
		}
		if err := checkHeaderValue(v); err != nil {
			return nil, fmt.Errorf("header %q: %w", k, err)
		}
		if _, dup := md[key]; dup {
			return nil, fmt.Errorf("header %q is given twice (names are case-insensitive)", k)
		}
		md.Set(key, v)
	}
	return md, nil
}

// checkHeaderValue accepts printable ASCII, what gRPC allows in a text header.
func checkHeaderValue(v string) error {
	for i := 0; i < len(v); i++ {
		if v[i] < 0x20 || v[i] > 0x7e {
			return errors.New("value holds characters other than printable ASCII")
		}
	}
	return nil
}
