// Package upstream opens the TCP connections a flow leaves ztgo on: to the application
// (inbound, keeping the client's source address where possible), to a destination outside the
// mesh (passthrough), to a workload that does not speak HBONE, and the TCP under HBONE
// connections.
//
// Sockets get ztunnel's settings: TCP_NODELAY, keepalive 180 s / 180 s / 9 probes, a 10 s
// connect timeout and, when configured, SO_MARK so capture rules skip ztgo's own traffic.
package upstream

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"syscall"
	"time"
)

// Config holds the socket settings of every upstream connection.
type Config struct {
	// Mark is set as SO_MARK on each socket when non-zero (ztunnel's PACKET_MARK, 1337).
	Mark int
	// ConnectTimeout bounds a connect; default 10 s.
	ConnectTimeout time.Duration
	// Keepalive settings; zero values take ztunnel's defaults (180 s, 180 s, 9).
	KeepaliveIdle, KeepaliveInterval time.Duration
	KeepaliveCount                   int
	// Transparent allows binding a non-local source address (IP_TRANSPARENT, needs
	// CAP_NET_ADMIN) to keep the client's address on inbound delivery.
	Transparent bool
}

// Dialer dials upstream TCP connections.
type Dialer struct {
	cfg Config
}

// New returns a Dialer with cfg's defaults filled in.
func New(cfg Config) *Dialer {
	if cfg.ConnectTimeout <= 0 {
		cfg.ConnectTimeout = 10 * time.Second
	}
	if cfg.KeepaliveIdle <= 0 {
		cfg.KeepaliveIdle = 180 * time.Second
	}
	if cfg.KeepaliveInterval <= 0 {
		cfg.KeepaliveInterval = 180 * time.Second
	}
	if cfg.KeepaliveCount <= 0 {
		cfg.KeepaliveCount = 9
	}
	return &Dialer{cfg: cfg}
}

// ErrTimeout marks a connect that did not complete in time.
var ErrTimeout = errors.New("connect timed out")

// Dial connects to dst. If src is valid the socket is bound to it first (port 0). With
// spoof set, src is the client's address and may not be local: then IP_TRANSPARENT is used
// when allowed; if the address cannot be bound at all, the connection falls back to the
// kernel's choice and spoofed reports false.
func (d *Dialer) Dial(ctx context.Context, src netip.Addr, dst netip.AddrPort, spoof bool) (c *net.TCPConn, spoofed bool, err error) {
	c, err = d.dial(ctx, src, dst, spoof && d.cfg.Transparent)
	if err == nil {
		return c, src.IsValid(), nil
	}
	if spoof && src.IsValid() && errors.Is(err, syscall.EADDRNOTAVAIL) {
		c, err = d.dial(ctx, netip.Addr{}, dst, false)
		if err == nil {
			return c, false, nil
		}
	}
	return nil, false, err
}

func (d *Dialer) dial(ctx context.Context, src netip.Addr, dst netip.AddrPort, transparent bool) (*net.TCPConn, error) {
	nd := net.Dialer{
		Timeout: d.cfg.ConnectTimeout,
		KeepAliveConfig: net.KeepAliveConfig{
			Enable: true, Idle: d.cfg.KeepaliveIdle, Interval: d.cfg.KeepaliveInterval, Count: d.cfg.KeepaliveCount,
		},
		Control: func(network, address string, rc syscall.RawConn) error {
			return control(rc, d.cfg.Mark, transparent)
		},
	}
	if src.IsValid() {
		nd.LocalAddr = &net.TCPAddr{IP: src.AsSlice()}
	}
	c, err := nd.DialContext(ctx, "tcp", dst.String())
	if err != nil {
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			return nil, fmt.Errorf("connect %s: %w", dst, ErrTimeout)
		}
		return nil, fmt.Errorf("connect %s: %w", dst, err)
	}
	return c.(*net.TCPConn), nil
}
