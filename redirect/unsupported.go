//go:build !linux

package redirect

import (
	"context"
	"net"
	"net/netip"
)

// OpenNetns needs Linux.
func OpenNetns(path string) (Netns, error) { return Netns{}, ErrUnsupported }

// NetnsFromFD needs Linux.
func NetnsFromFD(fd int) (Netns, error) { return Netns{}, ErrUnsupported }

// CurrentNetns needs Linux.
func CurrentNetns() (Netns, error) { return Netns{}, ErrUnsupported }

// Do needs Linux.
func (n Netns) Do(fn func() error) error { return ErrUnsupported }

// Install needs Linux.
func Install(ns Netns, cfg RuleConfig) error { return ErrUnsupported }

// Remove needs Linux.
func Remove(ns Netns) error { return ErrUnsupported }

// Check needs Linux.
func Check(ns Netns, cfg RuleConfig) ([]string, error) { return nil, ErrUnsupported }

// OriginalDst needs Linux.
func OriginalDst(c *net.TCPConn) (netip.AddrPort, error) { return netip.AddrPort{}, ErrUnsupported }

// ListenTCP needs Linux.
func (f *SocketFactory) ListenTCP(addr netip.AddrPort, transparent bool) (*net.TCPListener, error) {
	return nil, ErrUnsupported
}

// ListenUDP needs Linux.
func (f *SocketFactory) ListenUDP(addr netip.AddrPort) (*net.UDPConn, error) {
	return nil, ErrUnsupported
}

// ListenOutbound needs Linux.
func (f *SocketFactory) ListenOutbound() (*net.TCPListener, error) { return nil, ErrUnsupported }

// ListenInboundPlaintext needs Linux.
func (f *SocketFactory) ListenInboundPlaintext() (*net.TCPListener, error) {
	return nil, ErrUnsupported
}

// ListenInboundHBONE needs Linux.
func (f *SocketFactory) ListenInboundHBONE() (*net.TCPListener, error) { return nil, ErrUnsupported }

// ListenDNS needs Linux.
func (f *SocketFactory) ListenDNS() ([]*net.TCPListener, []*net.UDPConn, error) {
	return nil, nil, ErrUnsupported
}

// ListenAll needs Linux.
func (f *SocketFactory) ListenAll() (*Listeners, error) { return nil, ErrUnsupported }

// Dial needs Linux.
func (f *SocketFactory) Dial(ctx context.Context, dst netip.AddrPort) (*net.TCPConn, error) {
	return nil, ErrUnsupported
}

// DialTransparent needs Linux.
func (f *SocketFactory) DialTransparent(ctx context.Context, src netip.Addr, dst netip.AddrPort) (*net.TCPConn, error) {
	return nil, ErrUnsupported
}

// Dup is only supported on Linux.
func (n Netns) Dup() (Netns, error) { return Netns{}, ErrUnsupported }

// DupFd is only supported on Linux.
func (n Netns) DupFd() (int, error) { return -1, ErrUnsupported }

// DialUDP needs Linux.
func (f *SocketFactory) DialUDP(ctx context.Context, dst netip.AddrPort) (*net.UDPConn, error) {
	return nil, ErrUnsupported
}

// DialContext needs Linux.
func (f *SocketFactory) DialContext(ctx context.Context, network, address string) (net.Conn, error) {
	return nil, ErrUnsupported
}
