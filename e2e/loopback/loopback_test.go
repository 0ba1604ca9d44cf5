// Package loopback runs two ztgo nodes in one process on loopback addresses and checks the
// secure overlay end to end: SOCKS5 -> node-a -> mTLS HBONE -> node-b -> app, and back.
package loopback

import (
	"context"
	"crypto/sha256"
	"crypto/tls"
	"errors"
	"io"
	"net"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/ztgo/ztgo/e2e/meshtest"
	"github.com/ztgo/ztgo/runtime/node"
	"github.com/ztgo/ztgo/stages/hbone"
	"github.com/ztgo/ztgo/tls/ca"
	"github.com/ztgo/ztgo/tls/spiffe"
)

// roundTrip sends data through c and half-closes it, and returns the echo read to EOF.
func roundTrip(t *testing.T, c *net.TCPConn, data []byte) []byte {
	t.Helper()
	got, err := meshtest.RoundTrip(c, data)
	if err != nil {
		t.Fatal(err)
	}
	return got
}

func TestTransferSizesByteExact(t *testing.T) {
	m := newMesh(t, "", nil)
	app := meshtest.StartApp(t, serverIP+":8080", meshtest.Echo)
	sizes := []int{1, 1 << 20, 100 << 20}
	if testing.Short() {
		sizes = sizes[:2]
	}
	for _, size := range sizes {
		c, code, err := m.socks(clientIP, serverIP+":8080")
		if err != nil || code != 0 {
			t.Fatalf("size %d: socks: code %d err %v", size, code, err)
		}
		data := meshtest.RandomBytes(size, uint64(size))
		got := roundTrip(t, c, data)
		c.Close()
		if len(got) != size || sha256.Sum256(got) != sha256.Sum256(data) {
			t.Fatalf("size %d: echo of %d bytes differs", size, len(got))
		}
	}
	// The app saw the client's own address: node-b delivered from 127.20.1.10.
	for _, p := range app.Peers() {
		if p.Addr() != netip.MustParseAddr(clientIP) {
			t.Fatalf("app saw peer %s, want %s", p, clientIP)
		}
	}
}

func TestServiceVIPAndHostname(t *testing.T) {
	m := newMesh(t, "", nil)
	meshtest.StartApp(t, serverIP+":8080", meshtest.Echo)
	for _, target := range []string{echoVIP + ":80", "echo.default.svc.cluster.local:80"} {
		c, code, err := m.socks(clientIP, target)
		if err != nil || code != 0 {
			t.Fatalf("%s: code %d err %v", target, code, err)
		}
		if got := roundTrip(t, c, []byte("ping")); string(got) != "ping" {
			t.Fatalf("%s: got %q", target, got)
		}
		c.Close()
	}
}

func TestHalfClosePreserved(t *testing.T) {
	m := newMesh(t, "", nil)
	// The app reads to EOF and only then answers: the answer must still reach the client, so
	// the client's FIN travelled as END_STREAM and the reverse direction stayed open.
	meshtest.StartApp(t, serverIP+":8080", func(_ *meshtest.App, c *net.TCPConn) {
		in, _ := io.ReadAll(c)
		c.Write(append([]byte("after-eof:"), in...))
		c.CloseWrite()
	})
	c, code, err := m.socks(clientIP, serverIP+":8080")
	if err != nil || code != 0 {
		t.Fatalf("code %d err %v", code, err)
	}
	defer c.Close()
	c.Write([]byte("hello"))
	c.CloseWrite()
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	got, err := io.ReadAll(c)
	if err != nil || string(got) != "after-eof:hello" {
		t.Fatalf("got %q, %v", got, err)
	}
}

func TestConcurrentFlowsSharePooledConnections(t *testing.T) {
	for _, tc := range []struct {
		name       string
		maxStreams uint32
		wantConns  int
	}{
		{"100 streams per connection", 100, 2},
		{"200 streams per connection", 200, 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			m := newMesh(t, "", func(c *node.Config) { c.PoolMaxStreams = tc.maxStreams; c.Workers = 64 })
			// The app holds every flow open until all 200 are established.
			release := make(chan struct{})
			var arrived sync.WaitGroup
			arrived.Add(200)
			meshtest.StartApp(t, serverIP+":8080", func(_ *meshtest.App, c *net.TCPConn) {
				buf := make([]byte, 4)
				io.ReadFull(c, buf)
				arrived.Done()
				<-release
				c.Write(buf)
				c.CloseWrite()
			})
			var wg sync.WaitGroup
			errs := make(chan error, 200)
			for i := 0; i < 200; i++ {
				wg.Add(1)
				go func(i int) {
					defer wg.Done()
					c, code, err := m.socks(clientIP, serverIP+":8080")
					if err != nil || code != 0 {
						errs <- errors.New("socks failed")
						return
					}
					defer c.Close()
					msg := []byte{byte(i), byte(i >> 8), 'x', 'y'}
					c.Write(msg)
					c.SetReadDeadline(time.Now().Add(20 * time.Second))
					got := make([]byte, 4)
					if _, err := io.ReadFull(c, got); err != nil || string(got) != string(msg) {
						errs <- errors.New("echo mismatch")
					}
				}(i)
			}
			waitCh := make(chan struct{})
			go func() { arrived.Wait(); close(waitCh) }()
			select {
			case <-waitCh:
			case <-time.After(20 * time.Second):
				t.Fatal("not all 200 flows reached the app")
			}
			// All 200 are open at once: count the pooled connections carrying them.
			stats := m.a.Pool().Snapshot()
			streams := 0
			for _, s := range stats {
				streams += s.Active
			}
			if len(stats) != tc.wantConns || streams != 200 {
				t.Fatalf("pool has %d connections carrying %d streams, want %d carrying 200", len(stats), streams, tc.wantConns)
			}
			close(release)
			wg.Wait()
			close(errs)
			for err := range errs {
				t.Fatal(err)
			}
		})
	}
}

func TestPolicyDenyDeliversNothing(t *testing.T) {
	m := newMesh(t, "", nil)
	db := meshtest.StartApp(t, dbIP+":5432", meshtest.Sink)
	c, code, err := m.socks(clientIP, dbIP+":5432")
	if err != nil {
		t.Fatal(err)
	}
	if c != nil {
		c.Close()
		t.Fatal("flow to db was allowed; the prod-only policy must deny namespace default")
	}
	if code != 2 {
		t.Fatalf("SOCKS5 reply %d, want 2 (not allowed)", code)
	}
	time.Sleep(100 * time.Millisecond)
	if len(db.Peers()) != 0 || db.Received() != 0 {
		t.Fatalf("db got %d connections and %d bytes", len(db.Peers()), db.Received())
	}
	// node-b answered the CONNECT with 401 and counted a DENY; node-a saw the 401.
	if n := counterWith(t, m.b, "istio_tcp_connections_failed_total", "response_flags", "DENY"); n != 1 {
		t.Fatalf("node-b DENY failures = %v", n)
	}
	if n := counterWith(t, m.a, "istio_tcp_connections_failed_total", "response_flags", "DENY"); n != 1 {
		t.Fatalf("node-a DENY failures = %v", n)
	}
}

func TestPolicyChangeClosesEstablishedFlow(t *testing.T) {
	m := newMesh(t, "", nil)
	meshtest.StartApp(t, serverIP+":8080", meshtest.Echo)
	// Two flows: one from client (to be denied), one from client2 (stays allowed).
	denied, code, err := m.socks(clientIP, serverIP+":8080")
	if err != nil || code != 0 {
		t.Fatalf("code %d err %v", code, err)
	}
	defer denied.Close()
	kept, code, err := m.socks(client2IP, serverIP+":8080")
	if err != nil || code != 0 {
		t.Fatalf("code %d err %v", code, err)
	}
	defer kept.Close()
	for _, c := range []*net.TCPConn{denied, kept} {
		c.Write([]byte("1"))
		buf := make([]byte, 1)
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		if _, err := io.ReadFull(c, buf); err != nil {
			t.Fatal(err)
		}
	}
	m.setConfigB(`- name: deny-client
  namespace: default
  scope: Namespace
  action: Deny
  rules:
  - - - principals: [!Exact cluster.local/ns/default/sa/client]`)
	// The flow that is now denied is closed; the other keeps working.
	denied.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.ReadAll(denied); err != nil {
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			t.Fatal("denied flow was not closed after the policy change")
		}
	}
	kept.Write([]byte("2"))
	buf := make([]byte, 1)
	kept.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.ReadFull(kept, buf); err != nil || buf[0] != '2' {
		t.Fatalf("allowed flow broken by the policy change: %v", err)
	}
	// New flows from client are refused now.
	if c, code, _ := m.socks(clientIP, serverIP+":8080"); c != nil || code != 2 {
		t.Fatalf("new flow after deny: code %d", code)
	}
}

func TestWrongTrustDomainRejected(t *testing.T) {
	m := newMesh(t, "", nil)
	meshtest.StartApp(t, serverIP+":8080", meshtest.Echo)
	want := "spiffe://cluster.local/ns/default/sa/server"
	// Same root, other trust domain: the chain verifies but the trust domain must match.
	other := spiffe.ID{TrustDomain: "other.local", Namespace: "default", ServiceAccount: "client"}
	if err := hboneConnect(t, m.caDir, other, want, serverIP+":15008", serverIP+":8080"); err == nil {
		t.Fatal("a client from another trust domain was accepted")
	}
	// A different CA altogether.
	foreign := t.TempDir()
	if _, err := ca.LoadOrCreate(foreign); err != nil {
		t.Fatal(err)
	}
	good := spiffe.ID{TrustDomain: "cluster.local", Namespace: "default", ServiceAccount: "client"}
	// The client trusts the mesh's root, so only the server's rejection of the foreign client
	// certificate can make this fail.
	if err := hboneConnectVia(t, foreign, m.caDir, good, want, serverIP+":15008", serverIP+":8080"); err == nil {
		t.Fatal("a client with a certificate from a foreign CA was accepted")
	}
	// The control case: the right CA and trust domain work.
	if err := hboneConnect(t, m.caDir, good, want, serverIP+":15008", serverIP+":8080"); err != nil {
		t.Fatalf("valid client refused: %v", err)
	}
}

func TestAuthorityChecks(t *testing.T) {
	m := newMesh(t, "", nil)
	meshtest.StartApp(t, serverIP+":8080", meshtest.Echo)
	good := spiffe.ID{TrustDomain: "cluster.local", Namespace: "default", ServiceAccount: "client"}
	want := "spiffe://cluster.local/ns/default/sa/server"
	for _, tc := range []struct {
		authority string
		status    int
	}{
		{dbIP + ":5432", 400},     // a local workload, but not the one this connection reached
		{"127.20.9.9:8080", 400},  // not a workload at all
		{"not an authority", 400}, // unparsable
		{serverIP + ":15008", 503},
		{serverIP + ":9999", 503}, // nothing listens: upstream connect fails
		{serverIP + ":8080", 200},
	} {
		err := hboneConnect(t, m.caDir, good, want, serverIP+":15008", tc.authority)
		var se *hbone.StatusError
		switch {
		case tc.status == 200 && err != nil:
			t.Errorf("%s: %v", tc.authority, err)
		case tc.status != 200 && (!errors.As(err, &se) || se.Status != tc.status):
			t.Errorf("%s: got %v, want status %d", tc.authority, err, tc.status)
		}
	}
}

// hboneConnect dials addr with mTLS as id (certificate from the CA in caDir), expects the
// server to be wantPeer, and CONNECTs to authority, echoing one message when it succeeds.
func hboneConnect(t *testing.T, caDir string, id spiffe.ID, wantPeer, addr, authority string) error {
	t.Helper()
	return hboneConnectVia(t, caDir, caDir, id, wantPeer, addr, authority)
}

// hboneConnectVia is hboneConnect with the client certificate issued by the CA in certCA while
// the server is verified against the roots of the CA in rootCA.
func hboneConnectVia(t *testing.T, certCA, rootCA string, id spiffe.ID, wantPeer, addr, authority string) error {
	t.Helper()
	signer, err := ca.LoadOrCreate(certCA)
	if err != nil {
		t.Fatal(err)
	}
	trust, err := ca.LoadOrCreate(rootCA)
	if err != nil {
		t.Fatal(err)
	}
	tc, err := tls.Dial("tcp", addr, meshtest.ClientTLS(meshtest.IssueCert(t, signer, id), trust.Roots(), wantPeer))

	if err != nil {
		return err
	}
	conn, err := hbone.NewClientConn(tc, hbone.Config{})
	if err != nil {
		return err
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	s, _, err := conn.OpenStream(ctx, &hbone.Request{Authority: authority})
	if err != nil {
		return err
	}
	defer s.Close()
	s.Write([]byte("x"))
	s.CloseWrite()
	got, err := io.ReadAll(s)
	if err != nil {
		return err
	}
	if string(got) != "x" {
		return errors.New("echo mismatch")
	}
	return nil
}

func TestPassthroughAndPlainWorkload(t *testing.T) {
	m := newMesh(t, "", nil)
	ext := meshtest.StartApp(t, externalIP+":7070", meshtest.Echo)
	plain := meshtest.StartApp(t, plainIP+":9000", meshtest.Echo)
	for _, target := range []string{externalIP + ":7070", plainIP + ":9000"} {
		c, code, err := m.socks(clientIP, target)
		if err != nil || code != 0 {
			t.Fatalf("%s: code %d err %v", target, code, err)
		}
		if got := roundTrip(t, c, []byte("plain")); string(got) != "plain" {
			t.Fatalf("%s: got %q", target, got)
		}
		c.Close()
	}
	// Plain TCP leaves from the source workload's address, as from its pod.
	for _, a := range []*meshtest.App{ext, plain} {
		for _, p := range a.Peers() {
			if p.Addr() != netip.MustParseAddr(clientIP) {
				t.Fatalf("plain destination saw %s", p)
			}
		}
	}
	// No HBONE connection was needed.
	if m.a.Pool().Len() != 0 {
		t.Fatalf("passthrough used %d HBONE connections", m.a.Pool().Len())
	}
}

func TestUnknownSourceRefused(t *testing.T) {
	m := newMesh(t, "", nil)
	meshtest.StartApp(t, serverIP+":8080", meshtest.Echo)
	// 127.20.1.99 is no workload of node-a: it may not send into the mesh.
	c, code, err := m.socks("127.20.1.99", serverIP+":8080")
	if err != nil || c != nil || code != 2 {
		t.Fatalf("unknown source: conn %v code %d err %v", c != nil, code, err)
	}
}

// TestServiceWaypoint: a service with a waypoint is reached through it. node-a sends HBONE to
// the waypoint's node with the original VIP:port as :authority; node-b accepts that authority
// on the waypoint's address (it is the VIP's waypoint) and delivers to the waypoint's own
// address on the service port, where the waypoint proxy (here an echo) listens.
func TestServiceWaypoint(t *testing.T) {
	m := newMesh(t, "", nil)
	server := meshtest.StartApp(t, serverIP+":8080", meshtest.Echo)
	wp := meshtest.StartApp(t, waypointIP+":8081", meshtest.Echo)
	c, code, err := meshtest.SOCKS5(m.a.SOCKS5Addr(), netip.MustParseAddr(clientIP), echoWpVIP+":8081", 10*time.Second)
	if err != nil || code != 0 {
		t.Fatalf("code %d err %v", code, err)
	}
	got, err := meshtest.RoundTrip(c, []byte("via waypoint"))
	c.Close()
	if err != nil || string(got) != "via waypoint" {
		t.Fatalf("got %q %v", got, err)
	}
	if peers := wp.Peers(); len(peers) != 1 || peers[0].Addr().String() != clientIP {
		t.Fatalf("waypoint saw %v, want one flow from %s", peers, clientIP)
	}
	if n := len(server.Peers()); n != 0 {
		t.Fatalf("the service's endpoint was reached directly %d times, bypassing the waypoint", n)
	}
	// node-a's pool holds a connection to the waypoint, expecting its identity.
	stats := m.a.Pool().Snapshot()
	if len(stats) != 1 || stats[0].Key.Dst.String() != waypointIP+":15008" ||
		!strings.Contains(stats[0].Key.DstSANs, "spiffe://cluster.local/ns/default/sa/waypoint") {
		t.Fatalf("pool = %+v", stats)
	}
}

// TestFirstByteObserved: an HBONE flow records the time to the first byte from the server on
// both nodes (outbound on node-a, inbound on node-b).
func TestFirstByteObserved(t *testing.T) {
	m := newMesh(t, "", nil)
	meshtest.StartApp(t, serverIP+":8080", meshtest.Echo)
	c, code, err := meshtest.SOCKS5(m.a.SOCKS5Addr(), netip.MustParseAddr(clientIP), serverIP+":8080", 10*time.Second)
	if err != nil || code != 0 {
		t.Fatalf("code %d err %v", code, err)
	}
	if got, err := meshtest.RoundTrip(c, []byte("ping")); err != nil || string(got) != "ping" {
		t.Fatalf("got %q %v", got, err)
	}
	c.Close()
	for _, tc := range []struct {
		n   *node.Node
		dir string
	}{{m.a, "outbound"}, {m.b, "inbound"}} {
		meshtest.WaitFor(t, 5*time.Second, func() bool {
			return histogramCount(t, tc.n, "ztgo_stage_duration_seconds", map[string]string{"stage": "first_byte", "direction": tc.dir}) == 1
		})
	}
}
