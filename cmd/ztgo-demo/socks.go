package main

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"time"

	"github.com/ztgo/ztgo/e2e/socks5"
)

// socksDial connects from src to the SOCKS5 proxy and asks it to CONNECT to host:port. A
// non-zero reply is not an error: it is returned in Reply, with the connection closed.
func socksDial(ctx context.Context, proxy string, src netip.Addr, host string, port uint16, timeout time.Duration) (socks5.Result, error) {
	d := net.Dialer{Timeout: timeout, LocalAddr: net.TCPAddrFromAddrPort(netip.AddrPortFrom(src, 0))}
	return socks5.Dial(ctx, &d, proxy, hostPort(host, int(port)), timeout)
}

// isTimeout reports whether err is a network timeout.
func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}
