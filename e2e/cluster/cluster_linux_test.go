package cluster

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/ztgo/ztgo/redirect"
)

const wait = 5 * time.Second // bound of every wait in these tests

const slowConnect = 900 * time.Millisecond

// echoServer accepts connections on a listener inside a namespace, echoes what it reads and
// reports every client's address.
type echoServer struct {
	ln    *net.TCPListener
	peers chan netip.AddrPort
}

func serveEcho(t *testing.T, ns *Namespace, addr string) *echoServer {
	t.Helper()
	ln, err := ns.Listen(addr)
	if err != nil {
		t.Fatal(err)
	}
	s := &echoServer{ln: ln, peers: make(chan netip.AddrPort, 16)}
	done := make(chan struct{})
	var conns []net.Conn
	go func() {
		defer close(done)
		for {
			c, err := ln.AcceptTCP()
			if err != nil {
				return
			}
			conns = append(conns, c)
			s.peers <- c.RemoteAddr().(*net.TCPAddr).AddrPort()
			go io.Copy(c, c)
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		<-done
		for _, c := range conns {
			c.Close()
		}
	})
	return s
}

func (s *echoServer) port() uint16 { return s.ln.Addr().(*net.TCPAddr).AddrPort().Port() }

// nextPeer returns the client address of the next accepted connection.
func (s *echoServer) nextPeer(t *testing.T) netip.AddrPort {
	t.Helper()
	select {
	case p := <-s.peers:
		return netip.AddrPortFrom(p.Addr().Unmap(), p.Port())
	case <-time.After(wait):
		t.Fatalf("no connection on %s within %v", s.ln.Addr(), wait)
		return netip.AddrPort{}
	}
}

func dial(t *testing.T, from *Namespace, dst netip.AddrPort) *net.TCPConn {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), wait)
	defer cancel()
	c, err := from.Dial(ctx, dst)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// echoRoundTrip writes msg and expects it back.
func echoRoundTrip(t *testing.T, c net.Conn, msg string) {
	t.Helper()
	c.SetDeadline(time.Now().Add(wait))
	defer c.SetDeadline(time.Time{})
	if _, err := io.WriteString(c, msg); err != nil {
		t.Fatalf("write on %s: %v", c.LocalAddr(), err)
	}
	buf := make([]byte, len(msg))
	if _, err := io.ReadFull(c, buf); err != nil {
		t.Fatalf("read on %s: %v", c.LocalAddr(), err)
	}
	if string(buf) != msg {
		t.Fatalf("echo: got %q, want %q", buf, msg)
	}
}

// connectAndCheck dials from client to the server and checks that the server sees want as the
// client's address and that bytes flow both ways.
func connectAndCheck(t *testing.T, client *Namespace, server *echoServer, dstIP, want netip.Addr) *net.TCPConn {
	t.Helper()
	start := time.Now()
	c := dial(t, client, netip.AddrPortFrom(dstIP, server.port()))
	// A lost first packet (ARP request or SYN on a link the kernel has not activated yet)
	// costs a retransmission after 1s; nothing else takes that long here.
	if d := time.Since(start); d > slowConnect {
		t.Errorf("%s -> %s: connect took %v: was the first packet dropped?", client, dstIP, d)
	}
	peer := server.nextPeer(t)
	if peer.Addr() != want {
		t.Fatalf("%s -> %s: server sees client %s, want %s", client, dstIP, peer, want)
	}
	if local := c.LocalAddr().(*net.TCPAddr).AddrPort(); local.Port() != peer.Port() {
		t.Fatalf("server sees port %d, client has %s", peer.Port(), local)
	}
	echoRoundTrip(t, c, "hello from "+client.Name())
	return c
}

func addPod(t *testing.T, c *Cluster, node, name string, opts ...PodOption) *Pod {
	t.Helper()
	p, err := c.AddPod(node, name, opts...)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

func TestPrivilegedCrossNodePodToPod(t *testing.T) {
	t.Parallel()
	c := NewForTest(t, Config{})
	a1 := addPod(t, c, "node-a", "a1")
	b1 := addPod(t, c, "node-b", "b1")
	if a1.IP() != netip.MustParseAddr("198.18.1.10") || b1.IP() != netip.MustParseAddr("198.18.2.10") {
		t.Fatalf("pod addresses %s, %s; want 198.18.1.10 and 198.18.2.10", a1.IP(), b1.IP())
	}
	srv := serveEcho(t, b1.Namespace, ":8080")
	connectAndCheck(t, a1.Namespace, srv, b1.IP(), a1.IP())
	// And back the other way.
	srvA := serveEcho(t, a1.Namespace, ":8080")
	connectAndCheck(t, b1.Namespace, srvA, a1.IP(), b1.IP())
}

func TestPrivilegedSameNodePodToPodAndNodes(t *testing.T) {
	t.Parallel()
	c := NewForTest(t, Config{Nodes: 3})
	a1 := addPod(t, c, "node-a", "a1")
	a2 := addPod(t, c, "node-a", "a2", PodIP(netip.MustParseAddr("198.18.1.77")))
	c1 := addPod(t, c, "node-c", "c1")
	nodeA, nodeB := c.Node("node-a"), c.Node("node-b")
	if a2.IP().String() != "198.18.1.77" || c1.IP().String() != "198.18.3.10" {
		t.Fatalf("pod addresses %s, %s", a2.IP(), c1.IP())
	}
	if a1.Node() != nodeA || a1.HostLink() != "v-a1" {
		t.Fatalf("a1 on %s via %s", a1.Node().Name(), a1.HostLink())
	}

	t.Run("pod to pod", func(t *testing.T) {
		srv := serveEcho(t, a2.Namespace, ":9000")
		connectAndCheck(t, a1.Namespace, srv, a2.IP(), a1.IP())
	})
	t.Run("pod to own node", func(t *testing.T) {
		srv := serveEcho(t, nodeA.Namespace, nodeA.IP().String()+":9001")
		connectAndCheck(t, a1.Namespace, srv, nodeA.IP(), a1.IP())
	})
	t.Run("node to own pod", func(t *testing.T) {
		srv := serveEcho(t, a1.Namespace, ":9002")
		connectAndCheck(t, nodeA.Namespace, srv, a1.IP(), nodeA.IP())
	})
	t.Run("pod to other node", func(t *testing.T) {
		srv := serveEcho(t, nodeB.Namespace, ":9003")
		connectAndCheck(t, a2.Namespace, srv, nodeB.IP(), a2.IP())
	})
	t.Run("node to other node's pod", func(t *testing.T) {
		srv := serveEcho(t, c1.Namespace, ":9004")
		connectAndCheck(t, nodeB.Namespace, srv, c1.IP(), nodeB.IP())
	})
	t.Run("third node", func(t *testing.T) {
		srv := serveEcho(t, c1.Namespace, ":9005")
		connectAndCheck(t, a2.Namespace, srv, c1.IP(), a2.IP())
	})
}

func TestPrivilegedExternal(t *testing.T) {
	t.Parallel()
	c := NewForTest(t, Config{})
	a1 := addPod(t, c, "node-a", "a1")
	b1 := addPod(t, c, "node-b", "b1")
	ext, err := c.AddExternal("web")
	if err != nil {
		t.Fatal(err)
	}
	if ext.IP().String() != "198.18.0.100" || c.External("web") != ext {
		t.Fatalf("external at %s", ext.IP())
	}
	if _, err := c.AddExternal("web"); err == nil {
		t.Fatal("second external named web: no error")
	}
	if _, err := c.AddPod("node-a", "web"); err == nil {
		t.Fatal("pod named like an external: no error")
	}

	srv := serveEcho(t, ext.Namespace, ":80")
	connectAndCheck(t, b1.Namespace, srv, ext.IP(), b1.IP())
	connectAndCheck(t, a1.Namespace, srv, ext.IP(), a1.IP())

	srvA := serveEcho(t, a1.Namespace, ":8080")
	connectAndCheck(t, ext.Namespace, srvA, a1.IP(), ext.IP())

	ext2, err := c.AddExternal("db")
	if err != nil {
		t.Fatal(err)
	}
	if ext2.IP().String() != "198.18.0.101" {
		t.Fatalf("second external at %s", ext2.IP())
	}
	connectAndCheck(t, ext2.Namespace, srv, ext.IP(), ext2.IP())
}

func TestPrivilegedPodChurnKeepsConnections(t *testing.T) {
	t.Parallel()
	c := NewForTest(t, Config{})
	a1 := addPod(t, c, "node-a", "a1")
	b1 := addPod(t, c, "node-b", "b1")
	srv := serveEcho(t, b1.Namespace, ":8080")
	long := connectAndCheck(t, a1.Namespace, srv, b1.IP(), a1.IP())

	a2 := addPod(t, c, "node-a", "a2")
	echoRoundTrip(t, long, "after add")
	connectAndCheck(t, a2.Namespace, srv, b1.IP(), a2.IP())
	a2Srv := serveEcho(t, a2.Namespace, ":7000")
	connectAndCheck(t, b1.Namespace, a2Srv, a2.IP(), b1.IP())

	// A handle of our own keeps a2's namespace alive past RemovePod, to look inside.
	held, err := redirect.OpenNetns(a2.Path())
	if err != nil {
		t.Fatal(err)
	}
	defer held.Close()
	a2IP, a2Path := a2.IP(), a2.Path()
	if err := c.RemovePod("a2"); err != nil {
		t.Fatal(err)
	}
	echoRoundTrip(t, long, "after remove")

	if _, err := os.Stat(a2Path); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("%s after RemovePod: %v", a2Path, err)
	}
	if c.Pod("a2") != nil {
		t.Error("Pod(a2) after RemovePod")
	}
	if links := linkNames(t, held); !slices.Equal(links, []string{"lo"}) {
		t.Errorf("links left in the removed pod's namespace: %v", links)
	}
	if links := linkNames(t, c.Node("node-a").Netns()); slices.Contains(links, "v-a2") {
		t.Errorf("node-a still has v-a2: %v", links)
	}
	// Nothing answers for the removed pod's address: node-a has no route to it.
	ctx, cancel := context.WithTimeout(context.Background(), wait)
	defer cancel()
	if conn, err := b1.Dial(ctx, netip.AddrPortFrom(a2IP, 7000)); err == nil {
		conn.Close()
		t.Fatalf("dial to removed pod %s succeeded", a2IP)
	} else if ctx.Err() != nil {
		t.Fatalf("dial to removed pod %s hung until the timeout: %v", a2IP, err)
	}
	if err := c.RemovePod("a2"); err == nil {
		t.Error("second RemovePod(a2): no error")
	}

	// The name can be used again; the address is not (until the /24 wraps).
	a2b := addPod(t, c, "node-a", "a2")
	if a2b.IP() == a2IP {
		t.Errorf("re-added a2 got the removed pod's address %s", a2IP)
	}
	connectAndCheck(t, a2b.Namespace, srv, b1.IP(), a2b.IP())
	echoRoundTrip(t, long, "at the end")
}

func TestPrivilegedCommand(t *testing.T) {
	t.Parallel()
	c := NewForTest(t, Config{})
	a1 := addPod(t, c, "node-a", "a1")
	ctx, cancel := context.WithTimeout(context.Background(), wait)
	defer cancel()
	run := func(ns *Namespace, args ...string) string {
		t.Helper()
		out, err := ns.Command(ctx, args[0], args[1:]...).CombinedOutput()
		if err != nil {
			t.Fatalf("%s in %s: %v\n%s", args, ns, err, out)
		}
		return string(out)
	}
	if out := run(a1.Namespace, "ip", "-4", "-o", "addr", "show", "dev", "eth0"); !strings.Contains(out, " 198.18.1.10/32 ") {
		t.Errorf("ip addr in a1:\n%s", out)
	}
	if out := run(a1.Namespace, "ip", "-4", "route"); !strings.Contains(out, "default via 169.254.1.1 dev eth0") {
		t.Errorf("ip route in a1:\n%s", out)
	}
	if out := run(a1.Namespace, "ip", "neigh", "show", "169.254.1.1"); !strings.Contains(out, "ee:ee:ee:ee:ee:ee PERMANENT") {
		t.Errorf("ip neigh in a1:\n%s", out)
	}
	if out := run(c.Node("node-b").Namespace, "ip", "-4", "-o", "addr", "show", "dev", "eth0"); !strings.Contains(out, " 198.18.0.2/24 ") {
		t.Errorf("ip addr in node-b:\n%s", out)
	}
	// The namespace is a regular named one: `ip -n` and `ip netns list` know it.
	out, err := exec.CommandContext(ctx, "ip", "-n", a1.NetnsName(), "-o", "link", "show", "eth0").CombinedOutput()
	if err != nil || !strings.Contains(string(out), "eth0@") {
		t.Errorf("ip -n %s link: %v\n%s", a1.NetnsName(), err, out)
	}
	out, err = exec.CommandContext(ctx, "ip", "netns", "list").CombinedOutput()
	if err != nil || !strings.Contains(string(out), a1.NetnsName()) {
		t.Errorf("ip netns list: %v\n%s", err, out)
	}
}

func TestPrivilegedSysctls(t *testing.T) {
	t.Parallel()
	c := NewForTest(t, Config{})
	a1 := addPod(t, c, "node-a", "a1")
	ext, err := c.AddExternal("ext")
	if err != nil {
		t.Fatal(err)
	}
	nodeA := c.Node("node-a")
	for _, tc := range []struct {
		ns   *Namespace
		key  string
		want string
	}{
		{nodeA.Namespace, "net/ipv4/ip_forward", "1"},
		{c.Node("node-b").Namespace, "net/ipv4/ip_forward", "1"},
		{a1.Namespace, "net/ipv4/ip_forward", "0"},
		{ext.Namespace, "net/ipv4/ip_forward", "0"},
		{nodeA.Namespace, "net/ipv4/conf/all/rp_filter", "0"},
		{nodeA.Namespace, "net/ipv4/conf/eth0/rp_filter", "0"},
		{nodeA.Namespace, "net/ipv4/conf/v-a1/rp_filter", "0"},
		{a1.Namespace, "net/ipv4/conf/all/rp_filter", "0"},
		{a1.Namespace, "net/ipv4/conf/default/rp_filter", "0"},
		{a1.Namespace, "net/ipv4/conf/eth0/rp_filter", "0"},
		{a1.Namespace, "net/ipv4/conf/lo/rp_filter", "0"},
		{ext.Namespace, "net/ipv4/conf/eth0/rp_filter", "0"},
		{c.Fabric(), "net/ipv4/conf/v-node-a/rp_filter", "0"},
	} {
		got, err := readSysctl(tc.ns.Netns(), tc.key)
		if err != nil {
			t.Errorf("%s: %v", tc.ns, err)
		} else if got != tc.want {
			t.Errorf("%s: %s = %s, want %s", tc.ns, tc.key, got, tc.want)
		}
	}
	if _, err := os.Stat("/proc/sys/net/ipv6"); err == nil {
		for _, ns := range []*Namespace{nodeA.Namespace, a1.Namespace, ext.Namespace, c.Fabric()} {
			for _, key := range []string{"net/ipv6/conf/all/disable_ipv6", "net/ipv6/conf/eth0/disable_ipv6"} {
				if ns == c.Fabric() && strings.Contains(key, "eth0") {
					continue
				}
				if got, err := readSysctl(ns.Netns(), key); err != nil || got != "1" {
					t.Errorf("%s: %s = %q, %v; want 1", ns, key, got, err)
				}
			}
		}
	}
}

func TestPrivilegedProcess(t *testing.T) {
	t.Parallel()
	c := NewForTest(t, Config{})
	nodeA := c.Node("node-a")
	ctx := context.Background()

	t.Run("graceful", func(t *testing.T) {
		p, err := c.StartProcess("graceful", nodeA.Command(ctx, "sh", "-c",
			`trap 'echo bye; exit 0' TERM; ip -4 -o addr show dev eth0; echo ready; while :; do sleep 0.05; done`))
		if err != nil {
			t.Fatal(err)
		}
		if _, err := p.WaitLogContains(wait, "ready"); err != nil {
			t.Fatal(err)
		}
		if !strings.Contains(strings.Join(p.Lines(), "\n"), " 198.18.0.1/24 ") {
			t.Errorf("process does not run in node-a; output:\n%s", p.Tail(10))
		}
		mark := p.LineCount()
		if err := p.Stop(wait); err != nil {
			t.Fatalf("stop: %v", err)
		}
		if _, err := p.WaitLogSince(mark, wait, func(l string) bool { return l == "bye" }); err != nil {
			t.Fatal(err)
		}
		b, err := os.ReadFile(p.LogPath())
		if err != nil {
			t.Fatal(err)
		}
		if want := "ready\n"; !bytes.Contains(b, []byte(want)) || !bytes.HasSuffix(b, []byte("bye\n")) {
			t.Errorf("log file %s:\n%s", p.LogPath(), b)
		}
		if filepath.Dir(p.LogPath()) != c.RunDir() {
			t.Errorf("log %s is not in the run dir %s", p.LogPath(), c.RunDir())
		}
	})

	t.Run("killed after grace", func(t *testing.T) {
		p, err := c.StartProcess("stubborn", nodeA.Command(ctx, "sh", "-c",
			`trap '' TERM; echo ready; while :; do sleep 0.05; done`))
		if err != nil {
			t.Fatal(err)
		}
		if _, err := p.WaitLogContains(wait, "ready"); err != nil {
			t.Fatal(err)
		}
		start := time.Now()
		err = p.Stop(300 * time.Millisecond)
		if err == nil || !strings.Contains(err.Error(), "killed") {
			t.Fatalf("stop of a process ignoring SIGTERM: %v", err)
		}
		if d := time.Since(start); d < 300*time.Millisecond || d > wait {
			t.Errorf("stop took %v", d)
		}
		if err := syscall.Kill(p.Pid(), 0); !errors.Is(err, syscall.ESRCH) {
			t.Errorf("pid %d after Stop: %v", p.Pid(), err)
		}
	})

	t.Run("wait fails", func(t *testing.T) {
		p, err := c.StartProcess("short", nodeA.Command(ctx, "sh", "-c", `echo one; echo -n two; exit 3`))
		if err != nil {
			t.Fatal(err)
		}
		_, err = p.WaitLogContains(wait, "three")
		if err == nil || !strings.Contains(err.Error(), "exit status 3") || !strings.Contains(err.Error(), "two") {
			t.Fatalf("wait on a process that exits: %v", err)
		}
		select {
		case <-p.Done():
		case <-time.After(wait):
			t.Fatal("Done not closed")
		}
		if got := p.Lines(); !slices.Equal(got, []string{"one", "two"}) {
			t.Errorf("lines %q", got)
		}
		if p.Stop(wait) == nil {
			t.Error("Stop of a process that exited with 3: no error")
		}

		q, err := c.StartProcess("short", nodeA.Command(ctx, "sleep", "30"))
		if err != nil {
			t.Fatal(err)
		}
		start := time.Now()
		if _, err := q.WaitLogContains(200*time.Millisecond, "never"); err == nil || !strings.Contains(err.Error(), "none within") {
			t.Fatalf("wait for a line never printed: %v", err)
		}
		if d := time.Since(start); d > wait {
			t.Errorf("timeout of 200ms took %v", d)
		}
		if q.LogPath() == p.LogPath() || !strings.HasSuffix(q.LogPath(), "short.2.log") {
			t.Errorf("second process named short logs to %s", q.LogPath())
		}
	})

	t.Run("bad commands", func(t *testing.T) {
		cmd := nodeA.Command(ctx, "true")
		cmd.Stdout = io.Discard
		if _, err := c.StartProcess("x", cmd); err == nil {
			t.Error("command with Stdout set: no error")
		}
		if _, err := c.StartProcess("../x", nodeA.Command(ctx, "true")); err == nil {
			t.Error("name ../x: no error")
		}
		if _, err := c.StartProcess("missing", exec.Command("/nonexistent/program")); err == nil {
			t.Error("missing program: no error")
		}
	})

	// A pod created after a process started in its own mount namespace (ip netns exec gives it
	// one) still appears at its path there: /var/run/netns is a shared mount.
	t.Run("sees later namespaces", func(t *testing.T) {
		name := netnsName(c.ID(), "late")
		p, err := c.StartProcess("watcher", nodeA.Command(ctx, "sh", "-c",
			`echo started; until ip netns exec `+name+` ip -4 -o addr show dev eth0 2>/dev/null | grep -q 198.18.1; do sleep 0.05; done; echo seen`))
		if err != nil {
			t.Fatal(err)
		}
		// The shell runs, so it is in its own mount namespace before the pod exists.
		if _, err := p.WaitLogContains(wait, "started"); err != nil {
			t.Fatal(err)
		}
		addPod(t, c, "node-a", "late")
		if _, err := p.WaitLogContains(wait, "seen"); err != nil {
			t.Fatal(err)
		}
	})

	t.Run("close stops what runs", func(t *testing.T) {
		c2 := NewForTest(t, Config{StopGrace: 200 * time.Millisecond})
		p, err := c2.StartProcess("sleeper", c2.Node("node-b").Command(ctx, "sleep", "60"))
		if err != nil {
			t.Fatal(err)
		}
		if err := c2.Close(); err != nil {
			t.Fatal(err)
		}
		select {
		case <-p.Done():
		default:
			t.Fatal("process still running after Close")
		}
		if _, err := c2.StartProcess("again", c2.Node("node-b").Command(ctx, "true")); err == nil {
			t.Error("StartProcess after Close: no error")
		}
	})
}

func TestPrivilegedHTTP(t *testing.T) {
	t.Parallel()
	c := NewForTest(t, Config{})
	nodeA, nodeB := c.Node("node-a"), c.Node("node-b")
	a1 := addPod(t, c, "node-a", "a1")
	ready := make(chan struct{})
	mux := http.NewServeMux()
	mux.HandleFunc("/healthz/ready", func(w http.ResponseWriter, r *http.Request) {
		select {
		case <-ready:
			fmt.Fprintf(w, "ready, client %s", r.RemoteAddr)
		default:
			http.Error(w, "not ready", http.StatusServiceUnavailable)
		}
	})
	for _, addr := range []string{"127.0.0.1:15021", nodeA.IP().String() + ":15021"} {
		ln, err := nodeA.Listen(addr)
		if err != nil {
			t.Fatal(err)
		}
		srv := &http.Server{Handler: mux, ReadHeaderTimeout: wait}
		go srv.Serve(ln)
		t.Cleanup(func() { srv.Close() })
	}

	local := "http://127.0.0.1:15021/healthz/ready"
	if _, err := nodeA.WaitHTTP(local, http.StatusOK, 200*time.Millisecond); err == nil || !strings.Contains(err.Error(), "status 503") {
		t.Fatalf("WaitHTTP before ready: %v", err)
	}
	time.AfterFunc(100*time.Millisecond, func() { close(ready) })
	body, err := nodeA.WaitHTTP(local, http.StatusOK, wait)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(body), "client 127.0.0.1:") {
		t.Errorf("body %q", body)
	}
	// The same address in another namespace is another loopback.
	ctx, cancel := context.WithTimeout(context.Background(), wait)
	defer cancel()
	if _, _, err := nodeB.HTTPGet(ctx, local); err == nil || !strings.Contains(err.Error(), "connection refused") {
		t.Errorf("GET node-a's loopback from node-b: %v", err)
	}
	status, body, err := a1.HTTPGet(ctx, "http://"+nodeA.IP().String()+":15021/healthz/ready")
	if err != nil || status != http.StatusOK || !strings.Contains(string(body), "client "+a1.IP().String()+":") {
		t.Errorf("GET from a1: %d %q %v", status, body, err)
	}
	if _, _, err := a1.HTTPGet(ctx, "http://localhost:15021/"); err == nil || !strings.Contains(err.Error(), "want an IP address") {
		t.Errorf("GET by host name: %v", err)
	}
}

// linkNames lists the links of ns.
func linkNames(t *testing.T, ns redirect.Netns) []string {
	t.Helper()
	var names []string
	if err := withNetlink(ns, func(h *netlink.Handle) error {
		links, err := h.LinkList()
		for _, l := range links {
			names = append(names, l.Attrs().Name)
		}
		return err
	}); err != nil {
		t.Fatalf("links of %s: %v", ns, err)
	}
	slices.Sort(names)
	return names
}

// hostLinks lists the links of the test's own namespace.
func hostLinks(t *testing.T) []string {
	t.Helper()
	ifs, err := net.Interfaces()
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, i := range ifs {
		names = append(names, i.Name)
	}
	slices.Sort(names)
	return names
}

// traces returns every trace of run id in /var/run/netns, `ip netns list`, the mount table
// and the lock directory.
func traces(t *testing.T, id string) []string {
	t.Helper()
	prefix := "zt" + id + "-"
	var found []string
	entries, err := os.ReadDir(netnsDir)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		if strings.HasPrefix(e.Name(), prefix) {
			found = append(found, netnsDir+"/"+e.Name())
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), wait)
	defer cancel()
	out, err := exec.CommandContext(ctx, "ip", "netns", "list").CombinedOutput()
	if err != nil {
		t.Fatalf("ip netns list: %v\n%s", err, out)
	}
	for _, l := range strings.Split(string(out), "\n") {
		if strings.HasPrefix(l, prefix) {
			found = append(found, "ip netns list: "+l)
		}
	}
	mounts, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range strings.Split(string(mounts), "\n") {
		if strings.Contains(l, "/"+prefix) {
			found = append(found, "mount: "+l)
		}
	}
	if _, err := os.Stat(filepath.Join(lockDir, id+".lock")); err == nil {
		found = append(found, "lock file")
	}
	return found
}

func TestPrivilegedCloseLeavesNothing(t *testing.T) {
	t.Parallel()
	RequireRoot(t)
	before := hostLinks(t)
	c, err := New(Config{Nodes: 3})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() }) // if the test fails early
	addPod(t, c, "node-a", "a1")
	addPod(t, c, "node-b", "b1")
	if _, err := c.AddExternal("ext"); err != nil {
		t.Fatal(err)
	}
	p, err := c.StartProcess("sleeper", c.Node("node-a").Command(context.Background(), "sleep", "60"))
	if err != nil {
		t.Fatal(err)
	}
	if len(traces(t, c.ID())) == 0 {
		t.Fatal("traces finds nothing of a live cluster; it could never fail")
	}
	if got := linkNames(t, c.Fabric().Netns()); !slices.Equal(got, []string{"br0", "lo", "v-ext", "v-node-a", "v-node-b", "v-node-c"}) {
		t.Fatalf("fabric links %v", got)
	}
	// Handles of our own keep two namespaces alive past Close, to check their links went.
	var held []redirect.Netns
	for _, ns := range []*Namespace{c.Node("node-a").Namespace, c.Pod("b1").Namespace, c.Fabric()} {
		h, err := redirect.OpenNetns(ns.Path())
		if err != nil {
			t.Fatal(err)
		}
		defer h.Close()
		held = append(held, h)
	}
	// A listener left open also keeps its namespace alive.
	if _, err := c.Pod("a1").Listen(":8080"); err != nil {
		t.Fatal(err)
	}
	runDir := c.RunDir()

	if err := c.Close(); err != nil {
		t.Fatalf("close: %v", err)
	}
	if got := traces(t, c.ID()); len(got) > 0 {
		t.Errorf("left behind:\n%s", strings.Join(got, "\n"))
	}
	for _, h := range held {
		if got := linkNames(t, h); !slices.Equal(got, []string{"lo"}) {
			t.Errorf("links left in %s: %v", h, got)
		}
	}
	if got := hostLinks(t); !slices.Equal(got, before) {
		t.Errorf("host links changed: %v -> %v", before, got)
	}
	if err := syscall.Kill(p.Pid(), 0); !errors.Is(err, syscall.ESRCH) {
		t.Errorf("process %d after Close: %v", p.Pid(), err)
	}
	if _, err := os.Stat(runDir); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("run dir %s after Close: %v", runDir, err)
	}
	if err := c.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
	if _, err := c.AddPod("node-a", "a2"); err == nil {
		t.Error("AddPod after Close: no error")
	}
}

// TestPrivilegedCleanupStale is not parallel: the other tests' NewForTest also clean up.
func TestPrivilegedCleanupStale(t *testing.T) {
	live := NewForTest(t, Config{Nodes: 1})
	livePod := addPod(t, live, "node-a", "a1")

	// A crashed run without a lock file: two namespaces joined by a veth.
	crashed, err := newRunID()
	if err != nil {
		t.Fatal(err)
	}
	fabricPath := filepath.Join(netnsDir, netnsName(crashed, fabricName))
	nodePath := filepath.Join(netnsDir, netnsName(crashed, "node-a"))
	// A crashed run whose lock file is left, unlocked.
	unlocked, err := newRunID()
	if err != nil {
		t.Fatal(err)
	}
	unlockedPath := filepath.Join(netnsDir, netnsName(unlocked, "b1"))
	// Not ours: must survive.
	foreign := []string{
		filepath.Join(netnsDir, "zz"+crashed+"-node-a"),
		filepath.Join(netnsDir, "zt"+crashed+"x-node-a"),
	}
	for _, p := range append([]string{fabricPath, nodePath, unlockedPath}, foreign...) {
		if err := createNamedNetns(p); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { deleteNamedNetns(p) })
	}
	fabricNs, err := redirect.OpenNetns(fabricPath)
	if err != nil {
		t.Fatal(err)
	}
	defer fabricNs.Close()
	if err := addVeth(fabricNs, &Namespace{name: "node-a", netns: netnsName(crashed, "node-a")}, "v-node-a", nil); err != nil {
		t.Fatal(err)
	}
	lockPath := filepath.Join(lockDir, unlocked+".lock")
	if err := os.WriteFile(lockPath, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.Remove(lockPath) })

	removed, err := CleanupStale()
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{fabricPath, nodePath, unlockedPath} {
		if _, err := os.Stat(p); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("stale %s survived: %v", p, err)
		}
	}
	if _, err := os.Stat(lockPath); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("stale lock %s survived: %v", lockPath, err)
	}
	if got := linkNames(t, fabricNs); !slices.Equal(got, []string{"lo"}) {
		t.Errorf("links left in the stale fabric: %v", got)
	}
	for _, p := range foreign {
		if _, err := os.Stat(p); err != nil {
			t.Errorf("foreign %s removed: %v", p, err)
		}
		if slices.Contains(removed, filepath.Base(p)) {
			t.Errorf("CleanupStale reports removing foreign %s", p)
		}
	}
	for _, n := range []string{livePod.NetnsName(), live.Node("node-a").NetnsName(), live.Fabric().NetnsName()} {
		if slices.Contains(removed, n) {
			t.Errorf("CleanupStale removed %s of a live run", n)
		}
		if _, err := os.Stat(filepath.Join(netnsDir, n)); err != nil {
			t.Errorf("live %s: %v", n, err)
		}
	}
	if _, err := os.Stat(filepath.Join(lockDir, live.ID()+".lock")); err != nil {
		t.Errorf("lock of the live run: %v", err)
	}
	// The live run still works.
	srv := serveEcho(t, livePod.Namespace, ":80")
	connectAndCheck(t, live.Node("node-a").Namespace, srv, livePod.IP(), live.Node("node-a").IP())
}

func TestLockRunID(t *testing.T) {
	for _, tc := range []struct {
		file string
		id   string
		ok   bool
	}{
		{"1a2b3c.lock", "1a2b3c", true},
		{".setup.lock", "", false},
		{"1a2b3c", "", false},
		{"1A2B3C.lock", "", false},
		{".tmp-1a2b3c-123", "", false},
		{"1a2b3c4.lock", "", false},
	} {
		id, ok := lockRunID(tc.file)
		if id != tc.id || ok != tc.ok {
			t.Errorf("lockRunID(%q) = %q, %v", tc.file, id, ok)
		}
	}
}

func TestNewRejectsBadConfig(t *testing.T) {
	for _, n := range []int{-1, MaxNodes + 1} {
		if c, err := New(Config{Nodes: n}); err == nil {
			c.Close()
			t.Errorf("New with %d nodes: no error", n)
		}
	}
}
