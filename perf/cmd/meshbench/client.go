//go:build linux

package main

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/netip"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// dialTimeout bounds one connection setup, SOCKS5 handshake included.
const dialTimeout = 5 * time.Second

// path is one way from the client workload to a server port.
type path struct {
	name string
	// dial connects from clientIP to serverIP:port; for ztgo the SOCKS5 CONNECT has been
	// answered with success when it returns.
	dial func(ctx context.Context, port int) (*net.TCPConn, error)
}

// clientDialer binds clientIP and lets connect(2) pick the port (IP_BIND_ADDRESS_NO_PORT), so
// many short connections do not exhaust the ephemeral ports at bind time.
var clientDialer = net.Dialer{
	Timeout:   dialTimeout,
	LocalAddr: &net.TCPAddr{IP: net.ParseIP(clientIP)},
	Control: func(_, _ string, rc syscall.RawConn) error {
		var serr error
		err := rc.Control(func(fd uintptr) {
			serr = unix.SetsockoptInt(int(fd), unix.IPPROTO_IP, unix.IP_BIND_ADDRESS_NO_PORT, 1)
		})
		if err != nil {
			return err
		}
		return serr
	},
}

func directPath() path {
	return path{name: "direct", dial: func(ctx context.Context, port int) (*net.TCPConn, error) {
		c, err := clientDialer.DialContext(ctx, "tcp", hostPort(serverIP, port))
		if err != nil {
			return nil, err
		}
		return c.(*net.TCPConn), nil
	}}
}

func ztgoPath(socks string) path {
	dst := netip.MustParseAddr(serverIP).As4()
	return path{name: "ztgo", dial: func(ctx context.Context, port int) (*net.TCPConn, error) {
		c, err := clientDialer.DialContext(ctx, "tcp", socks)
		if err != nil {
			return nil, fmt.Errorf("connect to SOCKS5 %s: %w", socks, err)
		}
		tc := c.(*net.TCPConn)
		tc.SetDeadline(time.Now().Add(dialTimeout))
		if err := socksConnect(tc, dst, uint16(port)); err != nil {
			tc.Close()
			return nil, fmt.Errorf("SOCKS5 CONNECT %s:%d via %s: %w", serverIP, port, socks, err)
		}
		tc.SetDeadline(time.Time{})
		return tc, nil
	}}
}

// socksConnect runs a no-auth SOCKS5 CONNECT to an IPv4 destination as ordinary clients do
// (greeting, method choice, request, reply: two round trips, not pipelined).
func socksConnect(rw io.ReadWriter, ip [4]byte, port uint16) error {
	if _, err := rw.Write([]byte{5, 1, 0}); err != nil {
		return err
	}
	var b [32]byte
	if _, err := io.ReadFull(rw, b[:2]); err != nil {
		return fmt.Errorf("read method choice: %w", err)
	}
	if b[0] != 5 || b[1] != 0 {
		return fmt.Errorf("proxy refused no-auth (answer %d %d)", b[0], b[1])
	}
	req := []byte{5, 1, 0, 1, ip[0], ip[1], ip[2], ip[3], byte(port >> 8), byte(port)}
	if _, err := rw.Write(req); err != nil {
		return err
	}
	if _, err := io.ReadFull(rw, b[:4]); err != nil {
		return fmt.Errorf("read reply: %w", err)
	}
	if b[0] != 5 {
		return fmt.Errorf("reply version %d", b[0])
	}
	var size int
	switch b[3] {
	case 1:
		size = 4
	case 4:
		size = 16
	case 3:
		if _, err := io.ReadFull(rw, b[:1]); err != nil {
			return fmt.Errorf("read reply: %w", err)
		}
		size = int(b[0])
	default:
		return fmt.Errorf("reply address type %d", b[3])
	}
	code := b[1]
	rest := make([]byte, size+2)
	if _, err := io.ReadFull(rw, rest); err != nil {
		return fmt.Errorf("read reply address: %w", err)
	}
	if code != 0 {
		return fmt.Errorf("reply 0x%02x (%s)", code, socksReplyText(code))
	}
	return nil
}

func socksReplyText(code byte) string {
	switch code {
	case 1:
		return "general failure"
	case 2:
		return "connection not allowed by ruleset"
	case 3:
		return "network unreachable"
	case 4:
		return "host unreachable"
	case 5:
		return "connection refused"
	case 7:
		return "command not supported"
	case 8:
		return "address type not supported"
	}
	return "unknown"
}

// checkPath sends a message through p to the echo server and expects it back.
func checkPath(ctx context.Context, p path) error {
	c, err := p.dial(ctx, echoPort)
	if err != nil {
		return fmt.Errorf("%s path: %w", p.name, err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	msg := []byte("meshbench path check " + p.name)
	if _, err := c.Write(msg); err != nil {
		return fmt.Errorf("%s path: write: %w", p.name, err)
	}
	got := make([]byte, len(msg))
	if _, err := io.ReadFull(c, got); err != nil {
		return fmt.Errorf("%s path: read echo: %w", p.name, err)
	}
	if string(got) != string(msg) {
		return fmt.Errorf("%s path: echo returned %q, want %q", p.name, got, msg)
	}
	if err := c.CloseWrite(); err != nil {
		return fmt.Errorf("%s path: close write: %w", p.name, err)
	}
	if n, err := io.Copy(io.Discard, c); err != nil || n != 0 {
		return fmt.Errorf("%s path: after half-close: %d extra bytes, %v", p.name, n, err)
	}
	return nil
}
