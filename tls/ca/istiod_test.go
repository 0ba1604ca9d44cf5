package ca_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"math/big"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	pb "istio.io/api/security/v1alpha1"

	"github.com/ztgo/ztgo/tls/ca"
	"github.com/ztgo/ztgo/tls/certs"
	"github.com/ztgo/ztgo/tls/spiffe"
)

var (
	appID   = spiffe.ID{TrustDomain: "cluster.local", Namespace: "default", ServiceAccount: "app"}
	otherID = spiffe.ID{TrustDomain: "cluster.local", Namespace: "default", ServiceAccount: "intruder"}
)

// caServer is a real IstioCertificateService: it signs with an ephemeral local CA the way
// istiod does (the ImpersonatedIdentity when present, else the CSR's identity) and records
// what each call carried.
type caServer struct {
	pb.UnimplementedIstioCertificateServiceServer

	mu      sync.Mutex
	signer  *ca.Local
	seen    []seenCall
	respond func(req *pb.IstioCertificateRequest, chain []string) ([]string, error) // rewrites the answer
	calls   atomic.Int32
}

type seenCall struct {
	md  metadata.MD
	req *pb.IstioCertificateRequest
}

func (s *caServer) CreateCertificate(ctx context.Context, req *pb.IstioCertificateRequest) (*pb.IstioCertificateResponse, error) {
	s.calls.Add(1)
	md, _ := metadata.FromIncomingContext(ctx)
	s.mu.Lock()
	s.seen = append(s.seen, seenCall{md: md.Copy(), req: req})
	signer, respond := s.signer, s.respond
	s.mu.Unlock()

	idStr := req.GetMetadata().GetFields()[ca.ImpersonatedIdentityKey].GetStringValue()
	if idStr == "" {
		p, _ := pem.Decode([]byte(req.Csr))
		if p == nil {
			return nil, status.Error(codes.InvalidArgument, "bad csr")
		}
		csr, err := x509.ParseCertificateRequest(p.Bytes)
		if err != nil || len(csr.URIs) != 1 {
			return nil, status.Error(codes.InvalidArgument, "bad csr")
		}
		idStr = csr.URIs[0].String()
	}
	id, err := spiffe.Parse(idStr)
	if err != nil {
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	chain, err := signer.Sign(ctx, []byte(req.Csr), id, time.Duration(req.ValidityDuration)*time.Second)
	if err != nil {
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	if respond != nil {
		if chain, err = respond(req, chain); err != nil {
			return nil, err
		}
	}
	return &pb.IstioCertificateResponse{CertChain: chain}, nil
}

func (s *caServer) setSigner(l *ca.Local) {
	s.mu.Lock()
	s.signer = l
	s.mu.Unlock()
}

func (s *caServer) setRespond(f func(*pb.IstioCertificateRequest, []string) ([]string, error)) {
	s.mu.Lock()
	s.respond = f
	s.mu.Unlock()
}

func (s *caServer) last(t *testing.T) seenCall {
	t.Helper()
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(s.seen) == 0 {
		t.Fatal("the CA server saw no call")
	}
	return s.seen[len(s.seen)-1]
}

func newCAServer(t testing.TB, opts ...ca.Option) *caServer {
	t.Helper()
	l, err := ca.NewEphemeral("cluster.local", opts...)
	if err != nil {
		t.Fatal(err)
	}
	return &caServer{signer: l}
}

// serve starts a gRPC server for s on addr (ip:port, port 0 for any) and returns the address
// it listens on. tlsCfg nil serves cleartext HTTP/2. The server stops at cleanup.
func serve(t testing.TB, s *caServer, addr string, tlsCfg *tls.Config) (string, *grpc.Server) {
	t.Helper()
	var lis net.Listener
	var err error
	for range 50 { // a restarted server may briefly find its old port busy
		if lis, err = net.Listen("tcp", addr); err == nil {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err != nil {
		t.Fatal(err)
	}
	var opts []grpc.ServerOption
	if tlsCfg != nil {
		opts = append(opts, grpc.Creds(credentials.NewTLS(tlsCfg)))
	}
	srv := grpc.NewServer(opts...)
	pb.RegisterIstioCertificateServiceServer(srv, s)
	go func() { _ = srv.Serve(lis) }()
	t.Cleanup(srv.Stop)
	return lis.Addr().String(), srv
}

func newClient(t testing.TB, cfg ca.IstiodConfig) *ca.Istiod {
	t.Helper()
	c, err := ca.NewIstiod(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := c.Close(); err != nil {
			t.Error(err)
		}
	})
	return c
}

func writeFile(t testing.TB, path, data string) {
	t.Helper()
	// Replace atomically, as the kubelet does with its symlink swap.
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, []byte(data), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, path); err != nil {
		t.Fatal(err)
	}
}

func newCSR(t testing.TB, id spiffe.ID) []byte {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	u, _ := url.Parse(id.String())
	der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{URIs: []*url.URL{u}}, key)
	if err != nil {
		t.Fatal(err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der})
}

// fakeClock is a settable clock shared by the CA and the manager.
type fakeClock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *fakeClock) Set(t time.Time) {
	c.mu.Lock()
	c.t = t
	c.mu.Unlock()
}

// fakeWait replaces the manager's renewal timer: each wait reports its duration and returns
// when the test fires it.
type fakeWait struct {
	waits   chan time.Duration
	release chan struct{}
}

func newFakeWait() *fakeWait {
	return &fakeWait{waits: make(chan time.Duration, 16), release: make(chan struct{})}
}

func (f *fakeWait) Wait(ctx context.Context, d time.Duration) error {
	f.waits <- d
	select {
	case <-f.release:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

func (f *fakeWait) next(t *testing.T) time.Duration {
	t.Helper()
	select {
	case d := <-f.waits:
		return d
	case <-time.After(20 * time.Second):
		t.Fatal("no renewal was scheduled")
		return 0
	}
}

func (f *fakeWait) fire(t *testing.T) {
	t.Helper()
	select {
	case f.release <- struct{}{}:
	case <-time.After(20 * time.Second):
		t.Fatal("renewal goroutine is not waiting")
	}
}

type managerOpts struct {
	clock *fakeClock
	wait  *fakeWait
}

func newManager(t testing.TB, signer ca.Signer, o managerOpts) *certs.Manager {
	t.Helper()
	cfg := certs.Config{Signer: signer, TTL: 24 * time.Hour}
	if o.clock != nil {
		cfg.Now = o.clock.Now
	}
	if o.wait != nil {
		cfg.Wait = o.wait.Wait
	}
	m, err := certs.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := m.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(m.Stop)
	return m
}

// TestIstiodIssueThroughManager issues a workload certificate through the certificate
// manager over a real gRPC CreateCertificate call and checks everything the call carried.
func TestIstiodIssueThroughManager(t *testing.T) {
	srv := newCAServer(t)
	addr, _ := serve(t, srv, "127.60.0.1:0", nil)
	tokenFile := filepath.Join(t.TempDir(), "istio-token")
	writeFile(t, tokenFile, "token-one\n")
	client := newClient(t, ca.IstiodConfig{
		Address:   "http://" + addr,
		Plaintext: true,
		TokenFile: tokenFile,
		ClusterID: "east",
		Headers:   map[string]string{"X-Tenant": "blue", "route_hint": "a.b-c"},
	})
	m := newManager(t, client, managerOpts{})

	c, err := m.Get(context.Background(), appID)
	if err != nil {
		t.Fatal(err)
	}
	if c.Identity != appID || len(c.RootCerts) != 1 || !c.RootCerts[0].Equal(srv.signer.Certificate()) {
		t.Fatalf("certificate for %v with roots %d, want the CA's root", c.Identity, len(c.RootCerts))
	}

	call := srv.last(t)
	checkMD := func(md metadata.MD, key, want string) {
		t.Helper()
		if got := md.Get(key); len(got) != 1 || got[0] != want {
			t.Errorf("metadata %s = %q, want %q", key, got, want)
		}
	}
	checkMD(call.md, "authorization", "Bearer token-one")
	checkMD(call.md, "clusterid", "east")
	checkMD(call.md, "x-tenant", "blue")
	checkMD(call.md, "route_hint", "a.b-c")
	if got := call.req.ValidityDuration; got != 86400 {
		t.Errorf("validity_duration = %d, want 86400 (24h in seconds)", got)
	}
	fields := call.req.GetMetadata().GetFields()
	if len(fields) != 1 || fields[ca.ImpersonatedIdentityKey].GetStringValue() != appID.String() {
		t.Errorf("request metadata = %v, want only ImpersonatedIdentity=%s", fields, appID)
	}
	if !strings.HasPrefix(call.req.Csr, "-----BEGIN CERTIFICATE REQUEST-----") {
		t.Errorf("csr is not PEM: %.40q", call.req.Csr)
	}

	// The token file is read on every call: a rotated token is sent at once.
	writeFile(t, tokenFile, "token-two")
	if _, err := client.Sign(context.Background(), newCSR(t, otherID), otherID, time.Hour); err != nil {
		t.Fatal(err)
	}
	call = srv.last(t)
	checkMD(call.md, "authorization", "Bearer token-two")
	if got := call.req.ValidityDuration; got != 3600 {
		t.Errorf("validity_duration = %d, want 3600", got)
	}
}

func TestIstiodDedicatedSendsNoImpersonation(t *testing.T) {
	srv := newCAServer(t)
	addr, _ := serve(t, srv, "127.60.0.2:0", nil)
	client := newClient(t, ca.IstiodConfig{Address: addr, Plaintext: true, Dedicated: true, Token: "static"})
	m := newManager(t, client, managerOpts{})
	if _, err := m.Get(context.Background(), appID); err != nil {
		t.Fatal(err)
	}
	call := srv.last(t)
	if call.req.Metadata != nil {
		t.Errorf("dedicated mode sent request metadata %v", call.req.Metadata)
	}
	if got := call.md.Get("authorization"); len(got) != 1 || got[0] != "Bearer static" {
		t.Errorf("authorization = %q", got)
	}
	if got := call.md.Get("clusterid"); len(got) != 1 || got[0] != ca.DefaultClusterID {
		t.Errorf("clusterid = %q, want the default %q", got, ca.DefaultClusterID)
	}
}

func TestIstiodToken(t *testing.T) {
	srv := newCAServer(t)
	addr, _ := serve(t, srv, "127.60.0.3:0", nil)
	dir := t.TempDir()
	csr := newCSR(t, appID)

	missing := newClient(t, ca.IstiodConfig{Address: addr, Plaintext: true, TokenFile: filepath.Join(dir, "missing")})
	if _, err := missing.Sign(context.Background(), csr, appID, time.Hour); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("missing token file: %v", err)
	}
	empty := filepath.Join(dir, "empty")
	writeFile(t, empty, "")
	emptyClient := newClient(t, ca.IstiodConfig{Address: addr, Plaintext: true, TokenFile: empty})
	if _, err := emptyClient.Sign(context.Background(), csr, appID, time.Hour); err == nil || !strings.Contains(err.Error(), "is empty") {
		t.Errorf("empty token file: %v", err)
	}
	if n := srv.calls.Load(); n != 0 {
		t.Errorf("%d calls reached the CA without a token", n)
	}

	// Without a token no authorization is sent, and a CA_HEADER_AUTHORIZATION passes through;
	// with a token, the token wins, as ztunnel inserts it last.
	hdr := map[string]string{"authorization": "Custom xyz"}
	none := newClient(t, ca.IstiodConfig{Address: addr, Plaintext: true, Headers: hdr})
	if _, err := none.Sign(context.Background(), csr, appID, time.Hour); err != nil {
		t.Fatal(err)
	}
	if got := srv.last(t).md.Get("authorization"); len(got) != 1 || got[0] != "Custom xyz" {
		t.Errorf("authorization without a token = %q", got)
	}
	if got := srv.last(t).md.Get("clusterid"); len(got) != 0 {
		t.Errorf("clusterid without a token = %q, want none (ztunnel sends it only with a token)", got)
	}
	withToken := newClient(t, ca.IstiodConfig{Address: addr, Plaintext: true, Headers: hdr, Token: "tok"})
	if _, err := withToken.Sign(context.Background(), csr, appID, time.Hour); err != nil {
		t.Fatal(err)
	}
	if got := srv.last(t).md.Get("authorization"); len(got) != 1 || got[0] != "Bearer tok" {
		t.Errorf("authorization with a token = %q", got)
	}
}

// forge answers a request the way a confused or hostile CA would: it signs the requested key
// but names otherID, under a root of its own that it also returns as the root bundle.
func forge(t testing.TB, root *servingCA, req *pb.IstioCertificateRequest) []string {
	t.Helper()
	p, _ := pem.Decode([]byte(req.Csr))
	csr, err := x509.ParseCertificateRequest(p.Bytes)
	if err != nil {
		t.Error(err)
		return nil
	}
	u, _ := url.Parse(otherID.String())
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(time.Now().UnixNano()),
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		URIs:         []*url.URL{u},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, root.cert, csr.PublicKey, root.key)
	if err != nil {
		t.Error(err)
		return nil
	}
	return []string{string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})), root.pem}
}

func TestIstiodRejectsBadResponses(t *testing.T) {
	srv := newCAServer(t)
	addr, _ := serve(t, srv, "127.60.0.4:0", nil)
	shared := newClient(t, ca.IstiodConfig{Address: addr, Plaintext: true})
	dedicated := newClient(t, ca.IstiodConfig{Address: addr, Plaintext: true, Dedicated: true})
	csr := newCSR(t, appID)
	forger := newServingCA(t)
	const forged = "forged"

	tests := []struct {
		name    string
		client  *ca.Istiod
		chain   []string // nil: the CA's good answer; forged: signed for otherID
		wantErr error
		want    string
	}{
		{"empty chain", shared, []string{}, ca.ErrEmptyResponse, ""},
		{"other identity", shared, []string{forged}, ca.ErrIdentityMismatch, "leaf is for " + otherID.String() + ", requested " + appID.String()},
		{"leaf only", shared, nil, nil, "no root bundle"},
		{"garbage leaf", shared, []string{"nope", "nope"}, nil, "response leaf"},
		// Dedicated mode leaves the identity check to the manager, as ztunnel does.
		{"other identity dedicated", dedicated, []string{forged}, nil, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			srv.setRespond(func(req *pb.IstioCertificateRequest, good []string) ([]string, error) {
				switch {
				case tt.name == "leaf only":
					return good[:1], nil
				case len(tt.chain) == 1 && tt.chain[0] == forged:
					return forge(t, forger, req), nil
				}
				return tt.chain, nil
			})
			chain, err := tt.client.Sign(context.Background(), csr, appID, time.Hour)
			if tt.wantErr == nil && tt.want == "" {
				if err != nil || len(chain) != 2 {
					t.Fatalf("Sign = %d elements, %v", len(chain), err)
				}
				return
			}
			if err == nil || (tt.wantErr != nil && !errors.Is(err, tt.wantErr)) || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("Sign error = %v, want %v containing %q", err, tt.wantErr, tt.want)
			}
			if !strings.HasPrefix(err.Error(), "istiod CreateCertificate at "+addr+": ") {
				t.Errorf("error does not name the operation: %v", err)
			}
		})
	}

	// Through the manager both modes refuse the forged certificate.
	srv.setRespond(func(req *pb.IstioCertificateRequest, _ []string) ([]string, error) { return forge(t, forger, req), nil })
	for name, client := range map[string]*ca.Istiod{"shared": shared, "dedicated": dedicated} {
		m := newManager(t, client, managerOpts{})
		_, err := m.Get(context.Background(), appID)
		if err == nil || !strings.Contains(err.Error(), "is for "+otherID.String()) {
			t.Errorf("%s: manager accepted a certificate for another identity: %v", name, err)
		}
		if name == "shared" && !errors.Is(err, ca.ErrIdentityMismatch) {
			t.Errorf("shared: manager error does not wrap ErrIdentityMismatch: %v", err)
		}
	}
	// A CA error arrives as the gRPC status.
	srv.setRespond(func(*pb.IstioCertificateRequest, []string) ([]string, error) {
		return nil, status.Error(codes.Unauthenticated, "request authenticate failure")
	})
	_, err := shared.Sign(context.Background(), csr, appID, time.Hour)
	if status.Code(err) != codes.Unauthenticated {
		t.Errorf("Sign = %v, want the Unauthenticated status", err)
	}
}

func TestIstiodRenewAtHalfLife(t *testing.T) {
	clock := &fakeClock{t: time.Date(2026, 6, 1, 8, 0, 0, 0, time.UTC)}
	wait := newFakeWait()
	srv := newCAServer(t, ca.WithClock(clock.Now))
	addr, _ := serve(t, srv, "127.60.0.5:0", nil)
	client := newClient(t, ca.IstiodConfig{Address: addr, Plaintext: true})
	m := newManager(t, client, managerOpts{clock: clock, wait: wait})
	t0 := clock.Now()

	c1, err := m.Get(context.Background(), appID)
	if err != nil {
		t.Fatal(err)
	}
	half := c1.NotBefore.Add(c1.NotAfter.Sub(c1.NotBefore) / 2)
	if d := wait.next(t); d != half.Sub(t0) {
		t.Fatalf("renewal scheduled in %v, want %v (half-life)", d, half.Sub(t0))
	}
	clock.Set(half)
	wait.fire(t)
	wait.next(t) // published once the next wait starts
	c2, err := m.Get(context.Background(), appID)
	if err != nil {
		t.Fatal(err)
	}
	if c2 == c1 || c2.TLS.Leaf.SerialNumber.Cmp(c1.TLS.Leaf.SerialNumber) == 0 || !c2.NotBefore.After(c1.NotBefore) {
		t.Fatal("certificate was not renewed")
	}
	if n := srv.calls.Load(); n != 2 {
		t.Errorf("CA called %d times, want 2", n)
	}
}

func TestIstiodOutageKeepsCertificateAndRetries(t *testing.T) {
	clock := &fakeClock{t: time.Date(2026, 6, 1, 8, 0, 0, 0, time.UTC)}
	wait := newFakeWait()
	srv := newCAServer(t, ca.WithClock(clock.Now))
	addr, grpcSrv := serve(t, srv, "127.60.0.6:0", nil)
	client := newClient(t, ca.IstiodConfig{Address: addr, Plaintext: true, ConnectTimeout: 2 * time.Second})
	m := newManager(t, client, managerOpts{clock: clock, wait: wait})

	c1, err := m.Get(context.Background(), appID)
	if err != nil {
		t.Fatal(err)
	}
	wait.next(t)

	grpcSrv.Stop() // istiod goes away: its connections and listener close
	clock.Set(c1.RefreshAt())
	for i, base := range []time.Duration{time.Second, 2 * time.Second, 4 * time.Second} {
		wait.fire(t)
		d := wait.next(t)
		if lo, hi := time.Duration(float64(base)*0.8), time.Duration(float64(base)*1.2); d < lo || d > hi {
			t.Fatalf("retry %d after %v, want within [%v, %v]", i+1, d, lo, hi)
		}
		if c, err := m.Get(context.Background(), appID); err != nil || c != c1 {
			t.Fatalf("retry %d: Get = %v; want the old certificate", i+1, err)
		}
	}
	st := m.Snapshot()
	if len(st) != 1 || st[0].State != certs.StateAvailable || !strings.Contains(st[0].LastError, "Unavailable") {
		t.Fatalf("snapshot during the outage: %+v", st)
	}

	// The certificate expires while istiod is still down.
	clock.Set(c1.NotAfter)
	if _, err := m.Get(context.Background(), appID); err == nil || !strings.Contains(err.Error(), "expired") {
		t.Fatalf("Get after expiry: %v", err)
	}

	// istiod returns on the same address: the next retry reaches it.
	serve(t, srv, addr, nil)
	calls := srv.calls.Load()
	wait.fire(t)
	wait.next(t)
	c2, err := m.Get(context.Background(), appID)
	if err != nil || c2 == c1 {
		t.Fatalf("Get after recovery: %v", err)
	}
	if srv.calls.Load() != calls+1 {
		t.Errorf("recovery took %d calls, want 1", srv.calls.Load()-calls)
	}
}

// TestIstiodRootRotation: the CA starts signing under a new root, first announcing both roots
// in the bundle, then only the new one; the manager trusts what the last response says.
func TestIstiodRootRotation(t *testing.T) {
	clock := &fakeClock{t: time.Date(2026, 6, 1, 8, 0, 0, 0, time.UTC)}
	wait := newFakeWait()
	srv := newCAServer(t, ca.WithClock(clock.Now))
	oldCA := srv.signer
	newCA, err := ca.NewEphemeral("cluster.local", ca.WithClock(clock.Now))
	if err != nil {
		t.Fatal(err)
	}
	addr, _ := serve(t, srv, "127.60.0.7:0", nil)
	client := newClient(t, ca.IstiodConfig{Address: addr, Plaintext: true})
	m := newManager(t, client, managerOpts{clock: clock, wait: wait})

	c1, err := m.Get(context.Background(), appID)
	if err != nil {
		t.Fatal(err)
	}
	wait.next(t)

	renew := func(c *certs.Certificate) *certs.Certificate {
		t.Helper()
		clock.Set(c.RefreshAt())
		wait.fire(t)
		wait.next(t)
		n, err := m.Get(context.Background(), appID)
		if err != nil || n == c {
			t.Fatalf("renewal: %v", err)
		}
		return n
	}
	has := func(c *certs.Certificate, root *x509.Certificate) bool {
		for _, r := range c.RootCerts {
			if r.Equal(root) {
				return true
			}
		}
		return false
	}

	// Phase 1: signed by the new root, the bundle carries both (as istiod does during a
	// root rotation), one string holding several PEM roots.
	srv.setSigner(newCA)
	srv.setRespond(func(_ *pb.IstioCertificateRequest, chain []string) ([]string, error) {
		out := append([]string(nil), chain...)
		out[len(out)-1] = newCA.RootsPEM() + oldCA.RootsPEM()
		return out, nil
	})
	c2 := renew(c1)
	if len(c2.RootCerts) != 2 || !has(c2, newCA.Certificate()) || !has(c2, oldCA.Certificate()) {
		t.Fatalf("after rotation the roots are %d certificates, want old and new", len(c2.RootCerts))
	}
	// Peers still holding old-root certificates verify against the new bundle.
	if _, err := c1.TLS.Leaf.Verify(x509.VerifyOptions{Roots: c2.Roots, CurrentTime: clock.Now()}); err != nil {
		t.Errorf("an old-root peer does not verify against the rotated bundle: %v", err)
	}

	// Phase 2: the old root is retired.
	srv.setRespond(nil)
	c3 := renew(c2)
	if len(c3.RootCerts) != 1 || !has(c3, newCA.Certificate()) {
		t.Fatal("after retirement the roots are not only the new root")
	}
	if _, err := c1.TLS.Leaf.Verify(x509.VerifyOptions{Roots: c3.Roots, CurrentTime: clock.Now()}); err == nil {
		t.Error("a certificate of the retired root still verifies")
	}
}

// servingCA makes the certificates istiod serves its gRPC port with.
type servingCA struct {
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
	pem  string
}

func newServingCA(t testing.TB) *servingCA {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{Organization: []string{"cluster.local"}},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(24 * time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, _ := x509.ParseCertificate(der)
	return &servingCA{cert: cert, key: key, pem: string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}))}
}

// serverCert issues a serving certificate for dnsNames and ips.
func (s *servingCA) serverCert(t testing.TB, dnsNames []string, ips ...string) tls.Certificate {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(time.Now().UnixNano()),
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		DNSNames:     dnsNames,
	}
	for _, ip := range ips {
		tmpl.IPAddresses = append(tmpl.IPAddresses, net.ParseIP(ip))
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, s.cert, &key.PublicKey, s.key)
	if err != nil {
		t.Fatal(err)
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
}

// tlsServer serves with whatever certificate *cur holds at each handshake and counts
// handshakes.
func tlsServer(cur *atomic.Pointer[tls.Certificate], handshakes *atomic.Int32) *tls.Config {
	return &tls.Config{
		MinVersion: tls.VersionTLS13,
		GetCertificate: func(*tls.ClientHelloInfo) (*tls.Certificate, error) {
			handshakes.Add(1)
			return cur.Load(), nil
		},
	}
}

func TestIstiodTLS(t *testing.T) {
	const ip = "127.60.0.8"
	const istiodName = "istiod.istio-system.svc"
	srv := newCAServer(t)
	servingRoot := newServingCA(t)
	var cur atomic.Pointer[tls.Certificate]
	var handshakes atomic.Int32
	cert := servingRoot.serverCert(t, []string{istiodName}, ip)
	cur.Store(&cert)
	addr, _ := serve(t, srv, ip+":0", tlsServer(&cur, &handshakes))
	dir := t.TempDir()
	rootFile := filepath.Join(dir, "root-cert.pem")
	writeFile(t, rootFile, servingRoot.pem)
	csr := newCSR(t, appID)

	sign := func(cfg ca.IstiodConfig) error {
		t.Helper()
		c := newClient(t, cfg)
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		_, err := c.Sign(ctx, csr, appID, time.Hour)
		return err
	}
	if err := sign(ca.IstiodConfig{Address: "https://" + addr, RootCA: rootFile}); err != nil {
		t.Fatalf("root file: %v", err)
	}
	if err := sign(ca.IstiodConfig{Address: addr, RootCA: servingRoot.pem}); err != nil {
		t.Fatalf("literal PEM root: %v", err)
	}

	wrongRoot := newServingCA(t)
	wrongFile := filepath.Join(dir, "wrong.pem")
	writeFile(t, wrongFile, wrongRoot.pem)
	calls := srv.calls.Load()
	if err := sign(ca.IstiodConfig{Address: addr, RootCA: wrongFile, ConnectTimeout: 2 * time.Second}); err == nil ||
		!strings.Contains(err.Error(), "unknown authority") {
		t.Fatalf("a CA under a wrong root was accepted: %v", err)
	}
	if _, err := x509.SystemCertPool(); err == nil {
		if err := sign(ca.IstiodConfig{Address: addr, RootCA: ca.SystemRoots, ConnectTimeout: 2 * time.Second}); err == nil {
			t.Fatal("the system roots accepted a private istiod root")
		}
	}
	if srv.calls.Load() != calls {
		t.Fatal("a call reached an unverified CA")
	}

	// A serving certificate with only istiod's DNS name: dialled by IP it needs the
	// alternate name, and still refuses a name it does not hold.
	dnsOnly := servingRoot.serverCert(t, []string{istiodName})
	cur.Store(&dnsOnly)
	if err := sign(ca.IstiodConfig{Address: addr, RootCA: rootFile, ConnectTimeout: 2 * time.Second}); err == nil ||
		!strings.Contains(err.Error(), "verify ca server certificate: x509: cannot validate certificate for "+ip) {
		t.Fatalf("a certificate without the dialled IP was accepted: %v", err)
	}
	if err := sign(ca.IstiodConfig{Address: addr, RootCA: rootFile, AltHostname: istiodName}); err != nil {
		t.Fatalf("alternate hostname: %v", err)
	}
	if err := sign(ca.IstiodConfig{Address: addr, RootCA: rootFile, AltHostname: "other.svc", ConnectTimeout: 2 * time.Second}); err == nil {
		t.Fatal("a wrong alternate hostname was accepted")
	}
}

// TestIstiodRootFileRotation: istiod moves to a serving certificate under a new root and the
// root file is rewritten; the client reconnects with the new roots without a restart.
func TestIstiodRootFileRotation(t *testing.T) {
	const ip = "127.60.0.9"
	srv := newCAServer(t)
	root1, root2 := newServingCA(t), newServingCA(t)
	var cur atomic.Pointer[tls.Certificate]
	var handshakes atomic.Int32
	cert1 := root1.serverCert(t, nil, ip)
	cur.Store(&cert1)
	addr, _ := serve(t, srv, ip+":0", tlsServer(&cur, &handshakes))
	rootFile := filepath.Join(t.TempDir(), "root-cert.pem")
	writeFile(t, rootFile, root1.pem)
	client := newClient(t, ca.IstiodConfig{Address: addr, RootCA: rootFile, ConnectTimeout: 2 * time.Second})
	csr := newCSR(t, appID)
	sign := func() error {
		t.Helper()
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		_, err := client.Sign(ctx, csr, appID, time.Hour)
		return err
	}

	if err := sign(); err != nil {
		t.Fatal(err)
	}
	if err := sign(); err != nil {
		t.Fatal(err)
	}
	if n := handshakes.Load(); n != 1 {
		t.Fatalf("%d handshakes for two calls, want one reused connection", n)
	}

	// istiod rotates its serving certificate; the established connection stays valid.
	cert2 := root2.serverCert(t, nil, ip)
	cur.Store(&cert2)
	if err := sign(); err != nil {
		t.Fatalf("established connection after istiod's rotation: %v", err)
	}
	// A root file that cannot be parsed keeps the current connection.
	writeFile(t, rootFile, "not a certificate")
	if err := sign(); err != nil {
		t.Fatalf("unparsable root file: %v", err)
	}
	if n := handshakes.Load(); n != 1 {
		t.Fatalf("%d handshakes, want the connection kept", n)
	}

	// The new root is written (both roots, as during a rotation): the next call reconnects.
	writeFile(t, rootFile, root2.pem+root1.pem)
	if err := sign(); err != nil {
		t.Fatalf("after the root file changed: %v", err)
	}
	if n := handshakes.Load(); n != 2 {
		t.Fatalf("%d handshakes, want a new connection after the root file changed", n)
	}
	// Only the old root again: a new connection verifies against it and refuses istiod.
	writeFile(t, rootFile, root1.pem)
	if err := sign(); err == nil || !strings.Contains(err.Error(), "unknown authority") {
		t.Fatalf("a root file without istiod's root still verified: %v", err)
	}
}

func TestIstiodDeadlineAndClose(t *testing.T) {
	srv := newCAServer(t)
	block := make(chan struct{})
	srv.setRespond(func(*pb.IstioCertificateRequest, []string) ([]string, error) {
		<-block
		return nil, status.Error(codes.Unavailable, "stopped")
	})
	addr, _ := serve(t, srv, "127.60.0.10:0", nil)
	defer close(block)
	client, err := ca.NewIstiod(ca.IstiodConfig{Address: addr, Plaintext: true})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	if _, err := client.Sign(ctx, newCSR(t, appID), appID, time.Hour); status.Code(err) != codes.DeadlineExceeded {
		t.Fatalf("Sign past its deadline = %v", err)
	}
	if err := client.Close(); err != nil {
		t.Fatal(err)
	}
	if err := client.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	if _, err := client.Sign(context.Background(), newCSR(t, appID), appID, time.Hour); !errors.Is(err, ca.ErrClosed) {
		t.Fatalf("Sign after Close = %v", err)
	}
}

func TestIstiodUnreachableFailsWithinConnectTimeout(t *testing.T) {
	// Nothing listens here: the call fails with the connection error, not after gRPC's backoff
	// or the caller's whole deadline.
	lis, err := net.Listen("tcp", "127.60.0.11:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := lis.Addr().String()
	lis.Close()
	client := newClient(t, ca.IstiodConfig{Address: addr, Plaintext: true})
	for i := range 3 {
		start := time.Now()
		_, err := client.Sign(context.Background(), newCSR(t, appID), appID, time.Hour)
		if status.Code(err) != codes.Unavailable || !strings.Contains(err.Error(), "connection refused") {
			t.Fatalf("attempt %d: %v", i, err)
		}
		if d := time.Since(start); d > 3*time.Second {
			t.Fatalf("attempt %d took %v", i, d)
		}
	}
}

func TestNewIstiodValidation(t *testing.T) {
	servingRoot := newServingCA(t)
	dir := t.TempDir()
	rootFile := filepath.Join(dir, "root.pem")
	writeFile(t, rootFile, servingRoot.pem)
	badFile := filepath.Join(dir, "bad.pem")
	writeFile(t, badFile, "junk")
	ok := ca.IstiodConfig{Address: "istiod.istio-system.svc:15012", RootCA: rootFile}
	tests := []struct {
		name string
		edit func(*ca.IstiodConfig)
		want string
	}{
		{"ok", func(*ca.IstiodConfig) {}, ""},
		{"ok https no port", func(c *ca.IstiodConfig) { c.Address = "https://istiod.istio-system.svc" }, ""},
		{"ok ipv6", func(c *ca.IstiodConfig) { c.Address = "https://[::1]:15012" }, ""},
		{"ok literal pem", func(c *ca.IstiodConfig) { c.RootCA = servingRoot.pem }, ""},
		{"ok system", func(c *ca.IstiodConfig) { c.RootCA = ca.SystemRoots }, ""},
		{"empty address", func(c *ca.IstiodConfig) { c.Address = "" }, "empty CA address"},
		{"http without plaintext", func(c *ca.IstiodConfig) { c.Address = "http://istiod:15010" }, "http is allowed only with Plaintext"},
		{"bad scheme", func(c *ca.IstiodConfig) { c.Address = "unix:///x" }, "unsupported scheme"},
		{"path", func(c *ca.IstiodConfig) { c.Address = "https://istiod:15012/x" }, "want [scheme://]host[:port]"},
		{"bad port", func(c *ca.IstiodConfig) { c.Address = "istiod:0" }, "bad port"},
		{"no root", func(c *ca.IstiodConfig) { c.RootCA = "" }, "no CA root"},
		{"missing root file", func(c *ca.IstiodConfig) { c.RootCA = filepath.Join(dir, "nope.pem") }, "neither an existing file"},
		{"unparsable root file", func(c *ca.IstiodConfig) { c.RootCA = badFile }, badFile},
		{"two tokens", func(c *ca.IstiodConfig) { c.Token, c.TokenFile = "a", "b" }, "both TokenFile and Token"},
		{"token newline", func(c *ca.IstiodConfig) { c.Token = "a\nb" }, "printable ASCII"},
		{"header name", func(c *ca.IstiodConfig) { c.Headers = map[string]string{"a b": "x"} }, "name may hold only"},
		{"reserved header", func(c *ca.IstiodConfig) { c.Headers = map[string]string{"grpc-timeout": "1"} }, "reserved"},
		{"binary header", func(c *ca.IstiodConfig) { c.Headers = map[string]string{"x-bin": "1"} }, "-bin"},
		{"header value", func(c *ca.IstiodConfig) { c.Headers = map[string]string{"x": "\x01"} }, "printable ASCII"},
		{"header twice", func(c *ca.IstiodConfig) { c.Headers = map[string]string{"X-A": "1", "x-a": "2"} }, "given twice"},
		{"non-ASCII header name", func(c *ca.IstiodConfig) { c.Headers = map[string]string{"\u212a": "1"} }, "name may hold only"},
		{"negative timeout", func(c *ca.IstiodConfig) { c.ConnectTimeout = -1 }, "negative ConnectTimeout"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg := ok
			tt.edit(&cfg)
			if cfg.RootCA == ca.SystemRoots {
				if _, err := x509.SystemCertPool(); err != nil {
					t.Skipf("no system trust store here: %v", err)
				}
			}
			c, err := ca.NewIstiod(cfg)
			if tt.want == "" {
				if err != nil {
					t.Fatal(err)
				}
				if err := c.Close(); err != nil {
					t.Fatal(err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("NewIstiod = %v, want an error containing %q", err, tt.want)
			}
		})
	}
}
