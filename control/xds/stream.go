package xds

import (
	"context"
	"errors"
	"fmt"
	"io"
	"maps"
	"strings"
	"time"

	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	rpcstatus "google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"istio.io/istio/pkg/workloadapi"
	"istio.io/istio/pkg/workloadapi/security"

	"github.com/ztgo/ztgo/control/snapshot"
)

// run is the stream goroutine: one stream at a time, reconnecting with ztunnel's backoff
// (AdsClient::run_loop) until ctx ends.
func (c *Client) run(ctx context.Context) {
	defer close(c.done)
	backoff := c.cfg.InitialBackoff
	for conn := 1; ; conn++ {
		established, err := c.runStream(ctx, conn)
		if ctx.Err() != nil {
			return
		}
		if established {
			// ztunnel carries the backoff across a healthy stream; ztgo starts over, so a
			// long-lived stream that breaks is retried quickly.
			backoff = c.cfg.InitialBackoff
		}
		reason := classify(err, established)
		c.metrics.terminated(reason)
		switch reason {
		case ReasonConnectionError, ReasonError:
			backoff = min(c.cfg.MaxBackoff, backoff*2)
			c.log.Warn("xds stream failed", "conn", conn, "reason", string(reason), "err", err, "retry_in", backoff)
		default:
			// ztunnel retries a clean end (Complete) without waiting at all; waiting the
			// initial backoff keeps a server that closes every stream at once from being
			// hammered in a tight loop.
			backoff = c.cfg.InitialBackoff
			c.log.Info("xds stream ended", "conn", conn, "reason", string(reason), "err", err, "retry_in", backoff)
		}
		t := time.NewTimer(backoff)
		select {
		case <-ctx.Done():
			t.Stop()
			return
		case <-t.C:
		}
	}
}

// classify maps how a stream ended to ztunnel's termination reasons, which also decide the
// backoff: anything before the first response is a connection error; afterwards Unknown,
// Cancelled, DeadlineExceeded and the two Unavailable messages a server restart or GOAWAY
// produces are routine reconnects, other statuses are errors, and OK is Complete.
func classify(err error, established bool) TerminationReason {
	if err == nil || errors.Is(err, io.EOF) {
		if !established {
			return ReasonConnectionError
		}
		return ReasonComplete
	}
	if !established {
		return ReasonConnectionError
	}
	st, ok := status.FromError(err)
	if !ok {
		return ReasonError
	}
	switch st.Code() {
	case codes.Unknown, codes.Canceled, codes.DeadlineExceeded:
		return ReasonReconnect
	case codes.Unavailable:
		if strings.Contains(st.Message(), "transport is closing") || strings.Contains(st.Message(), "received prior goaway") {
			return ReasonReconnect
		}
	}
	return ReasonError
}

// runStream runs one stream to its end. established reports whether a response arrived.
func (c *Client) runStream(ctx context.Context, conn int) (established bool, err error) {
	cc, err := c.dial()
	if err != nil {
		return false, err
	}
	defer cc.Close()
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	sctx, err := c.streamContext(ctx)
	if err != nil {
		return false, err
	}
	stream, err := discovery.NewAggregatedDiscoveryServiceClient(cc).DeltaAggregatedResources(sctx)
	if err != nil {
		return false, fmt.Errorf("open stream to %s: %w", c.target.hostPort, err)
	}
	for _, t := range watchedTypes {
		req := c.initialRequest(t)
		c.log.Debug("xds sending initial request", "conn", conn, "type", t, "resources", len(req.InitialResourceVersions))
		if err := stream.Send(req); err != nil {
			return false, sendError(stream, err)
		}
	}
	for {
		resp, err := stream.Recv()
		if err != nil {
			return established, err
		}
		if !established {
			established = true
			c.log.Info("xds stream established", "conn", conn)
		}
		ack := c.handle(resp)
		if err := stream.Send(ack); err != nil {
			return established, sendError(stream, err)
		}
		if ack.ErrorDetail == nil && c.awaiting[ack.TypeUrl] {
			delete(c.awaiting, ack.TypeUrl)
			if len(c.awaiting) == 0 {
				c.log.Info("xds initial sync complete")
				close(c.ready)
			}
		}
	}
}

// sendError returns the stream's real status: gRPC reports a broken stream to Send as io.EOF
// and keeps the status for Recv.
func sendError(stream interface {
	Recv() (*discovery.DeltaDiscoveryResponse, error)
}, err error) error {
	if !errors.Is(err, io.EOF) {
		return err
	}
	for {
		if _, rerr := stream.Recv(); rerr != nil {
			return rerr
		}
	}
}

// initialRequest subscribes to every resource of typeURL (wildcard: no names) and tells the
// server what this client already holds.
func (c *Client) initialRequest(typeURL string) *discovery.DeltaDiscoveryRequest {
	return &discovery.DeltaDiscoveryRequest{
		Node:                    c.node,
		TypeUrl:                 typeURL,
		InitialResourceVersions: maps.Clone(c.known[typeURL]),
	}
}

// reject is one resource the client refused, with why.
type reject struct {
	name   string
	reason string
}

// handle applies one response and returns the ACK, or the NACK naming every rejected
// resource ("name: reason; name2: reason2"); the good resources of the same response apply
// either way, as in ztunnel.
func (c *Client) handle(resp *discovery.DeltaDiscoveryResponse) *discovery.DeltaDiscoveryRequest {
	typeURL := resp.GetTypeUrl()
	size := 0
	for _, r := range resp.GetResources() {
		size += len(r.GetResource().GetValue())
	}
	c.metrics.received(typeURL, size)
	c.log.Info("xds received response", "type", typeURL, "size", len(resp.GetResources()), "removes", len(resp.GetRemovedResources()))

	var rejects []reject
	switch typeURL {
	case AddressType:
		rejects = c.applyResponse(resp, convertAddressResource)
	case AuthorizationType:
		rejects = c.applyResponse(resp, convertAuthorizationResource)
	default:
		// ztunnel ACKs a type it has no handler for; there is nothing to reject by name.
		c.log.Error("xds response of an unknown type", "type", typeURL)
	}
	ack := &discovery.DeltaDiscoveryRequest{TypeUrl: typeURL, ResponseNonce: resp.GetNonce()}
	if len(rejects) > 0 {
		parts := make([]string, len(rejects))
		for i, r := range rejects {
			parts[i] = r.name + ": " + r.reason
		}
		msg := strings.Join(parts, "; ")
		ack.ErrorDetail = &rpcstatus.Status{Message: msg}
		c.log.Error("xds NACK", "type", typeURL, "nonce", resp.GetNonce(), "rejected", len(rejects), "error", msg)
	}
	return ack
}

// converted is one decoded and converted resource, ready for a snapshot.Delta.
type converted struct {
	workload *snapshot.Workload
	service  *snapshot.Service
	policy   *snapshot.Policy
}

// key names the object as snapshot.ResourceError names it, to map Apply's rejections back to
// the resource.
func (cv converted) key() string {
	switch {
	case cv.workload != nil:
		return "workload " + cv.workload.UID
	case cv.service != nil:
		return "service " + cv.service.Namespace + "/" + cv.service.Hostname
	default:
		return "policy " + cv.policy.Namespace + "/" + cv.policy.Name
	}
}

type convertFunc func(name string, value []byte) (converted, error)

// convertAddressResource decodes an Address: a workload (named by its uid) or a service
// (named namespace/hostname).
func convertAddressResource(name string, value []byte) (converted, error) {
	var a workloadapi.Address
	if err := proto.Unmarshal(value, &a); err != nil {
		return converted{}, fmt.Errorf("decode: %w", err)
	}
	switch t := a.GetType().(type) {
	case *workloadapi.Address_Workload:
		w, err := ConvertWorkload(t.Workload)
		if err != nil {
			return converted{}, err
		}
		if w.UID == "" {
			// The resource name is the uid (istiod's WorkloadInfo.ResourceName); using it
			// keeps a later removal by that name working.
			w.UID = name
		}
		return converted{workload: w}, nil
	case *workloadapi.Address_Service:
		s, err := ConvertService(t.Service)
		if err != nil {
			return converted{}, err
		}
		return converted{service: s}, nil
	}
	return converted{}, errors.New("unknown address type")
}

func convertAuthorizationResource(_ string, value []byte) (converted, error) {
	var a security.Authorization
	if err := proto.Unmarshal(value, &a); err != nil {
		return converted{}, fmt.Errorf("decode: %w", err)
	}
	p, err := ConvertAuthorization(&a)
	if err != nil {
		return converted{}, err
	}
	return converted{policy: p}, nil
}

// applyResponse converts the response's resources, applies them and its removals to the
// current snapshot, publishes the result if anything changed, and records the versions it
// now holds. It returns the rejected resources in response order.
func (c *Client) applyResponse(resp *discovery.DeltaDiscoveryResponse, convert convertFunc) []reject {
	typeURL := resp.GetTypeUrl()
	cur := c.store.Load()
	removed := make(map[string]bool, len(resp.GetRemovedResources()))
	for _, n := range resp.GetRemovedResources() {
		removed[n] = true
	}

	var delta snapshot.Delta
	reasons := map[string]string{} // resource name -> why it was rejected
	byKey := map[string]string{}   // converted key -> resource name
	var upserts int
	for _, r := range resp.GetResources() {
		name := r.GetName()
		if removed[name] {
			// ztunnel applies a response's removals after its updates, so a resource both
			// sent and removed ends up removed.
			continue
		}
		if r.GetResource() == nil {
			reasons[name] = "XDS payload without resource"
			continue
		}
		cv, err := convert(name, r.GetResource().GetValue())
		if err != nil {
			reasons[name] = err.Error()
			continue
		}
		byKey[cv.key()] = name
		upserts++
		switch {
		case cv.workload != nil:
			delta.Workloads = append(delta.Workloads, cv.workload)
		case cv.service != nil:
			delta.Services = append(delta.Services, cv.service)
		default:
			delta.Policies = append(delta.Policies, cv.policy)
		}
	}
	removals := 0
	for _, n := range resp.GetRemovedResources() {
		delete(c.known[typeURL], n)
		if c.addRemoval(cur, typeURL, n, &delta) {
			removals++
		}
	}

	if !delta.Empty() {
		// Apply rejects resources one by one (each rejection is one upsert of the delta) and
		// never fails as a whole.
		next, rerrs := cur.Apply(delta)
		for _, re := range rerrs {
			name, ok := byKey[re.Kind+" "+re.Name]
			if !ok {
				name = re.Kind + " " + re.Name
			}
			reasons[name] = re.Error()
		}
		if upserts > len(rerrs) || removals > 0 {
			c.store.Publish(next)
		}
	}

	var rejects []reject
	for _, r := range resp.GetResources() {
		name := r.GetName()
		if removed[name] {
			continue
		}
		if why, bad := reasons[name]; bad {
			rejects = append(rejects, reject{name: name, reason: why})
			delete(reasons, name) // a name listed twice is reported once
			continue
		}
		c.known[typeURL][name] = r.GetVersion()
	}
	return rejects
}

// addRemoval adds the removal of resource name to delta if the snapshot holds it, and reports
// whether it did. An Address name is a workload uid, or else "namespace/hostname" of a
// service, as ztunnel's remove_internal reads it: a name whose hostname part holds a "/" is a
// workload uid and never a service.
func (c *Client) addRemoval(cur *snapshot.Snapshot, typeURL, name string, delta *snapshot.Delta) bool {
	switch typeURL {
	case AddressType:
		if cur.WorkloadByUID(name) != nil {
			delta.RemovedWorkloads = append(delta.RemovedWorkloads, name)
			return true
		}
		ns, host, ok := strings.Cut(name, "/")
		if !ok || strings.Contains(host, "/") {
			c.log.Debug("xds removal of an unknown workload", "name", name)
			return false
		}
		key := snapshot.NamespacedHostname{Namespace: ns, Hostname: host}
		if cur.ServiceByKey(key) == nil {
			c.log.Debug("xds removal of an unknown service", "name", name)
			return false
		}
		delta.RemovedServices = append(delta.RemovedServices, key)
		return true
	case AuthorizationType:
		if cur.PolicyByKey(name) == nil {
			c.log.Debug("xds removal of an unknown policy", "name", name)
			return false
		}
		delta.RemovedPolicies = append(delta.RemovedPolicies, name)
		return true
	}
	return false
}
