package redirect

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

func (f *SocketFactory) keepalive() net.KeepAliveConfig {
	return net.KeepAliveConfig{
		Enable:   true,
		Idle:     f.cfg.KeepaliveIdle,
		Interval: f.cfg.KeepaliveInterval,
		Count:    f.cfg.KeepaliveCount,
	}
}

// setTransparent sets IP_TRANSPARENT (v4) or IPV6_TRANSPARENT (v6; the kernel keeps one
// flag per socket, so a dual-stack socket is covered for both families).
func setTransparent(fd int, v6 bool) error {
	if v6 {
		if err := unix.SetsockoptInt(fd, unix.SOL_IPV6, unix.IPV6_TRANSPARENT, 1); err != nil {
			return fmt.Errorf("set IPV6_TRANSPARENT: %w", err)
		}
		return nil
	}
	if err := unix.SetsockoptInt(fd, unix.SOL_IP, unix.IP_TRANSPARENT, 1); err != nil {
		return fmt.Errorf("set IP_TRANSPARENT: %w", err)
	}
	return nil
}

func setFreebind(fd int, v6 bool) error {
	if v6 {
		if err := unix.SetsockoptInt(fd, unix.SOL_IPV6, unix.IPV6_FREEBIND, 1); err != nil {
			return fmt.Errorf("set IPV6_FREEBIND: %w", err)
		}
		return nil
	}
	if err := unix.SetsockoptInt(fd, unix.SOL_IP, unix.IP_FREEBIND, 1); err != nil {
		return fmt.Errorf("set IP_FREEBIND: %w", err)
	}
	return nil
}

func (f *SocketFactory) setMark(fd int) error {
	if f.cfg.Mark == 0 {
		return nil
	}
	if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_MARK, int(f.cfg.Mark)); err != nil {
		return fmt.Errorf("set SO_MARK %#x: %w", f.cfg.Mark, err)
	}
	return nil
}

// listenControl sets the options of a listening socket before bind.
func (f *SocketFactory) listenControl(transparent bool) func(network, address string, rc syscall.RawConn) error {
	return func(network, address string, rc syscall.RawConn) error {
		var opErr error
		err := rc.Control(func(fd uintptr) {
			s := int(fd)
			if opErr = f.setMark(s); opErr != nil {
				return
			}
			if err := unix.SetsockoptInt(s, unix.SOL_SOCKET, unix.SO_REUSEPORT, 1); err != nil {
				opErr = fmt.Errorf("set SO_REUSEPORT: %w", err)
				return
			}
			if transparent {
				v6 := network == "tcp6" || network == "udp6"
				opErr = setTransparent(s, v6)
			}
		})
		if err != nil {
			return err
		}
		return opErr
	}
}

func listenAddr(addr netip.AddrPort) string {
	if !addr.Addr().IsValid() {
		// Wildcard: Go picks a dual-stack [::] socket when the system has IPv6, like ztunnel.
		return fmt.Sprintf(":%d", addr.Port())
	}
	return addr.String()
}

// ListenTCP opens a TCP listener on addr inside the pod namespace, with SO_MARK and
// SO_REUSEPORT, and IP_TRANSPARENT when transparent is set. An addr without an address
// (netip.AddrPortFrom(netip.Addr{}, port)) listens on every address of both families. The
// listener keeps accepting in the pod namespace after this returns; accepted connections
// inherit the mark.
func (f *SocketFactory) ListenTCP(addr netip.AddrPort, transparent bool) (*net.TCPListener, error) {
	lc := net.ListenConfig{KeepAliveConfig: f.keepalive(), Control: f.listenControl(transparent)}
	var ln net.Listener
	err := f.ns.Do(func() error {
		var err error
		ln, err = lc.Listen(context.Background(), "tcp", listenAddr(addr))
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("listen tcp %s in %s: %w", listenAddr(addr), f.ns, err)
	}
	return ln.(*net.TCPListener), nil
}

// ListenUDP opens a UDP socket bound to addr inside the pod namespace, with SO_MARK and
// SO_REUSEPORT.
func (f *SocketFactory) ListenUDP(addr netip.AddrPort) (*net.UDPConn, error) {
	lc := net.ListenConfig{Control: f.listenControl(false)}
	var pc net.PacketConn
	err := f.ns.Do(func() error {
		var err error
		pc, err = lc.ListenPacket(context.Background(), "udp", listenAddr(addr))
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("listen udp %s in %s: %w", listenAddr(addr), f.ns, err)
	}
	return pc.(*net.UDPConn), nil
}

func wildcard(port uint16) netip.AddrPort { return netip.AddrPortFrom(netip.Addr{}, port) }

// ListenOutbound opens the outbound capture listener (15001).
func (f *SocketFactory) ListenOutbound() (*net.TCPListener, error) {
	return f.ListenTCP(wildcard(f.cfg.Ports.Outbound), false)
}

// ListenInboundPlaintext opens the inbound plaintext capture listener (15006).
func (f *SocketFactory) ListenInboundPlaintext() (*net.TCPListener, error) {
	return f.ListenTCP(wildcard(f.cfg.Ports.InboundPlaintext), true)
}

// ListenInboundHBONE opens the inbound HBONE listener (15008).
func (f *SocketFactory) ListenInboundHBONE() (*net.TCPListener, error) {
	return f.ListenTCP(wildcard(f.cfg.Ports.InboundHBONE), true)
}

// ListenDNS opens the DNS proxy sockets, TCP and UDP, on 127.0.0.1 and ::1 (the addresses the
// output-hook redirect rewrites to). ::1 is skipped when the pod has no IPv6 loopback.
func (f *SocketFactory) ListenDNS() ([]*net.TCPListener, []*net.UDPConn, error) {
	var (
		tcps []*net.TCPListener
		udps []*net.UDPConn
	)
	fail := func(err error) ([]*net.TCPListener, []*net.UDPConn, error) {
		for _, l := range tcps {
			l.Close()
		}
		for _, c := range udps {
			c.Close()
		}
		return nil, nil, err
	}
	for _, ip := range []netip.Addr{loopback4, loopback6} {
		addr := netip.AddrPortFrom(ip, f.cfg.Ports.DNS)
		ln, err := f.ListenTCP(addr, false)
		if err != nil {
			if ip.Is6() && noIPv6(err) {
				continue
			}
			return fail(err)
		}
		tcps = append(tcps, ln)
		pc, err := f.ListenUDP(addr)
		if err != nil {
			return fail(err)
		}
		udps = append(udps, pc)
	}
	return tcps, udps, nil
}

func noIPv6(err error) bool {
	return errors.Is(err, unix.EADDRNOTAVAIL) || errors.Is(err, unix.EAFNOSUPPORT)
}

// ListenAll opens every capture listener of the pod: 15001, 15006, 15008 and DNS 15053. On
// error nothing stays open.
func (f *SocketFactory) ListenAll() (*Listeners, error) {
	l := &Listeners{}
	var err error
	if l.Outbound, err = f.ListenOutbound(); err != nil {
		return nil, err
	}
	if l.InboundPlaintext, err = f.ListenInboundPlaintext(); err != nil {
		l.Close()
		return nil, err
	}
	if l.InboundHBONE, err = f.ListenInboundHBONE(); err != nil {
		l.Close()
		return nil, err
	}
	if l.DNSTCP, l.DNSUDP, err = f.ListenDNS(); err != nil {
		l.Close()
		return nil, err
	}
	return l, nil
}

// Dial connects to dst from inside the pod namespace with the mark, so the pod's capture
// rules do not send the connection back to ztgo. The source address is the kernel's choice.
func (f *SocketFactory) Dial(ctx context.Context, dst netip.AddrPort) (*net.TCPConn, error) {
	return f.dial(ctx, netip.Addr{}, dst, false)
}

// DialTransparent connects to dst from inside the pod namespace with src as the source
// address (port chosen by the kernel), using IP_TRANSPARENT and IP_FREEBIND so src need not
// be an address of the pod: inbound delivery to the app keeps the client's address. The
// replies find their way back through the connmark and policy routing Install sets up. When
// src is invalid or dst's own address there is nothing to spoof and the connection is
// dialed normally (ztunnel skips spoofing for src == dst too).
func (f *SocketFactory) DialTransparent(ctx context.Context, src netip.Addr, dst netip.AddrPort) (*net.TCPConn, error) {
	src = src.Unmap()
	if !src.IsValid() || src == dst.Addr().Unmap() {
		return f.dial(ctx, netip.Addr{}, dst, false)
	}
	return f.dial(ctx, src, dst, true)
}

// aLongTimeAgo is a deadline in the past, to wake a blocked connect on cancellation.
var aLongTimeAgo = time.Unix(1, 0)

func (f *SocketFactory) dial(ctx context.Context, src netip.Addr, dst netip.AddrPort, transparent bool) (*net.TCPConn, error) {
	dst = netip.AddrPortFrom(dst.Addr().Unmap(), dst.Port())
	if !dst.IsValid() || dst.Port() == 0 {
		return nil, fmt.Errorf("connect %s: invalid destination", dst)
	}
	v6 := dst.Addr().Is6()
	if src.IsValid() && src.Is6() != v6 {
		return nil, fmt.Errorf("connect %s from %s: address families differ", dst, src)
	}
	family := unix.AF_INET
	if v6 {
		family = unix.AF_INET6
	}

	// Only socket() must run in the pod namespace: a socket belongs to the namespace it was
	// created in, and every later call (options, bind, connect) acts there.
	fd := -1
	err := f.ns.Do(func() error {
		var err error
		fd, err = unix.Socket(family, unix.SOCK_STREAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, unix.IPPROTO_TCP)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("connect %s: socket in %s: %w", dst, f.ns, err)
	}
	if err := f.prepareDial(fd, src, v6, transparent); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("connect %s: %w", dst, err)
	}

	file := os.NewFile(uintptr(fd), "tcp")
	defer file.Close() // net.FileConn dups the fd
	deadline := time.Now().Add(f.cfg.ConnectTimeout)
	ctxDeadline := false
	if d, ok := ctx.Deadline(); ok && d.Before(deadline) {
		deadline, ctxDeadline = d, true
	}
	if err := file.SetDeadline(deadline); err != nil {
		return nil, fmt.Errorf("connect %s: %w", dst, err)
	}
	stop := context.AfterFunc(ctx, func() { file.SetDeadline(aLongTimeAgo) })
	defer stop()

	if err := connect(file, sockaddr(dst)); err != nil {
		if errors.Is(err, os.ErrDeadlineExceeded) {
			switch {
			case ctx.Err() != nil:
				return nil, fmt.Errorf("connect %s: %w", dst, ctx.Err())
			case ctxDeadline:
				// The file's deadline can fire before the context's own timer.
				return nil, fmt.Errorf("connect %s: %w", dst, context.DeadlineExceeded)
			}
			return nil, fmt.Errorf("connect %s: %w", dst, ErrConnectTimeout)
		}
		return nil, fmt.Errorf("connect %s: %w", dst, err)
	}
	if err := file.SetDeadline(time.Time{}); err != nil {
		return nil, fmt.Errorf("connect %s: %w", dst, err)
	}
	c, err := net.FileConn(file)
	if err != nil {
		return nil, fmt.Errorf("connect %s: %w", dst, err)
	}
	tc, ok := c.(*net.TCPConn)
	if !ok {
		c.Close()
		return nil, fmt.Errorf("connect %s: unexpected connection type %T", dst, c)
	}
	if err := tc.SetKeepAliveConfig(f.keepalive()); err != nil {
		tc.Close()
		return nil, fmt.Errorf("connect %s: keepalive: %w", dst, err)
	}
	return tc, nil
}

func (f *SocketFactory) prepareDial(fd int, src netip.Addr, v6, transparent bool) error {
	if err := f.setMark(fd); err != nil {
		return err
	}
	if err := unix.SetsockoptInt(fd, unix.IPPROTO_TCP, unix.TCP_NODELAY, 1); err != nil {
		return fmt.Errorf("set TCP_NODELAY: %w", err)
	}
	if transparent {
		if err := setTransparent(fd, v6); err != nil {
			return err
		}
		if err := setFreebind(fd, v6); err != nil {
			return err
		}
	}
	if src.IsValid() {
		// Without this, bind picks a port unique to src, and churn from one client address
		// runs out of ports while old connections sit in TIME_WAIT; with it the port is
		// chosen at connect, unique per 4-tuple (as stages/upstream does).
		if err := unix.SetsockoptInt(fd, unix.SOL_IP, unix.IP_BIND_ADDRESS_NO_PORT, 1); err != nil {
			return fmt.Errorf("set IP_BIND_ADDRESS_NO_PORT: %w", err)
		}
		if err := unix.Bind(fd, sockaddr(netip.AddrPortFrom(src, 0))); err != nil {
			return fmt.Errorf("bind %s: %w", src, err)
		}
	}
	return nil
}

// connect runs a non-blocking connect on file's socket, waiting on the netpoller until it
// completes or file's deadline passes.
func connect(file *os.File, sa unix.Sockaddr) error {
	rc, err := file.SyscallConn()
	if err != nil {
		return err
	}
	started := false
	var connErr error
	err = rc.Write(func(fd uintptr) bool {
		s := int(fd)
		if !started {
			started = true
			switch err := unix.Connect(s, sa); err {
			case nil:
				return true
			case unix.EINPROGRESS, unix.EALREADY, unix.EINTR:
				return false // wait for writability
			default:
				connErr = err
				return true
			}
		}
		v, err := unix.GetsockoptInt(s, unix.SOL_SOCKET, unix.SO_ERROR)
		if err != nil {
			connErr = err
			return true
		}
		switch e := unix.Errno(v); e {
		case unix.EINPROGRESS, unix.EALREADY, unix.EINTR:
			return false
		case 0, unix.EISCONN:
			// Writable and no error can be a spurious wakeup; connected only if there is a peer.
			if _, err := unix.Getpeername(s); err == nil {
				return true
			}
			return false
		default:
			connErr = e
			return true
		}
	})
	if err != nil {
		return err
	}
	return connErr
}

func sockaddr(ap netip.AddrPort) unix.Sockaddr {
	a := ap.Addr().Unmap()
	if a.Is4() {
		return &unix.SockaddrInet4{Port: int(ap.Port()), Addr: a.As4()}
	}
	return &unix.SockaddrInet6{Port: int(ap.Port()), Addr: a.As16()}
}

// DialUDP opens a UDP socket inside the pod namespace, marked, connected to dst: the DNS
// proxy forwards a pod's queries from the pod, as ztunnel does, so upstream resolvers see
// the pod and the pod's network path applies.
func (f *SocketFactory) DialUDP(ctx context.Context, dst netip.AddrPort) (*net.UDPConn, error) {
	var c net.Conn
	err := f.ns.Do(func() error {
		d := net.Dialer{Control: func(_, _ string, rc syscall.RawConn) error {
			var serr error
			if err := rc.Control(func(fd uintptr) { serr = f.setMark(int(fd)) }); err != nil {
				return err
			}
			return serr
		}}
		var err error
		c, err = d.DialContext(ctx, "udp", dst.String())
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("udp %s in %s: %w", dst, f.ns, err)
	}
	return c.(*net.UDPConn), nil
}

// DialContext is Dial and DialUDP behind net.Dialer's signature ("tcp" or "udp", with or
// without a 4/6 suffix; address "ip:port"), for code that dials by network name.
func (f *SocketFactory) DialContext(ctx context.Context, network, address string) (net.Conn, error) {
	dst, err := netip.ParseAddrPort(address)
	if err != nil {
		return nil, fmt.Errorf("dial %s %s: want ip:port: %w", network, address, err)
	}
	switch network {
	case "tcp", "tcp4", "tcp6":
		c, err := f.Dial(ctx, dst)
		if err != nil {
			return nil, err // not a nil *TCPConn in a non-nil interface
		}
		return c, nil
	case "udp", "udp4", "udp6":
		c, err := f.DialUDP(ctx, dst)
		if err != nil {
			return nil, err
		}
		return c, nil
	}
	return nil, fmt.Errorf("dial %s %s: unsupported network", network, address)
}
