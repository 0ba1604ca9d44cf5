package stages

import (
	"context"
	"errors"
	"io"
	"net"
	"net/netip"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/ztgo/ztgo/control/snapshot"
	"github.com/ztgo/ztgo/stages/authz"
)

// testPod is a stages.Pod whose original destination and workload the test sets; the real
// one (runtime/node) is exercised end to end in network namespaces by e2e/inpod.
type testPod struct {
	dst  netip.AddrPort
	w    *snapshot.Workload
	err  error
	dial []string // "dial <dst>" or "transparent <src> <dst>", in order
}

func (p *testPod) Workload(ctx context.Context, s *snapshot.Snapshot) (*snapshot.Workload, *snapshot.Snapshot, error) {
	return p.w, s, p.err
}
func (p *testPod) Dial(ctx context.Context, dst netip.AddrPort) (*net.TCPConn, error) {
	p.dial = append(p.dial, "dial "+dst.String())
	return nil, errors.New("no dial in this test")
}
func (p *testPod) DialTransparent(ctx context.Context, src netip.Addr, dst netip.AddrPort) (*net.TCPConn, error) {
	p.dial = append(p.dial, "transparent "+src.String()+" "+dst.String())
	return nil, errors.New("no dial in this test")
}
func (p *testPod) OriginalDst(c *net.TCPConn) (netip.AddrPort, error) { return p.dst, nil }
func (p *testPod) Scope() string                                      { return "test" }

// tcpPair returns the server side of a loopback TCP connection.
func tcpPair(t *testing.T) *net.TCPConn {
	t.Helper()
	ln, err := net.ListenTCP("tcp", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	c, err := net.DialTCP("tcp", nil, ln.Addr().(*net.TCPAddr))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	s, err := ln.AcceptTCP()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

func TestCaptureInPod(t *testing.T) {
	client := &snapshot.Workload{UID: "c", Name: "client", Namespace: "default", ServiceAccount: "sa", Node: "n",
		Addresses: []netip.Addr{netip.MustParseAddr("198.18.1.10")}, Protocol: snapshot.TunnelHBONE, TrustDomain: "cluster.local"}
	snap, err := snapshot.Build(snapshot.Config{Workloads: []*snapshot.Workload{client}})
	if err != nil {
		t.Fatal(err)
	}
	ap := netip.MustParseAddrPort
	cases := []struct {
		name    string
		dir     Direction
		dst     netip.AddrPort
		podErr  error
		socks5  bool
		fail    Failure
		errText string
	}{
		{name: "outbound to a pod", dir: Outbound, dst: ap("198.18.2.10:80")},
		{name: "outbound to a remote 15008 is a real destination", dir: Outbound, dst: ap("198.18.2.10:15008")},
		{name: "outbound to loopback 15001", dir: Outbound, dst: ap("127.0.0.1:15001"), fail: FailDeny, errText: "proxy port"},
		{name: "outbound to loopback 15006", dir: Outbound, dst: ap("127.0.0.1:15006"), fail: FailDeny, errText: "proxy port"},
		{name: "outbound to loopback 15080 without socks5", dir: Outbound, dst: ap("127.0.0.1:15080")},
		{name: "outbound to loopback 15080 with socks5", dir: Outbound, dst: ap("127.0.0.1:15080"), socks5: true, fail: FailDeny},
		{name: "outbound from an unknown pod", dir: Outbound, dst: ap("198.18.2.10:80"), podErr: errors.New("not a workload"), fail: FailIdentity},
		{name: "plaintext to the app", dir: InboundPlain, dst: ap("198.18.1.10:8080")},
		{name: "plaintext to 15006 loops", dir: InboundPlain, dst: ap("198.18.1.10:15006"), fail: FailDeny, errText: "proxy port"},
		{name: "plaintext to 15001", dir: InboundPlain, dst: ap("198.18.1.10:15001"), fail: FailDeny},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			h := &Handlers{Node: "n", SOCKS5: tc.socks5}
			h.Stages(1, 1)
			pod := &testPod{dst: tc.dst, w: client, err: tc.podErr}
			f := &Flow{Dir: tc.dir, Snap: snap, Pod: pod, Down: tcpPair(t), Src: ap("198.18.3.3:40000")}
			if tc.dir == Outbound {
				f.Src = ap("198.18.1.10:40000")
			}
			v := h.capture(context.Background(), f)
			if tc.fail != FailNone {
				if v != Stop || f.Failure != tc.fail || !strings.Contains(f.Err.Error(), tc.errText) {
					t.Fatalf("verdict %v failure %v err %v, want Stop %v (%q)", v, f.Failure, f.Err, tc.fail, tc.errText)
				}
				return
			}
			if v != Next {
				t.Fatalf("verdict Stop: %v %v", f.Failure, f.Err)
			}
			if f.Dst != tc.dst {
				t.Errorf("dst %v, want %v", f.Dst, tc.dst)
			}
			switch tc.dir {
			case Outbound:
				if f.SrcWorkload != client || f.SrcIdentity != client.Identity() {
					t.Errorf("source %v %v, want the pod's workload", f.SrcWorkload, f.SrcIdentity)
				}
			case InboundPlain:
				if f.DstWorkload != client || !f.SrcIdentity.IsZero() {
					t.Errorf("dst workload %v src identity %v: want the pod's workload and no identity", f.DstWorkload, f.SrcIdentity)
				}
				if v := h.identity(context.Background(), f); v != Next || f.UpAddr != tc.dst {
					t.Errorf("identity: %v up %v, want the original destination", v, f.UpAddr)
				}
			}
		})
	}
}

// Upstream dials of captured flows go through the pod (its namespace), never the node's
// dialer: outbound from the pod's own address, inbound plaintext keeping the client's
// (unless it is the destination's own).
func TestUpstreamDialsThroughPod(t *testing.T) {
	pod := &testPod{}
	h := &Handlers{}
	h.Stages(1, 1)
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	up := netip.MustParseAddrPort("198.18.9.9:80")
	for _, tc := range []struct {
		dir Direction
		src string
	}{{Outbound, "198.18.1.1:1"}, {InboundPlain, "198.18.1.1:1"}, {InboundPlain, "198.18.9.9:2"}} {
		f := &Flow{Dir: tc.dir, Pod: pod, UpAddr: up, Src: netip.MustParseAddrPort(tc.src)}
		if v := h.upstream(ctx, f); v != Stop || f.Failure != FailConnect {
			t.Fatalf("%v: verdict %v failure %v", tc.dir, v, f.Failure)
		}
	}
	want := []string{"dial 198.18.9.9:80", "transparent 198.18.1.1 198.18.9.9:80", "transparent invalid IP 198.18.9.9:80"}
	if !slices.Equal(pod.dial, want) {
		t.Fatalf("pod dialled %q, want %q", pod.dial, want)
	}
}

// fakeConn is a Down that records its Close.
type fakeConn struct{ closed atomic.Int32 }

func (c *fakeConn) Read([]byte) (int, error)    { return 0, io.EOF }
func (c *fakeConn) Write(p []byte) (int, error) { return len(p), nil }
func (c *fakeConn) CloseWrite() error           { return nil }
func (c *fakeConn) Close() error                { c.closed.Add(1); return nil }

// A policy change that denies an established flow aborts it through its relay (closing Down
// alone would not wake a relay parked on the event loop); one that lands before the relay
// runs closes Down and makes SetAbort refuse, so the relay is aborted as it starts.
func TestPolicyChangeAbortsFlow(t *testing.T) {
	dst := func() *snapshot.Workload {
		return &snapshot.Workload{UID: "d", Name: "d", Namespace: "ns", Addresses: []netip.Addr{netip.MustParseAddr("10.0.0.2")}}
	}
	build := func(policies ...*snapshot.Policy) *snapshot.Snapshot {
		snap, err := snapshot.Build(snapshot.Config{Workloads: []*snapshot.Workload{dst()}, Policies: policies})
		if err != nil {
			t.Fatal(err)
		}
		return snap
	}
	open := build()
	denyAll := build(&snapshot.Policy{Name: "deny", Namespace: "ns", Scope: snapshot.ScopeNamespace, Action: snapshot.ActionDeny, Rules: []snapshot.Rule{{}}})

	for i, relayFirst := range []bool{true, false} {
		h := &Handlers{Tracker: authz.NewTracker(nil)}
		h.Stages(1, 1)
		down := &fakeConn{}
		f := &Flow{ID: uint64(i + 1), Dir: Inbound, Snap: open, DstWorkload: open.WorkloadByUID("d"), Down: down,
			Src: netip.MustParseAddrPort("10.0.0.1:4000"), Dst: netip.MustParseAddrPort("10.0.0.2:80")}
		if v := h.authz(context.Background(), f); v != Next {
			t.Fatalf("authz before the change: %v %v", f.Failure, f.Err)
		}
		var relayAborted atomic.Int32
		abortRelay := func() { relayAborted.Add(1) }
		if relayFirst && !f.SetAbort(abortRelay) {
			t.Fatal("SetAbort refused on a live flow")
		}
		if n := h.Tracker.Recheck(denyAll); n != 1 {
			t.Fatalf("recheck closed %d flows, want 1", n)
		}
		if relayFirst {
			if relayAborted.Load() != 1 || down.closed.Load() != 0 {
				t.Errorf("relay running: relay aborted %d times, Down closed %d times; want the relay's abort only",
					relayAborted.Load(), down.closed.Load())
			}
			continue
		}
		if down.closed.Load() != 1 {
			t.Errorf("before the relay: Down closed %d times, want 1", down.closed.Load())
		}
		if f.SetAbort(abortRelay) {
			t.Error("SetAbort accepted after the flow was aborted: the relay would run on")
		}
	}
}
