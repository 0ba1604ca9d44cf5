// Package capture learns where a new connection wants to go and who sent it: the original
// destination and the source workload of an outbound connection.
//
// Without kernel capture (loopback mode) applications enter the mesh explicitly through SOCKS5,
// as ztunnel's 15080 listener allows: no authentication, CONNECT only, IPv4, IPv6 or domain
// targets (RFC 1928). Unlike ztunnel, which answers success before it connects upstream, ztgo
// answers once the upstream is established, so a client learns of a denial or an unreachable
// destination from the reply code instead of from a closed connection.
package capture

import (
	"errors"
	"fmt"
	"io"
	"net/netip"
	"strconv"
)

// SOCKS5 reply codes (RFC 1928 section 6).
const (
	ReplySucceeded          byte = 0x00
	ReplyGeneralFailure     byte = 0x01
	ReplyNotAllowed         byte = 0x02
	ReplyNetworkUnreachable byte = 0x03
	ReplyHostUnreachable    byte = 0x04
	ReplyConnectionRefused  byte = 0x05
	ReplyCommandUnsupported byte = 0x07
	ReplyAddressUnsupported byte = 0x08
)

const (
	socksVersion  = 5
	cmdConnect    = 1
	atypIPv4      = 1
	atypDomain    = 3
	atypIPv6      = 4
	methodNoAuth  = 0
	methodNoneAcc = 0xff
)

// Target is what a SOCKS5 client asked to connect to: an address, or a host name and port.
type Target struct {
	Addr netip.AddrPort
	Host string
	Port uint16
}

func (t Target) String() string {
	if t.Host != "" {
		return netJoin(t.Host, t.Port)
	}
	return t.Addr.String()
}

func netJoin(h string, p uint16) string { return h + ":" + strconv.Itoa(int(p)) }

// ErrProtocol marks a malformed SOCKS5 exchange.
var ErrProtocol = errors.New("socks5 protocol error")

// Handshake runs the server side of the SOCKS5 greeting and request on rw and returns the
// target. On a protocol error it has already answered the client with the right reply code.
func Handshake(rw io.ReadWriter) (Target, error) {
	var buf [262]byte
	if _, err := io.ReadFull(rw, buf[:2]); err != nil {
		return Target{}, fmt.Errorf("read socks5 greeting: %w", err)
	}
	if buf[0] != socksVersion {
		return Target{}, fmt.Errorf("%w: version %d", ErrProtocol, buf[0])
	}
	n := int(buf[1])
	if n == 0 {
		rw.Write([]byte{socksVersion, methodNoneAcc})
		return Target{}, fmt.Errorf("%w: no auth methods", ErrProtocol)
	}
	if _, err := io.ReadFull(rw, buf[:n]); err != nil {
		return Target{}, fmt.Errorf("read socks5 methods: %w", err)
	}
	noAuth := false
	for _, m := range buf[:n] {
		if m == methodNoAuth {
			noAuth = true
		}
	}
	if !noAuth {
		rw.Write([]byte{socksVersion, methodNoneAcc})
		return Target{}, fmt.Errorf("%w: client does not offer no-auth", ErrProtocol)
	}
	if _, err := rw.Write([]byte{socksVersion, methodNoAuth}); err != nil {
		return Target{}, fmt.Errorf("write socks5 method: %w", err)
	}
	if _, err := io.ReadFull(rw, buf[:4]); err != nil {
		return Target{}, fmt.Errorf("read socks5 request: %w", err)
	}
	if buf[0] != socksVersion {
		return Target{}, fmt.Errorf("%w: request version %d", ErrProtocol, buf[0])
	}
	if buf[1] != cmdConnect {
		WriteReply(rw, ReplyCommandUnsupported, netip.AddrPort{})
		return Target{}, fmt.Errorf("%w: command %d not supported", ErrProtocol, buf[1])
	}
	var t Target
	switch buf[3] {
	case atypIPv4, atypIPv6:
		size := 4
		if buf[3] == atypIPv6 {
			size = 16
		}
		if _, err := io.ReadFull(rw, buf[:size+2]); err != nil {
			return Target{}, fmt.Errorf("read socks5 address: %w", err)
		}
		ip, _ := netip.AddrFromSlice(buf[:size])
		port := uint16(buf[size])<<8 | uint16(buf[size+1])
		t.Addr = netip.AddrPortFrom(ip.Unmap(), port)
	case atypDomain:
		if _, err := io.ReadFull(rw, buf[:1]); err != nil {
			return Target{}, fmt.Errorf("read socks5 domain: %w", err)
		}
		l := int(buf[0])
		if _, err := io.ReadFull(rw, buf[:l+2]); err != nil {
			return Target{}, fmt.Errorf("read socks5 domain: %w", err)
		}
		host := string(buf[:l])
		port := uint16(buf[l])<<8 | uint16(buf[l+1])
		if ip, err := netip.ParseAddr(host); err == nil {
			t.Addr = netip.AddrPortFrom(ip.Unmap(), port)
		} else {
			t.Port = port
			if l == 0 {
				WriteReply(rw, ReplyAddressUnsupported, netip.AddrPort{})
				return Target{}, fmt.Errorf("%w: empty domain", ErrProtocol)
			}
			t.Host = host
		}
	default:
		WriteReply(rw, ReplyAddressUnsupported, netip.AddrPort{})
		return Target{}, fmt.Errorf("%w: address type %d", ErrProtocol, buf[3])
	}
	if t.Host == "" && t.Addr.Port() == 0 || t.Host != "" && t.Port == 0 {
		WriteReply(rw, ReplyAddressUnsupported, netip.AddrPort{})
		return Target{}, fmt.Errorf("%w: port 0", ErrProtocol)
	}
	return t, nil
}

// WriteReply sends a SOCKS5 reply with the bound address (zero address if unknown).
func WriteReply(w io.Writer, code byte, bound netip.AddrPort) error {
	b := make([]byte, 0, 22)
	b = append(b, socksVersion, code, 0)
	ip := bound.Addr()
	switch {
	case ip.Is6() && !ip.Is4In6():
		a := ip.As16()
		b = append(b, atypIPv6)
		b = append(b, a[:]...)
	default:
		a := ip.Unmap()
		var a4 [4]byte
		if a.Is4() {
			a4 = a.As4()
		}
		b = append(b, atypIPv4)
		b = append(b, a4[:]...)
	}
	b = append(b, byte(bound.Port()>>8), byte(bound.Port()))
	_, err := w.Write(b)
	return err
}
