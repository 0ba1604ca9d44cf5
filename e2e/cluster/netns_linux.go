package cluster

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"runtime"
	"sort"
	"strings"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/ztgo/ztgo/redirect"
)

// prepareNetnsDir creates /var/run/netns and makes it a shared mount point, as
// `ip netns add` does: bind mounts made under it later then propagate into the mount
// namespaces of processes started with `ip netns exec`. The setup lock keeps parallel runs
// from stacking two bind mounts on the directory.
func prepareNetnsDir() error {
	if err := os.MkdirAll(lockDir, 0o755); err != nil {
		return fmt.Errorf("create %s: %w", lockDir, err)
	}
	unlock, err := lockFile(filepath.Join(lockDir, ".setup.lock"), true)
	if err != nil {
		return err
	}
	defer unlock()
	if err := os.MkdirAll(netnsDir, 0o755); err != nil {
		return fmt.Errorf("create %s: %w", netnsDir, err)
	}
	err = unix.Mount("", netnsDir, "none", unix.MS_SHARED|unix.MS_REC, "")
	if errors.Is(err, unix.EINVAL) { // not a mount point yet
		if err := unix.Mount(netnsDir, netnsDir, "none", unix.MS_BIND|unix.MS_REC, ""); err != nil {
			return fmt.Errorf("bind mount %s on itself: %w", netnsDir, err)
		}
		err = unix.Mount("", netnsDir, "none", unix.MS_SHARED|unix.MS_REC, "")
	}
	if err != nil {
		return fmt.Errorf("make %s a shared mount: %w", netnsDir, err)
	}
	return nil
}

// lockFile takes an exclusive flock on path, creating the file; wait says whether to wait
// for it. The returned func releases the lock (the file stays).
func lockFile(path string, wait bool) (unlock func(), err error) {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		return nil, fmt.Errorf("open lock %s: %w", path, err)
	}
	how := unix.LOCK_EX
	if !wait {
		how |= unix.LOCK_NB
	}
	if err := flock(f, how); err != nil {
		f.Close()
		return nil, fmt.Errorf("lock %s: %w", path, err)
	}
	return func() { f.Close() }, nil
}

func flock(f *os.File, how int) error {
	for {
		err := unix.Flock(int(f.Fd()), how)
		if !errors.Is(err, unix.EINTR) {
			return err
		}
	}
}

// runLock is the flock a live Cluster holds on lockDir/<id>.lock: while it is held, no
// CleanupStale touches the run's namespaces.
type runLock struct {
	f    *os.File
	path string
}

// acquireRunLock creates and locks the lock file of a new run. The file is locked before it
// appears under its name (a locked temporary file is hard-linked into place), so no
// CleanupStale ever sees it unlocked. It must not exist yet: a leftover lock of a crashed run
// with the same id makes the caller pick another id.
func acquireRunLock(id string) (*runLock, error) {
	path := filepath.Join(lockDir, id+".lock")
	f, err := os.CreateTemp(lockDir, ".tmp-"+id+"-")
	if err != nil {
		return nil, fmt.Errorf("create run lock: %w", err)
	}
	defer os.Remove(f.Name())
	if err := flock(f, unix.LOCK_EX|unix.LOCK_NB); err != nil {
		f.Close()
		return nil, fmt.Errorf("lock %s: %w", f.Name(), err)
	}
	if err := os.Link(f.Name(), path); err != nil {
		f.Close()
		return nil, fmt.Errorf("create run lock: %w", err)
	}
	return &runLock{f: f, path: path}, nil
}

// release removes the lock file, then drops the lock: by then the run's namespaces are gone.
func (l *runLock) release() error {
	if l == nil || l.f == nil {
		return nil
	}
	err := os.Remove(l.path)
	if errors.Is(err, fs.ErrNotExist) {
		err = nil
	}
	l.f.Close()
	l.f = nil
	if err != nil {
		return fmt.Errorf("remove run lock: %w", err)
	}
	return nil
}

// createNamedNetns creates a new network namespace and bind-mounts it at path, like
// `ip netns add`. The calling goroutine's thread is not affected: the work runs on a locked
// thread that is thrown away if it cannot return to the process's namespace.
func createNamedNetns(path string) error {
	done := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		restored, err := createNamedNetnsLocked(path)
		if restored {
			runtime.UnlockOSThread()
		}
		done <- err
	}()
	if err := <-done; err != nil {
		return fmt.Errorf("create netns %s: %w", path, err)
	}
	return nil
}

func createNamedNetnsLocked(path string) (restored bool, err error) {
	home, err := os.Open("/proc/thread-self/ns/net")
	if err != nil {
		return true, err
	}
	defer home.Close()
	f, err := os.OpenFile(path, os.O_RDONLY|os.O_CREATE|os.O_EXCL, 0o444)
	if err != nil {
		return true, err
	}
	f.Close()
	if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
		os.Remove(path)
		return true, fmt.Errorf("unshare: %w", err)
	}
	mountErr := unix.Mount("/proc/thread-self/ns/net", path, "none", unix.MS_BIND, "")
	if mountErr != nil {
		mountErr = fmt.Errorf("bind mount: %w", mountErr)
		os.Remove(path)
	}
	if err := unix.Setns(int(home.Fd()), unix.CLONE_NEWNET); err != nil {
		return false, errors.Join(mountErr, fmt.Errorf("setns back: %w", err))
	}
	return true, mountErr
}

// deleteNamedNetns unmounts and removes path, like `ip netns delete`. The namespace itself
// goes away once no process, socket or handle refers to it any more. What is already gone is
// not an error.
func deleteNamedNetns(path string) error {
	err := unix.Unmount(path, unix.MNT_DETACH)
	if err != nil && !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOENT) {
		return fmt.Errorf("unmount netns %s: %w", path, err)
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("remove netns %s: %w", path, err)
	}
	return nil
}

// sysctl is one /proc/sys/net setting; optional ones are skipped when the kernel lacks them
// (IPv6 disabled at boot).
type sysctl struct {
	key, value string
	optional   bool
}

// writeSysctls applies settings inside ns: /proc/sys/net resolves to the namespace of the
// thread that opens the file.
func writeSysctls(ns redirect.Netns, settings ...sysctl) error {
	return ns.Do(func() error {
		for _, s := range settings {
			err := os.WriteFile("/proc/sys/"+s.key, []byte(s.value), 0o644)
			if err != nil && !(s.optional && errors.Is(err, fs.ErrNotExist)) {
				return fmt.Errorf("sysctl %s=%s: %w", s.key, s.value, err)
			}
		}
		return nil
	})
}

// readSysctl reads one setting inside ns.
func readSysctl(ns redirect.Netns, key string) (string, error) {
	var b []byte
	err := ns.Do(func() error {
		var err error
		b, err = os.ReadFile("/proc/sys/" + key)
		return err
	})
	if err != nil {
		return "", fmt.Errorf("read sysctl %s: %w", key, err)
	}
	return string(trimNewline(b)), nil
}

func trimNewline(b []byte) []byte {
	for len(b) > 0 && (b[len(b)-1] == '\n' || b[len(b)-1] == '\r') {
		b = b[:len(b)-1]
	}
	return b
}

// ifaceSysctls are the per-interface settings of every link this package creates.
func ifaceSysctls(iface string) []sysctl {
	return []sysctl{{key: "net/ipv4/conf/" + iface + "/rp_filter", value: "0"}}
}

// baseSysctls are applied to every namespace before any link is added, so new links inherit
// the defaults.
func baseSysctls() []sysctl {
	return []sysctl{
		{key: "net/ipv4/conf/all/rp_filter", value: "0"},
		{key: "net/ipv4/conf/default/rp_filter", value: "0"},
		{key: "net/ipv4/conf/lo/rp_filter", value: "0"},
		{key: "net/ipv6/conf/all/disable_ipv6", value: "1", optional: true},
		{key: "net/ipv6/conf/default/disable_ipv6", value: "1", optional: true},
	}
}

// withNetlink runs fn with an rtnetlink handle whose socket lives in ns.
func withNetlink(ns redirect.Netns, fn func(h *netlink.Handle) error) error {
	var h *netlink.Handle
	if err := ns.Do(func() error {
		var err error
		h, err = netlink.NewHandle(unix.NETLINK_ROUTE)
		return err
	}); err != nil {
		return fmt.Errorf("netlink handle: %w", err)
	}
	defer h.Close()
	return fn(h)
}

// deleteLinks deletes every link of ns except lo. Deleting one end of a veth deletes the
// pair, so nothing this package wired to the namespace survives it.
func deleteLinks(ns redirect.Netns) error {
	return withNetlink(ns, func(h *netlink.Handle) error {
		links, err := h.LinkList()
		if err != nil {
			return fmt.Errorf("list links: %w", err)
		}
		var errs []error
		for _, l := range links {
			if l.Attrs().Name == "lo" {
				continue
			}
			if err := h.LinkDel(l); err != nil && !errors.Is(err, unix.ENODEV) {
				errs = append(errs, fmt.Errorf("delete link %s: %w", l.Attrs().Name, err))
			}
		}
		return errors.Join(errs...)
	})
}

// CleanupStale removes the namespaces that runs of this package left behind when they
// crashed: those named "zt<id>-<name>" exactly as this package names them, whose run no
// longer holds its lock (/var/run/ztgo-cluster/<id>.lock). Namespaces of live runs, in this
// process or any other, and every namespace not named by this package are left alone. Inside a
// stale namespace every link but lo is deleted before it is unmounted, so a process that still
// holds the namespace keeps nothing wired to the rest. It returns the names it removed.
func CleanupStale() ([]string, error) {
	entries, err := os.ReadDir(netnsDir)
	if errors.Is(err, fs.ErrNotExist) {
		entries = nil
	} else if err != nil {
		return nil, fmt.Errorf("cleanup stale: read %s: %w", netnsDir, err)
	}
	byRun := map[string][]string{}
	for _, e := range entries {
		if id := runIDOf(e.Name()); id != "" {
			byRun[id] = append(byRun[id], e.Name())
		}
	}
	// Lock files of runs that left no namespace (crashed before creating one, or after
	// removing them all) are stale too.
	if locks, err := os.ReadDir(lockDir); err == nil {
		for _, e := range locks {
			if id, ok := lockRunID(e.Name()); ok {
				if _, seen := byRun[id]; !seen {
					byRun[id] = nil
				}
			}
		}
	}
	ids := make([]string, 0, len(byRun))
	for id := range byRun {
		ids = append(ids, id)
	}
	sort.Strings(ids)
	var removed []string
	var errs []error
	for _, id := range ids {
		names, err := cleanupRun(id, byRun[id])
		removed = append(removed, names...)
		if err != nil {
			errs = append(errs, fmt.Errorf("cleanup stale run %s: %w", id, err))
		}
	}
	return removed, errors.Join(errs...)
}

// lockRunID returns the run id of a lock file name "<id>.lock".
func lockRunID(file string) (string, bool) {
	id, ok := strings.CutSuffix(file, ".lock")
	if !ok || runIDOf(netnsName(id, "x")) != id {
		return "", false
	}
	return id, true
}

// cleanupRun removes the namespaces of run id if its lock can be taken (or has no file).
func cleanupRun(id string, names []string) ([]string, error) {
	path := filepath.Join(lockDir, id+".lock")
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		// No lock file: a run creates it before its first namespace and removes it after its
		// last, so these namespaces belong to no live run.
	case err != nil:
		return nil, fmt.Errorf("open lock: %w", err)
	default:
		defer f.Close()
		if err := flock(f, unix.LOCK_EX|unix.LOCK_NB); errors.Is(err, unix.EWOULDBLOCK) {
			return nil, nil // live
		} else if err != nil {
			return nil, fmt.Errorf("lock %s: %w", path, err)
		}
	}
	var removed []string
	var errs []error
	for _, name := range names {
		p := filepath.Join(netnsDir, name)
		if ns, err := redirect.OpenNetns(p); err == nil {
			if err := deleteLinks(ns); err != nil {
				errs = append(errs, fmt.Errorf("%s: %w", name, err))
			}
			ns.Close()
		}
		if err := deleteNamedNetns(p); err != nil {
			errs = append(errs, err)
			continue
		}
		removed = append(removed, name)
	}
	if f != nil && len(errs) == 0 {
		if err := os.Remove(path); err != nil && !errors.Is(err, fs.ErrNotExist) {
			errs = append(errs, fmt.Errorf("remove lock: %w", err))
		}
	}
	return removed, errors.Join(errs...)
}
