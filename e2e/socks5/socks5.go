// Package socks5 is the client side of a SOCKS5 CONNECT without authentication (RFC 1928), as
// the programs and tests that drive ztgo's SOCKS5 entry speak it: ztgo-demo, meshbench and the
// end-to-end tests (through e2e/meshtest). It writes the messages by hand and waits for each
// answer before the next message (greeting, method choice, request, reply), as ordinary
// clients do, so that what a benchmark times is what a real client waits for.
package socks5

import (
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"net/netip"
	"strconv"
	"time"
)

// Reply codes (RFC 1928 section 6) that ztgo answers a CONNECT with most.
const (
	ReplySucceeded  byte = 0
	ReplyNotAllowed byte = 2 // connection not allowed by ruleset: denied by policy
)

// ReplyText names a reply code.
func ReplyText(code byte) string {
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

// Result is the outcome of a CONNECT through Dial.
type Result struct {
	// Conn is the tunnelled connection when Reply is ReplySucceeded, nil otherwise.
	Conn *net.TCPConn
	// Local is the client socket's address: the source workload's address and the port ztgo
	// records as the flow's src. It is set once the proxy accepted the connection, whatever
	// the reply.
	Local netip.AddrPort
	// Reply is the proxy's reply code, and Bound the address in its reply.
	Reply byte
	Bound netip.AddrPort
}

// Dial connects to proxy with d (whose LocalAddr picks the source workload, whose Timeout
// bounds the connect) and asks it to CONNECT to target, "ip:port" or "host:port"; timeout bounds
// the handshake. A reply other than ReplySucceeded is not an error: it is in the Result, and
// the connection is closed. err is set only when the exchange itself failed.
func Dial(ctx context.Context, d *net.Dialer, proxy, target string, timeout time.Duration) (Result, error) {
	host, portS, err := net.SplitHostPort(target)
	if err != nil {
		return Result{}, fmt.Errorf("socks5 target: %w", err)
	}
	port, err := strconv.ParseUint(portS, 10, 16)
	if err != nil {
		return Result{}, fmt.Errorf("socks5 target %q: port: %w", target, err)
	}
	nc, err := d.DialContext(ctx, "tcp", proxy)
	if err != nil {
		return Result{}, fmt.Errorf("connect to SOCKS5 %s: %w", proxy, err)
	}
	c := nc.(*net.TCPConn)
	ap := c.LocalAddr().(*net.TCPAddr).AddrPort()
	res := Result{Local: netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())}
	c.SetDeadline(time.Now().Add(timeout))
	res.Reply, res.Bound, err = Handshake(c, host, uint16(port))
	if err != nil {
		c.Close()
		return res, fmt.Errorf("SOCKS5 CONNECT %s via %s: %w", target, proxy, err)
	}
	if res.Reply != ReplySucceeded {
		c.Close()
		return res, nil
	}
	c.SetDeadline(time.Time{})
	res.Conn = c
	return res, nil
}

// Handshake runs the client side of a no-auth CONNECT to host:port on rw. host is sent as an
// IPv4 or IPv6 address when it is one, as a domain name (address type 3) otherwise. It returns
// the reply code and the bound address of the proxy's reply; a reply other than
// ReplySucceeded is not an error.
func Handshake(rw io.ReadWriter, host string, port uint16) (reply byte, bound netip.AddrPort, err error) {
	req := []byte{5, 1, 0} // version 5, CONNECT, reserved
	if ip, err := netip.ParseAddr(host); err == nil {
		if ip = ip.Unmap(); ip.Is4() {
			req = append(req, 1)
		} else {
			req = append(req, 4)
		}
		req = append(req, ip.AsSlice()...)
	} else {
		if len(host) == 0 || len(host) > 255 {
			return 0, bound, fmt.Errorf("host name %q: want 1 to 255 bytes", host)
		}
		req = append(append(req, 3, byte(len(host))), host...)
	}
	req = binary.BigEndian.AppendUint16(req, port)

	if _, err := rw.Write([]byte{5, 1, 0}); err != nil { // version 5, one method: no auth
		return 0, bound, err
	}
	var b [262]byte
	if _, err := io.ReadFull(rw, b[:2]); err != nil {
		return 0, bound, fmt.Errorf("read method choice: %w", err)
	}
	if b[0] != 5 || b[1] != 0 {
		return 0, bound, fmt.Errorf("proxy refused no-auth (answer %d %d)", b[0], b[1])
	}
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
	atyp := b[3]
	var size int
	switch atyp {
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
		return reply, bound, fmt.Errorf("reply address type %d", atyp)
	}
	if _, err := io.ReadFull(rw, b[:size+2]); err != nil {
		return reply, bound, fmt.Errorf("read reply address: %w", err)
	}
	if ip, ok := netip.AddrFromSlice(b[:size]); ok && atyp != 3 {
		bound = netip.AddrPortFrom(ip.Unmap(), binary.BigEndian.Uint16(b[size:]))
	}
	return reply, bound, nil
}
