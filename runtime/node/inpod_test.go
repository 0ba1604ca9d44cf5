package node

import (
	"context"
	"net/netip"
	"slices"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/ztgo/ztgo/control/snapshot"
	"github.com/ztgo/ztgo/redirect"
	"github.com/ztgo/ztgo/redirect/zds"
)

// A pod's first connection may come before the control plane announces the pod's workload:
// the wait ends with the publish that brings it, not at a poll or at the 5 s limit.
func TestPodWorkloadArrivesWhileWaiting(t *testing.T) {
	n, err := New(Config{Name: "node-a", DefaultConfig: []byte("workloads: []\n")})
	if err != nil {
		t.Fatal(err)
	}
	defer n.Stop(context.Background())
	p := &pod{n: n, uid: "client-uid", info: zds.WorkloadInfo{Name: "client", Namespace: "default", ServiceAccount: "client"}}
	p.ctx, p.cancel = context.WithCancel(context.Background())
	defer p.cancel()

	type result struct {
		w    *snapshot.Workload
		snap *snapshot.Snapshot
		err  error
	}
	got := make(chan result, 1)
	before := n.store.Load()
	go func() {
		w, snap, err := p.Workload(context.Background(), before)
		got <- result{w, snap, err}
	}()
	select {
	case r := <-got:
		t.Fatalf("found %v (%v) before the workload was published", r.w, r.err)
	case <-time.After(100 * time.Millisecond):
	}
	// Another node's workload of the same name does not count.
	other := &snapshot.Workload{UID: "0-other", Name: "client", Namespace: "default", ServiceAccount: "client", Node: "node-b",
		Addresses: []netip.Addr{netip.MustParseAddr("10.0.2.10")}}
	mine := &snapshot.Workload{UID: "a", Name: "client", Namespace: "default", ServiceAccount: "client", Node: "node-a",
		Addresses: []netip.Addr{netip.MustParseAddr("10.0.1.10")}}
	publish := func(ws ...*snapshot.Workload) {
		s, err := snapshot.Build(snapshot.Config{Workloads: ws})
		if err != nil {
			t.Fatal(err)
		}
		n.store.Publish(s)
	}
	publish(other)
	select {
	case r := <-got:
		t.Fatalf("found %+v (%v) in a snapshot with only another node's workload", r.w, r.err)
	case <-time.After(100 * time.Millisecond):
	}
	publish(other, mine)
	published := time.Now()
	select {
	case r := <-got:
		if r.err != nil || r.w == nil || r.w.UID != "a" {
			t.Fatalf("Workload = %+v, %v; want node-a's workload", r.w, r.err)
		}
		if r.snap != n.store.Load() {
			t.Errorf("Workload returned snapshot %d, want the one it found the workload in (%d)", r.snap.Version(), n.store.Load().Version())
		}
		if d := time.Since(published); d > time.Second {
			t.Errorf("found %v after the publish", d)
		}
	case <-time.After(2 * time.Second):
		t.Fatal("still waiting 2s after the pod's workload was published")
	}
	if a := p.dnsClient(); a != netip.MustParseAddr("10.0.1.10") {
		t.Errorf("dnsClient = %s, want the pod's workload address", a)
	}
}

// fakePod registers a pod proxy with no namespace and no listeners, as far as the node's
// bookkeeping goes (what addPod records).
func fakePod(n *Node, uid string) *pod {
	p := &pod{n: n, uid: uid, scope: "pod " + uid, lns: &redirect.Listeners{}, dnsStop: func() {}}
	p.ctx, p.cancel = context.WithCancel(context.Background())
	n.podMu.Lock()
	n.pods[uid] = p
	n.podScopes.Store(p.scope, p)
	n.podsActive.Set(float64(len(n.pods)))
	n.podMu.Unlock()
	return p
}

// The ZDS reconcile (a snapshot of the pods the node agent knows after a reconnect) stops the
// proxies of the pods it does not name, and only those.
func TestZDSSnapshotRemovesUnknownPods(t *testing.T) {
	reg := prometheus.NewRegistry()
	n, err := New(Config{Name: "node-a", DefaultConfig: []byte("workloads: []\n"), Registry: reg})
	if err != nil {
		t.Fatal(err)
	}
	defer n.Stop(context.Background())
	pods := map[string]*pod{}
	for _, uid := range []string{"a", "b", "c", "d"} {
		pods[uid] = fakePod(n, uid)
	}
	zdsHandler{Node: n}.Snapshot([]string{"c", "a", "x"}) // x: not running here, nothing to do
	if got := n.podUIDs(); !slices.Equal(got, []string{"a", "c"}) {
		t.Fatalf("pods after the snapshot: %v, want [a c]", got)
	}
	for uid, p := range pods {
		_, scoped := n.podScopes.Load(p.scope)
		kept := uid == "a" || uid == "c"
		if (p.ctx.Err() == nil) != kept || scoped != kept {
			t.Errorf("pod %s: running %v, scope registered %v; want %v", uid, p.ctx.Err() == nil, scoped, kept)
		}
	}
	if got := testutil.ToFloat64(n.podsActive); got != 2 {
		t.Errorf("ztgo_inpod_proxies = %v, want 2", got)
	}
}
