package agent

import (
	"fmt"

	"golang.org/x/sys/unix"

	"github.com/ztgo/ztgo/redirect"
)

// dupNetns returns a new close-on-exec fd for ns, owned by the caller. redirect.Netns does
// not hand out its fd, so the fd is opened from inside the namespace
// (/proc/thread-self/ns/net on a thread that entered it), then checked to name the same
// namespace.
func dupNetns(ns redirect.Netns) (int, error) {
	fd := -1
	err := ns.Do(func() error {
		var err error
		fd, err = unix.Open("/proc/thread-self/ns/net", unix.O_RDONLY|unix.O_CLOEXEC, 0)
		return err
	})
	if err != nil {
		if fd >= 0 {
			_ = unix.Close(fd)
		}
		return -1, fmt.Errorf("dup netns %s: %w", ns, err)
	}
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		_ = unix.Close(fd)
		return -1, fmt.Errorf("dup netns %s: fstat: %w", ns, err)
	}
	if got := (redirect.NetnsID{Dev: uint64(st.Dev), Ino: st.Ino}); got != ns.ID() {
		_ = unix.Close(fd)
		return -1, fmt.Errorf("dup netns %s: got %s instead", ns, got)
	}
	return fd, nil
}
