package zds

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"runtime"
	"runtime/debug"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/sys/unix"
	"google.golang.org/protobuf/proto"
	"istio.io/istio/pkg/zdsapi"

	"github.com/ztgo/ztgo/redirect"
)

func TestNewConfig(t *testing.T) {
	h := newFakeHandler(t)
	c, err := New(Config{}, h, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	want := Config{SocketPath: DefaultSocketPath, InitialBackoff: 10 * time.Millisecond, MaxBackoff: 15 * time.Second, RetryInterval: 5 * time.Second}
	if c.cfg != want {
		t.Errorf("defaults %+v, want %+v", c.cfg, want)
	}
	c.Stop() // before Start: no-op

	for name, cfg := range map[string]Config{
		"long path":       {SocketPath: "/" + strings.Repeat("x", 107)},
		"negative":        {InitialBackoff: -1},
		"max below first": {InitialBackoff: time.Second, MaxBackoff: time.Millisecond},
		"negative retry":  {RetryInterval: -time.Second},
	} {
		if _, err := New(cfg, h, nil, nil); err == nil {
			t.Errorf("%s: New accepted %+v", name, cfg)
		}
	}
	if _, err := New(Config{}, nil, nil, nil); err == nil {
		t.Error("New accepted a nil handler")
	}
	reg := prometheus.NewRegistry()
	if _, err := New(Config{}, h, nil, reg); err != nil {
		t.Fatal(err)
	}
	if _, err := New(Config{}, h, nil, reg); err == nil {
		t.Error("second client registered the same metrics")
	}
}

// TestWire checks the bytes on the socket: hello is 08 01 and an ACK is 0a 00
// (WorkloadResponse{ack: {}}), one message per packet.
func TestWire(t *testing.T) {
	a := newTestAgent(t)
	h := newFakeHandler(t)
	c, _ := testClient(t, a, h)
	conn := a.accept() // checks the hello bytes
	conn.send(keepReq("k"))
	if b, _ := conn.read(); !bytes.Equal(b, []byte{0x0a, 0x00}) {
		t.Fatalf("ack = % x, want 0a 00", b)
	}
	if c.IsReady() {
		t.Fatal("ready before snapshot_sent")
	}
	conn.mustSnapshot()
	expectReady(t, c)
	if err := c.Start(t.Context()); err == nil {
		t.Error("second Start accepted")
	}
}

func TestSnapshot(t *testing.T) {
	a := newTestAgent(t)
	h := newFakeHandler(t)
	c, reg := testClient(t, a, h)
	conn := a.accept()
	conn.mustAdd("a")
	conn.mustAdd("b")
	conn.mustKeep("c") // not running: nothing to keep
	select {
	case <-c.Ready():
		t.Fatal("ready before snapshot_sent")
	default:
	}
	conn.mustSnapshot()
	h.expect("add a", "add b", "snapshot a,b")
	expectReady(t, c)
	expectMetrics(t, reg, 2, 0, 2, 0)
}

func TestLiveAddDel(t *testing.T) {
	a := newTestAgent(t)
	h := newFakeHandler(t)
	c, reg := testClient(t, a, h)
	conn := a.accept()
	conn.mustSnapshot()
	expectReady(t, c)
	h.expect("snapshot ")

	conn.mustAdd("d")
	conn.mustAdd("d") // same netns: idempotent
	h.expect("add d")
	conn.mustDel("d")
	conn.mustDel("d")       // gone already
	conn.mustDel("unknown") // never known
	h.expect("del d")
	expectMetrics(t, reg, 0, 0, 1, 1)
	if !c.IsReady() {
		t.Fatal("not ready")
	}
}

// TestNackAndRetry: a pod whose AddPod fails is NACKed "failure to start proxy", counted
// pending, keeps the client unready, and is retried every RetryInterval until it starts.
func TestNackAndRetry(t *testing.T) {
	a := newTestAgent(t)
	h := newFakeHandler(t)
	h.fail("a", 2)
	// Slow enough that the test's requests come before the retries.
	c, reg := testClientConfig(t, Config{SocketPath: a.path, RetryInterval: 300 * time.Millisecond}, h)
	conn := a.accept()
	if nack := conn.add("a"); !strings.HasPrefix(nack, "failure to start proxy : ") || !strings.Contains(nack, "address already in use") {
		t.Fatalf("add a: answer %q, want a start-proxy NACK", nack)
	}
	expectMetrics(t, reg, 0, 1, 0, 0)
	conn.mustSnapshot()
	if c.IsReady() {
		t.Fatal("ready with a pending pod")
	}
	expectReady(t, c) // after the retries
	if n := h.addCalls("a"); n != 3 {
		t.Errorf("AddPod a called %d times, want 3", n)
	}
	h.expect("fail a", "snapshot ", "fail a", "add a")
	expectMetrics(t, reg, 1, 0, 1, 0)

	// Live: a NACKed add makes the client unready until its retry succeeds.
	h.fail("e", 1)
	if nack := conn.add("e"); !strings.HasPrefix(nack, "failure to start proxy : ") {
		t.Fatalf("add e: %q", nack)
	}
	if c.IsReady() {
		t.Fatal("ready with a pending pod")
	}
	eventually(t, "retry of e", c.IsReady)
	h.expect("fail e", "add e")

	// del of a pending pod drops it: no DelPod (it never started), no more retries.
	h.fail("f", -1)
	if nack := conn.add("f"); nack == "" {
		t.Fatal("add f ACKed")
	}
	conn.mustDel("f")
	if !c.IsReady() {
		t.Fatal("not ready after the pending pod was deleted")
	}
	calls := h.addCalls("f")
	time.Sleep(3 * c.cfg.RetryInterval)
	if n := h.addCalls("f"); n != calls {
		t.Errorf("deleted pending pod retried: %d AddPod calls, want %d", n, calls)
	}
	h.expect("fail f")
	expectMetrics(t, reg, 2, 0, 2, 0)
}

// TestReconcileAfterReconnect: pods the new snapshot neither adds nor keeps are removed at
// snapshot_sent; those it adds again in the same netns are left running.
func TestReconcileAfterReconnect(t *testing.T) {
	a := newTestAgent(t)
	h := newFakeHandler(t)
	c, reg := testClient(t, a, h)
	conn := a.accept()
	conn.mustAdd("a")
	conn.mustAdd("b")
	conn.mustAdd("c")
	conn.mustSnapshot()
	expectReady(t, c)
	h.expect("add a", "add b", "add c", "snapshot a,b,c")

	conn.close() // the node agent restarts
	conn = a.accept()
	if c.IsReady() {
		t.Fatal("ready while resyncing")
	}
	conn.mustKeep("a")
	conn.mustAdd("b") // same netns: stays
	conn.mustAdd("d")
	conn.mustDel("d") // before snapshot_sent: removed at reconcile
	conn.mustAdd("e")
	conn.mustDel("e")
	conn.mustAdd("e") // re-added: stays
	h.expect("add d", "add e")
	conn.mustSnapshot()
	h.expect("del c", "del d", "snapshot a,b,e")
	if !c.IsReady() {
		t.Fatal("not ready after the snapshot")
	}
	expectMetrics(t, reg, 3, 0, 5, 2)

	// A pending pod does not survive its connection: the next snapshot decides.
	h.fail("p", -1)
	if nack := conn.add("p"); nack == "" {
		t.Fatal("add p ACKed")
	}
	expectMetrics(t, reg, 3, 1, 5, 2)
	conn.close()
	conn = a.accept()
	eventually(t, "pending gauge reset", func() bool {
		return metric(t, reg, "workload_manager_pending_proxy_count") == 0
	})
	calls := h.addCalls("p")
	time.Sleep(3 * c.cfg.RetryInterval)
	if n := h.addCalls("p"); n != calls {
		t.Errorf("pending pod of a closed connection retried: %d AddPod calls, want %d", n, calls)
	}
	conn.mustSnapshot()
	h.expect("fail p", "del a", "del b", "del e", "snapshot ")
	expectReady(t, c)
}

// TestProtocolErrors: a request the protocol forbids is NACKed, the connection closed, and
// the client reconnects; running pods stay until the next snapshot decides.
func TestProtocolErrors(t *testing.T) {
	netns := func(t *testing.T) int { return openFd(t, "/proc/self/ns/net") }
	add := func(uid string) []byte { return marshal(t, addReq(uid)) }
	cases := []struct {
		name    string
		synced  bool // send snapshot_sent first
		packet  []byte
		fds     int // netns fds to attach
		nack    string
		errText string
	}{
		{name: "add without fd", packet: add("x"), nack: nackRead, errText: "without a netns fd"},
		{name: "two fds on add", packet: add("x"), fds: 2, nack: nackRead, errText: "expected 1 fd, got 2"},
		{name: "many fds on add", packet: add("x"), fds: 5, nack: nackRead, errText: "truncated control message"},
		{name: "fd on del", packet: marshal(t, delReq("x")), fds: 1, nack: nackRead, errText: "unexpected fd with del"},
		{name: "fd on keep", packet: marshal(t, keepReq("x")), fds: 1, nack: nackRead, errText: "unexpected fd with keep"},
		{name: "fd on snapshot_sent", packet: marshal(t, snapshotReq()), fds: 1, nack: nackRead, errText: "unexpected fd with snapshot_sent"},
		{name: "truncated", packet: add(strings.Repeat("u", 1100)), fds: 1, nack: nackRead, errText: "truncated message"},
		{name: "not protobuf", packet: []byte{0xff, 0xff, 0xff}, nack: nackRead, errText: "decode WorkloadRequest"},
		{name: "no payload", packet: []byte{0x48, 0x01}, nack: nackRead, errText: "no payload"},
		{name: "add without workload_info", fds: 1, nack: nackProcess, errText: "workload_info is required",
			packet: marshal(t, &zdsapi.WorkloadRequest{Payload: &zdsapi.WorkloadRequest_Add{Add: &zdsapi.AddWorkload{Uid: "x"}}})},
		{name: "duplicate snapshot_sent", synced: true, packet: marshal(t, snapshotReq()), nack: nackProcess, errText: "snapshot received already"},
		{name: "keep after snapshot_sent", synced: true, packet: marshal(t, keepReq("a")), nack: nackProcess, errText: "keep received after snapshot"},
	}
	a := newTestAgent(t)
	h := newFakeHandler(t)
	c, reg := testClient(t, a, h)
	conn := a.accept()
	conn.mustAdd("a")
	conn.mustSnapshot()
	h.expect("add a", "snapshot a")
	for _, tc := range cases {
		func() {
			if tc.synced {
				conn.mustAdd("a")
				conn.mustSnapshot()
				h.expect("snapshot a")
			}
			var fds []int
			for range tc.fds {
				fds = append(fds, netns(t))
			}
			conn.sendRaw(tc.packet, fds...)
			closeFds(fds)
			nack := conn.answer()
			if !strings.HasPrefix(nack, tc.nack) || !strings.Contains(nack, tc.errText) {
				t.Errorf("%s: answer %q, want %q...%q", tc.name, nack, tc.nack, tc.errText)
			}
			conn.expectEOF()
			conn = a.accept()
			h.expect()
			if c.IsReady() {
				t.Errorf("%s: ready after a protocol error", tc.name)
			}
		}()
	}
	// The client still works, and "a" survived every broken connection.
	conn.mustAdd("a")
	conn.mustSnapshot()
	h.expect("snapshot a")
	expectReady(t, c)
	expectMetrics(t, reg, 1, 0, 1, 0)
}

func marshal(t *testing.T, req *zdsapi.WorkloadRequest) []byte {
	t.Helper()
	b, err := proto.Marshal(req)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// TestNotANetns: an fd that is not a network namespace is NACKed as a failed start, but
// not kept pending (a retry cannot help) and the connection stays.
func TestNotANetns(t *testing.T) {
	a := newTestAgent(t)
	h := newFakeHandler(t)
	c, reg := testClient(t, a, h)
	conn := a.accept()
	for _, tc := range []struct{ path, want string }{
		{"/dev/null", "not a network namespace: file system type"},
		{"/proc/self/cmdline", "not a network namespace: file system type 0x9fa0"},
		{"/proc/self/ns/uts", "not a network namespace: namespace type 0x4000000"},
		{"/proc/self/ns/ipc", "not a network namespace: namespace type 0x8000000"},
	} {
		path, want := tc.path, tc.want
		fd := openFd(t, path)
		nack := conn.addFd("x", fd)
		unix.Close(fd)
		if !strings.HasPrefix(nack, nackStart) || !strings.Contains(nack, want) {
			t.Errorf("%s: answer %q, want %q...%q", path, nack, nackStart, want)
		}
	}
	conn.mustSnapshot()
	h.expect("snapshot ")
	expectReady(t, c)
	expectMetrics(t, reg, 0, 0, 0, 0)
}

// TestNetnsDup: Dup gives the handler an fd of its own for the same namespace, still valid
// after the client closed its copy.
func TestNetnsDup(t *testing.T) {
	a := newTestAgent(t)
	h := newFakeHandler(t)
	dup := -1
	h.inspect = func(uid string, ns redirect.Netns) error {
		var err error
		dup, err = ns.DupFd()
		return err
	}
	c, _ := testClient(t, a, h)
	conn := a.accept()
	conn.mustAdd("a")
	conn.mustSnapshot()
	c.Stop() // DelPod, then the client closes its fd
	h.expect("add a", "snapshot a", "del a")
	self := openFd(t, "/proc/self/ns/net")
	defer unix.Close(self)
	var st1, st2 unix.Stat_t
	if err := unix.Fstat(dup, &st1); err != nil {
		t.Fatalf("dup after Stop: %v", err)
	}
	if err := unix.Fstat(self, &st2); err != nil {
		t.Fatal(err)
	}
	if st1.Ino != st2.Ino || st1.Dev != st2.Dev {
		t.Errorf("dup names %d:%d, want %d:%d", st1.Dev, st1.Ino, st2.Dev, st2.Ino)
	}
	if flags, err := unix.FcntlInt(uintptr(dup), unix.F_GETFD, 0); err != nil || flags&unix.FD_CLOEXEC == 0 {
		t.Errorf("dup flags %#x, %v: want FD_CLOEXEC", flags, err)
	}
	unix.Close(dup)
}

// TestStopDrains: Stop removes every running pod and closes the connection.
func TestStopDrains(t *testing.T) {
	a := newTestAgent(t)
	h := newFakeHandler(t)
	c, reg := testClient(t, a, h)
	conn := a.accept()
	conn.mustAdd("a")
	conn.mustAdd("b")
	conn.mustSnapshot()
	h.expect("add a", "add b", "snapshot a,b")
	c.Stop()
	h.expect("del a", "del b")
	conn.expectEOF()
	a.expectNoConn(50 * time.Millisecond)
	expectMetrics(t, reg, 0, 0, 2, 2)
	if c.IsReady() {
		t.Error("ready after Stop")
	}
	c.Stop()
}

// TestStopDuringAddPod: Stop cancels the context of an AddPod in progress.
func TestStopDuringAddPod(t *testing.T) {
	a := newTestAgent(t)
	h := &blockingHandler{fakeHandler: newFakeHandler(t), entered: make(chan struct{})}
	c, _ := testClient(t, a, h)
	conn := a.accept()
	fd := openFd(t, "/proc/self/ns/net")
	conn.send(addReq("a"), fd)
	unix.Close(fd)
	<-h.entered
	done := make(chan struct{})
	go func() { c.Stop(); close(done) }()
	select {
	case <-done:
	case <-time.After(waitFor):
		t.Fatal("Stop did not cancel AddPod")
	}
}

type blockingHandler struct {
	*fakeHandler
	entered chan struct{}
}

func (h *blockingHandler) AddPod(ctx context.Context, uid string, info WorkloadInfo, ns redirect.Netns) error {
	close(h.entered)
	<-ctx.Done()
	return ctx.Err()
}

// TestConnectRetry: the client keeps dialling until the node agent listens.
func TestConnectRetry(t *testing.T) {
	dir, err := os.MkdirTemp("", "zds")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	path := filepath.Join(dir, "ztunnel.sock")
	h := newFakeHandler(t)
	c, _ := testClientConfig(t, Config{SocketPath: path}, h)
	time.Sleep(100 * time.Millisecond)
	a := listenAgent(t, path)
	conn := a.accept()
	conn.mustSnapshot()
	expectReady(t, c)
}

// TestReconnectBackoff: the delay doubles after each connection that ends before its
// snapshot, up to MaxBackoff, and starts over after one that completed it.
func TestReconnectBackoff(t *testing.T) {
	a := newTestAgent(t)
	h := newFakeHandler(t)
	const first, max = 20 * time.Millisecond, 160 * time.Millisecond
	testClientConfig(t, Config{SocketPath: a.path, InitialBackoff: first, MaxBackoff: max}, h)
	conn := a.accept()
	var gaps []time.Duration
	for range 6 {
		conn.close()
		next := a.accept()
		gaps = append(gaps, next.at.Sub(conn.at))
		conn = next
	}
	t.Logf("gaps %v", gaps)
	want := []time.Duration{first, 2 * first, 4 * first, max, max, max}
	for i, g := range gaps {
		if g < want[i] {
			t.Errorf("reconnect %d after %v, want at least %v", i, g, want[i])
		}
	}
	conn.mustSnapshot()
	conn.close()
	next := a.accept()
	if g := next.at.Sub(conn.at); g >= max+first {
		// ~first, after a completed snapshot; measured from the accept, which precedes the
		// snapshot by the test's own round trips.
		t.Errorf("reconnect after a synced connection took %v, want about %v", g, first)
	}
}

// TestFdLeak runs every path that receives an fd and checks that, after Stop, the process
// holds the fds and goroutines it held before.
func TestFdLeak(t *testing.T) {
	warm := newTestAgent(t) // the netpoller, the first listener: opened once per process
	warm.close()
	// No GC: an *os.File's finalizer would close a leaked netns fd and hide the leak.
	defer debug.SetGCPercent(debug.SetGCPercent(-1))
	runtime.GC()
	fdsBefore, gBefore := countFds(t), runtime.NumGoroutine()

	func() {
		a := newTestAgent(t)
		defer a.close()
		h := newFakeHandler(t)
		reg := prometheus.NewRegistry()
		c, err := New(Config{SocketPath: a.path, InitialBackoff: time.Millisecond, MaxBackoff: 5 * time.Millisecond, RetryInterval: 10 * time.Millisecond}, h, nil, reg)
		if err != nil {
			t.Fatal(err)
		}
		if err := c.Start(t.Context()); err != nil {
			t.Fatal(err)
		}
		conn := a.accept()
		for i := range 20 {
			conn.mustAdd(string(rune('a' + i)))
		}
		conn.mustAdd("a") // duplicate: the new fd is closed
		h.fail("pending", -1)
		if nack := conn.add("pending"); nack == "" { // pending, then dropped with the connection
			t.Fatal("add pending ACKed")
		}
		conn.mustDel("b")
		fd := openFd(t, "/dev/null")
		if nack := conn.addFd("n", fd); nack == "" {
			t.Fatal("/dev/null ACKed")
		}
		conn.mustSnapshot()
		conn.mustDel("c")
		// Protocol errors carrying fds.
		ns := openFd(t, "/proc/self/ns/net")
		for _, bad := range []struct {
			b   []byte
			fds []int
		}{
			{marshal(t, delReq("a")), []int{ns}},
			{marshal(t, addReq("x")), []int{ns, fd}},
			{marshal(t, addReq("x")), []int{ns, fd, ns, fd}},
			{marshal(t, addReq(strings.Repeat("u", 2000))), []int{ns}},
			{[]byte{0xff}, []int{ns}},
			{marshal(t, &zdsapi.WorkloadRequest{Payload: &zdsapi.WorkloadRequest_Add{Add: &zdsapi.AddWorkload{Uid: "x"}}}), []int{ns}},
		} {
			conn.sendRaw(bad.b, bad.fds...)
			if nack := conn.answer(); nack == "" {
				t.Fatalf("% x ACKed", bad.b)
			}
			conn.expectEOF()
			conn.close()
			conn = a.accept()
		}
		unix.Close(ns)
		unix.Close(fd)
		// A resync that removes half the pods.
		for i := range 10 {
			conn.mustAdd(string(rune('a' + 2*i)))
		}
		conn.mustSnapshot()
		c.Stop()
		conn.close()
		if n := len(h.running); n != 0 {
			t.Errorf("%d pods running after Stop", n)
		}
	}()

	deadline := time.Now().Add(waitFor)
	for {
		fds, gs := countFds(t), runtime.NumGoroutine()
		if fds == fdsBefore && gs <= gBefore {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("after Stop: %d fds (%d before), %d goroutines (%d before)", fds, fdsBefore, gs, gBefore)
		}
		time.Sleep(time.Millisecond)
	}
}

func countFds(t *testing.T) int {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(ents) - 1 // ReadDir's own fd
}
