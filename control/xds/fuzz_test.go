package xds

import (
	"testing"

	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"
	"istio.io/istio/pkg/workloadapi"
	"istio.io/istio/pkg/workloadapi/security"

	"github.com/ztgo/ztgo/control/snapshot"
)

// FuzzHandle feeds arbitrary resource bytes of both types through decode, conversion and
// Apply. Nothing may panic, and a resource is either applied and recorded, or NACKed and not.
func FuzzHandle(f *testing.F) {
	seed := func(m proto.Message) {
		b, err := proto.Marshal(m)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b, false)
		f.Add(b, true)
	}
	seed(&workloadapi.Address{Type: &workloadapi.Address_Workload{Workload: withService(wl("a", 10, 0, 0, 1), "s")}})
	seed(&workloadapi.Address{Type: &workloadapi.Address_Service{Service: svc("s", 10, 96, 0, 1)}})
	seed(denyPort("p", 80))
	seed(&security.Authorization{Name: "p", Groups: []*security.Group{{Rules: []*security.Rules{{Matches: []*security.Match{{
		SourceIps: []*security.Address{{Address: []byte{10, 0, 0, 0}, Length: 8}},
	}}}}}}})
	f.Fuzz(func(t *testing.T, value []byte, auth bool) {
		c, err := New(Config{Address: "http://127.0.0.1:1"}, snapshot.NewStore(), nil, nil)
		if err != nil {
			t.Fatal(err)
		}
		typeURL := AddressType
		if auth {
			typeURL = AuthorizationType
		}
		ack := c.handle(&discovery.DeltaDiscoveryResponse{
			TypeUrl:   typeURL,
			Nonce:     "1",
			Resources: []*discovery.Resource{{Name: "r", Version: "v", Resource: &anypb.Any{Value: value}}},
		})
		_, recorded := c.known[typeURL]["r"]
		if nacked := ack.GetErrorDetail() != nil; nacked == recorded {
			t.Fatalf("nacked=%v recorded=%v (%q)", nacked, recorded, ack.GetErrorDetail().GetMessage())
		}
	})
}
