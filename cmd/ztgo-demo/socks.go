package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"strconv"
	"time"
)

// socksReplyText names the SOCKS5 reply codes (RFC 1928 section 6).
func socksReplyText(code byte) string {
	switch code {
	case 0:
		return "succeeded"
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
	case 6:
		return "TTL expired"
	case 7:
		return "command not supported"
	case 8:
		return "address type not supported"
	}
	return "unknown"
}

// socksConn is the result of a SOCKS5 CONNECT.
type socksConn struct {
	// Conn is the tunnelled connection when Reply is 0, nil otherwise.
	Conn net.Conn
	// Local is the client socket's address: the source workload address and the port ztgo
	// records as the flow's src.
	Local netip.AddrPort
	Reply byte
	Bound netip.AddrPort
}

// socksDial connects from src to the SOCKS5 proxy and asks it to CONNECT to host:port. host is
// sent as an IPv4 address when it is one, as a domain name (address type 3) otherwise. A
// non-zero reply is not an error: it is returned in Reply, with the connection closed.
func socksDial(ctx context.Context, proxy string, src netip.Addr, host string, port uint16, timeout time.Duration) (socksConn, error) {
	d := net.Dialer{Timeout: timeout, LocalAddr: net.TCPAddrFromAddrPort(netip.AddrPortFrom(src, 0))}
	c, err := d.DialContext(ctx, "tcp", proxy)
	if err != nil {
		return socksConn{}, fmt.Errorf("connect to SOCKS5 %s from %s: %w", proxy, src, err)
	}
	res := socksConn{Local: addrPortOf(c.LocalAddr())}
	c.SetDeadline(time.Now().Add(timeout))
	res.Reply, res.Bound, err = socksHandshake(c, host, port)
	if err != nil {
		c.Close()
		return res, fmt.Errorf("SOCKS5 CONNECT %s via %s: %w", net.JoinHostPort(host, strconv.Itoa(int(port))), proxy, err)
	}
	if res.Reply != 0 {
		c.Close()
		return res, nil
	}
	c.SetDeadline(time.Time{})
	res.Conn = c
	return res, nil
}

// socksHandshake runs the client side of a no-auth SOCKS5 CONNECT on rw.
func socksHandshake(rw io.ReadWriter, host string, port uint16) (reply byte, bound netip.AddrPort, err error) {
	if _, err := rw.Write([]byte{5, 1, 0}); err != nil {
		return 0, bound, err
	}
	var b [262]byte
	if _, err := io.ReadFull(rw, b[:2]); err != nil {
		return 0, bound, fmt.Errorf("read method choice: %w", err)
	}
	if b[0] != 5 || b[1] != 0 {
		return 0, bound, fmt.Errorf("proxy refused no-auth (answer %d %d)", b[0], b[1])
	}
	req := []byte{5, 1, 0}
	if ip, err := netip.ParseAddr(host); err == nil && ip.Is4() {
		a := ip.As4()
		req = append(append(req, 1), a[:]...)
	} else {
		if len(host) == 0 || len(host) > 255 {
			return 0, bound, fmt.Errorf("host name %q: want 1 to 255 bytes", host)
		}
		req = append(append(req, 3, byte(len(host))), host...)
	}
	req = append(req, byte(port>>8), byte(port))
	if _, err := rw.Write(req); err != nil {
		return 0, bound, err
	}
	if _, err := io.ReadFull(rw, b[:4]); err != nil {
		return 0, bound, fmt.Errorf("read reply: %w", err)
	}
	if b[0] != 5 {
		return 0, bound, fmt.Errorf("reply version %d", b[0])
	}
	reply = b[1]
	var size int
	switch b[3] {
	case 1:
		size = 4
	case 4:
		size = 16
	case 3:
		if _, err := io.ReadFull(rw, b[:1]); err != nil {
			return reply, bound, fmt.Errorf("read reply: %w", err)
		}
		size = int(b[0])
	default:
		return reply, bound, fmt.Errorf("reply address type %d", b[3])
	}
	if _, err := io.ReadFull(rw, b[:size+2]); err != nil {
		return reply, bound, fmt.Errorf("read reply address: %w", err)
	}
	if ip, ok := netip.AddrFromSlice(b[:size]); ok && b[3] != 3 {
		bound = netip.AddrPortFrom(ip.Unmap(), uint16(b[size])<<8|uint16(b[size+1]))
	}
	return reply, bound, nil
}

func addrPortOf(a net.Addr) netip.AddrPort {
	if ta, ok := a.(*net.TCPAddr); ok {
		ap := ta.AddrPort()
		return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
	}
	ap, _ := netip.ParseAddrPort(a.String())
	return ap
}

// isTimeout reports whether err is a network timeout.
func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}
