package node

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"math/rand/v2"
	"net"
	"net/netip"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/ztgo/ztgo/connpool"
	"github.com/ztgo/ztgo/control/snapshot"
	"github.com/ztgo/ztgo/redirect"
	"github.com/ztgo/ztgo/redirect/zds"
	"github.com/ztgo/ztgo/stages"
	"github.com/ztgo/ztgo/stages/hbone"
	"github.com/ztgo/ztgo/stages/upstream"
)

// workloadWait is how long a captured connection waits for its pod's workload to appear in
// the mesh (ztunnel's wait_for_workload).
const workloadWait = 5 * time.Second

// pod is one in-pod proxy: ztgo's listeners inside a pod's network namespace and the socket
// factory its upstream connections come from. It implements stages.Pod for the flows it
// captures.
type pod struct {
	n     *Node
	uid   string
	info  zds.WorkloadInfo
	ns    redirect.Netns // owned: closed by finish, after every user is gone
	sf    *redirect.SocketFactory
	lns   *redirect.Listeners
	scope string
	added time.Time

	// ctx ends when the pod is removed: accept loops waiting for the pipeline or a
	// handshake slot, and flows waiting for the pod's workload, give up.
	ctx    context.Context
	cancel context.CancelFunc
	// closed is set (under Node.mu) when the pod is removed: a flow or an inbound connection
	// of the pod that completes afterwards is closed instead of registered.
	closed bool

	dnsStop func()
	loops   sync.WaitGroup
	// relays counts the pod's established flows still relaying (added under Node.mu).
	relays sync.WaitGroup
	// missed is 1 + the snapshot version in which a wait for the pod's workload timed out:
	// later connections of the pod fail at once until the mesh changes, so a pod the control
	// plane does not know cannot hold the capture workers 5 s per connection.
	missed atomic.Uint64
	// found caches the pod's workload in one snapshot, so flows of an unchanged mesh do
	// not scan the node's workloads.
	found atomic.Pointer[podWorkload]
}

type podWorkload struct {
	snap *snapshot.Snapshot
	w    *snapshot.Workload
}

// AddPod starts the in-pod proxy of pod uid: it opens ztgo's listeners inside ns (15001,
// 15006, 15008, 15053) and serves them until DelPod. The node duplicates ns; the caller keeps
// its own handle. Adding a uid that runs already with the same namespace changes nothing;
// with another namespace (the pod's sandbox was recreated) the old proxy is removed first.
// It is the pod sink of both the ZDS client and the built-in node agent.
func (n *Node) AddPod(ctx context.Context, uid string, info zds.WorkloadInfo, ns redirect.Netns) error {
	own, err := ns.Dup()
	if err != nil {
		return fmt.Errorf("add pod %s: %w", uid, err)
	}
	return n.addPod(uid, info, own)
}

// addPod takes ownership of ns.
func (n *Node) addPod(uid string, info zds.WorkloadInfo, ns redirect.Netns) error {
	var old *pod
	defer func() {
		if old != nil {
			old.finish() // after podMu is released: it waits for the old pod's loops
		}
	}()
	n.podMu.Lock()
	defer n.podMu.Unlock()
	if prev := n.pods[uid]; prev != nil {
		if prev.ns.ID() == ns.ID() {
			ns.Close()
			return nil
		}
		n.log.Info("pod network namespace changed: replacing its proxy", "uid", uid, "old", prev.ns.String(), "new", ns.String())
		old = n.detachLocked(prev)
	}
	if n.stoppingPods() {
		ns.Close()
		return errors.New("add pod: node is stopping")
	}
	sf, err := redirect.NewSocketFactory(ns, redirect.SocketConfig{Mark: n.cfg.InPodMark})
	if err != nil {
		ns.Close()
		return fmt.Errorf("add pod %s: %w", uid, err)
	}
	lns, err := sf.ListenAll()
	if err != nil {
		ns.Close()
		return fmt.Errorf("add pod %s: listeners in %s: %w", uid, ns, err)
	}
	p := &pod{
		n: n, uid: uid, info: info, ns: ns, sf: sf, lns: lns, added: time.Now(),
		scope: fmt.Sprintf("pod %s (%s)", uid, ns.ID()),
	}
	p.ctx, p.cancel = context.WithCancel(n.ctx)
	// In-pod mode always has the DNS proxy (New creates it).
	if p.dnsStop, err = n.dns.Serve(lns.DNSTCP, lns.DNSUDP, p.dnsClient, sf.DialContext); err != nil {
		p.cancel()
		lns.Close()
		ns.Close()
		return fmt.Errorf("add pod %s: dns: %w", uid, err)
	}
	p.loops.Add(3)
	go p.acceptCaptured(lns.Outbound, stages.Outbound)
	go p.acceptCaptured(lns.InboundPlaintext, stages.InboundPlain)
	go p.acceptHBONE(lns.InboundHBONE)
	n.pods[uid] = p
	n.podScopes.Store(p.scope, p)
	n.podsActive.Set(float64(len(n.pods)))
	n.log.Info("pod proxy started", "uid", uid, "name", info.Name, "namespace", info.Namespace,
		"service_account", info.ServiceAccount, "netns", ns.String())
	return nil
}

// DelPod stops pod uid's proxy at once (ztunnel drains a deleted pod's proxies immediately):
// its listeners close, its flows and pooled connections are closed, and its namespace handle
// is released. Other pods' flows are not touched.
func (n *Node) DelPod(uid string) {
	n.podMu.Lock()
	p := n.pods[uid]
	if p != nil {
		n.detachLocked(p)
	}
	n.podMu.Unlock()
	if p != nil {
		p.finish()
	}
}

// removeAllPods stops every in-pod proxy (node shutdown).
func (n *Node) removeAllPods() {
	n.podMu.Lock()
	var all []*pod
	for _, p := range n.pods {
		all = append(all, n.detachLocked(p))
	}
	n.podMu.Unlock()
	for _, p := range all {
		p.finish()
	}
}

// podUIDs lists the running in-pod proxies, by pod uid.
func (n *Node) podUIDs() []string {
	n.podMu.Lock()
	defer n.podMu.Unlock()
	return slices.Sorted(maps.Keys(n.pods))
}

func (n *Node) stoppingPods() bool {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.stopping
}

// detachLocked takes p out of the node (podMu held) and closes its listeners, so the same
// namespace can be served again at once; nothing here waits. finish does the rest.
func (n *Node) detachLocked(p *pod) *pod {
	delete(n.pods, p.uid)
	n.podScopes.Delete(p.scope)
	n.podsActive.Set(float64(len(n.pods)))
	p.lns.Close()
	p.cancel()
	n.mu.Lock()
	p.closed = true
	n.mu.Unlock()
	return p
}

// finish waits for the pod's accept loops and closes whatever the pod still has open: its
// flows, its inbound HBONE connections and its pooled connections. Flows and connections that
// complete later see closed and close themselves (established, serveInbound, dialHBONE).
func (p *pod) finish() {
	n := p.n
	p.dnsStop()
	p.loops.Wait()
	// closed was set under mu before this point, and flows are stored under mu after checking
	// it, so every flow of the pod that will ever be stored is visible here.
	n.flows.Range(func(_ uint64, f *stages.Flow) bool {
		if f.Pod == stages.Pod(p) {
			f.Abort()
		}
		return true
	})
	// The sockets really close (FIN or RST leave) once their relays let go of them. Wait for
	// that, briefly: the caller (the node agent) removes the pod's rules next, and with the
	// NAT gone a late FIN would no longer reach a client that came in through 15006.
	relaysDone := make(chan struct{})
	go func() { p.relays.Wait(); close(relaysDone) }()
	select {
	case <-relaysDone:
	case <-time.After(time.Second):
		n.log.Warn("pod removed with flows still closing", "uid", p.uid)
	}
	var conns []*hbone.Conn
	n.mu.Lock()
	for c, owner := range n.serverConns {
		if owner == p {
			conns = append(conns, c)
		}
	}
	n.mu.Unlock()
	for _, c := range conns {
		c.Close()
	}
	n.pool.CloseWhere(func(k connpool.Key) bool { return k.Scope == p.scope })
	// Dials of flows still in the stages fail from here on: the handle is closed.
	p.ns.Close()
	n.log.Info("pod proxy stopped", "uid", p.uid, "name", p.info.Name, "namespace", p.info.Namespace)
}

// isClosedLocked reports whether p was removed; the caller holds Node.mu.
func (p *pod) isClosedLocked() bool { return p.closed }

// acceptCaptured feeds the connections the pod's rules redirected to 15001 (outbound) or
// 15006 (inbound plaintext) into the pipeline.
func (p *pod) acceptCaptured(ln *net.TCPListener, dir stages.Direction) {
	defer p.loops.Done()
	p.n.acceptFlows(p.ctx, p.n.log.With("uid", p.uid), ln, dir, p)
}

// acceptFlows feeds the connections accepted on ln into the pipeline as flows of direction
// dir, until ln closes or ctx ends: the node's SOCKS5 entry (p nil) or a pod's captured
// 15001 and 15006 (p the pod).
func (n *Node) acceptFlows(ctx context.Context, log *slog.Logger, ln net.Listener, dir stages.Direction, p *pod) {
	rng := rand.New(rand.NewPCG(rand.Uint64(), rand.Uint64()))
	var delay time.Duration
	for {
		c, err := ln.Accept()
		if err != nil {
			if acceptRetry(ctx, log, ln, err, &delay) {
				continue
			}
			return
		}
		delay = 0
		var f *stages.Flow
		if dir == stages.Outbound {
			f = n.pipeline.NewFlow(dir, n.store.Load(), stages.Capture, stages.Identity, stages.Upstream)
			f.TraceParent = hbone.NewTraceParent(rng)
		} else {
			f = n.pipeline.NewFlow(dir, n.store.Load(), stages.Capture, stages.Identity, stages.Authz, stages.Upstream)
		}
		f.Down = c.(*net.TCPConn)
		f.Src = addrPort(c.RemoteAddr())
		if p != nil {
			f.Pod = p // never a nil *pod: f.Pod == nil is what tells a SOCKS5 flow
		}
		// Blocks while the capture stage is saturated: accepting slows down (backpressure).
		if err := n.pipeline.Submit(ctx, f); err != nil {
			c.Close()
			if errors.Is(err, stages.ErrStopped) || ctx.Err() != nil {
				return
			}
		}
	}
}

// acceptRetry handles an accept error: false ends the accept loop (the listener is closed,
// or ctx ended); otherwise (out of fds, ...) it waits, 5 ms doubling up to 1 s, and the loop
// goes on, so a passing shortage does not leave traffic redirected to a listener nobody
// serves.
func acceptRetry(ctx context.Context, log *slog.Logger, ln net.Listener, err error, delay *time.Duration) bool {
	if errors.Is(err, net.ErrClosed) || ctx.Err() != nil {
		return false
	}
	*delay = min(max(2**delay, 5*time.Millisecond), time.Second)
	log.Error("accept failed; retrying", "addr", ln.Addr().String(), "error", err, "retry_in", *delay)
	t := time.NewTimer(*delay)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-t.C:
		return true
	}
}

// acceptHBONE serves the pod's 15008: mTLS presenting the pod's certificate, then HTTP/2.
func (p *pod) acceptHBONE(ln *net.TCPListener) {
	defer p.loops.Done()
	p.n.acceptHBONE(p.ctx, ln, p)
}

// Workload finds the pod's workload among this node's workloads by the name, namespace and
// service account the pod source gave, waiting up to workloadWait for the control plane to
// announce it: each publish of the store wakes the wait.
func (p *pod) Workload(ctx context.Context, snap *snapshot.Snapshot) (*snapshot.Workload, *snapshot.Snapshot, error) {
	if w := p.lookup(snap); w != nil {
		return w, snap, nil
	}
	// latest looks in the store's current snapshot, if it is not the one looked in already.
	latest := func() *snapshot.Workload {
		if cur := p.n.store.Load(); cur != snap {
			snap = cur
			return p.lookup(snap)
		}
		return nil
	}
	if w := latest(); w != nil {
		return w, snap, nil
	}
	notFound := func() error {
		return fmt.Errorf("pod %s/%s (service account %s) is not a workload on node %q",
			p.info.Namespace, p.info.Name, p.info.ServiceAccount, p.n.cfg.Name)
	}
	if p.missed.Load() == snap.Version()+1 {
		return nil, snap, notFound() // already waited in vain for this mesh
	}
	changed, unsubscribe := p.n.store.Subscribe()
	defer unsubscribe()
	deadline := time.NewTimer(workloadWait)
	defer deadline.Stop()
	for {
		// After Subscribe: a publish that this look misses wakes the select.
		if w := latest(); w != nil {
			return w, snap, nil
		}
		select {
		case <-ctx.Done():
			return nil, snap, fmt.Errorf("waiting for the workload of pod %s/%s: %w", p.info.Namespace, p.info.Name, ctx.Err())
		case <-p.ctx.Done():
			return nil, snap, fmt.Errorf("waiting for the workload of pod %s/%s: pod removed", p.info.Namespace, p.info.Name)
		case <-deadline.C:
			p.missed.Store(snap.Version() + 1)
			return nil, snap, notFound()
		case <-changed:
		}
	}
}

// dnsClient is the address DNS queries through the pod's 15053 are answered for: the pod's
// own workload's, whatever address a query comes from (as ztunnel's per-pod DNS server
// knows its workload). Before the workload is known it is invalid, and queries get SERVFAIL.
func (p *pod) dnsClient() netip.Addr {
	if w := p.lookup(p.n.store.Load()); w != nil && len(w.Addresses) > 0 {
		return w.Addresses[0]
	}
	return netip.Addr{}
}

func (p *pod) lookup(snap *snapshot.Snapshot) *snapshot.Workload {
	if c := p.found.Load(); c != nil && c.snap == snap {
		return c.w
	}
	for _, w := range snap.WorkloadsOnNode(p.n.cfg.Name) {
		if w.Name == p.info.Name && w.Namespace == p.info.Namespace &&
			(p.info.ServiceAccount == "" || w.ServiceAccount == p.info.ServiceAccount) {
			p.found.Store(&podWorkload{snap: snap, w: w})
			return w
		}
	}
	return nil
}

// Dial connects from inside the pod, marked so the pod's rules let it out.
func (p *pod) Dial(ctx context.Context, dst netip.AddrPort) (*net.TCPConn, error) {
	c, err := p.sf.Dial(ctx, dst)
	return c, dialError(err)
}

// DialTransparent connects from inside the pod with the client's address as source.
func (p *pod) DialTransparent(ctx context.Context, src netip.Addr, dst netip.AddrPort) (*net.TCPConn, error) {
	c, err := p.sf.DialTransparent(ctx, src, dst)
	return c, dialError(err)
}

// OriginalDst is the destination the app dialled (SO_ORIGINAL_DST).
func (p *pod) OriginalDst(c *net.TCPConn) (netip.AddrPort, error) { return redirect.OriginalDst(c) }

// Scope keys the pod's pooled connections.
func (p *pod) Scope() string { return p.scope }

// dialError marks connect timeouts as upstream timeouts, which the stages report as
// NETWORK_POLICY, as for dials from the node's namespace.
func dialError(err error) error {
	if err != nil && errors.Is(err, redirect.ErrConnectTimeout) {
		return fmt.Errorf("%w: %w", upstream.ErrTimeout, err)
	}
	return err
}

// zdsHandler is the node as the ZDS client's Handler: AddPod and DelPod are the node's own
// (the pod sink the built-in agent uses too); Snapshot is the ZDS reconcile.
type zdsHandler struct{ *Node }

// Snapshot removes proxies the node agent no longer knows (the client reports only pods it
// started, so this is a safety net for proxies started before a reconnect).
func (h zdsHandler) Snapshot(active []string) {
	keep := map[string]bool{}
	for _, uid := range active {
		keep[uid] = true
	}
	for _, uid := range h.podUIDs() {
		if !keep[uid] {
			h.DelPod(uid)
		}
	}
}
