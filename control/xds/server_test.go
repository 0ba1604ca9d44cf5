package xds

import (
	"context"
	"crypto/tls"
	"net"
	"slices"
	"sync"
	"testing"
	"time"

	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/envoyproxy/go-control-plane/pkg/cache/types"
	cache "github.com/envoyproxy/go-control-plane/pkg/cache/v3"
	serverv3 "github.com/envoyproxy/go-control-plane/pkg/server/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/protobuf/proto"
	"istio.io/istio/pkg/workloadapi"
	"istio.io/istio/pkg/workloadapi/security"

	"github.com/ztgo/ztgo/control/snapshot"
)

// xdsServer is a real delta xDS server for the tests: go-control-plane's server over two
// linear caches (one per type URL), on a loopback listener that can be stopped and started
// again on the same address. It records every request, response and stream's metadata.
type xdsServer struct {
	t     *testing.T
	addr  string
	creds credentials.TransportCredentials

	addrs *cache.LinearCache
	auths *cache.LinearCache
	xds   serverv3.Server

	mu        sync.Mutex
	grpc      *grpc.Server
	requests  []*discovery.DeltaDiscoveryRequest
	responses []*discovery.DeltaDiscoveryResponse
	// The stream each request and response belongs to: a stream the server is still
	// tearing down can record a response after the client has reconnected.
	reqStream  []int64
	respStream []int64
	streamMD   []metadata.MD
	changed    chan struct{} // closed and replaced whenever something is recorded
}

func newXDSServer(t *testing.T, tlsCfg *tls.Config) *xdsServer {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	s := &xdsServer{
		t:       t,
		addrs:   cache.NewLinearCache(AddressType),
		auths:   cache.NewLinearCache(AuthorizationType),
		changed: make(chan struct{}),
	}
	if tlsCfg != nil {
		s.creds = credentials.NewTLS(tlsCfg)
	}
	mux := &cache.MuxCache{
		Classify:      func(r *cache.Request) string { return r.GetTypeUrl() },
		ClassifyDelta: func(r *cache.DeltaRequest) string { return r.GetTypeUrl() },
		Caches:        map[string]cache.Cache{AddressType: s.addrs, AuthorizationType: s.auths},
	}
	s.xds = serverv3.NewServer(ctx, mux, serverv3.CallbackFuncs{
		StreamDeltaRequestFunc: func(id int64, req *discovery.DeltaDiscoveryRequest) error {
			s.record(func() {
				s.requests = append(s.requests, proto.Clone(req).(*discovery.DeltaDiscoveryRequest))
				s.reqStream = append(s.reqStream, id)
			})
			return nil
		},
		StreamDeltaResponseFunc: func(id int64, _ *discovery.DeltaDiscoveryRequest, resp *discovery.DeltaDiscoveryResponse) {
			s.record(func() {
				s.responses = append(s.responses, proto.Clone(resp).(*discovery.DeltaDiscoveryResponse))
				s.respStream = append(s.respStream, id)
			})
		},
	})
	s.start()
	t.Cleanup(func() {
		s.stop()
		cancel()
	})
	return s
}

func (s *xdsServer) record(f func()) {
	s.mu.Lock()
	f()
	close(s.changed)
	s.changed = make(chan struct{})
	s.mu.Unlock()
}

// start serves on a fresh listener: on 127.0.0.1:0 the first time, then on the same address.
func (s *xdsServer) start() {
	s.t.Helper()
	addr := s.addr
	if addr == "" {
		addr = "127.0.0.1:0"
	}
	var lis net.Listener
	var err error
	// The port was just released by stop; retry briefly in case the kernel lags.
	for i := 0; i < 50; i++ {
		if lis, err = net.Listen("tcp", addr); err == nil {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	if err != nil {
		s.t.Fatalf("listen %s: %v", addr, err)
	}
	s.addr = lis.Addr().String()
	var opts []grpc.ServerOption
	if s.creds != nil {
		opts = append(opts, grpc.Creds(s.creds))
	}
	// The interceptor sees the stream's metadata exactly as the client sent it.
	opts = append(opts, grpc.StreamInterceptor(func(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, h grpc.StreamHandler) error {
		md, _ := metadata.FromIncomingContext(ss.Context())
		s.record(func() { s.streamMD = append(s.streamMD, md.Copy()) })
		return h(srv, ss)
	}))
	g := grpc.NewServer(opts...)
	discovery.RegisterAggregatedDiscoveryServiceServer(g, s.xds)
	s.mu.Lock()
	s.grpc = g
	s.mu.Unlock()
	go func() { _ = g.Serve(lis) }()
}

// stop closes the listener and every connection, as a server going away does.
func (s *xdsServer) stop() {
	s.mu.Lock()
	g := s.grpc
	s.grpc = nil
	s.mu.Unlock()
	if g != nil {
		g.Stop()
	}
}

func (s *xdsServer) url() string {
	if s.creds != nil {
		return "https://" + s.addr
	}
	return "http://" + s.addr
}

// waitFor waits until pred holds over the recorded requests and responses, and returns the
// index pred reports (or fails the test).
func (s *xdsServer) waitFor(what string, pred func(reqs []*discovery.DeltaDiscoveryRequest, resps []*discovery.DeltaDiscoveryResponse, md []metadata.MD) bool) {
	s.t.Helper()
	deadline := time.After(10 * time.Second)
	for {
		s.mu.Lock()
		ok := pred(s.requests, s.responses, s.streamMD)
		ch := s.changed
		s.mu.Unlock()
		if ok {
			return
		}
		select {
		case <-ch:
		case <-deadline:
			s.t.Fatalf("timed out waiting for %s", what)
		}
	}
}

// nacks returns the NACKs of typeURL received so far.
func (s *xdsServer) nacks(typeURL string) []*discovery.DeltaDiscoveryRequest {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []*discovery.DeltaDiscoveryRequest
	for _, r := range s.requests {
		if r.GetTypeUrl() == typeURL && r.GetErrorDetail() != nil {
			out = append(out, r)
		}
	}
	return out
}

// initialRequests returns the requests that opened a subscription (those with a node).
func (s *xdsServer) initialRequests(typeURL string) []*discovery.DeltaDiscoveryRequest {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []*discovery.DeltaDiscoveryRequest
	for _, r := range s.requests {
		if r.GetTypeUrl() == typeURL && r.GetNode() != nil {
			out = append(out, r)
		}
	}
	return out
}

func (s *xdsServer) responsesOf(typeURL string) []*discovery.DeltaDiscoveryResponse {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []*discovery.DeltaDiscoveryResponse
	for _, r := range s.responses {
		if r.GetTypeUrl() == typeURL {
			out = append(out, r)
		}
	}
	return out
}

// firstResponseOnStreamOf returns the first typeURL response sent on the stream that carried
// req, the initial request of a subscription.
func (s *xdsServer) firstResponseOnStreamOf(req *discovery.DeltaDiscoveryRequest) *discovery.DeltaDiscoveryResponse {
	s.t.Helper()
	s.mu.Lock()
	defer s.mu.Unlock()
	stream := int64(-1)
	for i, r := range s.requests {
		if r == req {
			stream = s.reqStream[i]
		}
	}
	for i, r := range s.responses {
		if s.respStream[i] == stream && r.GetTypeUrl() == req.GetTypeUrl() {
			return r
		}
	}
	s.t.Fatalf("no %s response on stream %d", req.GetTypeUrl(), stream)
	return nil
}

// version is the version the server last sent for name.
func (s *xdsServer) version(typeURL, name string) string {
	s.t.Helper()
	resps := s.responsesOf(typeURL)
	for i := len(resps) - 1; i >= 0; i-- {
		for _, r := range resps[i].GetResources() {
			if r.GetName() == name {
				return r.GetVersion()
			}
		}
	}
	s.t.Fatalf("server never sent %s", name)
	return ""
}

// The resources below are named as istiod names them: uid, namespace/hostname, namespace/name.

func (s *xdsServer) setWorkload(w *workloadapi.Workload) {
	s.t.Helper()
	if err := s.addrs.UpdateResource(w.GetUid(), &workloadapi.Address{Type: &workloadapi.Address_Workload{Workload: w}}); err != nil {
		s.t.Fatal(err)
	}
}

func (s *xdsServer) setService(svc *workloadapi.Service) {
	s.t.Helper()
	if err := s.addrs.UpdateResource(svc.GetNamespace()+"/"+svc.GetHostname(), &workloadapi.Address{Type: &workloadapi.Address_Service{Service: svc}}); err != nil {
		s.t.Fatal(err)
	}
}

func (s *xdsServer) setPolicy(p *security.Authorization) {
	s.t.Helper()
	if err := s.auths.UpdateResource(p.GetNamespace()+"/"+p.GetName(), p); err != nil {
		s.t.Fatal(err)
	}
}

// setAddresses replaces several Address resources in one push.
func (s *xdsServer) setAddresses(update map[string]types.Resource, remove []string) {
	s.t.Helper()
	if err := s.addrs.UpdateResources(update, remove); err != nil {
		s.t.Fatal(err)
	}
}

func (s *xdsServer) removeAddress(name string) {
	s.t.Helper()
	if err := s.addrs.DeleteResource(name); err != nil {
		s.t.Fatal(err)
	}
}

func (s *xdsServer) removePolicy(name string) {
	s.t.Helper()
	if err := s.auths.DeleteResource(name); err != nil {
		s.t.Fatal(err)
	}
}

// waitSnapshot waits until pred holds for the store's current snapshot.
func waitSnapshot(t *testing.T, st *snapshot.Store, what string, pred func(*snapshot.Snapshot) bool) *snapshot.Snapshot {
	t.Helper()
	ch, done := st.Subscribe()
	defer done()
	deadline := time.After(10 * time.Second)
	for {
		if s := st.Load(); pred(s) {
			return s
		}
		select {
		case <-ch:
		case <-deadline:
			t.Fatalf("timed out waiting for %s", what)
		}
	}
}

func wl(name string, ip ...byte) *workloadapi.Workload {
	return &workloadapi.Workload{
		Uid:            "Kubernetes//Pod/ns/" + name,
		Name:           name,
		Namespace:      "ns",
		Addresses:      [][]byte{ip},
		TunnelProtocol: workloadapi.TunnelProtocol_HBONE,
		Node:           "node1",
	}
}

func uid(name string) string { return "Kubernetes//Pod/ns/" + name }

func svc(name string, vip ...byte) *workloadapi.Service {
	return &workloadapi.Service{
		Name:      name,
		Namespace: "ns",
		Hostname:  name + ".ns.svc.cluster.local",
		Addresses: []*workloadapi.NetworkAddress{{Address: vip}},
		Ports:     []*workloadapi.Port{{ServicePort: 80, TargetPort: 8080}},
	}
}

func svcKey(name string) snapshot.NamespacedHostname {
	return snapshot.NamespacedHostname{Namespace: "ns", Hostname: name + ".ns.svc.cluster.local"}
}

func withService(w *workloadapi.Workload, svcName string) *workloadapi.Workload {
	w.Services = map[string]*workloadapi.PortList{
		"ns/" + svcName + ".ns.svc.cluster.local": {Ports: []*workloadapi.Port{{ServicePort: 80, TargetPort: 8080}}},
	}
	return w
}

func denyPort(name string, port uint32) *security.Authorization {
	return &security.Authorization{
		Name: name, Namespace: "ns", Scope: security.Scope_NAMESPACE, Action: security.Action_DENY,
		Groups: []*security.Group{{Rules: []*security.Rules{{Matches: []*security.Match{{DestinationPorts: []uint32{port}}}}}}},
	}
}

// names returns the resource names of a response, sorted.
func names(r *discovery.DeltaDiscoveryResponse) []string {
	var out []string
	for _, res := range r.GetResources() {
		out = append(out, res.GetName())
	}
	slices.Sort(out)
	return out
}
