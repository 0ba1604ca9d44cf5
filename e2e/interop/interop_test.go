// Package interop_test checks ztgo's HBONE against Istio's own Go implementation
// (istio.io/istio/pkg/hbone) as the peer, in both directions, with certificates from the CA
// directory the ztgo node uses:
//
//   - Istio's hbone.NewDialer -> ztgo inbound (127.30.1.0/24): echo, 400 for a foreign
//     :authority, 401 for a denied principal, the per-workload server certificate, and client
//     certificates from another CA or trust domain refused in the TLS handshake.
//   - ztgo outbound (SOCKS5) -> Istio's hbone.NewServer over mTLS (127.30.2.0/24): echo with
//     half-close, concurrent streams, the client identity Istio sees, and a server with the
//     wrong identity refused.
//
// Every test also checks that no goroutine of ztgo's packages outlives its stopped nodes.
// The Istio module is imported by these test files only; it never reaches the ztgo binary.
package interop_test

import (
	"crypto/sha256"
	"crypto/tls"
	"fmt"
	"net/netip"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/ztgo/ztgo/e2e/meshtest"
	"github.com/ztgo/ztgo/tls/ca"
)

const (
	istioClientURI = "spiffe://cluster.local/ns/default/sa/istio-client"
	serverURI      = "spiffe://cluster.local/ns/default/sa/server"
	lockedURI      = "spiffe://cluster.local/ns/default/sa/locked"
)

// inboundYAML: node "interop-in" hosts two HBONE workloads. "locked" selects a policy that
// denies Istio's client; "server" has no policy, so everything is allowed there.
const inboundYAML = `
workloads:
- uid: Kubernetes//v1/Pod/default/server
  name: server
  namespace: default
  serviceAccount: server
  workloadIps: ["127.30.1.2"]
  protocol: HBONE
  node: interop-in
- uid: Kubernetes//v1/Pod/default/locked
  name: locked
  namespace: default
  serviceAccount: locked
  workloadIps: ["127.30.1.3"]
  protocol: HBONE
  node: interop-in
  authorizationPolicies: ["default/deny-istio-client"]
policies:
- name: deny-istio-client
  namespace: default
  scope: WorkloadSelector
  action: Deny
  rules:
  - - - principals: [{Exact: cluster.local/ns/default/sa/istio-client}]
`

func TestIstioClientToZtgoInbound(t *testing.T) {
	meshtest.CheckLeaks(t)
	caDir := filepath.Join(t.TempDir(), "ca")
	signer, err := ca.LoadOrCreate(caDir)
	if err != nil {
		t.Fatal(err)
	}
	// The apps start first so that they are closed after the node has stopped.
	serverApp := startEcho(t, "127.30.1.2:8080")
	lockedApp := startEcho(t, "127.30.1.3:8080")
	startNode(t, "interop-in", caDir, inboundYAML)
	waitListening(t, "127.30.1.2:15008")
	waitListening(t, "127.30.1.3:15008")
	meshtest.RequireZtgoGoroutines(t)

	roots := signer.Roots()
	clientCert := meshtest.IssueCert(t, signer, identity(t, istioClientURI))

	t.Run("Echo", func(t *testing.T) {
		c, err := istioDial("127.30.1.2:15008", "127.30.1.2:8080", meshtest.ClientTLS(clientCert, roots, serverURI))
		if err != nil {
			t.Fatalf("istio dial through ztgo: %v", err)
		}
		data, sum := payload(1)
		got := exchange(t, c, data)
		if gs := sha256.Sum256(got); gs != sum {
			t.Errorf("echo through ztgo: got sha256 %x, want %x", gs, sum)
		}
		// Closing Istio's end sends END_STREAM; ztgo must hand the app a clean EOF.
		c.Close()
		r := serverApp.next(t)
		checkEchoed(t, r, sum)
		t.Logf("app saw the tunnelled connection from %s", r.remote)
	})

	t.Run("ForeignAuthority", func(t *testing.T) {
		serverApp.drain()
		lockedApp.drain()
		for _, target := range []string{
			"127.30.1.99:8080", // no workload at all
			"127.30.1.3:8080",  // another workload of the same node
		} {
			c, err := istioDial("127.30.1.2:15008", target, meshtest.ClientTLS(clientCert, roots, serverURI))
			if err == nil {
				c.Close()
				t.Errorf("CONNECT %s via 127.30.1.2:15008 succeeded, want 400", target)
				continue
			}
			if !strings.Contains(err.Error(), "400") {
				t.Errorf("CONNECT %s via 127.30.1.2:15008: %v, want status 400", target, err)
			}
		}
		serverApp.none(t)
		lockedApp.none(t)
	})

	t.Run("DeniedByPolicy", func(t *testing.T) {
		lockedApp.drain()
		c, err := istioDial("127.30.1.3:15008", "127.30.1.3:8080", meshtest.ClientTLS(clientCert, roots, lockedURI))
		if err == nil {
			c.Close()
			lockedApp.next(t) // keep the connection from showing up in later subtests
			t.Fatal("CONNECT to the locked workload succeeded, want 401")
		}
		if !strings.Contains(err.Error(), "401") {
			t.Errorf("CONNECT to the locked workload: %v, want status 401", err)
		}
		lockedApp.none(t)
	})

	t.Run("ServerCertificatePerWorkload", func(t *testing.T) {
		lockedApp.drain()
		// The listener of "locked" must present locked's identity, not server's.
		c, err := istioDial("127.30.1.3:15008", "127.30.1.3:8080", meshtest.ClientTLS(clientCert, roots, serverURI))
		if err == nil {
			c.Close()
			t.Fatal("127.30.1.3:15008 passed as the server workload")
		}
		if want := "peer identity is [" + lockedURI + "]"; !strings.Contains(err.Error(), want) {
			t.Errorf("dial 127.30.1.3:15008 expecting %s: %v, want an error containing %q", serverURI, err, want)
		}
		lockedApp.none(t)
	})

	t.Run("UntrustedClientRefusedInHandshake", func(t *testing.T) {
		serverApp.drain()
		// Control: with the right certificate ztgo completes the handshake and speaks HTTP/2.
		if err := tlsRefusal("127.30.1.2:15008", meshtest.ClientTLS(clientCert, roots, serverURI)); err != nil {
			t.Fatalf("the trusted client certificate was refused: %v", err)
		}
		other, err := ca.NewEphemeral("cluster.local")
		if err != nil {
			t.Fatal(err)
		}
		for _, tc := range []struct {
			name  string
			certs []tls.Certificate
		}{
			{"other CA, same identity", []tls.Certificate{meshtest.IssueCert(t, other, identity(t, istioClientURI))}},
			{"same CA, other trust domain", []tls.Certificate{meshtest.IssueCert(t, signer, identity(t, "spiffe://example.org/ns/default/sa/istio-client"))}},
			{"no client certificate", nil},
		} {
			name := tc.name
			tcfg := meshtest.ClientTLS(clientCert, roots, serverURI)
			tcfg.Certificates = tc.certs
			c, err := istioDial("127.30.1.2:15008", "127.30.1.2:8080", tcfg)
			if err == nil {
				c.Close()
				t.Errorf("%s: CONNECT succeeded, want the TLS handshake refused", name)
				continue
			}
			// A status would mean the handshake passed and ztgo answered the CONNECT.
			if strings.Contains(err.Error(), "round trip failed") {
				t.Errorf("%s: %v, want no CONNECT answer", name, err)
			}
			t.Logf("%s: Istio's dialer: %v", name, err)
			// Where it was refused: plain crypto/tls with the same config gets ztgo's alert.
			rerr := tlsRefusal("127.30.1.2:15008", tcfg)
			if rerr == nil || !strings.Contains(rerr.Error(), "remote error: tls:") {
				t.Errorf("%s: the TLS connection ended with %v, want ztgo's TLS alert", name, rerr)
			}
			t.Logf("%s: crypto/tls: %v", name, rerr)
		}
		serverApp.none(t)
	})
}

const (
	clientURI = "spiffe://cluster.local/ns/default/sa/client"
	remoteURI = "spiffe://cluster.local/ns/default/sa/remote"
)

var (
	clientIP   = netip.MustParseAddr("127.30.2.1")
	remoteApp  = netip.MustParseAddrPort("127.30.2.2:9090")
	imposterIP = netip.MustParseAddr("127.30.2.3")
)

// outboundYAML: node "a" (ztgo) hosts "client"; "remote" and "imposter" are HBONE workloads of
// node "b", which no ztgo runs: Istio's HBONE server answers on their 15008.
const outboundYAML = `
workloads:
- uid: Kubernetes//v1/Pod/default/client
  name: client
  namespace: default
  serviceAccount: client
  workloadIps: ["127.30.2.1"]
  protocol: HBONE
  node: a
- uid: Kubernetes//v1/Pod/default/remote
  name: remote
  namespace: default
  serviceAccount: remote
  workloadIps: ["127.30.2.2"]
  protocol: HBONE
  node: b
- uid: Kubernetes//v1/Pod/default/imposter
  name: imposter
  namespace: default
  serviceAccount: imposter
  workloadIps: ["127.30.2.3"]
  protocol: HBONE
  node: b
`

// socksEcho sends data through node a from the client workload to dst, half-closes, reads
// the echo to EOF and returns it.
func socksEcho(t *testing.T, socksAddr string, dst netip.AddrPort, data []byte) ([]byte, error) {
	c, rep, err := meshtest.SOCKS5(socksAddr, clientIP, dst.String(), ioTimeout)
	if err != nil {
		return nil, err
	}
	if rep != 0 {
		return nil, fmt.Errorf("socks5 reply %d, want 0", rep)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(ioTimeout))
	// The half-close is END_STREAM towards Istio's server and a FIN to the app.
	return meshtest.RoundTrip(c, data)
}

func TestZtgoOutboundToIstioServer(t *testing.T) {
	meshtest.CheckLeaks(t)
	caDir := filepath.Join(t.TempDir(), "ca")
	signer, err := ca.LoadOrCreate(caDir)
	if err != nil {
		t.Fatal(err)
	}
	roots := signer.Roots()
	// Started before the node, so they are closed after it has stopped.
	app := startEcho(t, remoteApp.String())
	imposterApp := startEcho(t, netip.AddrPortFrom(imposterIP, 9090).String())
	remote := startIstioServer(t, "127.30.2.2:15008", meshtest.IssueCert(t, signer, identity(t, remoteURI)), roots)
	// A server of the same CA, but presenting remote's identity at imposter's address.
	imposter := startIstioServer(t, "127.30.2.3:15008", meshtest.IssueCert(t, signer, identity(t, remoteURI)), roots)
	n := startNode(t, "a", caDir, outboundYAML)
	meshtest.RequireZtgoGoroutines(t)

	t.Run("Echo", func(t *testing.T) {
		data, sum := payload(2)
		got, err := socksEcho(t, n.SOCKS5Addr(), remoteApp, data)
		if err != nil {
			t.Fatalf("through ztgo to Istio's server: %v", err)
		}
		if gs := sha256.Sum256(got); len(got) != len(data) || gs != sum {
			t.Errorf("echo: got %d bytes sha256 %x, want %d bytes sha256 %x", len(got), gs, len(data), sum)
		}
		checkEchoed(t, app.next(t), sum)

		reqs := remote.seen()
		if len(reqs) != 1 {
			t.Fatalf("Istio's server got %d CONNECTs, want 1", len(reqs))
		}
		r := reqs[0]
		if r.proto != "HTTP/2.0" {
			t.Errorf("Istio's server got %s, want HTTP/2.0", r.proto)
		}
		if !slices.Equal(r.peerURIs, []string{clientURI}) {
			t.Errorf("Istio's server saw client identity %v, want [%s]", r.peerURIs, clientURI)
		}
		if r.authority != remoteApp.String() {
			t.Errorf("Istio's server got :authority %q, want %q", r.authority, remoteApp)
		}
		t.Logf("Istio's server saw %s from %v, headers %v", r.proto, r.peerURIs, r.header)
	})

	t.Run("ConcurrentStreams", func(t *testing.T) {
		before := len(remote.seen())
		const flows = 4
		var wg sync.WaitGroup
		for i := range flows {
			wg.Add(1)
			go func() {
				defer wg.Done()
				data, sum := payload(uint64(10 + i))
				got, err := socksEcho(t, n.SOCKS5Addr(), remoteApp, data)
				if err != nil {
					t.Errorf("flow %d: %v", i, err)
					return
				}
				if gs := sha256.Sum256(got); len(got) != len(data) || gs != sum {
					t.Errorf("flow %d: got %d bytes sha256 %x, want %d bytes sha256 %x", i, len(got), gs, len(data), sum)
				}
			}()
		}
		wg.Wait()
		for range flows {
			r := app.next(t)
			if r.err != nil || r.n != payloadSize {
				t.Errorf("app side: %d bytes, %v; want %d bytes and a clean EOF", r.n, r.err, payloadSize)
			}
		}
		reqs := remote.seen()[before:]
		if len(reqs) != flows {
			t.Errorf("Istio's server got %d CONNECTs, want %d", len(reqs), flows)
		}
		for _, r := range reqs {
			if !slices.Equal(r.peerURIs, []string{clientURI}) {
				t.Errorf("Istio's server saw client identity %v, want [%s]", r.peerURIs, clientURI)
			}
		}
	})

	t.Run("WrongServerIdentityRefused", func(t *testing.T) {
		c, rep, err := meshtest.SOCKS5(n.SOCKS5Addr(), clientIP, netip.AddrPortFrom(imposterIP, 9090).String(), ioTimeout)
		if err != nil {
			t.Fatalf("socks5: %v", err)
		}
		if rep == 0 {
			c.Close()
			t.Fatalf("ztgo connected to a server presenting %s at the imposter workload's address", remoteURI)
		}
		t.Logf("socks5 reply %d", rep)
		if reqs := imposter.seen(); len(reqs) != 0 {
			t.Errorf("the imposter got %d CONNECTs, want none", len(reqs))
		}
		imposterApp.none(t)
	})
}
