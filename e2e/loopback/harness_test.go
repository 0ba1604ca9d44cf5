package loopback

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"net/url"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/ztgo/ztgo/runtime/node"
	"github.com/ztgo/ztgo/tls/ca"
	"github.com/ztgo/ztgo/tls/spiffe"
)

// The mesh every test runs: node-a hosts the client, node-b the servers. All addresses are in
// 127.20.0.0/16 so this package never collides with other packages' tests.
const (
	clientIP   = "127.20.1.10"
	client2IP  = "127.20.1.11"
	serverIP   = "127.20.2.10"
	dbIP       = "127.20.2.20"
	plainIP    = "127.20.2.30" // a TCP (non-HBONE) mesh workload
	externalIP = "127.20.3.10" // not in the mesh
	echoVIP    = "127.20.100.1"
)

const meshYAML = `
workloads:
- uid: Kubernetes//v1/Pod/default/client
  name: client
  namespace: default
  serviceAccount: client
  workloadIps: ["127.20.1.10"]
  protocol: HBONE
  node: node-a
- uid: Kubernetes//v1/Pod/default/client2
  name: client2
  namespace: default
  serviceAccount: client2
  workloadIps: ["127.20.1.11"]
  protocol: HBONE
  node: node-a
- uid: Kubernetes//v1/Pod/default/server
  name: server
  namespace: default
  serviceAccount: server
  workloadIps: ["127.20.2.10"]
  protocol: HBONE
  node: node-b
  canonicalName: server
  services:
    "default/echo.default.svc.cluster.local": {80: 8080}
- uid: Kubernetes//v1/Pod/prod/db
  name: db
  namespace: prod
  serviceAccount: db
  workloadIps: ["127.20.2.20"]
  protocol: HBONE
  node: node-b
- uid: Kubernetes//v1/Pod/default/plain
  name: plain
  namespace: default
  workloadIps: ["127.20.2.30"]
  protocol: TCP
  node: node-b
services:
- name: echo
  namespace: default
  hostname: echo.default.svc.cluster.local
  vips: ["/127.20.100.1"]
  ports: {80: 8080}
policies:
- name: prod-only
  namespace: prod
  scope: Namespace
  action: Allow
  rules:
  - - - namespaces: [!Exact prod]
%s
`

// mesh is two ztgo nodes sharing one CA directory.
type mesh struct {
	t       *testing.T
	caDir   string
	cfgPath string // node-b's config file (node-b enforces inbound policy)
	a, b    *node.Node
}

func newMesh(t *testing.T, extraPolicies string, mutate func(*node.Config)) *mesh {
	t.Helper()
	checkLeaks(t)
	dir := t.TempDir()
	m := &mesh{t: t, caDir: filepath.Join(dir, "ca"), cfgPath: filepath.Join(dir, "mesh-b.yaml")}
	cfg := fmt.Sprintf(meshYAML, extraPolicies)
	if err := os.WriteFile(m.cfgPath, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	// Create the CA once so both nodes load the same one.
	if _, err := ca.LoadOrCreate(m.caDir); err != nil {
		t.Fatal(err)
	}
	m.a = m.start("node-a", node.Config{ConfigInline: cfg, SOCKS5Addr: "127.20.1.1:0"}, mutate)
	m.b = m.start("node-b", node.Config{ConfigPath: m.cfgPath, ConfigPollInterval: 20 * time.Millisecond}, mutate)
	return m
}

func (m *mesh) start(name string, cfg node.Config, mutate func(*node.Config)) *node.Node {
	m.t.Helper()
	cfg.Name = name
	cfg.CADir = m.caDir
	cfg.Logger = slog.New(slog.NewTextHandler(testWriter{m.t, name}, &slog.HandlerOptions{Level: slog.LevelWarn}))
	cfg.DrainTimeout = time.Second
	if mutate != nil {
		mutate(&cfg)
	}
	n, err := node.New(cfg)
	if err != nil {
		m.t.Fatal(err)
	}
	if err := n.Start(context.Background()); err != nil {
		m.t.Fatal(err)
	}
	m.t.Cleanup(func() { n.Stop(context.Background()) })
	return n
}

// setConfigB rewrites node-b's config file with extra policies and waits for it to apply.
func (m *mesh) setConfigB(extraPolicies string) {
	m.t.Helper()
	before := m.b.Store().Load().Version()
	if err := os.WriteFile(m.cfgPath, []byte(fmt.Sprintf(meshYAML, extraPolicies)), 0o600); err != nil {
		m.t.Fatal(err)
	}
	waitFor(m.t, 5*time.Second, func() bool { return m.b.Store().Load().Version() > before })
}

type testWriter struct {
	t    *testing.T
	name string
}

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Logf("[%s] %s", w.name, strings.TrimSpace(string(p)))
	return len(p), nil
}

// socks opens a flow through node-a's SOCKS5 entry from srcIP to target ("host:port") and
// returns the connection and the SOCKS5 reply code.
func (m *mesh) socks(srcIP, target string) (*net.TCPConn, byte, error) {
	d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(srcIP)}, Timeout: 5 * time.Second}
	c, err := d.Dial("tcp", m.a.SOCKS5Addr())
	if err != nil {
		return nil, 0, err
	}
	c.SetDeadline(time.Now().Add(15 * time.Second))
	host, portS, _ := net.SplitHostPort(target)
	var port int
	fmt.Sscan(portS, &port)
	req := []byte{5, 1, 0, 5, 1, 0}
	if ip, err := netip.ParseAddr(host); err == nil {
		req = append(req, 1)
		req = append(req, ip.AsSlice()...)
	} else {
		req = append(req, 3, byte(len(host)))
		req = append(req, host...)
	}
	req = append(req, byte(port>>8), byte(port))
	if _, err := c.Write(req); err != nil {
		c.Close()
		return nil, 0, err
	}
	var resp [12]byte
	if _, err := io.ReadFull(c, resp[:2]); err != nil {
		c.Close()
		return nil, 0, err
	}
	if _, err := io.ReadFull(c, resp[2:]); err != nil {
		c.Close()
		return nil, 0, fmt.Errorf("read socks reply: %w", err)
	}
	c.SetDeadline(time.Time{})
	if resp[3] != 0 {
		c.Close()
		return nil, resp[3], nil
	}
	return c.(*net.TCPConn), 0, nil
}

// app is a TCP server standing in for a workload's application.
type app struct {
	ln    net.Listener
	mu    sync.Mutex
	peers []string
	conns map[net.Conn]bool
	bytes int64
	wg    sync.WaitGroup
}

// startApp serves addr with handler; it records each client's address and bytes read when the
// handler uses the returned counting reader.
func startApp(t *testing.T, addr string, handler func(c *net.TCPConn)) *app {
	t.Helper()
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	a := &app{ln: ln, conns: map[net.Conn]bool{}}
	a.wg.Add(1)
	go func() {
		defer a.wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			a.mu.Lock()
			a.peers = append(a.peers, c.RemoteAddr().String())
			a.conns[c] = true
			a.mu.Unlock()
			a.wg.Add(1)
			go func() {
				defer a.wg.Done()
				defer func() {
					c.Close()
					a.mu.Lock()
					delete(a.conns, c)
					a.mu.Unlock()
				}()
				handler(c.(*net.TCPConn))
			}()
		}
	}()
	t.Cleanup(func() {
		// A failed test may leave clients open: end their connections instead of waiting.
		ln.Close()
		a.mu.Lock()
		for c := range a.conns {
			c.Close()
		}
		a.mu.Unlock()
		a.wg.Wait()
	})
	return a
}

func (a *app) peerList() []string {
	a.mu.Lock()
	defer a.mu.Unlock()
	return append([]string(nil), a.peers...)
}

// echo copies everything back and ends its side at EOF.
func echo(c *net.TCPConn) {
	io.Copy(c, c)
	c.CloseWrite()
	io.Copy(io.Discard, c)
}

// countingSink reads everything, counting bytes into a.
func (a *app) countingSink(c *net.TCPConn) {
	n, _ := io.Copy(io.Discard, c)
	a.mu.Lock()
	a.bytes += n
	a.mu.Unlock()
}

func (a *app) received() int64 {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.bytes
}

// clientTLS returns a TLS config presenting a certificate for id, signed by the CA in dir, that
// expects the server to present wantPeer.
func clientTLS(t *testing.T, dir string, id spiffe.ID, wantPeer string) *tls.Config {
	t.Helper()
	local, err := ca.LoadOrCreate(dir)
	if err != nil {
		t.Fatal(err)
	}
	cert := issue(t, local, id)
	roots := x509.NewCertPool()
	for _, r := range local.RootCerts() {
		roots.AddCert(r)
	}
	return &tls.Config{
		Certificates:       []tls.Certificate{cert},
		NextProtos:         []string{"h2"},
		MinVersion:         tls.VersionTLS13,
		InsecureSkipVerify: true, // verified below: the server has only a URI SAN
		VerifyConnection: func(cs tls.ConnectionState) error {
			if len(cs.PeerCertificates) == 0 {
				return errors.New("no server certificate")
			}
			leaf := cs.PeerCertificates[0]
			inter := x509.NewCertPool()
			for _, c := range cs.PeerCertificates[1:] {
				inter.AddCert(c)
			}
			if _, err := leaf.Verify(x509.VerifyOptions{Roots: roots, Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}); err != nil {
				return err
			}
			for _, u := range leaf.URIs {
				if u.String() == wantPeer {
					return nil
				}
			}
			return fmt.Errorf("server is not %s", wantPeer)
		},
	}
}

func issue(t *testing.T, signer *ca.Local, id spiffe.ID) tls.Certificate {
	t.Helper()
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	u, _ := url.Parse(id.String())
	csr, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{URIs: []*url.URL{u}}, key)
	if err != nil {
		t.Fatal(err)
	}
	chain, err := signer.Sign(context.Background(), pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: csr}), id, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	var cert tls.Certificate
	for _, p := range chain[:len(chain)-1] {
		b, _ := pem.Decode([]byte(p))
		cert.Certificate = append(cert.Certificate, b.Bytes)
	}
	cert.PrivateKey = key
	return cert
}

func waitFor(t *testing.T, d time.Duration, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatal("condition not met in time")
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// checkLeaks fails the test if goroutines of ztgo's packages outlive it.
func checkLeaks(t *testing.T) {
	t.Cleanup(func() {
		deadline := time.Now().Add(5 * time.Second)
		for {
			buf := make([]byte, 1<<20)
			buf = buf[:runtime.Stack(buf, true)]
			var leaked []string
			for _, g := range bytes.Split(buf, []byte("\n\n")) {
				if bytes.Contains(g, []byte("github.com/ztgo/ztgo/")) && !bytes.Contains(g, []byte("e2e/loopback.")) {
					leaked = append(leaked, string(g))
				}
			}
			if len(leaked) == 0 {
				return
			}
			if time.Now().After(deadline) {
				t.Errorf("%d goroutines leaked, first:\n%s", len(leaked), leaked[0])
				return
			}
			time.Sleep(20 * time.Millisecond)
		}
	})
}
