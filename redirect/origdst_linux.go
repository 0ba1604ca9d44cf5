package redirect

import (
	"fmt"
	"net"
	"net/netip"
	"unsafe"

	"golang.org/x/sys/unix"
)

// ip6tSOOriginalDst is IP6T_SO_ORIGINAL_DST from linux/netfilter_ipv6/ip6_tables.h (same
// number as SO_ORIGINAL_DST, at level SOL_IPV6).
const ip6tSOOriginalDst = 80

// OriginalDst returns the destination the client originally connected to before the capture
// rules redirected the connection: conntrack's SO_ORIGINAL_DST for IPv4, IP6T_SO_ORIGINAL_DST
// for IPv6 (tried in that order, as ztunnel does). A connection that was not NATed (TPROXY,
// or a direct connect to the listener) has its original destination as its local address,
// which is returned then.
func OriginalDst(c *net.TCPConn) (netip.AddrPort, error) {
	rc, err := c.SyscallConn()
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf("original dst: %w", err)
	}
	var (
		orig netip.AddrPort
		ok   bool
	)
	if err := rc.Control(func(fd uintptr) {
		if orig, ok = origDst4(int(fd)); ok {
			return
		}
		orig, ok = origDst6(int(fd))
	}); err != nil {
		return netip.AddrPort{}, fmt.Errorf("original dst: %w", err)
	}
	if ok {
		return netip.AddrPortFrom(orig.Addr().Unmap(), orig.Port()), nil
	}
	la, isTCP := c.LocalAddr().(*net.TCPAddr)
	if !isTCP || la == nil {
		return netip.AddrPort{}, fmt.Errorf("original dst: no local address")
	}
	ap := la.AddrPort()
	return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port()), nil
}

func getsockopt(fd, level, opt int, p unsafe.Pointer, size *uint32) error {
	_, _, e := unix.Syscall6(unix.SYS_GETSOCKOPT, uintptr(fd), uintptr(level), uintptr(opt),
		uintptr(p), uintptr(unsafe.Pointer(size)), 0)
	if e != 0 {
		return e
	}
	return nil
}

// ntohs reads a port stored in network byte order.
func ntohs(p uint16) uint16 {
	b := (*[2]byte)(unsafe.Pointer(&p))
	return uint16(b[0])<<8 | uint16(b[1])
}

func origDst4(fd int) (netip.AddrPort, bool) {
	var sa unix.RawSockaddrInet4
	size := uint32(unsafe.Sizeof(sa))
	if err := getsockopt(fd, unix.SOL_IP, unix.SO_ORIGINAL_DST, unsafe.Pointer(&sa), &size); err != nil {
		return netip.AddrPort{}, false
	}
	if sa.Family != unix.AF_INET {
		return netip.AddrPort{}, false
	}
	return netip.AddrPortFrom(netip.AddrFrom4(sa.Addr), ntohs(sa.Port)), true
}

func origDst6(fd int) (netip.AddrPort, bool) {
	var sa unix.RawSockaddrInet6
	size := uint32(unsafe.Sizeof(sa))
	if err := getsockopt(fd, unix.SOL_IPV6, ip6tSOOriginalDst, unsafe.Pointer(&sa), &size); err != nil {
		return netip.AddrPort{}, false
	}
	if sa.Family != unix.AF_INET6 {
		return netip.AddrPort{}, false
	}
	return netip.AddrPortFrom(netip.AddrFrom16(sa.Addr), ntohs(sa.Port)), true
}
