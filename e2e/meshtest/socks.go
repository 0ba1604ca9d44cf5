package meshtest

import (
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"net/netip"
	"strconv"
	"time"
)

// SOCKS5 opens a flow through the SOCKS5 entry at proxy from source address src (the zero
// Addr lets the system choose) to target, "ip:port" or "host:port", writing the SOCKS5
// messages by hand. timeout bounds the dial and the handshake. It returns the connection,
// nil unless the reply code is 0 (succeeded), and the reply code; err is set only when the
// exchange itself failed.
func SOCKS5(proxy string, src netip.Addr, target string, timeout time.Duration) (*net.TCPConn, byte, error) {
	req := []byte{5, 1, 0} // CONNECT
	host, portS, err := net.SplitHostPort(target)
	if err != nil {
		return nil, 0, err
	}
	port, err := strconv.ParseUint(portS, 10, 16)
	if err != nil {
		return nil, 0, fmt.Errorf("socks5 target %q: port: %w", target, err)
	}
	if ip, err := netip.ParseAddr(host); err == nil {
		if ip = ip.Unmap(); ip.Is4() {
			req = append(req, 1)
		} else {
			req = append(req, 4)
		}
		req = append(req, ip.AsSlice()...)
	} else {
		if len(host) > 255 {
			return nil, 0, fmt.Errorf("socks5 target %q: host name too long", target)
		}
		req = append(req, 3, byte(len(host)))
		req = append(req, host...)
	}
	req = binary.BigEndian.AppendUint16(req, uint16(port))

	d := net.Dialer{Timeout: timeout}
	if src.IsValid() {
		d.LocalAddr = net.TCPAddrFromAddrPort(netip.AddrPortFrom(src, 0))
	}
	nc, err := d.Dial("tcp", proxy)
	if err != nil {
		return nil, 0, err
	}
	c := nc.(*net.TCPConn)
	c.SetDeadline(time.Now().Add(timeout))
	fail := func(err error) (*net.TCPConn, byte, error) {
		c.Close()
		return nil, 0, err
	}
	if _, err := c.Write([]byte{5, 1, 0}); err != nil { // version 5, one method: no auth
		return fail(err)
	}
	var sel [2]byte
	if _, err := io.ReadFull(c, sel[:]); err != nil {
		return fail(fmt.Errorf("socks5 method selection: %w", err))
	}
	if sel != [2]byte{5, 0} {
		return fail(fmt.Errorf("socks5 method selection %v, want [5 0]", sel))
	}
	if _, err := c.Write(req); err != nil {
		return fail(err)
	}
	var hdr [4]byte
	if _, err := io.ReadFull(c, hdr[:]); err != nil {
		return fail(fmt.Errorf("socks5 reply: %w", err))
	}
	if hdr[0] != 5 {
		return fail(fmt.Errorf("socks5 reply version %d", hdr[0]))
	}
	rep := hdr[1]
	var alen int
	switch hdr[3] {
	case 1:
		alen = 4
	case 4:
		alen = 16
	case 3:
		var l [1]byte
		if _, err := io.ReadFull(c, l[:]); err != nil {
			return fail(fmt.Errorf("socks5 reply address: %w", err))
		}
		alen = int(l[0])
	default:
		return fail(fmt.Errorf("socks5 reply address type %d", hdr[3]))
	}
	if _, err := io.ReadFull(c, make([]byte, alen+2)); err != nil {
		return fail(fmt.Errorf("socks5 reply address: %w", err))
	}
	if rep != 0 {
		c.Close()
		return nil, rep, nil
	}
	c.SetDeadline(time.Time{})
	return c, 0, nil
}
