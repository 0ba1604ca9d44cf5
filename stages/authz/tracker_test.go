package authz

import (
	"bytes"
	"context"
	"log/slog"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/ztgo/ztgo/control/snapshot"
	"github.com/ztgo/ztgo/tls/spiffe"
)

// trackerMesh builds a snapshot with two destination workloads, "a" in namespace ns-a and "b" in
// ns-b, plus the given policies. Objects are fresh on each call because Build takes ownership.
func trackerMesh(t *testing.T, policies ...*snapshot.Policy) *snapshot.Snapshot {
	t.Helper()
	snap, err := snapshot.Build(snapshot.Config{
		Workloads: []*snapshot.Workload{
			{UID: "uid-a", Name: "a", Namespace: "ns-a", Addresses: []netip.Addr{ip("10.0.0.1")}},
			{UID: "uid-b", Name: "b", Namespace: "ns-b", Addresses: []netip.Addr{ip("10.0.0.2")}},
		},
		Policies: policies,
	})
	if err != nil {
		t.Fatalf("build snapshot: %v", err)
	}
	return snap
}

func denyBad() *snapshot.Policy {
	return policy("ns-a", "deny-bad", snapshot.ScopeNamespace, snapshot.ActionDeny,
		one(snapshot.Match{Principals: []snapshot.StringMatch{exact("cluster.local/ns/client/sa/bad")}}))
}

func clientConn(sa string, dst string) Conn {
	return Conn{
		SrcIdentity: spiffe.ID{TrustDomain: "cluster.local", Namespace: "client", ServiceAccount: sa},
		SrcIP:       ip("10.0.1.1"), DstIP: ip(dst), DstPort: 80,
	}
}

// closeCounter records closeFn calls per flow.
type closeCounter struct {
	mu    sync.Mutex
	calls map[uint64][]Decision
	ch    chan uint64
}

func newCloseCounter() *closeCounter {
	return &closeCounter{calls: map[uint64][]Decision{}, ch: make(chan uint64, 100)}
}

func (c *closeCounter) fn(id uint64) func(Decision) {
	return func(d Decision) {
		c.mu.Lock()
		c.calls[id] = append(c.calls[id], d)
		c.mu.Unlock()
		c.ch <- id
	}
}

func (c *closeCounter) count(id uint64) int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.calls[id])
}

func TestTrackerRunClosesNewlyDenied(t *testing.T) {
	var logs syncBuffer
	tr := NewTracker(slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelDebug})))
	store := snapshot.NewStore()
	store.Publish(trackerMesh(t))
	cc := newCloseCounter()

	tr.Add(1, "uid-a", clientConn("bad", "10.0.0.1"), cc.fn(1))    // denied once the policy lands
	tr.Add(2, "uid-a", clientConn("good", "10.0.0.1"), cc.fn(2))   // still allowed
	tr.Add(3, "uid-b", clientConn("bad", "10.0.0.2"), cc.fn(3))    // policy is in another namespace
	tr.Add(4, "uid-gone", clientConn("bad", "10.0.0.9"), cc.fn(4)) // destination not in the snapshot
	tr.Add(5, "uid-a", clientConn("bad", "10.0.0.1"), cc.fn(5))    // removed before the change
	tr.Remove(5)
	if got := tr.Len(); got != 4 {
		t.Fatalf("Len = %d, want 4", got)
	}

	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { tr.Run(ctx, store); close(done) }()

	store.Publish(trackerMesh(t, denyBad()))
	select {
	case id := <-cc.ch:
		if id != 1 {
			t.Fatalf("closed flow %d, want 1", id)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("flow 1 was not closed after the deny policy was published")
	}

	// More publishes with the same policy must not close anything again. The flow whose
	// destination is missing is logged on every recheck, which shows when version 4 was seen.
	store.Publish(trackerMesh(t, denyBad()))
	store.Publish(trackerMesh(t, denyBad()))
	waitFor(t, func() bool {
		return strings.Contains(logs.String(), "dst_workload=uid-gone") && strings.Contains(logs.String(), "snapshot=4")
	})
	cancel()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("Run did not return after ctx was cancelled")
	}

	for id, want := range map[uint64]int{1: 1, 2: 0, 3: 0, 4: 0, 5: 0} {
		if got := cc.count(id); got != want {
			t.Errorf("flow %d: closeFn ran %d times, want %d", id, got, want)
		}
	}
	cc.mu.Lock()
	d := cc.calls[1][0]
	cc.mu.Unlock()
	if d.Allow || d.Outcome != DeniedExplicitly || d.Policy != "ns-a/deny-bad" {
		t.Errorf("flow 1 closed with %+v", d)
	}
	if got := tr.Len(); got != 3 {
		t.Errorf("Len after close = %d, want 3", got)
	}
	if !strings.Contains(logs.String(), "no longer allowed after a policy update") {
		t.Errorf("close not logged:\n%s", logs.String())
	}
}

// syncBuffer lets the test read logs while Run writes them.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

func waitFor(t *testing.T, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatal("condition not met in time")
		}
		time.Sleep(time.Millisecond)
	}
}

func TestTrackerRecheck(t *testing.T) {
	tr := NewTracker(nil)
	cc := newCloseCounter()
	tr.Add(1, "uid-a", clientConn("bad", "10.0.0.1"), cc.fn(1))
	tr.Add(2, "uid-a", clientConn("good", "10.0.0.1"), cc.fn(2))

	if n := tr.Recheck(trackerMesh(t)); n != 0 {
		t.Fatalf("Recheck without policies closed %d", n)
	}
	snap := trackerMesh(t, denyBad())
	if n := tr.Recheck(snap); n != 1 {
		t.Fatalf("Recheck closed %d, want 1", n)
	}
	if n := tr.Recheck(snap); n != 0 {
		t.Fatalf("second Recheck closed %d, want 0", n)
	}
	if cc.count(1) != 1 || cc.count(2) != 0 {
		t.Fatalf("closeFn calls: flow1=%d flow2=%d, want 1 and 0", cc.count(1), cc.count(2))
	}

	// An allow-list that leaves out "good" closes it too: denial by "none allowed".
	allowOther := policy("ns-a", "allow-other", snapshot.ScopeNamespace, snapshot.ActionAllow,
		one(snapshot.Match{Principals: []snapshot.StringMatch{exact("cluster.local/ns/client/sa/other")}}))
	if n := tr.Recheck(trackerMesh(t, allowOther)); n != 1 {
		t.Fatalf("Recheck closed %d, want 1", n)
	}
	cc.mu.Lock()
	d := cc.calls[2][0]
	cc.mu.Unlock()
	if d.Outcome != DeniedNotAllowed || d.Reason != ReasonNotAllowed {
		t.Errorf("flow 2 closed with %+v", d)
	}
	if tr.Len() != 0 {
		t.Errorf("Len = %d, want 0", tr.Len())
	}
}

// TestTrackerCloseOnce runs overlapping Rechecks and Removes and checks that no closeFn ever
// runs twice.
func TestTrackerCloseOnce(t *testing.T) {
	tr := NewTracker(nil)
	const flows = 2000
	var calls [flows]atomic.Int32
	for i := range flows {
		tr.Add(uint64(i), "uid-a", clientConn("bad", "10.0.0.1"), func(Decision) { calls[i].Add(1) })
	}
	snap := trackerMesh(t, denyBad())
	var wg sync.WaitGroup
	var closed atomic.Int64
	for range 4 {
		wg.Go(func() { closed.Add(int64(tr.Recheck(snap))) })
	}
	wg.Go(func() {
		for i := 0; i < flows; i += 3 {
			tr.Remove(uint64(i))
		}
	})
	wg.Wait()
	total := 0
	for i := range flows {
		switch n := calls[i].Load(); n {
		case 0:
		case 1:
			total++
		default:
			t.Fatalf("flow %d closed %d times", i, n)
		}
	}
	if int64(total) != closed.Load() {
		t.Errorf("Recheck reported %d closes, closeFn ran %d times", closed.Load(), total)
	}
	if total+tr.Len() > flows || total < flows*2/3 {
		t.Errorf("closed %d, still tracked %d, of %d flows", total, tr.Len(), flows)
	}
}

// TestTrackerCloseFnMayRemove checks that closeFn can call back into the tracker, as a flow's
// teardown path will.
func TestTrackerCloseFnMayRemove(t *testing.T) {
	tr := NewTracker(nil)
	tr.Add(7, "uid-a", clientConn("bad", "10.0.0.1"), func(Decision) { tr.Remove(7) })
	done := make(chan int)
	go func() { done <- tr.Recheck(trackerMesh(t, denyBad())) }()
	select {
	case n := <-done:
		if n != 1 {
			t.Fatalf("closed %d, want 1", n)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Recheck deadlocked when closeFn called Remove")
	}
}
