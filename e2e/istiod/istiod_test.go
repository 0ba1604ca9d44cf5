// Package istiod runs two ztgo nodes in one process with no local configuration at all: the
// mesh comes only from a real delta xDS server (go-control-plane's ADS server over linear
// caches, serving istio.workload.Address and istio.security.Authorization as istiod does) and
// every workload certificate from a real IstioCertificateService (a gRPC server signing CSRs
// with an ephemeral ztgo CA). Traffic goes SOCKS5 -> node-a -> HBONE mTLS -> node-b -> app on
// loopback addresses in 127.90.0.0/16, and the tests change the mesh at run time through the
// xDS caches: a policy push, a workload update, and a push holding one bad resource.
package istiod

import (
	"context"
	"crypto/sha256"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/envoyproxy/go-control-plane/pkg/cache/types"
	cache "github.com/envoyproxy/go-control-plane/pkg/cache/v3"
	serverv3 "github.com/envoyproxy/go-control-plane/pkg/server/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	pb "istio.io/api/security/v1alpha1"
	"istio.io/istio/pkg/workloadapi"
	"istio.io/istio/pkg/workloadapi/security"

	"github.com/ztgo/ztgo/control/xds"
	"github.com/ztgo/ztgo/e2e/meshtest"
	"github.com/ztgo/ztgo/runtime/node"
	"github.com/ztgo/ztgo/tls/ca"
	"github.com/ztgo/ztgo/tls/spiffe"
)

// The mesh pushed over xDS. node-a hosts client and client2, node-b the servers. Every
// address is in 127.90.0.0/16 so this package never collides with other packages' tests.
const (
	controlIP = "127.90.0.1" // the xDS and CA servers
	clientIP  = "127.90.1.10"
	client2IP = "127.90.1.11"
	serverIP  = "127.90.2.10"
	server2IP = "127.90.2.20" // replaces server in TestWorkloadUpdateReroutesService
	goodIP    = "127.90.2.30" // the good workload of TestBadResourceNACKedGoodApplied
	legacyIP  = "127.90.2.40" // its bad (LEGACY_ISTIO_MTLS) neighbour in the same push
	echoVIP   = "127.90.100.1"

	echoKey   = "default/echo.default.svc.cluster.local" // the service's resource name
	denyKey   = "default/deny-client"                    // the policy's resource name
	trustRoot = "cluster.local"

	// replyNotAllowed is the SOCKS5 reply code of a denied flow.
	replyNotAllowed = 2
)

// nodeHeader is a CA request header naming the node that sent it (CA_HEADER_X_ZTGO_NODE),
// so the CA server can tell which node asked for which identity.
const nodeHeader = "x-ztgo-node"

func id(sa string) spiffe.ID {
	return spiffe.ID{TrustDomain: trustRoot, Namespace: "default", ServiceAccount: sa}
}

func uid(name string) string { return "Kubernetes//Pod/default/" + name }

func ip(s string) []byte { return netip.MustParseAddr(s).AsSlice() }

// workload is an HBONE pod in namespace default; service, when set, is echo (80 -> 8080).
func workload(name, sa, addr, nodeName string, echo bool) *workloadapi.Workload {
	w := &workloadapi.Workload{
		Uid:            uid(name),
		Name:           name,
		Namespace:      "default",
		ServiceAccount: sa,
		Addresses:      [][]byte{ip(addr)},
		TunnelProtocol: workloadapi.TunnelProtocol_HBONE,
		Node:           nodeName,
		CanonicalName:  name,
	}
	if echo {
		w.Services = map[string]*workloadapi.PortList{
			echoKey: {Ports: []*workloadapi.Port{{ServicePort: 80, TargetPort: 8080}}},
		}
	}
	return w
}

func wlRes(w *workloadapi.Workload) types.Resource {
	return &workloadapi.Address{Type: &workloadapi.Address_Workload{Workload: w}}
}

func echoService() types.Resource {
	return &workloadapi.Address{Type: &workloadapi.Address_Service{Service: &workloadapi.Service{
		Name:      "echo",
		Namespace: "default",
		Hostname:  "echo.default.svc.cluster.local",
		Addresses: []*workloadapi.NetworkAddress{{Address: ip(echoVIP)}},
		Ports:     []*workloadapi.Port{{ServicePort: 80, TargetPort: 8080}},
	}}}
}

// initialMesh is what the xDS server holds when the nodes connect.
func initialMesh() map[string]types.Resource {
	return map[string]types.Resource{
		uid("client"):  wlRes(workload("client", "client", clientIP, "node-a", false)),
		uid("client2"): wlRes(workload("client2", "client2", client2IP, "node-a", false)),
		uid("server"):  wlRes(workload("server", "server", serverIP, "node-b", true)),
		echoKey:        echoService(),
	}
}

// csrCall is one CreateCertificate call as the CA server saw it.
type csrCall struct {
	node         string // the nodeHeader value
	impersonated string // the ImpersonatedIdentity metadata field, "" when absent
}

// nack is one NACK the xDS server received.
type nack struct {
	node, typeURL, message string
}

// controlPlane is istiod for the tests: a delta ADS server and a certificate service.
type controlPlane struct {
	t *testing.T

	addrs, auths *cache.LinearCache
	xdsAddr      string
	caAddr       string
	signer       *ca.Local

	// gate holds every xDS stream before the server reads its first request, until release.
	gate    chan struct{}
	release func()
	held    atomic.Int32 // streams that reached the gate

	mu          sync.Mutex
	streamNodes map[int64]string // stream id -> NODE_NAME of its initial request
	nacks       []nack
	csrs        []csrCall
}

// startControlPlane serves xDS and the CA on controlIP. xDS streams wait at the gate until
// cp.release is called.
func startControlPlane(t *testing.T) *controlPlane {
	t.Helper()
	signer, err := ca.NewEphemeral(trustRoot)
	if err != nil {
		t.Fatal(err)
	}
	cp := &controlPlane{
		t:           t,
		addrs:       cache.NewLinearCache(xds.AddressType),
		auths:       cache.NewLinearCache(xds.AuthorizationType),
		signer:      signer,
		gate:        make(chan struct{}),
		streamNodes: map[int64]string{},
	}
	var once sync.Once
	cp.release = func() { once.Do(func() { close(cp.gate) }) }
	if err := cp.addrs.UpdateResources(initialMesh(), nil); err != nil {
		t.Fatal(err)
	}

	// xDS: one linear cache per type URL behind a mux, as the xDS client's own tests run it.
	ctx, cancel := context.WithCancel(context.Background())
	mux := &cache.MuxCache{
		Classify:      func(r *cache.Request) string { return r.GetTypeUrl() },
		ClassifyDelta: func(r *cache.DeltaRequest) string { return r.GetTypeUrl() },
		Caches:        map[string]cache.Cache{xds.AddressType: cp.addrs, xds.AuthorizationType: cp.auths},
	}
	srv := serverv3.NewServer(ctx, mux, serverv3.CallbackFuncs{
		StreamDeltaRequestFunc: func(stream int64, req *discovery.DeltaDiscoveryRequest) error {
			cp.mu.Lock()
			defer cp.mu.Unlock()
			if n := req.GetNode(); n != nil {
				cp.streamNodes[stream] = n.GetMetadata().GetFields()["NODE_NAME"].GetStringValue()
			}
			if d := req.GetErrorDetail(); d != nil {
				cp.nacks = append(cp.nacks, nack{node: cp.streamNodes[stream], typeURL: req.GetTypeUrl(), message: d.GetMessage()})
			}
			return nil
		},
	})
	xg := grpc.NewServer(grpc.StreamInterceptor(func(srv any, ss grpc.ServerStream, _ *grpc.StreamServerInfo, h grpc.StreamHandler) error {
		cp.held.Add(1)
		select {
		case <-cp.gate:
		case <-ss.Context().Done():
			return ss.Context().Err()
		}
		return h(srv, ss)
	}))
	discovery.RegisterAggregatedDiscoveryServiceServer(xg, srv)
	cp.xdsAddr = serveGRPC(t, xg)
	t.Cleanup(func() {
		cp.release()
		xg.Stop()
		cancel()
	})

	// The CA.
	cg := grpc.NewServer()
	pb.RegisterIstioCertificateServiceServer(cg, &caService{cp: cp})
	cp.caAddr = serveGRPC(t, cg)
	t.Cleanup(cg.Stop)
	return cp
}

func serveGRPC(t *testing.T, g *grpc.Server) string {
	t.Helper()
	lis, err := net.Listen("tcp", controlIP+":0")
	if err != nil {
		t.Fatal(err)
	}
	go func() { _ = g.Serve(lis) }()
	return lis.Addr().String()
}

// caService is IstioCertificateService as istiod runs it for ztunnel in shared mode: it signs
// the CSR for the ImpersonatedIdentity (else the CSR's own identity) and answers [leaf, root].
type caService struct {
	pb.UnimplementedIstioCertificateServiceServer
	cp *controlPlane
}

func (s *caService) CreateCertificate(ctx context.Context, req *pb.IstioCertificateRequest) (*pb.IstioCertificateResponse, error) {
	md, _ := metadata.FromIncomingContext(ctx)
	call := csrCall{impersonated: req.GetMetadata().GetFields()[ca.ImpersonatedIdentityKey].GetStringValue()}
	if v := md.Get(nodeHeader); len(v) > 0 {
		call.node = v[0]
	}
	s.cp.mu.Lock()
	s.cp.csrs = append(s.cp.csrs, call)
	s.cp.mu.Unlock()
	if call.impersonated == "" {
		return nil, status.Error(codes.PermissionDenied, "shared mode: no ImpersonatedIdentity")
	}
	who, err := spiffe.Parse(call.impersonated)
	if err != nil {
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	ttl := time.Duration(req.GetValidityDuration()) * time.Second
	if ttl <= 0 {
		ttl = 24 * time.Hour
	}
	chain, err := s.cp.signer.Sign(ctx, []byte(req.GetCsr()), who, ttl)
	if err != nil {
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	return &pb.IstioCertificateResponse{CertChain: chain}, nil
}

// identities returns the identities node asked the CA for, sorted and deduplicated.
func (cp *controlPlane) identities(nodeName string) []string {
	cp.mu.Lock()
	defer cp.mu.Unlock()
	var out []string
	for _, c := range cp.csrs {
		if c.node == nodeName {
			out = append(out, c.impersonated)
		}
	}
	slices.Sort(out)
	return slices.Compact(out)
}

func (cp *controlPlane) csrCount() int {
	cp.mu.Lock()
	defer cp.mu.Unlock()
	return len(cp.csrs)
}

func (cp *controlPlane) nacksOf(typeURL string) []nack {
	cp.mu.Lock()
	defer cp.mu.Unlock()
	var out []nack
	for _, n := range cp.nacks {
		if n.typeURL == typeURL {
			out = append(out, n)
		}
	}
	return out
}

func (cp *controlPlane) pushAddresses(update map[string]types.Resource, remove []string) {
	cp.t.Helper()
	if err := cp.addrs.UpdateResources(update, remove); err != nil {
		cp.t.Fatal(err)
	}
}

func (cp *controlPlane) pushPolicy(name string, p *security.Authorization) {
	cp.t.Helper()
	if err := cp.auths.UpdateResource(name, p); err != nil {
		cp.t.Fatal(err)
	}
}

// mesh is the control plane and two nodes that have nothing but its address.
type mesh struct {
	t    *testing.T
	cp   *controlPlane
	a, b *node.Node
	// mutate, if set, adjusts each node's config before it starts.
	mutate func(name string, cfg *node.Config)
}

// newMesh starts the control plane and both nodes. Unless hold, it lets the xDS server answer
// and waits for both nodes to be ready; with hold, the streams wait until m.push.
func newMesh(t *testing.T, hold bool) *mesh {
	t.Helper()
	return newMeshWith(t, hold, nil)
}

// newMeshWith is newMesh with a per-node config change.
func newMeshWith(t *testing.T, hold bool, mutate func(name string, cfg *node.Config)) *mesh {
	t.Helper()
	meshtest.CheckLeaks(t) // first: its check runs after every other cleanup
	m := &mesh{t: t, cp: startControlPlane(t), mutate: mutate}
	m.a = m.start("node-a", "127.90.1.1")
	m.b = m.start("node-b", "127.90.2.1")
	meshtest.RequireZtgoGoroutines(t)
	if !hold {
		m.push()
		m.waitReady()
	}
	return m
}

// push lets the held xDS streams proceed once both nodes' streams reached the server: the
// server then sends its first response, the mesh. Holding them first lets tests observe the
// nodes before any config arrived (not ready, nothing routed).
func (m *mesh) push() {
	m.t.Helper()
	meshtest.WaitFor(m.t, 10*time.Second, func() bool { return m.cp.held.Load() >= 2 })
	m.cp.release()
}

// start runs a node fed only by xDS and the CA: no ConfigPath, ConfigInline or DefaultConfig.
// Its readiness endpoint listens on adminIP; node-a also takes SOCKS5 there.
func (m *mesh) start(name, adminIP string) *node.Node {
	m.t.Helper()
	cfg := node.Config{
		Name:   name,
		Source: node.SourceXDS,
		XDS: xds.Config{
			Address:        "http://" + m.cp.xdsAddr,
			NodeName:       name,
			PodName:        "ztunnel-" + name,
			PodNamespace:   "istio-system",
			InitialBackoff: 5 * time.Millisecond,
			MaxBackoff:     100 * time.Millisecond,
		},
		IstiodCA: &ca.IstiodConfig{
			Address:   "http://" + m.cp.caAddr,
			Plaintext: true,
			Headers:   map[string]string{nodeHeader: name},
		},
		ReadinessAddr: adminIP + ":0",
		DrainTimeout:  time.Second,
		DebugSnapshot: true,
		Logger:        meshtest.Logger(m.t, name, slog.LevelInfo),
	}
	if name == "node-a" {
		cfg.SOCKS5Addr = adminIP + ":0"
	}
	if m.mutate != nil {
		m.mutate(name, &cfg)
	}
	return meshtest.StartNode(m.t, cfg)
}

// readiness returns the status code and body of n's /healthz/ready.
func readiness(t *testing.T, n *node.Node) (int, string) {
	t.Helper()
	hc := &http.Client{Timeout: 2 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	resp, err := hc.Get("http://" + n.AdminAddr("readiness") + "/healthz/ready")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, strings.TrimSpace(string(body))
}

func (m *mesh) waitReady() {
	m.t.Helper()
	for _, n := range []*node.Node{m.a, m.b} {
		meshtest.WaitFor(m.t, 10*time.Second, func() bool {
			code, _ := readiness(m.t, n)
			return code == http.StatusOK
		})
	}
}

// socks opens a flow through node-a's SOCKS5 entry from src to target.
func (m *mesh) socks(src, target string) (*net.TCPConn, byte, error) {
	return meshtest.SOCKS5(m.a.SOCKS5Addr(), netip.MustParseAddr(src), target, 10*time.Second)
}

// transfer sends size bytes from src to target through the mesh and checks the echo byte
// for byte (length and SHA-256).
func (m *mesh) transfer(src, target string, size int, seed uint64) {
	m.t.Helper()
	c, code, err := m.socks(src, target)
	if err != nil || code != 0 {
		m.t.Fatalf("%s -> %s: SOCKS5 reply %d, err %v", src, target, code, err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(20 * time.Second))
	data := meshtest.RandomBytes(size, seed)
	got, err := meshtest.RoundTrip(c, data)
	if err != nil {
		m.t.Fatalf("%s -> %s: %v", src, target, err)
	}
	if len(got) != len(data) || sha256.Sum256(got) != sha256.Sum256(data) {
		m.t.Fatalf("%s -> %s: echo of %d bytes differs from the %d sent", src, target, len(got), len(data))
	}
}

// exchange writes b on c and reads it back from the echo.
func exchange(c *net.TCPConn, b string) error {
	c.SetDeadline(time.Now().Add(5 * time.Second))
	defer c.SetDeadline(time.Time{})
	if _, err := c.Write([]byte(b)); err != nil {
		return err
	}
	buf := make([]byte, len(b))
	if _, err := io.ReadFull(c, buf); err != nil {
		return err
	}
	if string(buf) != b {
		return fmt.Errorf("echo %q, want %q", buf, b)
	}
	return nil
}

// listening reports whether something accepts TCP on addr.
func listening(addr string) bool {
	c, err := net.DialTimeout("tcp", addr, 500*time.Millisecond)
	if err != nil {
		return false
	}
	c.Close()
	return true
}

// refused reports whether a TCP connect to addr is refused (nothing listens).
func refused(addr string) bool {
	c, err := net.DialTimeout("tcp", addr, 500*time.Millisecond)
	if err == nil {
		c.Close()
		return false
	}
	return errors.Is(err, syscall.ECONNREFUSED)
}

func knows(n *node.Node, addr string) bool {
	return n.Store().Load().WorkloadByAddr("", netip.MustParseAddr(addr)) != nil
}

// TestReadyOnlyAfterPush: with the xDS server holding its streams, both nodes are connected
// but not ready, know no workload, refuse a flow from client and have asked the CA for
// nothing. Once the server answers, both become ready, having fetched from the CA exactly
// the identities of their own workloads; node-b serves the CA's certificate for server; and
// 1 MiB goes byte-exact client -> VIP:80 and client -> server:8080.
func TestReadyOnlyAfterPush(t *testing.T) {
	m := newMesh(t, true)
	app := meshtest.StartApp(t, serverIP+":8080", meshtest.Echo)

	// Both nodes opened their xDS stream and wait for the first response.
	meshtest.WaitFor(t, 10*time.Second, func() bool { return m.cp.held.Load() >= 2 })
	for _, n := range []*node.Node{m.a, m.b} {
		code, body := readiness(t, n)
		if code != http.StatusInternalServerError || !strings.Contains(body, "state manager") {
			t.Fatalf("before the push: readiness %d %q, want 500 naming the state manager", code, body)
		}
		if v := n.Store().Load().Version(); v != 0 {
			t.Fatalf("before the push: snapshot version %d, want 0 (no local config)", v)
		}
	}
	if c, code, err := m.socks(clientIP, serverIP+":8080"); err != nil || c != nil || code != replyNotAllowed {
		t.Fatalf("before the push: flow from client: conn %v, reply %d, err %v; want refused (2)", c != nil, code, err)
	}
	if n := m.cp.csrCount(); n != 0 {
		t.Fatalf("before the push: %d CSRs sent, want none", n)
	}

	start := time.Now()
	m.push()
	m.waitReady()
	t.Logf("ready %v after the first push", time.Since(start).Round(time.Millisecond))

	// Readiness waited for the first round of certificates: each node asked the CA, in
	// shared mode, for the identities of its own workloads and nothing else.
	want := map[string][]string{
		"node-a": {id("client").String(), id("client2").String()},
		"node-b": {id("server").String()},
	}
	for nodeName, ids := range want {
		if got := m.cp.identities(nodeName); !slices.Equal(got, ids) {
			t.Fatalf("%s asked the CA for %q, want %q", nodeName, got, ids)
		}
	}

	// node-b's inbound HBONE presents server's certificate signed by the CA server.
	cert := meshtest.IssueCert(t, m.cp.signer, id("client"))
	d := tls.Dialer{NetDialer: &net.Dialer{Timeout: 5 * time.Second}, Config: meshtest.ClientTLS(cert, m.cp.signer.Roots(), id("server").String())}
	tc, err := d.DialContext(context.Background(), "tcp", serverIP+":15008")
	if err != nil {
		t.Fatalf("mTLS to node-b as the CA's client: %v", err)
	}
	tc.Close()

	m.transfer(clientIP, echoVIP+":80", 1<<20, 1)
	m.transfer(clientIP, serverIP+":8080", 1<<20, 2)
	if m.a.Pool().Len() == 0 {
		t.Fatal("node-a holds no pooled HBONE connection: the flows did not go through HBONE")
	}
	peers := app.Peers()
	if len(peers) != 2 {
		t.Fatalf("echo accepted %d connections, want 2", len(peers))
	}
	for _, p := range peers {
		if p.Addr() != netip.MustParseAddr(clientIP) {
			t.Fatalf("echo saw peer %s, want %s", p, clientIP)
		}
	}
	// The CA saw nothing else: no extra identity was requested for traffic.
	for nodeName, ids := range want {
		if got := m.cp.identities(nodeName); !slices.Equal(got, ids) {
			t.Fatalf("after traffic %s asked the CA for %q, want %q", nodeName, got, ids)
		}
	}
	if n := len(m.cp.nacksOf(xds.AddressType)) + len(m.cp.nacksOf(xds.AuthorizationType)); n != 0 {
		t.Fatalf("%d NACKs of a valid mesh", n)
	}
}

// TestPolicyPushClosesDeniedFlow: an Authorization pushed at run time (DENY principal
// client, namespace scope) closes client's established flow within seconds, leaves client2's
// flow working, and refuses new flows from client with SOCKS5 reply 2.
func TestPolicyPushClosesDeniedFlow(t *testing.T) {
	m := newMesh(t, false)
	meshtest.StartApp(t, serverIP+":8080", meshtest.Echo)

	denied, code, err := m.socks(clientIP, echoVIP+":80")
	if err != nil || code != 0 {
		t.Fatalf("client flow: reply %d, err %v", code, err)
	}
	defer denied.Close()
	kept, code, err := m.socks(client2IP, echoVIP+":80")
	if err != nil || code != 0 {
		t.Fatalf("client2 flow: reply %d, err %v", code, err)
	}
	defer kept.Close()
	for i, c := range []*net.TCPConn{denied, kept} {
		if err := exchange(c, "before"); err != nil {
			t.Fatalf("flow %d before the policy: %v", i, err)
		}
	}

	start := time.Now()
	m.cp.pushPolicy(denyKey, &security.Authorization{
		Name: "deny-client", Namespace: "default", Scope: security.Scope_NAMESPACE, Action: security.Action_DENY,
		Groups: []*security.Group{{Rules: []*security.Rules{{Matches: []*security.Match{{
			Principals: []*security.StringMatch{{MatchType: &security.StringMatch_Exact{Exact: "cluster.local/ns/default/sa/client"}}},
		}}}}}},
	})
	// The now-denied flow ends: EOF or a reset, not a read timeout.
	denied.SetReadDeadline(time.Now().Add(5 * time.Second))
	_, err = io.ReadAll(denied)
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		t.Fatal("client's flow is still open 5s after the DENY was pushed")
	}
	t.Logf("denied flow closed %v after the push (read: %v)", time.Since(start).Round(time.Millisecond), err)

	if err := exchange(kept, "after"); err != nil {
		t.Fatalf("client2's flow broke with the policy push: %v", err)
	}
	if c, code, err := m.socks(clientIP, echoVIP+":80"); err != nil || c != nil || code != replyNotAllowed {
		t.Fatalf("new client flow after the DENY: conn %v, reply %d, err %v; want reply 2", c != nil, code, err)
	}
	m.transfer(client2IP, echoVIP+":80", 64<<10, 3)
	if n := m.cp.nacksOf(xds.AuthorizationType); len(n) != 0 {
		t.Fatalf("policy NACKed: %+v", n)
	}
}

// TestWorkloadUpdateReroutesService: one push adds server2 behind echo and removes server.
// node-b closes server's inbound listener and opens server2's, and new flows to the VIP
// reach server2's app, which sees the client's address. node-b fetched server2's identity
// from the CA.
func TestWorkloadUpdateReroutesService(t *testing.T) {
	m := newMesh(t, false)
	old := meshtest.StartApp(t, serverIP+":8080", meshtest.Echo)
	app2 := meshtest.StartApp(t, server2IP+":8080", meshtest.Echo)
	m.transfer(clientIP, echoVIP+":80", 1024, 4)
	if len(old.Peers()) != 1 || len(app2.Peers()) != 0 {
		t.Fatalf("before the update: server saw %d flows, server2 %d; want 1 and 0", len(old.Peers()), len(app2.Peers()))
	}

	m.cp.pushAddresses(map[string]types.Resource{
		uid("server2"): wlRes(workload("server2", "server2", server2IP, "node-b", true)),
	}, []string{uid("server")})
	meshtest.WaitFor(t, 10*time.Second, func() bool {
		return knows(m.a, server2IP) && !knows(m.a, serverIP) && knows(m.b, server2IP) && !knows(m.b, serverIP)
	})
	meshtest.WaitFor(t, 10*time.Second, func() bool { return listening(server2IP + ":15008") })
	meshtest.WaitFor(t, 10*time.Second, func() bool { return refused(serverIP + ":15008") })

	const flows = 4
	for i := range flows {
		m.transfer(clientIP, echoVIP+":80", 64<<10, uint64(10+i))
	}
	if n := len(old.Peers()); n != 1 {
		t.Fatalf("removed server got %d more flows", n-1)
	}
	peers := app2.Peers()
	if len(peers) != flows {
		t.Fatalf("server2 got %d flows, want %d", len(peers), flows)
	}
	for _, p := range peers {
		if p.Addr() != netip.MustParseAddr(clientIP) {
			t.Fatalf("server2 saw peer %s, want %s", p, clientIP)
		}
	}
	if got := m.cp.identities("node-b"); !slices.Contains(got, id("server2").String()) {
		t.Fatalf("node-b asked the CA for %q, want server2's identity among them", got)
	}
}

// TestBadResourceNACKedGoodApplied: a push holding a good workload and one with tunnel
// protocol LEGACY_ISTIO_MTLS is NACKed by both nodes naming the bad one, while the good one
// applies: node-b listens for it and traffic reaches it; the bad one is in no node's view.
// Pushing the bad workload fixed is then accepted and it becomes reachable too.
func TestBadResourceNACKedGoodApplied(t *testing.T) {
	m := newMesh(t, false)
	good := meshtest.StartApp(t, goodIP+":8080", meshtest.Echo)
	fixed := meshtest.StartApp(t, legacyIP+":8080", meshtest.Echo)

	legacy := workload("legacy", "legacy", legacyIP, "node-b", false)
	legacy.TunnelProtocol = workloadapi.TunnelProtocol_LEGACY_ISTIO_MTLS
	m.cp.pushAddresses(map[string]types.Resource{
		uid("good"):   wlRes(workload("good", "good", goodIP, "node-b", false)),
		uid("legacy"): wlRes(legacy),
	}, nil)

	meshtest.WaitFor(t, 10*time.Second, func() bool {
		nodes := map[string]bool{}
		for _, n := range m.cp.nacksOf(xds.AddressType) {
			if strings.Contains(n.message, uid("legacy")) && strings.Contains(n.message, "LEGACY_ISTIO_MTLS") {
				nodes[n.node] = true
			}
		}
		return nodes["node-a"] && nodes["node-b"]
	})
	for _, n := range m.cp.nacksOf(xds.AddressType) {
		if strings.Contains(n.message, uid("good")) {
			t.Fatalf("%s NACK names the good workload: %s", n.node, n.message)
		}
	}

	meshtest.WaitFor(t, 10*time.Second, func() bool { return knows(m.a, goodIP) && knows(m.b, goodIP) })
	meshtest.WaitFor(t, 10*time.Second, func() bool { return listening(goodIP + ":15008") })
	m.transfer(clientIP, goodIP+":8080", 64<<10, 5)
	if p := good.Peers(); len(p) != 1 || p[0].Addr() != netip.MustParseAddr(clientIP) {
		t.Fatalf("good workload's app saw %v, want one flow from %s", p, clientIP)
	}
	if knows(m.a, legacyIP) || knows(m.b, legacyIP) {
		t.Fatal("the NACKed workload is in a node's view")
	}
	if !refused(legacyIP + ":15008") {
		t.Fatal("node-b listens for HBONE on the NACKed workload's address")
	}

	// The bad resource, fixed, is accepted on the next push.
	before := len(m.cp.nacksOf(xds.AddressType))
	m.cp.pushAddresses(map[string]types.Resource{
		uid("legacy"): wlRes(workload("legacy", "legacy", legacyIP, "node-b", false)),
	}, nil)
	meshtest.WaitFor(t, 10*time.Second, func() bool { return knows(m.a, legacyIP) && knows(m.b, legacyIP) })
	meshtest.WaitFor(t, 10*time.Second, func() bool { return listening(legacyIP + ":15008") })
	m.transfer(clientIP, legacyIP+":8080", 64<<10, 6)
	if len(fixed.Peers()) != 1 {
		t.Fatalf("fixed workload's app got %d flows, want 1", len(fixed.Peers()))
	}
	if after := len(m.cp.nacksOf(xds.AddressType)); after != before {
		t.Fatalf("the fixed push was NACKed: %+v", m.cp.nacksOf(xds.AddressType)[before:])
	}
}

// overlayYAML is the local config both nodes apply on top of istiod's view in SourceBoth: a
// workload istiod does not know, and a policy that denies client2.
const overlayYAML = `
workloads:
- uid: Kubernetes//Pod/default/extra
  name: extra
  namespace: default
  serviceAccount: extra
  workloadIps: ["127.90.2.50"]
  protocol: HBONE
  node: node-b
policies:
- name: deny-client2
  namespace: default
  scope: Namespace
  action: Deny
  rules:
  - - - principals: [!Exact cluster.local/ns/default/sa/client2]
`

// TestSourceBothOverlay: with SourceBoth, the local config's resources join istiod's, and
// later xDS pushes still reach the merged view.
func TestSourceBothOverlay(t *testing.T) {
	m := newMeshWith(t, false, func(name string, cfg *node.Config) {
		cfg.Source = node.SourceBoth
		cfg.ConfigInline = overlayYAML
	})
	meshtest.StartApp(t, "127.90.2.10:8080", meshtest.Echo)
	meshtest.StartApp(t, "127.90.2.50:8080", meshtest.Echo)
	// From istiod: the echo service. From the overlay: workload extra, which both nodes know
	// (unknown, it would be reached as passthrough and the transfer would prove nothing) and
	// node-b serves HBONE for.
	overlaid := func() bool {
		return knows(m.a, "127.90.2.50") && knows(m.b, "127.90.2.50") && listening("127.90.2.50:15008")
	}
	meshtest.WaitFor(t, 5*time.Second, overlaid)
	// The echo service's endpoint comes from istiod: node-b opens its HBONE listener once its
	// snapshot has it, which can be a moment after the overlay's.
	meshtest.WaitFor(t, 5*time.Second, func() bool { return knows(m.a, "127.90.2.10") && listening("127.90.2.10:15008") })
	m.transfer("127.90.1.10", "127.90.100.1:80", 64<<10, 1)
	m.transfer("127.90.1.10", "127.90.2.50:8080", 64<<10, 2)
	// The overlay's DENY applies on node-b.
	if c, code, _ := m.socks("127.90.1.11", "127.90.100.1:80"); c != nil || code != 2 {
		if c != nil {
			c.Close()
		}
		t.Fatalf("client2 through the overlay's deny: SOCKS5 reply %d, want 2", code)
	}
	// A later push from istiod is merged too.
	meshtest.StartApp(t, "127.90.2.20:8080", meshtest.Echo)
	m.cp.pushAddresses(map[string]types.Resource{uid("server2"): wlRes(workload("server2", "server2", "127.90.2.20", "node-b", false))}, nil)
	meshtest.WaitFor(t, 5*time.Second, func() bool { return knows(m.a, "127.90.2.20") && listening("127.90.2.20:15008") })
	m.transfer("127.90.1.10", "127.90.2.20:8080", 64<<10, 3)
	// The overlay's workload survived the merge of that push.
	if !overlaid() {
		t.Fatal("the overlay's workload is gone after an xDS push")
	}
	m.transfer("127.90.1.10", "127.90.2.50:8080", 1024, 4)
}
