package upstream

import (
	"fmt"
	"syscall"

	"golang.org/x/sys/unix"
)

func control(rc syscall.RawConn, mark int, transparent bool) error {
	var opErr error
	err := rc.Control(func(fd uintptr) {
		// The source address is bound before connect; without this the kernel must pick a
		// port unique to that address at bind time, and churn through one client address
		// runs out of ports while old ones sit in TIME_WAIT. With it the port is chosen at
		// connect, unique per 4-tuple. Harmless when nothing is bound.
		unix.SetsockoptInt(int(fd), unix.SOL_IP, unix.IP_BIND_ADDRESS_NO_PORT, 1)
		if mark != 0 {
			if err := unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_MARK, mark); err != nil {
				opErr = fmt.Errorf("set SO_MARK %d: %w", mark, err)
				return
			}
		}
		if transparent {
			// Both families: the socket may be v4 or v6. Failures mean no CAP_NET_ADMIN; the
			// bind then fails with EADDRNOTAVAIL and Dial falls back.
			unix.SetsockoptInt(int(fd), unix.SOL_IP, unix.IP_TRANSPARENT, 1)
			unix.SetsockoptInt(int(fd), unix.SOL_IPV6, unix.IPV6_TRANSPARENT, 1)
			unix.SetsockoptInt(int(fd), unix.SOL_IP, unix.IP_FREEBIND, 1)
		}
	})
	if err != nil {
		return err
	}
	return opErr
}
