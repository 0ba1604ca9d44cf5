package zds

import "golang.org/x/sys/unix"

// closeFd closes a received fd that nothing took.
func closeFd(fd int) {
	if fd >= 0 {
		_ = unix.Close(fd)
	}
}
