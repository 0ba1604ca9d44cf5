package stages

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"time"

	"github.com/ztgo/ztgo/connpool"
	"github.com/ztgo/ztgo/control/snapshot"
	"github.com/ztgo/ztgo/stages/authz"
	"github.com/ztgo/ztgo/stages/capture"
	"github.com/ztgo/ztgo/stages/hbone"
	"github.com/ztgo/ztgo/stages/identity"
	"github.com/ztgo/ztgo/stages/upstream"
)

// Error carries a failure kind through layers that only return error (pool dialers).
type Error struct {
	Kind Failure
	Err  error
}

func (e *Error) Error() string { return e.Kind.String() + ": " + e.Err.Error() }
func (e *Error) Unwrap() error { return e.Err }

// Classify maps an error from a dial, handshake or CONNECT to its failure kind.
func Classify(err error) Failure {
	var fe *Error
	var se *hbone.StatusError
	var re tls.RecordHeaderError
	var ae tls.AlertError
	var ce *tls.CertificateVerificationError
	switch {
	case errors.As(err, &fe):
		return fe.Kind
	case errors.As(err, &se):
		if se.Status == 401 {
			return FailDeny
		}
		return FailConnect
	case errors.As(err, &ce), errors.As(err, &ae), errors.As(err, &re):
		return FailTLS
	case errors.Is(err, upstream.ErrTimeout):
		return FailNetworkPolicy
	default:
		return FailConnect
	}
}

// Handlers are ztgo's stage implementations. They bind the pure decision packages
// (identity, authz) and the I/O packages (capture, hbone, upstream, connpool) to a Flow.
type Handlers struct {
	// Node is this node's name: only its own workloads may send through it.
	Node string
	// Network is this node's network name ("" by default).
	Network string
	Pool    *connpool.Pool
	Dialer  *upstream.Dialer
	Tracker *authz.Tracker
	Log     *slog.Logger
	// HandshakeTimeout bounds the SOCKS5 handshake; default 10 s.
	HandshakeTimeout time.Duration
	// LogAuthzInfo logs authorization decisions at info (ztunnel's AUTHZ_POLICY_INFO_LOGGING).
	LogAuthzInfo bool
	// SOCKS5 says the SOCKS5 listener is enabled: its port is then one of ztgo's own ports,
	// which captured connections may not target.
	SOCKS5 bool
}

// Stages returns the stage configuration for NewPipeline with the given worker counts.
func (h *Handlers) Stages(workers, mailbox int) map[ID]StageConfig {
	if h.HandshakeTimeout <= 0 {
		h.HandshakeTimeout = 10 * time.Second
	}
	if h.Log == nil {
		h.Log = slog.New(slog.DiscardHandler)
	}
	return map[ID]StageConfig{
		// The SOCKS5 handshake waits on the client: many cheap workers so slow clients cannot
		// hold the stage (each is bounded by HandshakeTimeout).
		Capture: {Stage: StageFunc(h.capture), Workers: max(workers*4, 128), Mailbox: mailbox},
		// Identity and authz are snapshot lookups that never block: they run on the worker of
		// the stage before them (capture), which saves two hand-offs per flow.
		Identity: {Stage: StageFunc(h.identity), Workers: max(workers/4, 2), Mailbox: mailbox, Inline: true},
		Authz:    {Stage: StageFunc(h.authz), Workers: max(workers/4, 2), Mailbox: mailbox, Inline: true},
		HBONE:    {Stage: StageFunc(h.hbone), Workers: workers, Mailbox: mailbox},
		Upstream: {Stage: StageFunc(h.upstream), Workers: workers, Mailbox: mailbox},
	}
}

// capture learns the original destination and the source workload. Outbound flows enter
// through SOCKS5 or a pod's 15001 listener, inbound plaintext through a pod's 15006; inbound
// HBONE flows were captured by the HBONE server already.
func (h *Handlers) capture(ctx context.Context, f *Flow) Verdict {
	if f.Dir == Inbound {
		return Next
	}
	nc, ok := f.Down.(net.Conn)
	if !ok {
		return f.Fail(FailBadRequest, errors.New("captured flow without a connection"))
	}
	if f.Pod != nil {
		return h.captureInPod(ctx, f, nc)
	}
	if f.Dir != Outbound {
		return f.Fail(FailBadRequest, fmt.Errorf("%s flow without a pod", f.Dir))
	}
	nc.SetDeadline(time.Now().Add(h.HandshakeTimeout))
	target, err := capture.Handshake(nc)
	nc.SetDeadline(time.Time{})
	if err != nil {
		return f.Fail(FailBadRequest, fmt.Errorf("socks5 handshake: %w", err))
	}
	src := f.Snap.WorkloadByAddr(h.Network, f.Src.Addr())
	if src == nil || src.Node != h.Node {
		return f.Fail(FailIdentity, fmt.Errorf("source %s is not a workload on node %q", f.Src.Addr(), h.Node))
	}
	f.SrcWorkload = src
	f.SrcIdentity = src.Identity()
	if target.Host != "" {
		ip, err := h.resolve(ctx, f, target.Host)
		if err != nil {
			return f.Fail(FailConnect, err)
		}
		f.Dst = netip.AddrPortFrom(ip, target.Port)
	} else {
		f.Dst = target.Addr
	}
	if f.Dst.Addr().IsLoopback() && identity.IsProxyPort(f.Dst.Port(), h.SOCKS5) {
		return f.Fail(FailDeny, fmt.Errorf("%w: %s", identity.ErrSelfCall, f.Dst))
	}
	return Next
}

// captureInPod handles a connection a pod's capture rules redirected to ztgo: its original
// destination comes from the socket, and the pod (not the source address) names the workload
// on ztgo's side of the flow, as ztunnel's in-pod proxies do.
func (h *Handlers) captureInPod(ctx context.Context, f *Flow, nc net.Conn) Verdict {
	tc, ok := nc.(*net.TCPConn)
	if !ok {
		return f.Fail(FailBadRequest, fmt.Errorf("captured flow on %T, want TCP", nc))
	}
	dst, err := f.Pod.OriginalDst(tc)
	if err != nil {
		return f.Fail(FailBadRequest, fmt.Errorf("original destination: %w", err))
	}
	f.Dst = dst
	// A call to ztgo's own ports would loop: outbound only matters on loopback (other
	// addresses are real destinations); inbound plaintext to any of them (pod:15006 would
	// redirect to itself forever).
	if identity.IsProxyPort(dst.Port(), h.SOCKS5) && (f.Dir != Outbound || dst.Addr().IsLoopback()) {
		return f.Fail(FailDeny, fmt.Errorf("%w: %s", identity.ErrSelfCall, dst))
	}
	w, snap, err := f.Pod.Workload(ctx, f.Snap)
	if err != nil {
		return f.Fail(FailIdentity, err)
	}
	f.Snap = snap
	if f.Dir == Outbound {
		f.SrcWorkload = w
		f.SrcIdentity = w.Identity()
		return Next
	}
	// Inbound plaintext: the client has no identity; its workload, if the mesh knows its
	// address, only labels metrics and logs.
	f.DstWorkload = w
	f.DstIdentity = w.Identity()
	f.SrcWorkload = snap.WorkloadByAddr(h.Network, f.Src.Addr())
	return Next
}

// resolve turns a SOCKS5 host name into an address: a mesh service's VIP first (as ztunnel's
// DNS proxy would answer), then the system resolver.
func (h *Handlers) resolve(ctx context.Context, f *Flow, host string) (netip.Addr, error) {
	if svc := f.Snap.ServiceByHostname(host, f.SrcWorkload.Namespace); svc != nil {
		for _, v := range svc.VIPs {
			if v.Network == h.Network {
				return v.Addr, nil
			}
		}
	}
	ips, err := net.DefaultResolver.LookupNetIP(ctx, "ip", host)
	if err != nil || len(ips) == 0 {
		return netip.Addr{}, fmt.Errorf("resolve %s: %w", host, err)
	}
	return ips[0].Unmap(), nil
}

// identity picks where the flow goes (outbound) or which local workload it is for (inbound).
func (h *Handlers) identity(ctx context.Context, f *Flow) Verdict {
	if f.Dir == Outbound {
		route, err := identity.Outbound(f.Snap, f.SrcWorkload, f.Dst, nil)
		if err != nil {
			kind := FailConnect
			if errors.Is(err, identity.ErrNoSourceWorkload) {
				kind = FailIdentity
			}
			return f.Fail(kind, fmt.Errorf("route %s: %w", f.Dst, err))
		}
		f.Route = route
		f.DstWorkload, f.DstService = route.DstWorkload, route.DstService
		if route.DstWorkload != nil {
			f.DstIdentity = route.DstWorkload.Identity()
		}
		switch route.Kind {
		case identity.HBONE, identity.Waypoint:
			f.ReplaceRest(HBONE)
			f.HBONEAddr = route.Authority
		default:
			f.ReplaceRest(Upstream)
		}
		f.UpAddr = route.Dial
		return Next
	}
	if f.Dir == InboundPlain {
		// The pod's workload was found at capture; the app is where the client connected.
		f.UpAddr = f.Dst
		return Next
	}
	target, rej := identity.InboundOn(f.Snap, h.Network, f.Local.Addr(), f.DownStream.Request().Authority)
	if rej != nil {
		f.DownStream.Respond(rej.Status, nil)
		kind := FailConnect
		if rej.Status == 400 {
			kind = FailBadRequest
		}
		return f.Fail(kind, rej)
	}
	f.DstWorkload = target.Workload
	f.DstService = target.Service
	if f.DstService == nil {
		// As ztunnel: the client names the service it addressed in forwarded's host=.
		if host := hbone.ForwardedHost(f.DownStream.Request().Get(hbone.HeaderForwarded)); host != "" {
			f.DstService = f.Snap.ServiceByHostname(host, target.Workload.Namespace)
		}
	}
	f.DstIdentity = target.Workload.Identity()
	f.Dst = target.Dst
	f.UpAddr = target.Dst
	// Everything the flow needs from the CONNECT's headers is in it now (the node took
	// traceparent when the stream arrived).
	f.DownStream.DropRequestHeaders()
	return Next
}

// authz enforces L4 policy on inbound flows and registers them for re-checks on policy change.
func (h *Handlers) authz(ctx context.Context, f *Flow) Verdict {
	conn := authz.Conn{SrcIdentity: f.SrcIdentity, SrcIP: f.Src.Addr(), DstIP: f.Dst.Addr(), DstPort: f.Dst.Port()}
	// Registered before the first check so a policy published in between is not missed.
	if h.Tracker != nil {
		// f's addresses are set before this stage and never change after it.
		h.Tracker.Add(f.ID, f.DstWorkload.UID, conn, func(d authz.Decision) {
			h.Log.Info("closing connection denied by new policy", "flow", f.ID, "src", f.Src, "dst", f.Dst, "reason", d.Reason)
			f.Abort()
		})
	}
	d := authz.Evaluate(f.Snap, f.DstWorkload, conn)
	f.Decision = d
	for _, dr := range d.DryRun {
		h.Log.Info("dry-run authorization", "flow", f.ID, "conn", conn.String(), "result", dr.String())
	}
	if !d.Allow {
		if h.Tracker != nil {
			h.Tracker.Remove(f.ID)
		}
		if f.DownStream != nil {
			f.DownStream.Respond(401, nil)
		}
		return f.Fail(FailDeny, errors.New(d.Reason))
	}
	if h.LogAuthzInfo {
		h.Log.Info("authorization allowed", "flow", f.ID, "conn", conn.String(), "policy", d.Policy)
	}
	return Next
}

// hbone opens a CONNECT stream on a pooled mTLS connection.
func (h *Handlers) hbone(ctx context.Context, f *Flow) Verdict {
	dctx, cancel := context.WithTimeout(ctx, 20*time.Second)
	defer cancel()
	key := connpool.NewKey(f.SrcIdentity.String(), f.Route.ExpectedSANs, f.Route.Dial, f.Src.Addr())
	if f.Pod != nil {
		key.Scope = f.Pod.Scope()
	}
	conn, err := h.Pool.Get(dctx, key)
	if err != nil {
		return f.Fail(Classify(err), fmt.Errorf("hbone connection to %s: %w", f.Route.Dial, err))
	}
	host := ""
	if f.DstService != nil {
		host = f.DstService.Hostname
	}
	req := &hbone.Request{
		Authority: f.Route.Authority.String(),
		Header: []hbone.Header{
			{Name: hbone.HeaderForwarded, Value: hbone.Forwarded(f.Src, host)},
			{Name: hbone.HeaderTraceParent, Value: f.TraceParent},
		},
	}
	if b := WorkloadBaggage(f.SrcWorkload).String(); b != "" {
		req.Header = append(req.Header, hbone.Header{Name: hbone.HeaderBaggage, Value: b})
	}
	s, _, err := conn.OpenReserved(dctx, req)
	if err != nil {
		return f.Fail(Classify(err), fmt.Errorf("CONNECT %s via %s: %w", req.Authority, f.Route.Dial, err))
	}
	f.Up = s
	return Next
}

// upstream dials plain TCP: the app (inbound, keeping the client's address), a passthrough
// destination or a non-HBONE workload (outbound, from the source workload's address).
func (h *Handlers) upstream(ctx context.Context, f *Flow) Verdict {
	if f.DownStream != nil && f.DownStream.Failed() {
		// The client gave up (reset, or its connection died): do not dial for nobody.
		return f.Fail(FailConnect, errors.New("client reset the stream before the upstream was dialled"))
	}
	dst := f.UpAddr
	src := f.Src.Addr()
	if f.Dir != Outbound && src == dst.Addr() {
		src = netip.Addr{} // ztunnel does not spoof a source equal to the destination
	}
	var c *net.TCPConn
	var err error
	switch {
	case f.Pod != nil && f.Dir != Outbound:
		// Inside the destination pod, keeping the client's address.
		c, err = f.Pod.DialTransparent(ctx, src, dst)
	case f.Pod != nil:
		// Inside the source pod, marked so its capture rules let it out.
		c, err = f.Pod.Dial(ctx, dst)
	default:
		c, _, err = h.Dialer.Dial(ctx, src, dst, true)
	}
	if err != nil {
		if f.DownStream != nil {
			f.DownStream.Respond(503, nil)
		}
		return f.Fail(Classify(err), err)
	}
	if f.DownStream != nil {
		var hdr []hbone.Header
		if b := WorkloadBaggage(f.DstWorkload).String(); b != "" {
			hdr = []hbone.Header{{Name: hbone.HeaderBaggage, Value: b}}
		}
		if err := f.DownStream.Respond(200, hdr); err != nil {
			c.Close()
			return f.Fail(FailConnect, fmt.Errorf("answer CONNECT: %w", err))
		}
	}
	f.Up = c
	return Next
}

// WorkloadBaggage describes w the way ztunnel's baggage header does.
func WorkloadBaggage(w *snapshot.Workload) hbone.Baggage {
	if w == nil {
		return hbone.Baggage{}
	}
	name := w.WorkloadName
	if name == "" {
		name = w.Name
	}
	return hbone.Baggage{
		ClusterID: w.ClusterID, Namespace: w.Namespace, WorkloadType: w.WorkloadType.String(), WorkloadName: name,
		Service: w.CanonicalName, Version: w.CanonicalRevision, Region: w.Locality.Region, Zone: w.Locality.Zone,
	}
}
