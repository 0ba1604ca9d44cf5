package redirect

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"os"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

func sockopt(t *testing.T, c syscall.Conn, level, opt int) int {
	t.Helper()
	rc, err := c.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var v int
	var gerr error
	if err := rc.Control(func(fd uintptr) { v, gerr = unix.GetsockoptInt(int(fd), level, opt) }); err != nil {
		t.Fatal(err)
	}
	if gerr != nil {
		t.Fatalf("getsockopt %d/%d: %v", level, opt, gerr)
	}
	return v
}

func TestPrivilegedSocketFactory(t *testing.T) {
	requireRoot(t)
	ns := newTestNetns(t)
	f, err := NewSocketFactory(ns, SocketConfig{})
	if err != nil {
		t.Fatal(err)
	}
	ls, err := f.ListenAll()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ls.Close() })

	t.Run("listener options", func(t *testing.T) {
		for _, tc := range []struct {
			ln          *net.TCPListener
			addr        string
			transparent bool
		}{
			{ls.Outbound, "[::]:15001", false},
			{ls.InboundPlaintext, "[::]:15006", true},
			{ls.InboundHBONE, "[::]:15008", true},
			{ls.DNSTCP[0], "127.0.0.1:15053", false},
			{ls.DNSTCP[1], "[::1]:15053", false},
		} {
			if got := tc.ln.Addr().String(); got != tc.addr {
				t.Errorf("listener on %s, want %s", got, tc.addr)
			}
			if m := sockopt(t, tc.ln, unix.SOL_SOCKET, unix.SO_MARK); m != 0x539 {
				t.Errorf("%s: SO_MARK %#x", tc.addr, m)
			}
			if r := sockopt(t, tc.ln, unix.SOL_SOCKET, unix.SO_REUSEPORT); r != 1 {
				t.Errorf("%s: SO_REUSEPORT %d", tc.addr, r)
			}
			level, opt := unix.SOL_IPV6, unix.IPV6_TRANSPARENT
			if tc.ln.Addr().(*net.TCPAddr).IP.To4() != nil {
				level, opt = unix.SOL_IP, unix.IP_TRANSPARENT
			}
			if tr := sockopt(t, tc.ln, level, opt) == 1; tr != tc.transparent {
				t.Errorf("%s: transparent %v, want %v", tc.addr, tr, tc.transparent)
			}
		}
		for i, want := range []string{"127.0.0.1:15053", "[::1]:15053"} {
			if got := ls.DNSUDP[i].LocalAddr().String(); got != want {
				t.Errorf("DNS UDP on %s, want %s", got, want)
			}
			if m := sockopt(t, ls.DNSUDP[i], unix.SOL_SOCKET, unix.SO_MARK); m != 0x539 {
				t.Errorf("DNS UDP %s: SO_MARK %#x", want, m)
			}
		}
		// A second factory can bind the same ports (SO_REUSEPORT), as a replacement
		// ztgo does during a restart.
		f2, _ := NewSocketFactory(ns, SocketConfig{})
		ln2, err := f2.ListenOutbound()
		if err != nil {
			t.Fatalf("second listener on 15001: %v", err)
		}
		ln2.Close()
	})

	t.Run("listeners live in the pod namespace", func(t *testing.T) {
		c := dialIn(t, ns, "tcp", netip.Addr{}, netip.MustParseAddrPort("127.0.0.1:15001"))
		a := accept(t, ls.Outbound, 5*time.Second)
		if m := sockopt(t, a, unix.SOL_SOCKET, unix.SO_MARK); m != 0x539 {
			t.Errorf("accepted connection SO_MARK %#x, want the listener's", m)
		}
		// Not NATed: the original destination is the local address.
		orig, err := OriginalDst(a)
		if err != nil {
			t.Fatal(err)
		}
		if want := netip.MustParseAddrPort("127.0.0.1:15001"); orig != want {
			t.Errorf("original dst %s, want %s", orig, want)
		}
		c.Close()
	})

	t.Run("dial from the pod namespace", func(t *testing.T) {
		app := listenIn(t, ns, "127.0.0.1:0")
		dst := app.Addr().(*net.TCPAddr).AddrPort()
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		c, err := f.Dial(ctx, dst)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		s := accept(t, app, 5*time.Second)
		if m := sockopt(t, c, unix.SOL_SOCKET, unix.SO_MARK); m != 0x539 {
			t.Errorf("dialed SO_MARK %#x", m)
		}
		if nd := sockopt(t, c, unix.IPPROTO_TCP, unix.TCP_NODELAY); nd != 1 {
			t.Errorf("TCP_NODELAY %d", nd)
		}
		if idle := sockopt(t, c, unix.IPPROTO_TCP, unix.TCP_KEEPIDLE); idle != 180 {
			t.Errorf("TCP_KEEPIDLE %d, want 180", idle)
		}
		echo(s)
		roundTrip(t, c, c, "ping", "ping")

		// Same source and destination address: nothing to spoof, dialed plainly.
		c2, err := f.DialTransparent(ctx, dst.Addr(), dst)
		if err != nil {
			t.Fatal(err)
		}
		c2.Close()
		accept(t, app, 5*time.Second)

		if _, err := f.DialTransparent(ctx, netip.MustParseAddr("::1"), dst); err == nil {
			t.Error("mixed address families accepted")
		}
		if _, err := f.Dial(ctx, netip.AddrPort{}); err == nil {
			t.Error("invalid destination accepted")
		}
	})

	t.Run("transparent dials from one source share its ports", func(t *testing.T) {
		// One local port for the whole namespace: two connections from the same source
		// address to two destinations both get it only if the port is chosen per 4-tuple at
		// connect (IP_BIND_ADDRESS_NO_PORT), not reserved for the address at bind.
		apps := []*net.TCPListener{listenIn(t, ns, "127.0.0.1:15101"), listenIn(t, ns, "127.0.0.1:15102")}
		old := sysctlIn(t, ns, "net/ipv4/ip_local_port_range", "40000 40000")
		t.Cleanup(func() { sysctlIn(t, ns, "net/ipv4/ip_local_port_range", old) })
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		src := netip.MustParseAddr("127.0.0.2")
		for _, app := range apps {
			c, err := f.DialTransparent(ctx, src, app.Addr().(*net.TCPAddr).AddrPort())
			if err != nil {
				t.Fatalf("transparent dial to %s: %v", app.Addr(), err)
			}
			defer c.Close()
			if got := c.LocalAddr().(*net.TCPAddr).AddrPort(); got != netip.AddrPortFrom(src, 40000) {
				t.Errorf("dial to %s from %s, want %s:40000", app.Addr(), got, src)
			}
			if tr := sockopt(t, c, unix.SOL_IP, unix.IP_TRANSPARENT); tr != 1 {
				t.Errorf("IP_TRANSPARENT %d", tr)
			}
			accept(t, app, 5*time.Second)
		}
	})

	t.Run("UDP and DialContext from the pod namespace", func(t *testing.T) {
		var srv *net.UDPConn
		if err := ns.Do(func() error {
			var err error
			srv, err = net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
			return err
		}); err != nil {
			t.Fatal(err)
		}
		defer srv.Close()
		dst := srv.LocalAddr().(*net.UDPAddr).AddrPort()
		ctx := context.Background()
		c, err := f.DialContext(ctx, "udp", dst.String())
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		uc, ok := c.(*net.UDPConn)
		if !ok {
			t.Fatalf("DialContext udp: %T", c)
		}
		if m := sockopt(t, uc, unix.SOL_SOCKET, unix.SO_MARK); m != 0x539 {
			t.Errorf("UDP SO_MARK %#x", m)
		}
		// 127.0.0.1 of the pod, not of the host: the datagram reaches the pod's socket.
		if _, err := c.Write([]byte("q")); err != nil {
			t.Fatal(err)
		}
		srv.SetReadDeadline(time.Now().Add(5 * time.Second))
		buf := make([]byte, 8)
		n, from, err := srv.ReadFromUDPAddrPort(buf)
		if err != nil || string(buf[:n]) != "q" || from != c.LocalAddr().(*net.UDPAddr).AddrPort() {
			t.Fatalf("pod socket read %q from %s (%v), want \"q\" from %s", buf[:n], from, err, c.LocalAddr())
		}

		app := listenIn(t, ns, "127.0.0.1:0")
		tc, err := f.DialContext(ctx, "tcp4", app.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		tc.Close()
		accept(t, app, 5*time.Second)
		if c, err := f.DialContext(ctx, "sctp", dst.String()); err == nil || c != nil {
			t.Errorf("sctp: %v, %v", c, err)
		}
		if c, err := f.DialContext(ctx, "tcp", "localhost:80"); err == nil || c != nil {
			t.Errorf("host name: %v, %v", c, err)
		}
	})

	t.Run("connect timeout and cancellation", func(t *testing.T) {
		// A veth pair whose far end has no address: ARP for 198.18.9.9 goes unanswered, so a
		// connect to it stays pending (for about 3 s, until the neighbour entry fails).
		h := nlHandle(t, ns)
		if err := h.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "bh0"}, PeerName: "bh1"}); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() {
			if l, err := h.LinkByName("bh0"); err == nil {
				h.LinkDel(l)
			}
		})
		for _, name := range []string{"bh0", "bh1"} {
			l, err := h.LinkByName(name)
			if err != nil {
				t.Fatal(err)
			}
			if name == "bh0" {
				if err := h.AddrAdd(l, prefix("198.18.9.1/24")); err != nil {
					t.Fatal(err)
				}
			}
			if err := h.LinkSetUp(l); err != nil {
				t.Fatal(err)
			}
		}
		dst := netip.MustParseAddrPort("198.18.9.9:80")

		short, _ := NewSocketFactory(ns, SocketConfig{ConnectTimeout: 200 * time.Millisecond})
		start := time.Now()
		if _, err := short.Dial(context.Background(), dst); !errors.Is(err, ErrConnectTimeout) {
			t.Fatalf("want ErrConnectTimeout, got %v", err)
		}
		if d := time.Since(start); d > 3*time.Second {
			t.Fatalf("timeout took %s", d)
		}

		ctx, cancel := context.WithCancel(context.Background())
		time.AfterFunc(100*time.Millisecond, cancel)
		if _, err := f.Dial(ctx, dst); !errors.Is(err, context.Canceled) {
			t.Fatalf("want context.Canceled, got %v", err)
		}
		ctx2, cancel2 := context.WithTimeout(context.Background(), 100*time.Millisecond)
		defer cancel2()
		if _, err := f.Dial(ctx2, dst); !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("want context.DeadlineExceeded, got %v", err)
		}
		if _, err := f.Dial(context.Background(), netip.MustParseAddrPort("198.18.200.1:80")); !errors.Is(err, unix.ENETUNREACH) {
			t.Fatalf("want ENETUNREACH for an unrouted address, got %v", err)
		}
	})
}

// sysctlIn sets a sysctl of ns's namespace (path under /proc/sys) and returns its old value.
func sysctlIn(t *testing.T, ns Netns, key, val string) string {
	t.Helper()
	var old []byte
	if err := ns.Do(func() error {
		path := "/proc/sys/" + key
		var err error
		if old, err = os.ReadFile(path); err != nil {
			return err
		}
		return os.WriteFile(path, []byte(val), 0o644)
	}); err != nil {
		t.Fatalf("sysctl %s=%s in %s: %v", key, val, ns, err)
	}
	return strings.TrimSpace(string(old))
}
