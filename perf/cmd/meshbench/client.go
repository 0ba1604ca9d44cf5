//go:build linux

package main

import (
	"context"
	"fmt"
	"io"
	"net"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ztgo/ztgo/e2e/socks5"
)

// dialTimeout bounds one connection setup, SOCKS5 handshake included.
const dialTimeout = 5 * time.Second

// path is one way from the client workload to a server port.
type path struct {
	name string
	// dial connects from clientIP to serverIP:port (passthroughIP:port on the passthrough
	// path); through ztgo the SOCKS5 CONNECT has been answered with success when it returns.
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

// ztgoPath goes through node a's SOCKS5 at socks to the server workload: HBONE to node b.
func ztgoPath(socks string) path { return socksPath("ztgo", socks, serverIP) }

// passthroughPath goes through node a's SOCKS5 at socks to passthroughIP, which is not in the
// mesh: node a connects to it in plain TCP, and node b has no part.
func passthroughPath(socks string) path { return socksPath("passthrough", socks, passthroughIP) }

// socksPath connects through the SOCKS5 server at socks to ip:port.
func socksPath(name, socks, ip string) path {
	return path{name: name, dial: func(ctx context.Context, port int) (*net.TCPConn, error) {
		target := hostPort(ip, port)
		res, err := socks5.Dial(ctx, &clientDialer, socks, target, dialTimeout)
		if err != nil {
			return nil, err
		}
		if res.Reply != socks5.ReplySucceeded {
			return nil, fmt.Errorf("SOCKS5 CONNECT %s via %s: reply 0x%02x (%s)", target, socks, res.Reply, socks5.ReplyText(res.Reply))
		}
		return res.Conn, nil
	}}
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
