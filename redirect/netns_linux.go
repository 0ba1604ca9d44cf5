package redirect

import (
	"errors"
	"fmt"
	"os"
	"runtime"
	"sync"

	"golang.org/x/sys/unix"
)

// OpenNetns opens the network namespace at path: a bind mount such as /var/run/netns/x, or
// a process's /proc/<pid>/ns/net. It fails if path is not a network namespace.
func OpenNetns(path string) (Netns, error) {
	f, err := os.OpenFile(path, os.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return Netns{}, fmt.Errorf("open netns %s: %w", path, err)
	}
	n, err := newNetns(f, path)
	if err != nil {
		f.Close()
		return Netns{}, err
	}
	return n, nil
}

// NetnsFromFD takes ownership of fd, a network namespace file descriptor such as the one
// istio-cni passes with a ZDS WorkloadRequest.add (SCM_RIGHTS). On error fd is closed too, so
// the caller never has to.
func NetnsFromFD(fd int) (Netns, error) {
	if fd < 0 {
		return Netns{}, fmt.Errorf("netns fd %d: %w", fd, unix.EBADF)
	}
	unix.CloseOnExec(fd)
	f := os.NewFile(uintptr(fd), fmt.Sprintf("netns-fd-%d", fd))
	n, err := newNetns(f, fmt.Sprintf("fd %d", fd))
	if err != nil {
		f.Close()
		return Netns{}, err
	}
	return n, nil
}

// CurrentNetns opens the network namespace of the calling thread (normally the process's
// own, ztgo's "node" namespace).
func CurrentNetns() (Netns, error) {
	return OpenNetns("/proc/thread-self/ns/net")
}

func newNetns(f *os.File, source string) (Netns, error) {
	fd := int(f.Fd())
	if err := validateNetns(fd); err != nil {
		return Netns{}, fmt.Errorf("netns %s: %w", source, err)
	}
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return Netns{}, fmt.Errorf("netns %s: fstat: %w", source, err)
	}
	return Netns{h: &nsHandle{f: f, id: NetnsID{Dev: st.Dev, Ino: st.Ino}, source: source}}, nil
}

// ErrNotNetns is returned for a file that is not a network namespace.
var ErrNotNetns = errors.New("not a network namespace")

// validateNetns checks that fd is a network namespace: NS_GET_NSTYPE where the kernel has
// it (4.11+); on older kernels, which answer ENOTTY, the file must at least be on nsfs.
func validateNetns(fd int) error {
	typ, err := unix.IoctlRetInt(fd, unix.NS_GET_NSTYPE)
	if err == nil {
		if typ != unix.CLONE_NEWNET {
			return fmt.Errorf("%w: namespace type %#x", ErrNotNetns, typ)
		}
		return nil
	}
	if !errors.Is(err, unix.ENOTTY) {
		return fmt.Errorf("%w: NS_GET_NSTYPE: %v", ErrNotNetns, err)
	}
	var sfs unix.Statfs_t
	if err := unix.Fstatfs(fd, &sfs); err != nil {
		return fmt.Errorf("fstatfs: %w", err)
	}
	if sfs.Type != unix.NSFS_MAGIC {
		return fmt.Errorf("%w: file system type %#x", ErrNotNetns, sfs.Type)
	}
	return nil
}

// Do runs fn on an OS thread locked to a fresh goroutine that has entered the namespace.
// Sockets fn creates belong to the namespace for their whole life, so
// they keep working after Do returns. fn must not start goroutines that expect to run in the
// namespace, and should be short: it holds an OS thread.
//
// Afterwards the thread returns to the process's namespace (its main thread's). If it cannot,
// it is discarded (its goroutine exits while still locked), so no goroutine ever runs in a
// namespace it did not ask for.
func (n Netns) Do(fn func() error) error {
	return n.withFd(func(fd int) error {
		done := make(chan error, 1)
		go func() {
			runtime.LockOSThread()
			restored, err := n.enterRun(fd, fn)
			if restored {
				runtime.UnlockOSThread()
			}
			// Otherwise the thread stays locked and the runtime terminates it when this
			// goroutine exits.
			done <- err
		}()
		return <-done
	})
}

// processNetns is the process's own network namespace (its main thread's), opened once: the
// namespace every thread returns to after Do. ztunnel keeps the same handle for the same
// purpose. Opening it per call would cost more than the two setns calls together.
var processNetns = sync.OnceValues(func() (*os.File, error) {
	return os.OpenFile("/proc/self/ns/net", os.O_RDONLY|unix.O_CLOEXEC, 0)
})

// enterRun runs fn inside the namespace fd on the calling (locked) thread and moves the
// thread back to the process's namespace. restored reports whether that worked.
func (n Netns) enterRun(fd int, fn func() error) (restored bool, err error) {
	home, err := processNetns()
	if err != nil {
		return true, fmt.Errorf("open process netns: %w", err)
	}
	if err := unix.Setns(fd, unix.CLONE_NEWNET); err != nil {
		return true, fmt.Errorf("setns %s: %w", n.ID(), err)
	}
	fnErr := fn()
	if err := unix.Setns(int(home.Fd()), unix.CLONE_NEWNET); err != nil {
		return false, errors.Join(fnErr, fmt.Errorf("setns back: %w", err))
	}
	return true, fnErr
}

// Dup returns an independent handle to the same namespace, with its own fd: the caller
// closes it on its own schedule, whatever happens to n.
func (n Netns) Dup() (Netns, error) {
	fd, err := n.DupFd()
	if err != nil {
		return Netns{}, err
	}
	return Netns{h: &nsHandle{f: os.NewFile(uintptr(fd), n.h.source), id: n.h.id, source: n.h.source}}, nil
}

// DupFd returns a new close-on-exec fd for the namespace, owned by the caller: for code that
// takes a raw fd, such as a ZDS server passing the namespace to a proxy (SCM_RIGHTS).
func (n Netns) DupFd() (int, error) {
	fd := -1
	err := n.withFd(func(nsfd int) error {
		var err error
		if fd, err = unix.FcntlInt(uintptr(nsfd), unix.F_DUPFD_CLOEXEC, 0); err != nil {
			return fmt.Errorf("dup %s: %w", n.h.id, err)
		}
		return nil
	})
	return fd, err
}
