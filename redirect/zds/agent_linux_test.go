package zds

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/sys/unix"
	"google.golang.org/protobuf/proto"
	"istio.io/istio/pkg/zdsapi"

	"github.com/ztgo/ztgo/redirect"
)

// This file holds the test doubles: a node agent that speaks ZDS on a real SOCK_SEQPACKET
// socket, as istio-cni's ztunnelserver does, and a Handler that records its calls.

const waitFor = 5 * time.Second

// testAgent is a fake istio-cni node agent: it listens, and each accepted connection is
// handed to the test after its hello has been checked.
type testAgent struct {
	t     *testing.T
	path  string
	ln    *net.UnixListener
	conns chan accepted
}

type accepted struct {
	c  *net.UnixConn
	at time.Time
}

func newTestAgent(t *testing.T) *testAgent {
	t.Helper()
	// A short directory: sun_path holds 107 bytes and t.TempDir() can be longer.
	dir, err := os.MkdirTemp("", "zds")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return listenAgent(t, filepath.Join(dir, "ztunnel.sock"))
}

func listenAgent(t *testing.T, path string) *testAgent {
	t.Helper()
	ln, err := net.ListenUnix("unixpacket", &net.UnixAddr{Name: path, Net: "unixpacket"})
	if err != nil {
		t.Fatal(err)
	}
	a := &testAgent{t: t, path: path, ln: ln, conns: make(chan accepted, 64)}
	go func() {
		defer close(a.conns)
		for {
			c, err := ln.AcceptUnix()
			if err != nil {
				return
			}
			a.conns <- accepted{c, time.Now()}
		}
	}()
	t.Cleanup(a.close)
	return a
}

// close stops listening and closes the connections nobody took.
func (a *testAgent) close() {
	a.ln.Close()
	for c := range a.conns {
		c.c.Close()
	}
}

// accept waits for the client's next connection and checks its hello: ZdsHello{version:
// V1}, which is the two bytes 08 01.
func (a *testAgent) accept() *agentConn {
	a.t.Helper()
	select {
	case c, ok := <-a.conns:
		if !ok {
			a.t.Fatal("agent closed")
		}
		ac := &agentConn{t: a.t, c: c.c, at: c.at}
		a.t.Cleanup(ac.close)
		b, fds := ac.read()
		if len(fds) != 0 {
			a.t.Fatalf("hello carried %d fds", len(fds))
		}
		if !bytes.Equal(b, []byte{0x08, 0x01}) {
			a.t.Fatalf("hello = % x, want 08 01", b)
		}
		var h zdsapi.ZdsHello
		if err := proto.Unmarshal(b, &h); err != nil || h.GetVersion() != zdsapi.Version_V1 {
			a.t.Fatalf("hello %v: %v", &h, err)
		}
		return ac
	case <-time.After(waitFor):
		a.t.Fatal("client did not connect")
		return nil
	}
}

// expectNoConn checks that the client does not connect within d.
func (a *testAgent) expectNoConn(d time.Duration) {
	a.t.Helper()
	select {
	case c := <-a.conns:
		c.c.Close()
		a.t.Fatal("unexpected connection")
	case <-time.After(d):
	}
}

// agentConn is one accepted connection, driven the way the node agent drives it: one
// request, then wait for its answer.
type agentConn struct {
	t  *testing.T
	c  *net.UnixConn
	at time.Time // accepted
}

func (ac *agentConn) close() { ac.c.Close() }

// read receives one packet as the node agent does (1024-byte buffer, truncation is an
// error) and closes any fd it carried.
func (ac *agentConn) read() ([]byte, []int) {
	ac.t.Helper()
	buf := make([]byte, 1024)
	oob := make([]byte, unix.CmsgSpace(4*4))
	if err := ac.c.SetReadDeadline(time.Now().Add(waitFor)); err != nil {
		ac.t.Fatal(err)
	}
	n, oobn, flags, _, err := ac.c.ReadMsgUnix(buf, oob)
	if err != nil {
		ac.t.Fatalf("agent read: %v", err)
	}
	if flags&(unix.MSG_TRUNC|unix.MSG_CTRUNC) != 0 {
		ac.t.Fatalf("agent read: truncated (flags %#x)", flags)
	}
	fds, err := parseRights(oob[:oobn])
	if err != nil {
		ac.t.Fatal(err)
	}
	closeFds(fds)
	return buf[:n], fds
}

// sendRaw sends one packet with fds as SCM_RIGHTS.
func (ac *agentConn) sendRaw(b []byte, fds ...int) {
	ac.t.Helper()
	var oob []byte
	if len(fds) > 0 {
		oob = unix.UnixRights(fds...)
	}
	if err := ac.c.SetWriteDeadline(time.Now().Add(waitFor)); err != nil {
		ac.t.Fatal(err)
	}
	if _, _, err := ac.c.WriteMsgUnix(b, oob, nil); err != nil {
		ac.t.Fatalf("agent send: %v", err)
	}
}

func (ac *agentConn) send(req *zdsapi.WorkloadRequest, fds ...int) {
	ac.t.Helper()
	b, err := proto.Marshal(req)
	if err != nil {
		ac.t.Fatal(err)
	}
	ac.sendRaw(b, fds...)
}

// answer reads the client's answer: it must be a WorkloadResponse with an ack and no fd.
// It returns the ack's error ("" for an ACK).
func (ac *agentConn) answer() string {
	ac.t.Helper()
	b, fds := ac.read()
	if len(fds) != 0 {
		ac.t.Fatalf("answer carried %d fds", len(fds))
	}
	var r zdsapi.WorkloadResponse
	if err := proto.Unmarshal(b, &r); err != nil {
		ac.t.Fatalf("answer % x: %v", b, err)
	}
	if r.GetAck() == nil {
		ac.t.Fatalf("answer % x has no ack", b)
	}
	return r.GetAck().GetError()
}

// request sends req with fds and returns the answer.
func (ac *agentConn) request(req *zdsapi.WorkloadRequest, fds ...int) string {
	ac.t.Helper()
	ac.send(req, fds...)
	return ac.answer()
}

// mustAck sends req and fails unless it is ACKed.
func (ac *agentConn) mustAck(req *zdsapi.WorkloadRequest, fds ...int) {
	ac.t.Helper()
	if nack := ac.request(req, fds...); nack != "" {
		ac.t.Fatalf("%v: NACK %q", req, nack)
	}
}

// addFd sends add for uid with fd as its netns and returns the answer.
func (ac *agentConn) addFd(uid string, fd int) string {
	ac.t.Helper()
	return ac.request(addReq(uid), fd)
}

// add sends add for uid with this process's own netns (/proc/self/ns/net, a real netns fd
// that needs no privilege) and returns the answer.
func (ac *agentConn) add(uid string) string {
	ac.t.Helper()
	fd := openFd(ac.t, "/proc/self/ns/net")
	defer unix.Close(fd)
	return ac.addFd(uid, fd)
}

func (ac *agentConn) mustAdd(uid string) {
	ac.t.Helper()
	if nack := ac.add(uid); nack != "" {
		ac.t.Fatalf("add %s: NACK %q", uid, nack)
	}
}

func (ac *agentConn) mustKeep(uid string) { ac.t.Helper(); ac.mustAck(keepReq(uid)) }
func (ac *agentConn) mustDel(uid string)  { ac.t.Helper(); ac.mustAck(delReq(uid)) }
func (ac *agentConn) mustSnapshot()       { ac.t.Helper(); ac.mustAck(snapshotReq()) }

// expectEOF checks that the client closes the connection.
func (ac *agentConn) expectEOF() {
	ac.t.Helper()
	if err := ac.c.SetReadDeadline(time.Now().Add(waitFor)); err != nil {
		ac.t.Fatal(err)
	}
	buf := make([]byte, 1024)
	n, _, _, _, err := ac.c.ReadMsgUnix(buf, nil)
	if !errors.Is(err, io.EOF) {
		ac.t.Fatalf("want EOF, got %d bytes % x, %v", n, buf[:n], err)
	}
}

func addReq(uid string) *zdsapi.WorkloadRequest {
	return &zdsapi.WorkloadRequest{Payload: &zdsapi.WorkloadRequest_Add{Add: &zdsapi.AddWorkload{
		Uid: uid,
		WorkloadInfo: &zdsapi.WorkloadInfo{
			Name: "pod-" + uid, Namespace: "ns", ServiceAccount: "sa",
		},
	}}}
}

func keepReq(uid string) *zdsapi.WorkloadRequest {
	return &zdsapi.WorkloadRequest{Payload: &zdsapi.WorkloadRequest_Keep{Keep: &zdsapi.KeepWorkload{Uid: uid}}}
}

func delReq(uid string) *zdsapi.WorkloadRequest {
	return &zdsapi.WorkloadRequest{Payload: &zdsapi.WorkloadRequest_Del{Del: &zdsapi.DelWorkload{Uid: uid}}}
}

func snapshotReq() *zdsapi.WorkloadRequest {
	return &zdsapi.WorkloadRequest{Payload: &zdsapi.WorkloadRequest_SnapshotSent{SnapshotSent: &zdsapi.SnapshotSent{}}}
}

func openFd(t *testing.T, path string) int {
	t.Helper()
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatalf("open %s: %v", path, err)
	}
	return fd
}

// fakeHandler records the client's calls and checks the client's promises: DelPod only
// for a running pod, and the netns still open and unchanged until DelPod.
type fakeHandler struct {
	t *testing.T

	mu       sync.Mutex
	events   []string
	running  map[string]redirect.Netns
	adds     map[string]int
	failures map[string]int // uid -> how many more AddPod calls fail (-1: all)
	// inspect, if set, is called by AddPod before it succeeds.
	inspect func(uid string, ns redirect.Netns) error
}

func newFakeHandler(t *testing.T) *fakeHandler {
	return &fakeHandler{t: t, running: map[string]redirect.Netns{}, adds: map[string]int{}, failures: map[string]int{}}
}

func (h *fakeHandler) AddPod(ctx context.Context, uid string, info WorkloadInfo, ns redirect.Netns) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.adds[uid]++
	if want := (WorkloadInfo{Name: "pod-" + uid, Namespace: "ns", ServiceAccount: "sa"}); info != want {
		h.t.Errorf("AddPod %s: info %+v, want %+v", uid, info, want)
	}
	if _, ok := h.running[uid]; ok {
		h.t.Errorf("AddPod %s: already running", uid)
	}
	checkOpen(h.t, "AddPod "+uid, ns)
	if n := h.failures[uid]; n != 0 {
		h.failures[uid] = n - 1
		h.events = append(h.events, "fail "+uid)
		return fmt.Errorf("bind 15008 in %v: address already in use", ns)
	}
	if h.inspect != nil {
		if err := h.inspect(uid, ns); err != nil {
			return err
		}
	}
	h.running[uid] = ns
	h.events = append(h.events, "add "+uid)
	return nil
}

func (h *fakeHandler) DelPod(uid string) {
	h.mu.Lock()
	defer h.mu.Unlock()
	ns, ok := h.running[uid]
	if !ok {
		h.t.Errorf("DelPod %s: not running", uid)
	} else {
		checkOpen(h.t, "DelPod "+uid, ns)
	}
	delete(h.running, uid)
	h.events = append(h.events, "del "+uid)
}

func (h *fakeHandler) Snapshot(active []string) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if !slices.IsSorted(active) {
		h.t.Errorf("Snapshot %v: not sorted", active)
	}
	if running := slices.Sorted(maps.Keys(h.running)); !slices.Equal(active, running) {
		h.t.Errorf("Snapshot %v, but running %v", active, running)
	}
	h.events = append(h.events, "snapshot "+strings.Join(active, ","))
}

// checkOpen checks that ns's fd is open and still names the same namespace.
func checkOpen(t *testing.T, what string, ns redirect.Netns) {
	t.Helper()
	fd, err := ns.DupFd()
	if err != nil {
		t.Errorf("%s: netns %v: %v", what, ns, err)
		return
	}
	defer unix.Close(fd)
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		t.Errorf("%s: netns fd %d: %v", what, fd, err)
		return
	}
	if got := (redirect.NetnsID{Dev: uint64(st.Dev), Ino: uint64(st.Ino)}); got != ns.ID() {
		t.Errorf("%s: netns fd names %v, want %v", what, got, ns.ID())
	}
}

// take returns the events since the last call.
func (h *fakeHandler) take() []string {
	h.mu.Lock()
	defer h.mu.Unlock()
	e := h.events
	h.events = nil
	return e
}

func (h *fakeHandler) expect(want ...string) {
	h.t.Helper()
	if got := h.take(); !slices.Equal(got, want) {
		h.t.Fatalf("handler calls %q, want %q", got, want)
	}
}

func (h *fakeHandler) fail(uid string, n int) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.failures[uid] = n
}

func (h *fakeHandler) addCalls(uid string) int {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.adds[uid]
}

// testClient starts a client on a's socket with fast timers.
func testClient(t *testing.T, a *testAgent, h Handler) (*Client, *prometheus.Registry) {
	t.Helper()
	return testClientConfig(t, Config{SocketPath: a.path}, h)
}

func testClientConfig(t *testing.T, cfg Config, h Handler) (*Client, *prometheus.Registry) {
	t.Helper()
	if cfg.InitialBackoff == 0 {
		cfg.InitialBackoff = time.Millisecond
	}
	if cfg.MaxBackoff == 0 {
		cfg.MaxBackoff = 20 * time.Millisecond
	}
	if cfg.RetryInterval == 0 {
		cfg.RetryInterval = 50 * time.Millisecond
	}
	reg := prometheus.NewRegistry()
	c, err := New(cfg, h, slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug})), reg)
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Stop)
	return c, reg
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(b []byte) (int, error) {
	w.t.Log(strings.TrimSuffix(string(b), "\n"))
	return len(b), nil
}

// metric returns the value of the single-series family name in reg.
func metric(t *testing.T, reg *prometheus.Registry, name string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		m := mf.GetMetric()[0]
		switch {
		case m.GetGauge() != nil:
			return m.GetGauge().GetValue()
		case m.GetCounter() != nil:
			return m.GetCounter().GetValue()
		}
	}
	t.Fatalf("no metric %s", name)
	return 0
}

func expectMetrics(t *testing.T, reg *prometheus.Registry, active, pending, started, stopped float64) {
	t.Helper()
	for name, want := range map[string]float64{
		"workload_manager_active_proxy_count":    active,
		"workload_manager_pending_proxy_count":   pending,
		"workload_manager_proxies_started_total": started,
		"workload_manager_proxies_stopped_total": stopped,
	} {
		if got := metric(t, reg, name); got != want {
			t.Errorf("%s = %v, want %v", name, got, want)
		}
	}
}

func expectReady(t *testing.T, c *Client) {
	t.Helper()
	select {
	case <-c.Ready():
	case <-time.After(waitFor):
		t.Fatal("client not ready")
	}
	if !c.IsReady() {
		t.Fatal("IsReady false")
	}
}

// eventually polls cond until it holds.
func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(waitFor)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(time.Millisecond)
	}
}
