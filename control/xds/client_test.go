package xds

import (
	"context"
	"io"
	"log/slog"
	"maps"
	"net/netip"
	"os"
	"path/filepath"
	"reflect"
	"runtime"
	"slices"
	"strings"
	"testing"
	"time"

	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/envoyproxy/go-control-plane/pkg/cache/types"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"
	"istio.io/istio/pkg/workloadapi"

	"github.com/ztgo/ztgo/control/snapshot"
)

// testLogger writes the client's log into the test's log, shown when a test fails.
type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

func testLogger(t *testing.T) *slog.Logger {
	return slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

// startClient starts a client of srv (or of cfg.Address if set) with a short backoff. The
// client is stopped when the test ends.
func startClient(t *testing.T, srv *xdsServer, edit func(*Config)) (*Client, *snapshot.Store) {
	t.Helper()
	cfg := Config{
		PodName:        "ztunnel-abcde",
		PodNamespace:   "istio-system",
		NodeName:       "node1",
		InstanceIP:     "10.0.0.9",
		InitialBackoff: 5 * time.Millisecond,
		MaxBackoff:     50 * time.Millisecond,
	}
	if srv != nil {
		cfg.Address = srv.url()
	}
	if edit != nil {
		edit(&cfg)
	}
	st := snapshot.NewStore()
	c, err := New(cfg, st, testLogger(t), prometheus.NewRegistry())
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Stop)
	return c, st
}

// checkGoroutines fails the test if the goroutine count does not settle back to baseline:
// a stopped client must leave nothing running (streams, gRPC transports, timers).
func checkGoroutines(t *testing.T, baseline int) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for runtime.NumGoroutine() > baseline {
		if time.Now().After(deadline) {
			buf := make([]byte, 1<<20)
			t.Fatalf("%d goroutines, %d before the client:\n%s", runtime.NumGoroutine(), baseline, buf[:runtime.Stack(buf, true)])
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func waitReady(t *testing.T, c *Client) {
	t.Helper()
	select {
	case <-c.Ready():
	case <-time.After(10 * time.Second):
		t.Fatal("client not ready")
	}
}

// connErrors is how many connection errors the client has counted.
func connErrors(c *Client) float64 {
	return testutil.ToFloat64(c.metrics.terminations.WithLabelValues(string(ReasonConnectionError)))
}

// waitConnErrors waits until the client has counted at least n connection errors, and fails
// the test with msg if it does not within 10 s.
func waitConnErrors(t *testing.T, c *Client, n float64, msg string) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for connErrors(c) < n {
		if time.Now().After(deadline) {
			t.Fatal(msg)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func isAck(r *discovery.DeltaDiscoveryRequest, typeURL string) bool {
	return r.GetTypeUrl() == typeURL && r.GetResponseNonce() != "" && r.GetErrorDetail() == nil
}

func addrIs(w *snapshot.Workload, ip string) bool {
	return w != nil && len(w.Addresses) == 1 && w.Addresses[0] == netip.MustParseAddr(ip)
}

func TestInitialSyncAndUpdates(t *testing.T) {
	srv := newXDSServer(t, nil)
	srv.setService(svc("a", 10, 96, 0, 1))
	srv.setWorkload(withService(wl("w1", 10, 0, 0, 1), "a"))
	srv.setWorkload(wl("w2", 10, 0, 0, 2))
	srv.setPolicy(denyPort("p1", 9999))
	baseline := runtime.NumGoroutine()
	c, st := startClient(t, srv, nil)
	waitReady(t, c)
	defer checkGoroutines(t, baseline)
	defer c.Stop()

	// Ready means both first responses were applied: the snapshot holds the whole mesh.
	s := st.Load()
	w1 := s.WorkloadByUID(uid("w1"))
	if !addrIs(w1, "10.0.0.1") || w1.Protocol != snapshot.TunnelHBONE || w1.Node != "node1" || w1.TrustDomain != "cluster.local" {
		t.Fatalf("w1 = %+v", w1)
	}
	if got := s.WorkloadByAddr("", netip.MustParseAddr("10.0.0.2")); got == nil || got.UID != uid("w2") {
		t.Fatalf("workload by address = %+v", got)
	}
	a := s.ServiceByKey(svcKey("a"))
	if a == nil || len(a.VIPs) != 1 || a.VIPs[0].Addr != netip.MustParseAddr("10.96.0.1") || a.Ports[80] != 8080 {
		t.Fatalf("service a = %+v", a)
	}
	if eps := s.Endpoints(a); len(eps) != 1 || eps[0].Workload.UID != uid("w1") || eps[0].Ports[80] != 8080 {
		t.Fatalf("endpoints of a = %+v", eps)
	}
	if p := s.PolicyByKey("ns/p1"); p == nil || p.Action != snapshot.ActionDeny || p.Scope != snapshot.ScopeNamespace ||
		!reflect.DeepEqual(p.Rules, []snapshot.Rule{{{{DestinationPorts: []uint16{9999}}}}}) {
		t.Fatalf("policy p1 = %+v", p)
	}

	// Update a workload.
	srv.setWorkload(withService(wl("w1", 10, 0, 0, 11), "a"))
	waitSnapshot(t, st, "w1 moved", func(s *snapshot.Snapshot) bool { return addrIs(s.WorkloadByUID(uid("w1")), "10.0.0.11") })

	// Add a workload and a service, remove a workload, in one push.
	srv.setAddresses(map[string]types.Resource{
		uid("w3"):                   &workloadapi.Address{Type: &workloadapi.Address_Workload{Workload: withService(wl("w3", 10, 0, 0, 3), "b")}},
		"ns/b.ns.svc.cluster.local": &workloadapi.Address{Type: &workloadapi.Address_Service{Service: svc("b", 10, 96, 0, 2)}},
	}, []string{uid("w2")})
	s = waitSnapshot(t, st, "w3 and b added, w2 removed", func(s *snapshot.Snapshot) bool {
		return s.WorkloadByUID(uid("w3")) != nil && s.WorkloadByUID(uid("w2")) == nil
	})
	if eps := s.Endpoints(s.ServiceByKey(svcKey("b"))); len(eps) != 1 || eps[0].Workload.UID != uid("w3") {
		t.Fatalf("endpoints of b = %+v", eps)
	}

	// Policies: add one, update one, remove one.
	srv.setPolicy(denyPort("p2", 7777))
	waitSnapshot(t, st, "p2 added", func(s *snapshot.Snapshot) bool { return s.PolicyByKey("ns/p2") != nil })
	srv.setPolicy(denyPort("p2", 6666))
	waitSnapshot(t, st, "p2 updated", func(s *snapshot.Snapshot) bool {
		p := s.PolicyByKey("ns/p2")
		return p != nil && p.Rules[0][0][0].DestinationPorts[0] == 6666
	})
	srv.removePolicy("ns/p1")
	waitSnapshot(t, st, "p1 removed", func(s *snapshot.Snapshot) bool { return s.PolicyByKey("ns/p1") == nil })

	// Remove a service: its endpoint is staged again.
	srv.removeAddress("ns/a.ns.svc.cluster.local")
	s = waitSnapshot(t, st, "a removed", func(s *snapshot.Snapshot) bool { return s.ServiceByKey(svcKey("a")) == nil })
	if !slices.Contains(s.StagedServices(), "ns/a.ns.svc.cluster.local") || s.WorkloadByUID(uid("w1")) == nil {
		t.Fatalf("staged = %v", s.StagedServices())
	}

	if n := len(srv.nacks(AddressType)) + len(srv.nacks(AuthorizationType)); n != 0 {
		t.Fatalf("%d NACKs for valid resources", n)
	}
}

func TestPartialPushIsNACKedAndGoodResourcesApply(t *testing.T) {
	srv := newXDSServer(t, nil)
	srv.setWorkload(wl("good", 10, 0, 0, 1))
	c, st := startClient(t, srv, nil)
	waitReady(t, c)

	legacy := wl("legacy", 10, 0, 0, 3)
	legacy.TunnelProtocol = workloadapi.TunnelProtocol_LEGACY_ISTIO_MTLS
	noName := wl("noname", 10, 0, 0, 4)
	noName.Name = "" // converts, but the snapshot refuses it
	srv.setAddresses(map[string]types.Resource{
		uid("bad"):    &workloadapi.Address{Type: &workloadapi.Address_Workload{Workload: wl("bad", 1, 2, 3)}},
		uid("legacy"): &workloadapi.Address{Type: &workloadapi.Address_Workload{Workload: legacy}},
		uid("noname"): &workloadapi.Address{Type: &workloadapi.Address_Workload{Workload: noName}},
		uid("good2"):  &workloadapi.Address{Type: &workloadapi.Address_Workload{Workload: wl("good2", 10, 0, 0, 2)}},
	}, nil)
	srv.waitFor("a NACK", func(reqs []*discovery.DeltaDiscoveryRequest, _ []*discovery.DeltaDiscoveryResponse, _ []metadata.MD) bool {
		return slices.ContainsFunc(reqs, func(r *discovery.DeltaDiscoveryRequest) bool { return r.GetErrorDetail() != nil })
	})
	nack := srv.nacks(AddressType)[0]
	parts := strings.Split(nack.GetErrorDetail().GetMessage(), "; ")
	slices.Sort(parts)
	want := []string{
		uid("bad") + ": workload ns/bad: addresses[0]: 3 bytes is not an IPv4 or IPv6 address",
		uid("legacy") + ": workload ns/legacy: tunnel_protocol: LEGACY_ISTIO_MTLS is not supported",
		uid("noname") + ": workload " + uid("noname") + ": name: must not be empty",
	}
	if !reflect.DeepEqual(parts, want) {
		t.Fatalf("NACK message parts:\n%q\nwant\n%q", parts, want)
	}
	// The NACK answers the push that carried the bad resources.
	if nack.GetResponseNonce() == "" {
		t.Fatal("NACK without nonce")
	}
	// The good resource of the same push applied; the bad ones did not.
	s := waitSnapshot(t, st, "good2 applied", func(s *snapshot.Snapshot) bool { return s.WorkloadByUID(uid("good2")) != nil })
	for _, n := range []string{"bad", "legacy", "noname"} {
		if s.WorkloadByUID(uid(n)) != nil {
			t.Fatalf("rejected %s is in the snapshot", n)
		}
	}

	// A bad update keeps the previous version of the resource.
	broken := wl("good", 10, 0, 0, 99)
	broken.Status = 7
	srv.setWorkload(broken)
	srv.waitFor("second NACK", func(reqs []*discovery.DeltaDiscoveryRequest, _ []*discovery.DeltaDiscoveryResponse, _ []metadata.MD) bool {
		n := 0
		for _, r := range reqs {
			if r.GetErrorDetail() != nil {
				n++
			}
		}
		return n == 2
	})
	if msg := srv.nacks(AddressType)[1].GetErrorDetail().GetMessage(); msg != uid("good")+": workload ns/good: status: unknown value 7" {
		t.Fatalf("second NACK = %q", msg)
	}
	if !addrIs(st.Load().WorkloadByUID(uid("good")), "10.0.0.1") {
		t.Fatalf("good = %+v, want its previous version", st.Load().WorkloadByUID(uid("good")))
	}
}

func TestReadyWaitsForBothTypes(t *testing.T) {
	srv := newXDSServer(t, nil)
	srv.setWorkload(wl("bad", 1, 2, 3)) // the first Address response is NACKed
	srv.setPolicy(denyPort("p1", 1))
	c, st := startClient(t, srv, nil)

	srv.waitFor("Address NACK and Authorization ACK", func(reqs []*discovery.DeltaDiscoveryRequest, _ []*discovery.DeltaDiscoveryResponse, _ []metadata.MD) bool {
		nacked := slices.ContainsFunc(reqs, func(r *discovery.DeltaDiscoveryRequest) bool {
			return r.GetTypeUrl() == AddressType && r.GetErrorDetail() != nil
		})
		acked := slices.ContainsFunc(reqs, func(r *discovery.DeltaDiscoveryRequest) bool { return isAck(r, AuthorizationType) })
		return nacked && acked
	})
	select {
	case <-c.Ready():
		t.Fatal("ready although the Address response was NACKed")
	default:
	}
	if st.Load().PolicyByKey("ns/p1") == nil {
		t.Fatal("policy not applied")
	}

	fixed := wl("bad", 10, 0, 0, 1)
	srv.setWorkload(fixed)
	waitReady(t, c)
	if st.Load().WorkloadByUID(uid("bad")) == nil {
		t.Fatal("fixed workload missing")
	}
}

func TestReadyNeedsAuthorizationToo(t *testing.T) {
	srv := newXDSServer(t, nil)
	srv.setWorkload(wl("w1", 10, 0, 0, 1))
	bad := denyPort("p1", 1)
	bad.Action = 2
	srv.setPolicy(bad)
	c, _ := startClient(t, srv, nil)
	srv.waitFor("Address ACK and Authorization NACK", func(reqs []*discovery.DeltaDiscoveryRequest, _ []*discovery.DeltaDiscoveryResponse, _ []metadata.MD) bool {
		nacked := slices.ContainsFunc(reqs, func(r *discovery.DeltaDiscoveryRequest) bool {
			return r.GetTypeUrl() == AuthorizationType && r.GetErrorDetail() != nil
		})
		return nacked && slices.ContainsFunc(reqs, func(r *discovery.DeltaDiscoveryRequest) bool { return isAck(r, AddressType) })
	})
	select {
	case <-c.Ready():
		t.Fatal("ready although the Authorization response was NACKed")
	default:
	}
	if msg := srv.nacks(AuthorizationType)[0].GetErrorDetail().GetMessage(); msg != "ns/p1: policy ns/p1: action: unknown value 2 (only ALLOW and DENY are defined)" {
		t.Fatalf("NACK = %q", msg)
	}
	srv.setPolicy(denyPort("p1", 1))
	waitReady(t, c)
}

func TestReconnectResumesWithInitialVersions(t *testing.T) {
	srv := newXDSServer(t, nil)
	srv.setService(svc("a", 10, 96, 0, 1))
	srv.setWorkload(withService(wl("w1", 10, 0, 0, 1), "a"))
	srv.setWorkload(wl("w2", 10, 0, 0, 2))
	srv.setPolicy(denyPort("p1", 1))
	srv.setPolicy(denyPort("p2", 2))
	c, st := startClient(t, srv, nil)
	waitReady(t, c)

	// Two rejections before the restart: a resource never accepted, and a bad update of an
	// accepted one (whose previous version the client keeps).
	w2Accepted := srv.version(AddressType, uid("w2"))
	srv.setWorkload(wl("bad", 1, 2, 3))
	srv.waitFor("NACK of bad", func(reqs []*discovery.DeltaDiscoveryRequest, _ []*discovery.DeltaDiscoveryResponse, _ []metadata.MD) bool {
		return slices.ContainsFunc(reqs, func(r *discovery.DeltaDiscoveryRequest) bool { return r.GetErrorDetail() != nil })
	})
	w2bad := wl("w2", 10, 0, 0, 2)
	w2bad.TunnelProtocol = workloadapi.TunnelProtocol_LEGACY_ISTIO_MTLS
	srv.setWorkload(w2bad)
	srv.waitFor("NACK of w2", func(reqs []*discovery.DeltaDiscoveryRequest, _ []*discovery.DeltaDiscoveryResponse, _ []metadata.MD) bool {
		return len(slices.DeleteFunc(slices.Clone(reqs), func(r *discovery.DeltaDiscoveryRequest) bool { return r.GetErrorDetail() == nil })) == 2
	})
	wantAddrVersions := map[string]string{
		uid("w1"):                   srv.version(AddressType, uid("w1")),
		uid("w2"):                   w2Accepted,
		"ns/a.ns.svc.cluster.local": srv.version(AddressType, "ns/a.ns.svc.cluster.local"),
	}
	wantAuthVersions := map[string]string{
		"ns/p1": srv.version(AuthorizationType, "ns/p1"),
		"ns/p2": srv.version(AuthorizationType, "ns/p2"),
	}
	firstAddrInitial := len(srv.initialRequests(AddressType))
	firstAuthInitial := len(srv.initialRequests(AuthorizationType))

	// The server goes away; while it is down the mesh changes.
	srv.stop()
	srv.removeAddress(uid("w1"))
	srv.removePolicy("ns/p1")
	srv.setWorkload(wl("w3", 10, 0, 0, 3))
	srv.start()

	srv.waitFor("reconnect", func(reqs []*discovery.DeltaDiscoveryRequest, _ []*discovery.DeltaDiscoveryResponse, _ []metadata.MD) bool {
		return len(srv.initialRequestsLocked(reqs, AddressType)) > firstAddrInitial && len(srv.initialRequestsLocked(reqs, AuthorizationType)) > firstAuthInitial
	})
	addrInit := srv.initialRequests(AddressType)[firstAddrInitial]
	if got := addrInit.GetInitialResourceVersions(); !maps.Equal(got, wantAddrVersions) {
		t.Fatalf("Address initial_resource_versions = %v, want %v (rejected resources left out or at their accepted version)", got, wantAddrVersions)
	}
	if got := srv.initialRequests(AuthorizationType)[firstAuthInitial].GetInitialResourceVersions(); !maps.Equal(got, wantAuthVersions) {
		t.Fatalf("Authorization initial_resource_versions = %v, want %v", got, wantAuthVersions)
	}
	if len(addrInit.GetResourceNamesSubscribe()) != 0 || addrInit.GetNode().GetId() != "ztunnel~10.0.0.9~ztunnel-abcde.istio-system~istio-system.svc.cluster.local" {
		t.Fatalf("initial request = %v", addrInit)
	}

	// The server's view replaces ours: removals made while disconnected arrive as
	// removed_resources and apply; unchanged resources stay without being re-sent.
	s := waitSnapshot(t, st, "resync", func(s *snapshot.Snapshot) bool {
		return s.WorkloadByUID(uid("w1")) == nil && s.PolicyByKey("ns/p1") == nil && s.WorkloadByUID(uid("w3")) != nil
	})
	if s.ServiceByKey(svcKey("a")) == nil || s.PolicyByKey("ns/p2") == nil || !addrIs(s.WorkloadByUID(uid("w2")), "10.0.0.2") {
		t.Fatal("resources the server still has were lost on reconnect")
	}
	resync := srv.firstResponseOnStreamOf(addrInit)
	if got, want := names(resync), []string{uid("bad"), uid("w2"), uid("w3")}; !slices.Equal(got, want) {
		t.Fatalf("resync sent %v, want %v (only what differs from the client's claim)", got, want)
	}
	if got := resync.GetRemovedResources(); !slices.Equal(got, []string{uid("w1")}) {
		t.Fatalf("resync removed %v", got)
	}
	// The still-bad resources were retried and rejected again.
	srv.waitFor("NACK after reconnect", func(reqs []*discovery.DeltaDiscoveryRequest, _ []*discovery.DeltaDiscoveryResponse, _ []metadata.MD) bool {
		return len(slices.DeleteFunc(slices.Clone(reqs), func(r *discovery.DeltaDiscoveryRequest) bool { return r.GetErrorDetail() == nil })) == 3
	})
}

// initialRequestsLocked is initialRequests for use inside waitFor, which holds the lock.
func (s *xdsServer) initialRequestsLocked(reqs []*discovery.DeltaDiscoveryRequest, typeURL string) []*discovery.DeltaDiscoveryRequest {
	var out []*discovery.DeltaDiscoveryRequest
	for _, r := range reqs {
		if r.GetTypeUrl() == typeURL && r.GetNode() != nil {
			out = append(out, r)
		}
	}
	return out
}

func TestEndpointsBeforeServiceAreStaged(t *testing.T) {
	srv := newXDSServer(t, nil)
	srv.setWorkload(withService(wl("w1", 10, 0, 0, 1), "late"))
	srv.setWorkload(withService(wl("w2", 10, 0, 0, 2), "late"))
	c, st := startClient(t, srv, nil)
	waitReady(t, c)
	s := st.Load()
	if s.ServiceByKey(svcKey("late")) != nil || !slices.Equal(s.StagedServices(), []string{"ns/late.ns.svc.cluster.local"}) {
		t.Fatalf("staged = %v", s.StagedServices())
	}
	srv.setService(svc("late", 10, 96, 0, 9))
	s = waitSnapshot(t, st, "service arrived", func(s *snapshot.Snapshot) bool { return s.ServiceByKey(svcKey("late")) != nil })
	eps := s.Endpoints(s.ServiceByKey(svcKey("late")))
	if len(eps) != 2 || eps[0].Workload.UID != uid("w1") || eps[1].Workload.UID != uid("w2") || len(s.StagedServices()) != 0 {
		t.Fatalf("endpoints = %+v, staged = %v", eps, s.StagedServices())
	}
}

func TestStreamHeadersAndTokenRotation(t *testing.T) {
	srv := newXDSServer(t, nil)
	token := filepath.Join(t.TempDir(), "istio-token")
	if err := os.WriteFile(token, []byte("tok-1\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	c, _ := startClient(t, srv, func(cfg *Config) {
		cfg.TokenFile = token
		cfg.ClusterID = "cluster-x"
		cfg.Headers = map[string]string{"X-Extra": "v1", "clusterid": "overridden"}
	})
	waitReady(t, c)
	mdAt := func(i int) metadata.MD {
		srv.waitFor("stream", func(_ []*discovery.DeltaDiscoveryRequest, _ []*discovery.DeltaDiscoveryResponse, md []metadata.MD) bool {
			return len(md) > i
		})
		srv.mu.Lock()
		defer srv.mu.Unlock()
		return srv.streamMD[i]
	}
	check := func(md metadata.MD, tok string) {
		t.Helper()
		if got := md.Get("authorization"); !slices.Equal(got, []string{"Bearer " + tok}) {
			t.Fatalf("authorization = %q", got)
		}
		if got := md.Get("clusterid"); !slices.Equal(got, []string{"cluster-x"}) {
			t.Fatalf("clusterid = %q", got)
		}
		if got := md.Get("x-extra"); !slices.Equal(got, []string{"v1"}) {
			t.Fatalf("x-extra = %q", got)
		}
	}
	check(mdAt(0), "tok-1")

	// The token file is read again on reconnect.
	if err := os.WriteFile(token, []byte("tok-2"), 0o600); err != nil {
		t.Fatal(err)
	}
	srv.stop()
	srv.start()
	check(mdAt(1), "tok-2")

	// An empty token file fails the connect (a connection error, retried with backoff)...
	if err := os.WriteFile(token, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	before := connErrors(c)
	srv.stop()
	srv.start()
	waitConnErrors(t, c, before+2, "no connection errors with an empty token file")
	srv.mu.Lock()
	streams := len(srv.streamMD)
	srv.mu.Unlock()
	if streams != 2 {
		t.Fatalf("%d streams opened, want no stream without a token", streams)
	}
	// ...until a token is there again.
	if err := os.WriteFile(token, []byte("tok-3"), 0o600); err != nil {
		t.Fatal(err)
	}
	check(mdAt(2), "tok-3")
}

func TestStaticTokenAndNoToken(t *testing.T) {
	srv := newXDSServer(t, nil)
	c, _ := startClient(t, srv, func(cfg *Config) { cfg.Token = "static"; cfg.ClusterID = "Kubernetes" })
	waitReady(t, c)
	c.Stop()
	c2, _ := startClient(t, srv, func(cfg *Config) { cfg.ClusterID = "Kubernetes" })
	waitReady(t, c2)
	srv.mu.Lock()
	defer srv.mu.Unlock()
	if got := srv.streamMD[0].Get("authorization"); !slices.Equal(got, []string{"Bearer static"}) {
		t.Fatalf("authorization = %q", got)
	}
	// Without a token ztunnel sends neither authorization nor clusterid.
	if md := srv.streamMD[1]; len(md.Get("authorization")) != 0 || len(md.Get("clusterid")) != 0 {
		t.Fatalf("metadata without a token = %v", md)
	}
}

func TestMetricsAndTerminations(t *testing.T) {
	srv := newXDSServer(t, nil)
	srv.setWorkload(wl("w1", 10, 0, 0, 1))
	c, _ := startClient(t, srv, nil)
	waitReady(t, c)
	if n := testutil.ToFloat64(c.metrics.messages.WithLabelValues(AddressType)); n < 1 {
		t.Fatalf("messages = %v", n)
	}
	// The bytes are the encoded resources, as ztunnel counts them.
	resp := srv.responsesOf(AddressType)[0]
	want := 0
	for _, r := range resp.GetResources() {
		want += len(r.GetResource().GetValue())
	}
	if got := testutil.ToFloat64(c.metrics.bytes.WithLabelValues(AddressType)); int(got) != want || want == 0 {
		t.Fatalf("bytes = %v, want %d", got, want)
	}
	srv.stop()
	srv.start()
	total := func() float64 {
		sum := 0.0
		for _, r := range []TerminationReason{ReasonConnectionError, ReasonError, ReasonReconnect, ReasonComplete} {
			sum += testutil.ToFloat64(c.metrics.terminations.WithLabelValues(string(r)))
		}
		return sum
	}
	deadline := time.Now().Add(10 * time.Second)
	for total() < 1 {
		if time.Now().After(deadline) {
			t.Fatal("server stop not counted as a termination")
		}
		time.Sleep(5 * time.Millisecond)
	}
	srv.waitFor("reconnect", func(_ []*discovery.DeltaDiscoveryRequest, _ []*discovery.DeltaDiscoveryResponse, md []metadata.MD) bool {
		return len(md) == 2
	})
}

func TestMetricsRegistration(t *testing.T) {
	reg := prometheus.NewRegistry()
	if _, err := New(Config{Address: "http://127.0.0.1:1"}, snapshot.NewStore(), nil, reg); err != nil {
		t.Fatal(err)
	}
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, mf := range mfs {
		got = append(got, mf.GetName())
	}
	if want := []string{"istio_xds_connection_terminations_total"}; !slices.Equal(got, want) {
		// Vectors without children are not gathered; terminations are pre-created.
		t.Fatalf("gathered %v, want %v", got, want)
	}
	// A second client on the same registry is refused, not silently double-counted.
	if _, err := New(Config{Address: "http://127.0.0.1:1"}, snapshot.NewStore(), nil, reg); err == nil {
		t.Fatal("second registration accepted")
	}
}

func TestStopWhileServerUnreachable(t *testing.T) {
	srv := newXDSServer(t, nil)
	addr := srv.url()
	srv.stop() // nothing listens there now
	baseline := runtime.NumGoroutine()
	c, _ := startClient(t, nil, func(cfg *Config) { cfg.Address = addr })
	waitConnErrors(t, c, 3, "no connection errors")
	start := time.Now()
	c.Stop()
	if d := time.Since(start); d > time.Second {
		t.Fatalf("Stop took %v", d)
	}
	c.Stop() // idempotent
	checkGoroutines(t, baseline)
	select {
	case <-c.Ready():
		t.Fatal("ready without a server")
	default:
	}
}

func TestClassify(t *testing.T) {
	st := func(code codes.Code, msg string) error { return status.Error(code, msg) }
	tests := []struct {
		name        string
		err         error
		established bool
		want        TerminationReason
	}{
		{"dial failure", io.ErrUnexpectedEOF, false, ReasonConnectionError},
		{"status before first response", st(codes.Unavailable, "connection refused"), false, ReasonConnectionError},
		{"clean end before first response", io.EOF, false, ReasonConnectionError},
		{"clean end", io.EOF, true, ReasonComplete},
		{"unknown", st(codes.Unknown, "x"), true, ReasonReconnect},
		{"cancelled", st(codes.Canceled, "x"), true, ReasonReconnect},
		{"deadline", st(codes.DeadlineExceeded, "x"), true, ReasonReconnect},
		{"transport is closing", st(codes.Unavailable, "transport is closing"), true, ReasonReconnect},
		{"goaway", st(codes.Unavailable, "closing transport due to: x, received prior goaway: y"), true, ReasonReconnect},
		{"other unavailable", st(codes.Unavailable, "error reading from server: EOF"), true, ReasonError},
		{"permission denied", st(codes.PermissionDenied, "authentication failure"), true, ReasonError},
		{"not a status", io.ErrClosedPipe, true, ReasonError},
	}
	for _, tc := range tests {
		if got := classify(tc.err, tc.established); got != tc.want {
			t.Errorf("%s: classify = %s, want %s", tc.name, got, tc.want)
		}
	}
}

func TestHandle(t *testing.T) {
	c, err := New(Config{Address: "http://127.0.0.1:1"}, snapshot.NewStore(), testLogger(t), nil)
	if err != nil {
		t.Fatal(err)
	}
	anyOf := func(a *workloadapi.Address) *discovery.Resource {
		b, err := proto.Marshal(a)
		if err != nil {
			t.Fatal(err)
		}
		return &discovery.Resource{Resource: &anypb.Any{TypeUrl: AddressType, Value: b}}
	}
	res := func(name, version string, r *discovery.Resource) *discovery.Resource {
		r.Name, r.Version = name, version
		return r
	}
	w := func(n string) *workloadapi.Address {
		return &workloadapi.Address{Type: &workloadapi.Address_Workload{Workload: wl(n, 10, 0, 0, byte(len(n)))}}
	}
	ack := c.handle(&discovery.DeltaDiscoveryResponse{
		TypeUrl: AddressType, Nonce: "n1",
		Resources: []*discovery.Resource{
			res(uid("a"), "v1", anyOf(w("a"))),
			res("empty", "v1", &discovery.Resource{}),
			res("garbage", "v1", &discovery.Resource{Resource: &anypb.Any{Value: []byte{0xff}}}),
			res("neither", "v1", anyOf(&workloadapi.Address{})),
			res(uid("gone"), "v1", anyOf(w("gone"))),
			res("ns/svc.example", "v1", anyOf(&workloadapi.Address{Type: &workloadapi.Address_Service{Service: &workloadapi.Service{Name: "svc", Namespace: "ns", Hostname: "svc.example"}}})),
		},
		// A resource both sent and removed ends up removed (ztunnel applies removals last);
		// a removal of something unknown is ignored.
		RemovedResources: []string{uid("gone"), "never-seen", "ns/never.example"},
	})
	if ack.GetTypeUrl() != AddressType || ack.GetResponseNonce() != "n1" {
		t.Fatalf("ack = %v", ack)
	}
	msg := ack.GetErrorDetail().GetMessage()
	if !strings.HasPrefix(msg, "empty: XDS payload without resource; garbage: decode: ") || !strings.HasSuffix(msg, "; neither: unknown address type") {
		t.Fatalf("NACK message = %q", msg)
	}
	s := c.store.Load()
	if s.WorkloadByUID(uid("a")) == nil || s.WorkloadByUID(uid("gone")) != nil || s.ServiceByKey(snapshot.NamespacedHostname{Namespace: "ns", Hostname: "svc.example"}) == nil {
		t.Fatal("good resources not applied")
	}
	if want := map[string]string{uid("a"): "v1", "ns/svc.example": "v1"}; !maps.Equal(c.known[AddressType], want) {
		t.Fatalf("known = %v, want %v", c.known[AddressType], want)
	}
	version := s.Version()

	// Removing names the snapshot does not hold changes nothing and publishes nothing.
	ack = c.handle(&discovery.DeltaDiscoveryResponse{TypeUrl: AddressType, Nonce: "n2", RemovedResources: []string{"x", "ns/y", "a/b/c"}})
	if ack.GetErrorDetail() != nil || c.store.Load().Version() != version {
		t.Fatalf("no-op removal: ack %v, version %d -> %d", ack, version, c.store.Load().Version())
	}
	// A service is removed by namespace/hostname, a workload by uid.
	c.handle(&discovery.DeltaDiscoveryResponse{TypeUrl: AddressType, Nonce: "n3", RemovedResources: []string{"ns/svc.example", uid("a")}})
	if s := c.store.Load(); len(s.Workloads()) != 0 || len(s.Services()) != 0 || len(c.known[AddressType]) != 0 {
		t.Fatalf("after removals: %d workloads, %d services, known %v", len(s.Workloads()), len(s.Services()), c.known[AddressType])
	}
	// An unknown type is ACKed, as ztunnel does.
	if ack := c.handle(&discovery.DeltaDiscoveryResponse{TypeUrl: "type.googleapis.com/other", Nonce: "n4"}); ack.GetErrorDetail() != nil || ack.GetResponseNonce() != "n4" {
		t.Fatalf("unknown type: %v", ack)
	}
	// A workload without a uid takes the resource name, so a removal by that name works.
	noUID := wl("x", 10, 0, 0, 5)
	noUID.Uid = ""
	c.handle(&discovery.DeltaDiscoveryResponse{TypeUrl: AddressType, Nonce: "n5", Resources: []*discovery.Resource{
		res("name-as-uid", "v1", anyOf(&workloadapi.Address{Type: &workloadapi.Address_Workload{Workload: noUID}})),
	}})
	if c.store.Load().WorkloadByUID("name-as-uid") == nil {
		t.Fatal("workload without uid not stored under its resource name")
	}
	// A workload with neither addresses nor a hostname (istiod's stand-in for a service's
	// endpoints on another network) is ACKed and applied, as ztunnel takes it.
	remote := withService(wl("remote"), "svc")
	remote.Addresses, remote.Network = nil, "net2"
	ack = c.handle(&discovery.DeltaDiscoveryResponse{TypeUrl: AddressType, Nonce: "n6", Resources: []*discovery.Resource{
		res(uid("remote"), "v1", anyOf(&workloadapi.Address{Type: &workloadapi.Address_Workload{Workload: remote}})),
	}})
	if ack.GetErrorDetail() != nil || c.store.Load().WorkloadByUID(uid("remote")) == nil {
		t.Fatalf("address-less workload: ack %v, stored %v", ack, c.store.Load().WorkloadByUID(uid("remote")) != nil)
	}
}
