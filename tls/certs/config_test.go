package certs

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"io"
	"net"
	"net/netip"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/ztgo/ztgo/tls/ca"
	"github.com/ztgo/ztgo/tls/spiffe"
)

// addrConn gives a net.Pipe end the addresses of a real socket, so the server can pick its
// certificate by local IP.
type addrConn struct {
	net.Conn
	local, remote net.Addr
}

func (c addrConn) LocalAddr() net.Addr  { return c.local }
func (c addrConn) RemoteAddr() net.Addr { return c.remote }

type result struct {
	client, server       tls.ConnectionState
	clientErr, serverErr error
}

// handshake runs a full TLS handshake between the configs over net.Pipe, the server seeing
// local as its address. After a successful handshake the server writes "ok", so a client whose
// certificate the server rejects after the client's own handshake finished (TLS 1.3 sends the
// client certificate last) sees the server's alert as clientErr.
func handshake(t testing.TB, clientCfg, serverCfg *tls.Config, local netip.Addr) result {
	t.Helper()
	cp, sp := net.Pipe()
	deadline := time.Now().Add(10 * time.Second)
	cp.SetDeadline(deadline)
	sp.SetDeadline(deadline)
	srv := tls.Server(addrConn{
		Conn:   sp,
		local:  net.TCPAddrFromAddrPort(netip.AddrPortFrom(local, 15008)),
		remote: net.TCPAddrFromAddrPort(netip.MustParseAddrPort("10.9.9.9:40000")),
	}, serverCfg)
	cli := tls.Client(cp, clientCfg)

	var r result
	done := make(chan struct{})
	go func() {
		defer close(done)
		defer sp.Close()
		if r.serverErr = srv.Handshake(); r.serverErr != nil {
			return
		}
		r.server = srv.ConnectionState()
		_, r.serverErr = srv.Write([]byte("ok"))
	}()
	func() {
		defer cp.Close()
		if r.clientErr = cli.Handshake(); r.clientErr != nil {
			return
		}
		r.client = cli.ConnectionState()
		buf := make([]byte, 2)
		if _, err := io.ReadFull(cli, buf); err != nil {
			r.clientErr = fmt.Errorf("after handshake: %w", err)
		}
	}()
	<-done
	return r
}

// mesh is one CA with a manager and the workloads of one node.
type mesh struct {
	*testManager
	byIP map[netip.Addr]spiffe.ID
}

func newMesh(t testing.TB, td string) *mesh {
	return &mesh{testManager: newTestManager(t, td, false), byIP: map[netip.Addr]spiffe.ID{}}
}

func (m *mesh) certFor(local netip.Addr) (spiffe.ID, error) {
	id, ok := m.byIP[local]
	if !ok {
		return spiffe.ID{}, fmt.Errorf("no local workload with IP %s", local)
	}
	return id, nil
}

func (m *mesh) client(t testing.TB, src spiffe.ID, expected ...spiffe.ID) *tls.Config {
	t.Helper()
	sans := make([]string, len(expected))
	for i, e := range expected {
		sans[i] = e.String()
	}
	cfg, err := m.ClientConfig(context.Background(), src, sans)
	if err != nil {
		t.Fatal(err)
	}
	return cfg
}

func TestHandshake(t *testing.T) {
	var (
		srcID   = mustID(t, "spiffe://cluster.local/ns/default/sa/client")
		webID   = mustID(t, "spiffe://cluster.local/ns/default/sa/web")
		dbID    = mustID(t, "spiffe://cluster.local/ns/data/sa/db")
		webIP   = netip.MustParseAddr("10.0.0.1")
		dbIP    = netip.MustParseAddr("10.0.0.2")
		otherID = mustID(t, "spiffe://other.local/ns/default/sa/client")
	)
	m := newMesh(t, "cluster.local")
	m.byIP[webIP] = webID
	m.byIP[dbIP] = dbID
	server := m.ServerConfig(m.certFor)

	// A second mesh with its own CA and trust domain.
	foreign := newMesh(t, "other.local")
	// A CA not bound to a trust domain, issuing both cluster.local and other.local under one
	// root: the only thing that can reject its other.local client is the trust-domain check.
	shared, err := ca.LoadOrCreate(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	sharedM, err := New(Config{Signer: shared})
	if err != nil {
		t.Fatal(err)
	}
	if err := sharedM.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(sharedM.Stop)
	sharedMesh := &mesh{testManager: &testManager{Manager: sharedM}, byIP: map[netip.Addr]spiffe.ID{webIP: webID}}

	noVerify := func(cfg *tls.Config) *tls.Config {
		cfg = cfg.Clone()
		cfg.VerifyConnection = nil // a client that does not check the server, to reach the server's checks
		return cfg
	}
	tests := []struct {
		name       string
		client     *tls.Config
		server     *tls.Config
		local      netip.Addr
		wantPeer   spiffe.ID // identity the client sees
		clientErr  string    // substring; "" means success
		serverErr  string
		anyFailure bool // only that the handshake fails on both sides
	}{
		{name: "matching SAN", client: m.client(t, srcID, webID), server: server, local: webIP, wantPeer: webID},
		{name: "one of several expected SANs", client: m.client(t, srcID, dbID, webID), server: server, local: webIP, wantPeer: webID},
		{name: "certificate chosen by local IP", client: m.client(t, srcID, dbID), server: server, local: dbIP, wantPeer: dbID},
		{
			name: "non-matching expected SAN", client: m.client(t, srcID, dbID), server: server, local: webIP,
			clientErr: "verify server identity: peer is [" + webID.String() + "], expected one of [" + dbID.String() + "]",
			serverErr: "bad certificate",
		},
		{
			name: "unknown local IP", client: m.client(t, srcID, webID), server: server, local: netip.MustParseAddr("10.0.0.9"),
			serverErr: "no local workload with IP 10.0.0.9", clientErr: "internal error",
		},
		{
			name: "client from another trust domain, same root", client: sharedMesh.client(t, otherID, webID),
			server: sharedM.ServerConfig(sharedMesh.certFor), local: webIP,
			serverErr: `verify client trust domain: client is [` + otherID.String() + `], want trust domain "cluster.local"`,
			clientErr: "bad certificate",
		},
		{
			name: "client from another CA", client: foreign.client(t, otherID, webID), server: server, local: webIP,
			clientErr: "certificate signed by unknown authority", anyFailure: true,
		},
		{
			name: "client from another CA not checking the server", client: noVerify(foreign.client(t, otherID, webID)),
			server: server, local: webIP,
			serverErr: "verify client certificate: x509: certificate signed by unknown authority",
		},
		{
			name:   "client without certificate",
			client: &tls.Config{InsecureSkipVerify: true, MinVersion: tls.VersionTLS13, NextProtos: []string{"h2"}},
			server: server, local: webIP,
			serverErr: "client didn't provide a certificate",
		},
		{
			name:   "TLS 1.2 client",
			client: &tls.Config{InsecureSkipVerify: true, MaxVersion: tls.VersionTLS12, NextProtos: []string{"h2"}},
			server: server, local: webIP,
			serverErr: "client offered only unsupported versions",
		},
		{
			name: "client without h2", client: func() *tls.Config {
				c := m.client(t, srcID, webID)
				c.NextProtos = []string{"http/1.1"}
				return c
			}(), server: server, local: webIP,
			serverErr: "client offered application protocols [http/1.1], want h2", anyFailure: true,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := handshake(t, tt.client, tt.server, tt.local)
			if tt.clientErr == "" && tt.serverErr == "" {
				if r.clientErr != nil || r.serverErr != nil {
					t.Fatalf("client error %v, server error %v", r.clientErr, r.serverErr)
				}
				checkState(t, r, tt.wantPeer, srcID)
				return
			}
			if tt.anyFailure && (r.clientErr == nil || r.serverErr == nil) {
				t.Errorf("want both sides to fail: client %v, server %v", r.clientErr, r.serverErr)
			}
			for _, c := range []struct {
				side string
				err  error
				want string
			}{{"client", r.clientErr, tt.clientErr}, {"server", r.serverErr, tt.serverErr}} {
				if c.want == "" {
					continue
				}
				if c.err == nil || !strings.Contains(c.err.Error(), c.want) {
					t.Errorf("%s error = %v, want containing %q", c.side, c.err, c.want)
				}
			}
		})
	}
}

// TestNoResumption: even a client that caches sessions gets a full handshake every time,
// because the server issues no tickets.
func TestNoResumption(t *testing.T) {
	m := newMesh(t, "cluster.local")
	src := mustID(t, "spiffe://cluster.local/ns/default/sa/client")
	dst := mustID(t, "spiffe://cluster.local/ns/default/sa/web")
	ip := netip.MustParseAddr("10.0.0.1")
	m.byIP[ip] = dst
	server := m.ServerConfig(m.certFor)
	client := m.client(t, src, dst)
	if client.ClientSessionCache != nil || !client.SessionTicketsDisabled || client.ServerName != "" {
		t.Fatal("client config allows resumption or sets SNI")
	}
	caching := client.Clone()
	caching.SessionTicketsDisabled = false
	caching.ClientSessionCache = tls.NewLRUClientSessionCache(4)
	for i := range 2 {
		r := handshake(t, caching, server, ip)
		if r.clientErr != nil || r.serverErr != nil {
			t.Fatal(r.clientErr, r.serverErr)
		}
		if r.client.DidResume || r.server.DidResume {
			t.Fatalf("handshake %d resumed a session", i)
		}
	}
}

func checkState(t *testing.T, r result, wantServer, wantClient spiffe.ID) {
	t.Helper()
	for _, s := range []struct {
		side string
		cs   tls.ConnectionState
		peer spiffe.ID
	}{{"client", r.client, wantServer}, {"server", r.server, wantClient}} {
		if s.cs.Version != tls.VersionTLS13 {
			t.Errorf("%s: version %x, want TLS 1.3", s.side, s.cs.Version)
		}
		if s.cs.NegotiatedProtocol != "h2" {
			t.Errorf("%s: ALPN %q, want h2", s.side, s.cs.NegotiatedProtocol)
		}
		if s.cs.CurveID != tls.X25519MLKEM768 {
			t.Errorf("%s: key exchange %v, want X25519MLKEM768", s.side, s.cs.CurveID)
		}
		if s.cs.DidResume {
			t.Errorf("%s: session resumed", s.side)
		}
		if got, err := PeerIdentity(s.cs); err != nil || got != s.peer {
			t.Errorf("%s: PeerIdentity = %v, %v; want %v", s.side, got, err, s.peer)
		}
	}
	if r.server.ServerName != "" {
		t.Errorf("client sent SNI %q", r.server.ServerName)
	}
}

// TestHandshakeLoopbackTCP checks certificate selection by the real local address of accepted
// sockets: one listener on 127.0.0.1 and one on 127.0.0.2, one shared server config.
func TestHandshakeLoopbackTCP(t *testing.T) {
	m := newMesh(t, "cluster.local")
	src := mustID(t, "spiffe://cluster.local/ns/default/sa/client")
	ids := map[string]spiffe.ID{
		"127.0.0.1": mustID(t, "spiffe://cluster.local/ns/a/sa/one"),
		"127.0.0.2": mustID(t, "spiffe://cluster.local/ns/b/sa/two"),
	}
	for ip, id := range ids {
		m.byIP[netip.MustParseAddr(ip)] = id
	}
	server := m.ServerConfig(m.certFor)
	for ip, id := range ids {
		t.Run(ip, func(t *testing.T) {
			ln, err := net.Listen("tcp", ip+":0")
			if err != nil {
				t.Skipf("cannot listen on %s: %v", ip, err)
			}
			defer ln.Close()
			errc := make(chan error, 1)
			go func() {
				c, err := ln.Accept()
				if err != nil {
					errc <- err
					return
				}
				defer c.Close()
				s := tls.Server(c, server)
				s.SetDeadline(time.Now().Add(10 * time.Second))
				if err := s.Handshake(); err != nil {
					errc <- err
					return
				}
				got, err := PeerIdentity(s.ConnectionState())
				if err == nil && got != src {
					err = fmt.Errorf("server saw client %v", got)
				}
				if err == nil {
					_, err = s.Write([]byte("ok"))
				}
				errc <- err
			}()
			raw, err := net.DialTimeout("tcp", ln.Addr().String(), 5*time.Second)
			if err != nil {
				t.Fatal(err)
			}
			defer raw.Close()
			c := tls.Client(raw, m.client(t, src, id))
			c.SetDeadline(time.Now().Add(10 * time.Second))
			if err := c.Handshake(); err != nil {
				t.Fatal(err)
			}
			if _, err := io.ReadFull(c, make([]byte, 2)); err != nil {
				t.Fatal(err)
			}
			if got, _ := PeerIdentity(c.ConnectionState()); got != id {
				t.Fatalf("server at %s presented %v, want %v", ip, got, id)
			}
			if err := <-errc; err != nil {
				t.Fatal(err)
			}
		})
	}
}

// TestClientConfigFollowsRenewal: a config built before a renewal presents the new certificate.
func TestClientConfigFollowsRenewal(t *testing.T) {
	tm := newTestManager(t, "cluster.local", true)
	src := mustID(t, "spiffe://cluster.local/ns/default/sa/client")
	dst := mustID(t, "spiffe://cluster.local/ns/default/sa/web")
	dstIP := netip.MustParseAddr("10.0.0.1")
	m := &mesh{testManager: tm, byIP: map[netip.Addr]spiffe.ID{dstIP: dst}}
	server := m.ServerConfig(m.certFor)
	client := m.client(t, src, dst)
	if _, err := tm.Get(context.Background(), dst); err != nil {
		t.Fatal(err)
	}
	// Both renewal goroutines (src, dst) are now waiting.
	tm.wait.next(t)
	tm.wait.next(t)

	r := handshake(t, client, server, dstIP)
	if r.clientErr != nil || r.serverErr != nil {
		t.Fatal(r.clientErr, r.serverErr)
	}
	first := r.server.PeerCertificates[0].SerialNumber

	c, _ := tm.Get(context.Background(), src)
	tm.clock.Set(c.RefreshAt())
	tm.wait.fire(t) // renews whichever identity comes first; fire both
	tm.wait.fire(t)
	tm.wait.next(t)
	tm.wait.next(t)

	r = handshake(t, client, server, dstIP)
	if r.clientErr != nil || r.serverErr != nil {
		t.Fatal(r.clientErr, r.serverErr)
	}
	if r.server.PeerCertificates[0].SerialNumber.Cmp(first) == 0 {
		t.Fatal("client still presents the certificate from before the renewal")
	}
	now, _ := tm.Get(context.Background(), src)
	if r.server.PeerCertificates[0].SerialNumber.Cmp(now.TLS.Leaf.SerialNumber) != 0 {
		t.Fatal("client does not present the current certificate")
	}
}

func TestClientConfigErrors(t *testing.T) {
	m := newMesh(t, "cluster.local")
	src := mustID(t, "spiffe://cluster.local/ns/default/sa/client")
	if _, err := m.ClientConfig(context.Background(), src, nil); err == nil {
		t.Fatal("ClientConfig without expected identities succeeded")
	}
	m.signer.fail.Store(true)
	_, err := m.ClientConfig(context.Background(), mustID(t, "spiffe://cluster.local/ns/x/sa/y"), []string{src.String()})
	if err == nil || !strings.HasPrefix(err.Error(), "client config for ") {
		t.Fatalf("ClientConfig with failing CA: %v", err)
	}
}

func TestPeerIdentity(t *testing.T) {
	uris := func(us ...string) tls.ConnectionState {
		c := &x509.Certificate{}
		for _, u := range us {
			p, err := url.Parse(u)
			if err != nil {
				t.Fatal(err)
			}
			c.URIs = append(c.URIs, p)
		}
		return tls.ConnectionState{PeerCertificates: []*x509.Certificate{c}}
	}
	tests := []struct {
		name string
		cs   tls.ConnectionState
		want string // "" means error
	}{
		{"no certificate", tls.ConnectionState{}, ""},
		{"no URI SAN", uris(), ""},
		{"only non-SPIFFE URIs", uris("https://example.com/x", "spiffe://td/ns/a"), ""},
		{"first parseable wins", uris("https://example.com/x", "spiffe://td/ns/a/sa/b", "spiffe://td/ns/c/sa/d"), "spiffe://td/ns/a/sa/b"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := PeerIdentity(tt.cs)
			if tt.want == "" {
				if err == nil {
					t.Fatalf("got %v, want error", got)
				}
				return
			}
			if err != nil || got.String() != tt.want {
				t.Fatalf("got %v, %v; want %s", got, err, tt.want)
			}
		})
	}
}

func TestLocalIP(t *testing.T) {
	tests := []struct {
		addr net.Addr
		want string
	}{
		{&net.TCPAddr{IP: net.ParseIP("10.1.2.3"), Port: 15008}, "10.1.2.3"},
		{&net.TCPAddr{IP: net.ParseIP("::ffff:10.1.2.3"), Port: 15008}, "10.1.2.3"},
		{&net.TCPAddr{IP: net.ParseIP("fd00::1"), Port: 15008}, "fd00::1"},
		{&net.UnixAddr{Name: "/tmp/x", Net: "unix"}, ""},
	}
	for _, tt := range tests {
		got, err := localIP(addrConn{local: tt.addr})
		if tt.want == "" {
			if err == nil {
				t.Errorf("%v: want error", tt.addr)
			}
			continue
		}
		if err != nil || got.String() != tt.want {
			t.Errorf("%v: got %v, %v; want %s", tt.addr, got, err, tt.want)
		}
	}
	if _, err := localIP(nil); err == nil {
		t.Error("nil conn: want error")
	}
}

func BenchmarkHandshake(b *testing.B) {
	m := newMesh(b, "cluster.local")
	src := mustID(b, "spiffe://cluster.local/ns/default/sa/client")
	dst := mustID(b, "spiffe://cluster.local/ns/default/sa/web")
	ip := netip.MustParseAddr("10.0.0.1")
	m.byIP[ip] = dst
	server := m.ServerConfig(m.certFor)
	client := m.client(b, src, dst)
	b.ReportAllocs()
	for b.Loop() {
		r := handshake(b, client, server, ip)
		if r.clientErr != nil || r.serverErr != nil {
			b.Fatal(r.clientErr, r.serverErr)
		}
	}
}
