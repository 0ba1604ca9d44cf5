package agent

import (
	"context"
	"errors"
	"io"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"golang.org/x/sys/unix"
	"google.golang.org/protobuf/proto"
	"istio.io/istio/pkg/zdsapi"

	"github.com/ztgo/ztgo/redirect"
	"github.com/ztgo/ztgo/redirect/zds"
)

// socketPath returns a socket path in a short temporary directory: sun_path holds 107
// bytes, and t.TempDir() can be longer.
func socketPath(t *testing.T) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "zds")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return filepath.Join(dir, "ztunnel.sock")
}

func newTestServer(t *testing.T, path string) (*Server, *prometheus.Registry) {
	t.Helper()
	reg := prometheus.NewRegistry()
	s, err := NewServer(ServerConfig{SocketPath: path, Logger: testLogger(t).With("side", "server"), Registerer: reg, RetryInterval: 30 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.Stop)
	return s, reg
}

// zdsRecorder is a zds.Handler recording what our ZDS client does.
type zdsRecorder struct {
	mu      sync.Mutex
	events  []string
	ids     map[string]redirect.NetnsID
	infos   map[string]zds.WorkloadInfo
	failing map[string]int
}

func newZDSRecorder() *zdsRecorder {
	return &zdsRecorder{ids: map[string]redirect.NetnsID{}, infos: map[string]zds.WorkloadInfo{}, failing: map[string]int{}}
}

func (h *zdsRecorder) AddPod(ctx context.Context, uid string, info zds.WorkloadInfo, ns redirect.Netns) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	if n := h.failing[uid]; n > 0 {
		h.failing[uid] = n - 1
		h.events = append(h.events, "fail "+uid)
		return errors.New("listen: address in use")
	}
	h.ids[uid] = ns.ID()
	h.infos[uid] = info
	h.events = append(h.events, "add "+uid)
	return nil
}

func (h *zdsRecorder) DelPod(uid string) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.events = append(h.events, "del "+uid)
}

func (h *zdsRecorder) Snapshot(active []string) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.events = append(h.events, "snapshot "+strings.Join(active, ","))
}

// expect waits until the handler has seen exactly want since the last call.
func (h *zdsRecorder) expect(t *testing.T, want ...string) {
	t.Helper()
	var got []string
	deadline := time.Now().Add(waitFor)
	for {
		h.mu.Lock()
		got = slices.Clone(h.events)
		h.mu.Unlock()
		if len(got) >= len(want) || time.Now().After(deadline) {
			break
		}
		time.Sleep(2 * time.Millisecond)
	}
	time.Sleep(30 * time.Millisecond) // and nothing more
	h.mu.Lock()
	got, h.events = h.events, nil
	h.mu.Unlock()
	if !slices.Equal(got, want) {
		t.Fatalf("client handler calls %q, want %q", got, want)
	}
}

func (h *zdsRecorder) id(uid string) redirect.NetnsID {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.ids[uid]
}

func startClient(t *testing.T, path string, h zds.Handler) *zds.Client {
	t.Helper()
	c, err := zds.New(zds.Config{SocketPath: path, InitialBackoff: time.Millisecond, MaxBackoff: 20 * time.Millisecond, RetryInterval: 20 * time.Millisecond},
		h, testLogger(t).With("side", "client"), nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Stop)
	return c
}

func info(name string) zds.WorkloadInfo {
	return zds.WorkloadInfo{Name: name, Namespace: "ns", ServiceAccount: "sa-" + name}
}

func TestPrivilegedServerWithClient(t *testing.T) {
	requireRoot(t)
	nsDir := t.TempDir()
	var ns []redirect.Netns
	for _, n := range []string{"p1", "p2", "p3", "p4"} {
		ns = append(ns, openNetns(t, newPodNetns(t, nsDir, n)))
	}
	fds := openFds(t)
	goroutines := runtime.NumGoroutine()
	path := socketPath(t)
	srv, reg := newTestServer(t, path)
	ctx := context.Background()

	// Pods added before Start are in the first snapshot.
	for i, uid := range []string{"p2", "p1"} {
		if err := srv.AddPod(ctx, uid, info(uid), ns[1-i]); err != nil {
			t.Fatal(err)
		}
	}
	if err := srv.Start(ctx); err != nil {
		t.Fatal(err)
	}
	if fi, err := os.Stat(path); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("socket mode: %v %v", fi.Mode(), err)
	}
	h1 := newZDSRecorder()
	c1 := startClient(t, path, h1)
	h1.expect(t, "add p1", "add p2", "snapshot p1,p2")
	select {
	case <-c1.Ready():
	case <-time.After(waitFor):
		t.Fatal("client not ready")
	}
	for i, uid := range []string{"p1", "p2"} {
		if got := h1.id(uid); got != ns[i].ID() {
			t.Errorf("%s: client got netns %v, want %v", uid, got, ns[i].ID())
		}
	}
	if got := h1.infos["p1"]; got != info("p1") {
		t.Errorf("p1 info = %+v", got)
	}

	// Live add and del.
	if err := srv.AddPod(ctx, "p3", info("p3"), ns[2]); err != nil {
		t.Fatal(err)
	}
	h1.expect(t, "add p3")
	srv.DelPod("p1")
	h1.expect(t, "del p1")
	// The same pod again changes nothing; new info is a del and an add.
	if err := srv.AddPod(ctx, "p3", info("p3"), ns[2]); err != nil {
		t.Fatal(err)
	}
	h1.expect(t)
	if err := srv.AddPod(ctx, "p3", zds.WorkloadInfo{Name: "p3", Namespace: "ns", ServiceAccount: "other"}, ns[2]); err != nil {
		t.Fatal(err)
	}
	h1.expect(t, "del p3", "add p3")

	// A second client gets the snapshot and, as the newest, the adds; dels go to both.
	h2 := newZDSRecorder()
	c2 := startClient(t, path, h2)
	h2.expect(t, "add p2", "add p3", "snapshot p2,p3")
	eventually(t, "two connections", func() bool { return metric(t, reg, "ztgo_agent_zds_connections") == 2 })
	if err := srv.AddPod(ctx, "p4", info("p4"), ns[3]); err != nil {
		t.Fatal(err)
	}
	h2.expect(t, "add p4")
	h1.expect(t)
	srv.DelPod("p2")
	h1.expect(t, "del p2")
	h2.expect(t, "del p2")

	// The first client goes away (it drains its pods); the second is undisturbed.
	c1.Stop()
	h1.expect(t, "del p3")
	eventually(t, "one connection", func() bool { return metric(t, reg, "ztgo_agent_zds_connections") == 1 })
	srv.DelPod("p4")
	h2.expect(t, "del p4")

	// A NACKed add is sent again.
	h2.mu.Lock()
	h2.failing["p1"] = 1 << 30 // the client retries on its own as well
	h2.mu.Unlock()
	if err := srv.AddPod(ctx, "p1", info("p1"), ns[0]); err != nil {
		t.Fatal(err)
	}
	eventually(t, "two NACKs", func() bool { return metric(t, reg, "ztgo_agent_zds_messages_total", "type=add", "result=nack") >= 2 })
	h2.mu.Lock()
	h2.failing["p1"] = 0
	h2.mu.Unlock()
	eventually(t, "p1 running on client 2", func() bool { return h2.id("p1") == ns[0].ID() })
	h2.mu.Lock()
	h2.events = nil
	h2.mu.Unlock()

	// The client reconnects after the server restarts: the new server, with the same pods,
	// sends a snapshot that changes nothing.
	srv.Stop()
	if err := srv.AddPod(ctx, "p9", info("p9"), ns[0]); err == nil {
		t.Error("AddPod after Stop: no error")
	}
	if _, err := os.Stat(path); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("socket file after Stop: %v", err)
	}
	srv2, _ := newTestServer(t, path)
	for i, uid := range []string{"p1", "p3"} {
		inf := info(uid)
		if uid == "p3" {
			inf.ServiceAccount = "other"
		}
		if err := srv2.AddPod(ctx, uid, inf, ns[i*2]); err != nil {
			t.Fatal(err)
		}
	}
	if err := srv2.Start(ctx); err != nil {
		t.Fatal(err)
	}
	h2.expect(t, "snapshot p1,p3")

	c2.Stop()
	h2.expect(t, "del p1", "del p3")
	srv2.Stop()
	if problems, err := testutil.GatherAndLint(reg); err != nil || len(problems) > 0 {
		t.Fatalf("lint: %v %v", problems, err)
	}
	if now := openFds(t); len(now) != len(fds) {
		t.Errorf("open fds: %d, want %d\nbefore: %q\nafter:  %q", len(now), len(fds), fds, now)
	}
	eventually(t, "goroutines to end", func() bool { return runtime.NumGoroutine() <= goroutines })
}

// rawClient is a ZDS client driven by hand, to check the server's side of the protocol.
type rawClient struct {
	t *testing.T
	c *net.UnixConn
}

func dialRaw(t *testing.T, path string) *rawClient {
	t.Helper()
	c, err := net.DialUnix("unixpacket", nil, &net.UnixAddr{Name: path, Net: "unixpacket"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return &rawClient{t: t, c: c}
}

func (r *rawClient) send(m proto.Message) {
	r.t.Helper()
	b, err := proto.Marshal(m)
	if err != nil {
		r.t.Fatal(err)
	}
	r.sendRaw(b)
}

func (r *rawClient) sendRaw(b []byte) {
	r.t.Helper()
	if _, err := r.c.Write(b); err != nil {
		r.t.Fatal(err)
	}
}

func (r *rawClient) hello() { r.t.Helper(); r.send(&zdsapi.ZdsHello{Version: zdsapi.Version_V1}) }

func (r *rawClient) ack(nack string) {
	r.t.Helper()
	r.send(&zdsapi.WorkloadResponse{Payload: &zdsapi.WorkloadResponse_Ack{Ack: &zdsapi.Ack{Error: nack}}})
}

// read receives one request; an add must carry exactly one fd, naming a network
// namespace, whose ID is returned; nothing else may carry one.
func (r *rawClient) read() (*zdsapi.WorkloadRequest, redirect.NetnsID) {
	r.t.Helper()
	buf := make([]byte, 1024)
	oob := make([]byte, unix.CmsgSpace(4*4))
	if err := r.c.SetReadDeadline(time.Now().Add(waitFor)); err != nil {
		r.t.Fatal(err)
	}
	n, oobn, flags, _, err := r.c.ReadMsgUnix(buf, oob)
	if err != nil {
		r.t.Fatalf("read: %v", err)
	}
	if flags&(unix.MSG_TRUNC|unix.MSG_CTRUNC) != 0 {
		r.t.Fatalf("truncated: flags %#x", flags)
	}
	var fds []int
	if oobn > 0 {
		msgs, err := unix.ParseSocketControlMessage(oob[:oobn])
		if err != nil {
			r.t.Fatal(err)
		}
		for _, m := range msgs {
			f, err := unix.ParseUnixRights(&m)
			if err != nil {
				r.t.Fatal(err)
			}
			fds = append(fds, f...)
		}
	}
	var req zdsapi.WorkloadRequest
	if err := proto.Unmarshal(buf[:n], &req); err != nil {
		r.t.Fatal(err)
	}
	var id redirect.NetnsID
	if req.GetAdd() != nil {
		if len(fds) != 1 {
			r.t.Fatalf("add with %d fds", len(fds))
		}
		ns, err := redirect.NetnsFromFD(fds[0])
		if err != nil {
			r.t.Fatalf("add fd: %v", err)
		}
		id = ns.ID()
		ns.Close()
	} else if len(fds) != 0 {
		r.t.Fatalf("%v with %d fds", &req, len(fds))
	}
	return &req, id
}

func (r *rawClient) expectEOF() {
	r.t.Helper()
	if err := r.c.SetReadDeadline(time.Now().Add(waitFor)); err != nil {
		r.t.Fatal(err)
	}
	_, _, _, _, err := r.c.ReadMsgUnix(make([]byte, 1024), nil)
	if !errors.Is(err, io.EOF) {
		r.t.Fatalf("want EOF, got %v", err)
	}
}

func TestPrivilegedServerProtocol(t *testing.T) {
	requireRoot(t)
	ns := openNetns(t, newPodNetns(t, t.TempDir(), "p"))
	path := socketPath(t)
	// A stale socket from an earlier run is replaced.
	stale, err := net.ListenUnix("unixpacket", &net.UnixAddr{Name: path, Net: "unixpacket"})
	if err != nil {
		t.Fatal(err)
	}
	stale.SetUnlinkOnClose(false)
	stale.Close()
	srv, reg := newTestServer(t, path)
	ctx := context.Background()
	if err := srv.AddPod(ctx, "p", info("p"), ns); err != nil {
		t.Fatal(err)
	}
	if err := srv.Start(ctx); err != nil {
		t.Fatal(err)
	}

	t.Run("snapshot, NACK and retry", func(t *testing.T) {
		r := dialRaw(t, path)
		r.hello()
		req, id := r.read()
		if add := req.GetAdd(); add.GetUid() != "p" || add.GetWorkloadInfo().GetServiceAccount() != "sa-p" || id != ns.ID() {
			t.Fatalf("first request %v with netns %v, want add p with %v", req, id, ns.ID())
		}
		r.ack("failure to start proxy : no")
		if req, _ := r.read(); req.GetSnapshotSent() == nil {
			t.Fatalf("want snapshot_sent, got %v", req)
		}
		r.ack("")
		start := time.Now()
		if req, id := r.read(); req.GetAdd().GetUid() != "p" || id != ns.ID() {
			t.Fatalf("want the add again, got %v", req)
		}
		if d := time.Since(start); d < 20*time.Millisecond {
			t.Errorf("add resent after %v, before the retry interval", d)
		}
		r.ack("")
		// DelPod returns only once the client acknowledged the delete: the agent removes
		// the pod's rules after it.
		deleted := make(chan struct{})
		go func() { srv.DelPod("p"); close(deleted) }()
		if req, _ := r.read(); req.GetDel().GetUid() != "p" {
			t.Fatalf("want del p, got %v", req)
		}
		select {
		case <-deleted:
			t.Fatal("DelPod returned before the client acknowledged the delete")
		case <-time.After(50 * time.Millisecond):
		}
		r.ack("")
		select {
		case <-deleted:
		case <-time.After(waitFor):
			t.Fatal("DelPod still waiting after the ack")
		}
		if err := srv.AddPod(ctx, "p", info("p"), ns); err != nil {
			t.Fatal(err)
		}
		if req, _ := r.read(); req.GetAdd().GetUid() != "p" {
			t.Fatalf("want add p, got %v", req)
		}
		r.ack("")
		if got := metric(t, reg, "ztgo_agent_zds_messages_total", "type=add", "result=nack"); got != 1 {
			t.Errorf("NACKed adds = %v", got)
		}
	})
	t.Run("del waits for an add in flight", func(t *testing.T) {
		// The client may start a pod as soon as its add is sent, before it answers: a DelPod
		// then must wait for the client's answer to the add and to the del that follows,
		// or the agent removes the rules under a proxy that is starting.
		r := dialRaw(t, path)
		r.hello()
		r.read() // add p
		r.ack("")
		r.read() // snapshot_sent
		r.ack("")
		if err := srv.AddPod(ctx, "q", info("q"), ns); err != nil {
			t.Fatal(err)
		}
		if req, _ := r.read(); req.GetAdd().GetUid() != "q" {
			t.Fatalf("want add q, got %v", req)
		}
		deleted := make(chan struct{})
		go func() { srv.DelPod("q"); close(deleted) }()
		select {
		case <-deleted:
			t.Fatal("DelPod returned while the client was being sent the add")
		case <-time.After(50 * time.Millisecond):
		}
		r.ack("")
		if req, _ := r.read(); req.GetDel().GetUid() != "q" {
			t.Fatalf("want del q, got %v", req)
		}
		select {
		case <-deleted:
			t.Fatal("DelPod returned before the client acknowledged the delete")
		case <-time.After(50 * time.Millisecond):
		}
		r.ack("")
		select {
		case <-deleted:
		case <-time.After(waitFor):
			t.Fatal("DelPod still waiting after the ack")
		}
	})
	for _, tc := range []struct {
		name string
		run  func(r *rawClient)
	}{
		{"hello without version", func(r *rawClient) { r.sendRaw([]byte{}) }},
		{"garbage hello", func(r *rawClient) { r.sendRaw([]byte{0xff, 0xff}) }},
		{"unsolicited message", func(r *rawClient) {
			r.hello()
			r.read()
			r.ack("")
			r.read()
			r.ack("")
			r.ack("")
		}},
		{"truncated answer", func(r *rawClient) {
			r.hello()
			r.read()
			r.sendRaw(make([]byte, 2000))
		}},
		{"answer without ack", func(r *rawClient) {
			r.hello()
			r.read()
			r.send(&zdsapi.WorkloadResponse{})
		}},
		{"fd from the client", func(r *rawClient) {
			r.hello()
			r.read()
			b, _ := proto.Marshal(&zdsapi.WorkloadResponse{Payload: &zdsapi.WorkloadResponse_Ack{Ack: &zdsapi.Ack{}}})
			if _, _, err := r.c.WriteMsgUnix(b, unix.UnixRights(0), nil); err != nil {
				t.Fatal(err)
			}
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := dialRaw(t, path)
			tc.run(r)
			r.expectEOF()
		})
	}
	// None of that disturbed the server.
	r := dialRaw(t, path)
	r.hello()
	if req, _ := r.read(); req.GetAdd().GetUid() != "p" {
		t.Fatalf("want add p, got %v", req)
	}
	r.ack("")
	eventually(t, "one connection", func() bool { return metric(t, reg, "ztgo_agent_zds_connections") == 1 })
}

// TestPrivilegedAgentWithServer: the whole node agent, files to ZDS client.
func TestPrivilegedAgentWithServer(t *testing.T) {
	requireRoot(t)
	dir, nsDir := t.TempDir(), t.TempDir()
	pathA := newPodNetns(t, nsDir, "a")
	writeAtomic(t, dir, "a.yaml", "uid: uid-a\nname: a\nnamespace: ns\nserviceAccount: sa\nnetns: "+pathA+"\n")
	sock := socketPath(t)
	srv, _ := newTestServer(t, sock)
	a, _ := startAgent(t, dir, srv, Config{})
	if err := srv.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	h := newZDSRecorder()
	startClient(t, sock, h)
	h.expect(t, "add uid-a", "snapshot uid-a")
	if got, want := h.id("uid-a"), openNetns(t, pathA).ID(); got != want {
		t.Errorf("client netns %v, want %v", got, want)
	}
	if err := os.Remove(filepath.Join(dir, "a.yaml")); err != nil {
		t.Fatal(err)
	}
	h.expect(t, "del uid-a")
	a.Stop()
}

func TestNewServerConfig(t *testing.T) {
	if _, err := NewServer(ServerConfig{SocketPath: "/" + strings.Repeat("x", 107)}); err == nil {
		t.Error("long socket path: no error")
	}
	if _, err := NewServer(ServerConfig{RetryInterval: -1}); err == nil {
		t.Error("negative retry: no error")
	}
	// An existing file that is not a socket is not removed.
	path := filepath.Join(t.TempDir(), "not-a-socket")
	if err := os.WriteFile(path, []byte("x"), 0o600); err != nil {
		t.Fatal(err)
	}
	s, err := NewServer(ServerConfig{SocketPath: path})
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Start(context.Background()); err == nil || !strings.Contains(err.Error(), "not a socket") {
		t.Errorf("start over a regular file: %v", err)
	}
	// A pod needs a UID and an open netns to duplicate.
	if err := s.AddPod(context.Background(), "p", info("p"), redirect.Netns{}); err == nil {
		t.Error("AddPod without a netns: no error")
	}
	if err := s.AddPod(context.Background(), "", info("p"), redirect.Netns{}); err == nil {
		t.Error("AddPod without a uid: no error")
	}
	s.Stop()
}
