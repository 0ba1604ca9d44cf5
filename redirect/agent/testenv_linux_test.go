package agent

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"testing"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/ztgo/ztgo/redirect"
)

// requireRoot skips a privileged test when not root, unless CI=true, where CI is expected
// to run as root and a skip would hide the test: then it fails.
func requireRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() == 0 {
		return
	}
	const why = "needs root (network namespaces, bind mounts, nftables, setns)"
	if os.Getenv("CI") == "true" {
		t.Fatalf("privileged test %s but runs as uid %d with CI=true", why, os.Geteuid())
	}
	t.Skipf("skipping privileged test: %s; run `sudo make test-privileged`", why)
}

// newPodNetns creates a network namespace with lo up and bind-mounts it at dir/name, as
// `ip netns add` does under /var/run/netns. t.Cleanup unmounts it; the namespace
// disappears once nothing else holds it.
func newPodNetns(t testing.TB, dir, name string) string {
	t.Helper()
	path := filepath.Join(dir, name)
	if err := os.WriteFile(path, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		restored, err := unshareAndMount(path)
		if restored {
			runtime.UnlockOSThread()
		}
		errc <- err
	}()
	if err := <-errc; err != nil {
		t.Fatalf("create netns %s: %v", path, err)
	}
	t.Cleanup(func() { unmountNetns(t, path) })
	ns, err := redirect.OpenNetns(path)
	if err != nil {
		t.Fatal(err)
	}
	defer ns.Close()
	if err := ns.Do(func() error {
		lo, err := netlink.LinkByName("lo")
		if err != nil {
			return err
		}
		return netlink.LinkSetUp(lo)
	}); err != nil {
		t.Fatalf("lo up in %s: %v", path, err)
	}
	return path
}

// unshareAndMount gives the calling locked thread a new network namespace, bind-mounts it
// at path and moves the thread back; restored is false if the move back failed.
func unshareAndMount(path string) (restored bool, err error) {
	orig, err := os.Open("/proc/thread-self/ns/net")
	if err != nil {
		return true, err
	}
	defer orig.Close()
	if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
		return true, fmt.Errorf("unshare: %w", err)
	}
	merr := unix.Mount("/proc/thread-self/ns/net", path, "", unix.MS_BIND, "")
	if merr != nil {
		merr = fmt.Errorf("bind mount: %w", merr)
	}
	if err := unix.Setns(int(orig.Fd()), unix.CLONE_NEWNET); err != nil {
		return false, errors.Join(merr, fmt.Errorf("setns back: %w", err))
	}
	return true, merr
}

// unmountNetns removes a namespace's bind mount (if still mounted) and its file.
func unmountNetns(t testing.TB, path string) {
	t.Helper()
	if err := unix.Unmount(path, unix.MNT_DETACH); err != nil && !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOENT) {
		t.Errorf("unmount %s: %v", path, err)
	}
	_ = os.Remove(path)
}

func openNetns(t testing.TB, path string) redirect.Netns {
	t.Helper()
	ns, err := redirect.OpenNetns(path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ns.Close() })
	return ns
}

// openFds lists this process's open fds and what they refer to.
func openFds(t testing.TB) []string {
	t.Helper()
	es, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, e := range es {
		target, _ := os.Readlink(filepath.Join("/proc/self/fd", e.Name()))
		out = append(out, e.Name()+"="+target)
	}
	return out
}
