package meshtest

import (
	"context"
	"net"
	"net/netip"
	"time"

	"github.com/ztgo/ztgo/e2e/socks5"
)

// SOCKS5 opens a flow through the SOCKS5 entry at proxy from source address src (the zero
// Addr lets the system choose) to target, "ip:port" or "host:port". timeout bounds the dial
// and the handshake. It returns the connection, nil unless the reply code is 0 (succeeded),
// and the reply code; err is set only when the exchange itself failed.
func SOCKS5(proxy string, src netip.Addr, target string, timeout time.Duration) (*net.TCPConn, byte, error) {
	d := net.Dialer{Timeout: timeout}
	if src.IsValid() {
		d.LocalAddr = net.TCPAddrFromAddrPort(netip.AddrPortFrom(src, 0))
	}
	res, err := socks5.Dial(context.Background(), &d, proxy, target, timeout)
	return res.Conn, res.Reply, err
}
