package zds

import (
	"errors"
	"fmt"
	"os"

	"golang.org/x/sys/unix"
)

// newNetns takes ownership of fd: it returns it as a Netns if it is a network namespace, and
// closes it otherwise.
func newNetns(fd int) (*Netns, error) {
	if err := checkNetns(fd); err != nil {
		_ = unix.Close(fd)
		return nil, err
	}
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		_ = unix.Close(fd)
		return nil, fmt.Errorf("fstat netns fd: %w", err)
	}
	id := NetnsID{Dev: uint64(st.Dev), Ino: uint64(st.Ino)}
	return &Netns{f: os.NewFile(uintptr(fd), fmt.Sprintf("net:[%d]", id.Ino)), id: id}, nil
}

// checkNetns is ztunnel's check: NS_GET_NSTYPE (Linux 4.11+) must say CLONE_NEWNET; where
// the ioctl is unknown (ENOTTY: an older kernel, or a file that is no namespace) the fd must
// at least come from nsfs. ztunnel also accepts a proc
// file there (namespace files were proc files before Linux 3.19); ztgo does not, so a stray
// /proc file is rejected on every kernel.
func checkNetns(fd int) error {
	t, err := unix.IoctlRetInt(fd, unix.NS_GET_NSTYPE)
	switch {
	case err == nil && t != unix.CLONE_NEWNET:
		return fmt.Errorf("fd is a namespace of type %#x, not a network namespace", t)
	case err == nil:
		return nil
	case !errors.Is(err, unix.ENOTTY):
		return fmt.Errorf("fd is not a network namespace: NS_GET_NSTYPE: %w", err)
	}
	var fs unix.Statfs_t
	if err := unix.Fstatfs(fd, &fs); err != nil {
		return fmt.Errorf("fstatfs netns fd: %w", err)
	}
	if fs.Type != unix.NSFS_MAGIC {
		return fmt.Errorf("fd is not a network namespace (filesystem magic %#x)", fs.Type)
	}
	return nil
}

// closeFd closes a received fd that nothing took.
func closeFd(fd int) {
	if fd >= 0 {
		_ = unix.Close(fd)
	}
}

// Dup returns a new close-on-exec fd for the namespace, owned by the caller: a handler that
// keeps the namespace beyond DelPod, or hands it to code that takes ownership, uses it.
func (n *Netns) Dup() (int, error) {
	fd, err := unix.FcntlInt(uintptr(n.Fd()), unix.F_DUPFD_CLOEXEC, 0)
	if err != nil {
		return -1, fmt.Errorf("dup %v: %w", n, err)
	}
	return fd, nil
}
