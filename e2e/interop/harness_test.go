package interop_test

import (
	"context"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"io"
	"log"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"sync"
	"testing"
	"time"

	"istio.io/istio/pkg/hbone"

	"github.com/ztgo/ztgo/e2e/meshtest"
	"github.com/ztgo/ztgo/runtime/node"
	"github.com/ztgo/ztgo/tls/spiffe"
)

// ioTimeout bounds every network step of a test, so a hang fails instead of blocking go test.
const ioTimeout = 10 * time.Second

// payloadSize is what every echo test sends (and must get back).
const payloadSize = 1 << 20

// identity parses a SPIFFE URI or fails the test.
func identity(t *testing.T, uri string) spiffe.ID {
	t.Helper()
	id, err := spiffe.Parse(uri)
	if err != nil {
		t.Fatal(err)
	}
	return id
}

// istioDial connects to target through Istio's HBONE dialer. The dialer ignores contexts, so a
// hang is turned into an error here (its goroutine is abandoned, the test fails anyway).
func istioDial(proxyAddr, target string, tcfg *tls.Config) (net.Conn, error) {
	d := hbone.NewDialer(hbone.Config{ProxyAddress: proxyAddr, TLS: tcfg})
	type result struct {
		c   net.Conn
		err error
	}
	ch := make(chan result, 1)
	go func() {
		c, err := d.DialContext(context.Background(), "tcp", target)
		ch <- result{c, err}
	}()
	select {
	case r := <-ch:
		return r.c, r.err
	case <-time.After(ioTimeout):
		return nil, fmt.Errorf("istio hbone dial %s via %s: no answer in %v", target, proxyAddr, ioTimeout)
	}
}

// payload returns payloadSize pseudo-random bytes for seed and their SHA-256.
func payload(seed uint64) ([]byte, [32]byte) {
	b := meshtest.RandomBytes(payloadSize, seed)
	return b, sha256.Sum256(b)
}

// echoResult is what the echo app saw on one connection.
type echoResult struct {
	remote netip.AddrPort
	n      int64
	sum    [32]byte
	err    error // nil when the client half-closed (EOF) cleanly
}

// echoApp is the workload's application: it writes back everything it reads, and on EOF
// reports the count and SHA-256 of what it received, then closes.
type echoApp struct {
	results chan echoResult
}

// startEcho serves addr until the test ends (meshtest.StartApp's cleanup).
func startEcho(t *testing.T, addr string) *echoApp {
	t.Helper()
	a := &echoApp{results: make(chan echoResult, 64)}
	meshtest.StartApp(t, addr, func(_ *meshtest.App, c *net.TCPConn) { a.serve(c) })
	return a
}

func (a *echoApp) serve(c *net.TCPConn) {
	c.SetDeadline(time.Now().Add(ioTimeout))
	h := sha256.New()
	buf := make([]byte, 32<<10)
	res := echoResult{remote: c.RemoteAddr().(*net.TCPAddr).AddrPort()}
	for {
		n, err := c.Read(buf)
		if n > 0 {
			h.Write(buf[:n])
			res.n += int64(n)
			if _, werr := c.Write(buf[:n]); werr != nil {
				res.err = werr
				break
			}
		}
		if err == io.EOF {
			break
		}
		if err != nil {
			res.err = err
			break
		}
	}
	copy(res.sum[:], h.Sum(nil))
	a.results <- res
}

// next waits for the report of the next connection that ended.
func (a *echoApp) next(t *testing.T) echoResult {
	t.Helper()
	select {
	case r := <-a.results:
		return r
	case <-time.After(ioTimeout):
		t.Fatal("the echo app saw no connection end")
		return echoResult{}
	}
}

// none asserts that the echo app has not seen a connection end.
func (a *echoApp) none(t *testing.T) {
	t.Helper()
	select {
	case r := <-a.results:
		t.Errorf("the echo app got a connection from %s (%d bytes), want none", r.remote, r.n)
	default:
	}
}

// drain forgets connections reported so far (left over from an earlier subtest).
func (a *echoApp) drain() {
	for {
		select {
		case <-a.results:
		default:
			return
		}
	}
}

// checkEchoed asserts the app received exactly the payload with a clean EOF.
func checkEchoed(t *testing.T, r echoResult, sum [32]byte) {
	t.Helper()
	if r.err != nil {
		t.Errorf("app side: connection ended with %v, want a clean EOF", r.err)
	}
	if r.n != payloadSize || r.sum != sum {
		t.Errorf("app side: received %d bytes sha256 %x, want %d bytes sha256 %x", r.n, r.sum, payloadSize, sum)
	}
}

// exchange writes data on c while reading len(data) bytes back, then returns what came back.
// It does not rely on half-close, which Istio's dialer connection (a net.Pipe) cannot do.
func exchange(t *testing.T, c net.Conn, data []byte) []byte {
	t.Helper()
	c.SetDeadline(time.Now().Add(ioTimeout))
	werr := make(chan error, 1)
	go func() {
		_, err := c.Write(data)
		werr <- err
	}()
	got := make([]byte, len(data))
	n, rerr := io.ReadFull(c, got)
	if err := <-werr; err != nil {
		t.Fatalf("write through the tunnel: %v", err)
	}
	if rerr != nil {
		t.Fatalf("read through the tunnel: %v after %d of %d bytes", rerr, n, len(data))
	}
	return got
}

// tlsRefusal connects to addr with plain crypto/tls and tcfg, and returns the error that
// ends the connection before any HTTP/2 frame arrives. With TLS 1.3 the client finishes its
// handshake before the server has checked the client certificate, so a server that refuses
// the certificate shows up as an alert on the first read ("remote error: tls: ..."). A server
// that accepted it would send its HTTP/2 SETTINGS instead, and tlsRefusal returns nil.
func tlsRefusal(addr string, tcfg *tls.Config) error {
	nc, err := net.DialTimeout("tcp", addr, ioTimeout)
	if err != nil {
		return err
	}
	defer nc.Close()
	nc.SetDeadline(time.Now().Add(ioTimeout))
	c := tls.Client(nc, tcfg)
	if err := c.Handshake(); err != nil {
		return err
	}
	// Send the HTTP/2 client preface and an empty SETTINGS frame, then wait for the server.
	preface := append([]byte("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"), 0, 0, 0, 4, 0, 0, 0, 0, 0)
	if _, err := c.Write(preface); err != nil {
		return err
	}
	var b [1]byte
	if _, err := c.Read(b[:]); err != nil {
		return err
	}
	return nil
}

// startNode runs a ztgo node in loopback mode and stops it when the test ends.
func startNode(t *testing.T, name, caDir, config string) *node.Node {
	t.Helper()
	return meshtest.StartNode(t, node.Config{
		Name:          name,
		ConfigInline:  config,
		CADir:         caDir,
		SOCKS5Addr:    "127.30.0.1:0",
		AdminAddr:     "",
		MetricsAddr:   "",
		ReadinessAddr: "",
		DrainTimeout:  time.Second,
		Logger:        slog.New(slog.NewTextHandler(t.Output(), &slog.HandlerOptions{Level: slog.LevelDebug})).With("node", name),
	})
}

// waitListening waits until addr accepts TCP connections (a node opens its inbound listeners
// in Start, so this is normally immediate).
func waitListening(t *testing.T, addr string) {
	t.Helper()
	deadline := time.Now().Add(ioTimeout)
	for {
		c, err := net.DialTimeout("tcp", addr, time.Second)
		if err == nil {
			c.Close()
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s is not listening: %v", addr, err)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// istioServer is Istio's own HBONE server (hbone.NewServer) served over mTLS the way Istio's
// echo test server does it: tls.NewListener with NextProtos ["h2"] and http.Server.Serve.
// Each CONNECT's TLS peer identity, :authority and headers are recorded before Istio's handler
// runs.
type istioServer struct {
	srv  *http.Server
	done chan struct{}

	mu       sync.Mutex
	requests []istioRequest
}

type istioRequest struct {
	proto     string
	peerURIs  []string
	authority string
	header    http.Header
}

func startIstioServer(t *testing.T, addr string, cert tls.Certificate, clientRoots *x509.CertPool) *istioServer {
	t.Helper()
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	tcfg := &tls.Config{
		Certificates: []tls.Certificate{cert},
		NextProtos:   []string{"h2"},
		ClientAuth:   tls.RequireAndVerifyClientCert,
		ClientCAs:    clientRoots,
		MinVersion:   tls.VersionTLS12,
	}
	s := &istioServer{srv: hbone.NewServer(), done: make(chan struct{})}
	inner := s.srv.Handler
	s.srv.Handler = http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		req := istioRequest{proto: r.Proto, authority: r.Host, header: r.Header.Clone()}
		if r.TLS != nil && len(r.TLS.PeerCertificates) > 0 {
			for _, u := range r.TLS.PeerCertificates[0].URIs {
				req.peerURIs = append(req.peerURIs, u.String())
			}
		}
		s.mu.Lock()
		s.requests = append(s.requests, req)
		s.mu.Unlock()
		inner.ServeHTTP(w, r)
	})
	s.srv.ErrorLog = log.New(t.Output(), "istio-server "+addr+": ", 0)
	go func() {
		defer close(s.done)
		s.srv.Serve(tls.NewListener(ln, tcfg))
	}()
	t.Cleanup(s.close)
	return s
}

func (s *istioServer) close() {
	s.srv.Close()
	<-s.done
}

func (s *istioServer) seen() []istioRequest {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]istioRequest(nil), s.requests...)
}
