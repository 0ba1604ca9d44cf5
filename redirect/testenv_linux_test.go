package redirect

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"runtime"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// requireRoot skips a privileged test when not root, unless CI=true, where CI is expected
// to run as root and a skip would hide the test: then it fails.
func requireRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() == 0 {
		return
	}
	const why = "needs root (network namespaces, nftables, policy routing, IP_TRANSPARENT)"
	if os.Getenv("CI") == "true" {
		t.Fatalf("privileged test %s but runs as uid %d with CI=true", why, os.Geteuid())
	}
	t.Skipf("skipping privileged test: %s; run `sudo make test-privileged`", why)
}

// newTestNetns creates an anonymous network namespace with lo up. It disappears when the
// handle and every socket in it are closed; t.Cleanup closes the handle.
func newTestNetns(t testing.TB) Netns {
	t.Helper()
	ch := make(chan nsResult, 1)
	go func() {
		runtime.LockOSThread()
		r, restored := unshareNetns()
		if restored {
			runtime.UnlockOSThread()
		}
		ch <- r
	}()
	r := <-ch
	if r.err != nil {
		t.Fatalf("create netns: %v", r.err)
	}
	t.Cleanup(func() { r.ns.Close() })
	h := nlHandle(t, r.ns)
	lo, err := h.LinkByName("lo")
	if err != nil {
		t.Fatalf("lo: %v", err)
	}
	if err := h.LinkSetUp(lo); err != nil {
		t.Fatalf("lo up: %v", err)
	}
	return r.ns
}

type nsResult struct {
	ns  Netns
	err error
}

// unshareNetns gives the calling locked thread a new network namespace, opens it, and moves
// the thread back; restored is false if the move back failed.
func unshareNetns() (r nsResult, restored bool) {
	orig, err := os.Open("/proc/thread-self/ns/net")
	if err != nil {
		return nsResult{err: err}, true
	}
	defer orig.Close()
	if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
		return nsResult{err: fmt.Errorf("unshare: %w", err)}, true
	}
	ns, err := CurrentNetns()
	if serr := unix.Setns(int(orig.Fd()), unix.CLONE_NEWNET); serr != nil {
		ns.Close()
		return nsResult{err: errors.Join(err, serr)}, false
	}
	return nsResult{ns: ns, err: err}, true
}

// nlHandle opens an rtnetlink handle inside ns, closed by t.Cleanup.
func nlHandle(t testing.TB, ns Netns) *netlink.Handle {
	t.Helper()
	var h *netlink.Handle
	if err := ns.Do(func() error {
		var err error
		h, err = netlink.NewHandle(unix.NETLINK_ROUTE)
		return err
	}); err != nil {
		t.Fatalf("netlink handle in %s: %v", ns, err)
	}
	t.Cleanup(h.Close)
	return h
}

func prefix(s string) *netlink.Addr {
	a, err := netlink.ParseAddr(s)
	if err != nil {
		panic(err)
	}
	return a
}

// topology is a node namespace joining two pod namespaces, each over a veth pair:
//
//	pod A eth0 198.18.1.2/24 <-> node za 198.18.1.1/24
//	pod B eth0 198.18.2.2/24 <-> node zb 198.18.2.1/24
//
// The node forwards between them; the pods' default routes point at the node. Nothing
// reaches outside: the node has no other link and no default route.
type topology struct {
	node, a, b Netns
	ipA, ipB   netip.Addr
}

func newTopology(t *testing.T) *topology {
	t.Helper()
	tp := &topology{
		node: newTestNetns(t), a: newTestNetns(t), b: newTestNetns(t),
		ipA: netip.MustParseAddr("198.18.1.2"), ipB: netip.MustParseAddr("198.18.2.2"),
	}
	hn := nlHandle(t, tp.node)
	for _, p := range []struct {
		ns       Netns
		nodeLink string
		nodeAddr string
		podAddr  string
		gw       string
	}{
		{tp.a, "za", "198.18.1.1/24", "198.18.1.2/24", "198.18.1.1"},
		{tp.b, "zb", "198.18.2.1/24", "198.18.2.2/24", "198.18.2.1"},
	} {
		err := p.ns.withFd(func(fd int) error {
			return hn.LinkAdd(&netlink.Veth{
				LinkAttrs:     netlink.LinkAttrs{Name: p.nodeLink},
				PeerName:      "eth0",
				PeerNamespace: netlink.NsFd(fd),
			})
		})
		if err != nil {
			t.Fatalf("veth %s: %v", p.nodeLink, err)
		}
		name := p.nodeLink
		t.Cleanup(func() {
			// Deleting one end deletes the pair.
			if l, err := hn.LinkByName(name); err == nil {
				if err := hn.LinkDel(l); err != nil {
					t.Errorf("delete veth %s: %v", name, err)
				}
			}
		})
		nl, err := hn.LinkByName(p.nodeLink)
		if err != nil {
			t.Fatal(err)
		}
		if err := hn.AddrAdd(nl, prefix(p.nodeAddr)); err != nil {
			t.Fatalf("addr %s: %v", p.nodeAddr, err)
		}
		if err := hn.LinkSetUp(nl); err != nil {
			t.Fatal(err)
		}
		hp := nlHandle(t, p.ns)
		pl, err := hp.LinkByName("eth0")
		if err != nil {
			t.Fatal(err)
		}
		if err := hp.AddrAdd(pl, prefix(p.podAddr)); err != nil {
			t.Fatalf("addr %s: %v", p.podAddr, err)
		}
		if err := hp.LinkSetUp(pl); err != nil {
			t.Fatal(err)
		}
		if err := hp.RouteAdd(&netlink.Route{LinkIndex: pl.Attrs().Index, Gw: net.ParseIP(p.gw), Dst: defaultDst(unix.AF_INET)}); err != nil {
			t.Fatalf("default route via %s: %v", p.gw, err)
		}
	}
	if err := tp.node.Do(func() error {
		return os.WriteFile("/proc/sys/net/ipv4/ip_forward", []byte("1"), 0o644)
	}); err != nil {
		t.Fatalf("node forwarding: %v", err)
	}
	return tp
}

// dialIn connects from inside ns like an unmodified application would: a plain Go dial on a
// thread that entered the namespace. src, when valid, is bound as the local address.
func dialIn(t *testing.T, ns Netns, network string, src netip.Addr, dst netip.AddrPort) net.Conn {
	t.Helper()
	var c net.Conn
	err := ns.Do(func() error {
		d := net.Dialer{Timeout: 5 * time.Second}
		if src.IsValid() {
			d.LocalAddr = &net.TCPAddr{IP: src.AsSlice()}
		}
		var err error
		c, err = d.Dial(network, dst.String())
		return err
	})
	if err != nil {
		t.Fatalf("dial %s %s from %s: %v", network, dst, ns, err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// listenIn opens a plain application listener inside ns.
func listenIn(t *testing.T, ns Netns, addr string) *net.TCPListener {
	t.Helper()
	var ln net.Listener
	if err := ns.Do(func() error {
		var err error
		ln, err = net.Listen("tcp", addr)
		return err
	}); err != nil {
		t.Fatalf("listen %s in %s: %v", addr, ns, err)
	}
	t.Cleanup(func() { ln.Close() })
	return ln.(*net.TCPListener)
}

// accept waits up to d for a connection.
func accept(t *testing.T, ln *net.TCPListener, d time.Duration) *net.TCPConn {
	t.Helper()
	if err := ln.SetDeadline(time.Now().Add(d)); err != nil {
		t.Fatal(err)
	}
	c, err := ln.AcceptTCP()
	if err != nil {
		t.Fatalf("accept on %s: %v", ln.Addr(), err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// expectNoAccept asserts that nothing connects to ln within d.
func expectNoAccept(t *testing.T, ln *net.TCPListener, d time.Duration) {
	t.Helper()
	if err := ln.SetDeadline(time.Now().Add(d)); err != nil {
		t.Fatal(err)
	}
	c, err := ln.AcceptTCP()
	if err == nil {
		c.Close()
		t.Fatalf("unexpected connection on %s from %s", ln.Addr(), c.RemoteAddr())
	}
	if !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("accept on %s: %v", ln.Addr(), err)
	}
}

func remoteIP(c net.Conn) netip.Addr {
	return c.RemoteAddr().(*net.TCPAddr).AddrPort().Addr().Unmap()
}

// roundTrip writes msg on w and expects to read want on r, bounded in time.
func roundTrip(t *testing.T, w, r net.Conn, msg, want string) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	w.SetWriteDeadline(deadline)
	r.SetReadDeadline(deadline)
	if _, err := w.Write([]byte(msg)); err != nil {
		t.Fatalf("write: %v", err)
	}
	buf := make([]byte, len(want))
	if _, err := io.ReadFull(r, buf); err != nil {
		t.Fatalf("read: %v", err)
	}
	if string(buf) != want {
		t.Fatalf("read %q, want %q", buf, want)
	}
}

// relay copies both ways between a and b until ctx ends or either side closes.
func relay(ctx context.Context, a, b net.Conn) {
	cp := func(dst, src net.Conn) {
		buf := make([]byte, 4096)
		for ctx.Err() == nil {
			n, err := src.Read(buf)
			if n > 0 {
				if _, werr := dst.Write(buf[:n]); werr != nil {
					return
				}
			}
			if err != nil {
				return
			}
		}
	}
	go cp(a, b)
	go cp(b, a)
	context.AfterFunc(ctx, func() { a.Close(); b.Close() })
}

// echo serves one connection: reads and writes everything back.
func echo(c net.Conn) {
	go func() {
		buf := make([]byte, 4096)
		for {
			n, err := c.Read(buf)
			if n > 0 {
				if _, werr := c.Write(buf[:n]); werr != nil {
					return
				}
			}
			if err != nil {
				return
			}
		}
	}()
}
