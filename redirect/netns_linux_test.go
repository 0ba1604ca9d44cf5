package redirect

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"testing"

	"golang.org/x/sys/unix"
)

func inode(t *testing.T, path string) NetnsID {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	return NetnsID{Dev: st.Dev, Ino: st.Ino}
}

// allThreadsIn reports threads of this process that are not in namespace id.
func threadsNotIn(t *testing.T, id NetnsID) []string {
	t.Helper()
	tasks, err := os.ReadDir("/proc/self/task")
	if err != nil {
		t.Fatal(err)
	}
	var bad []string
	for _, task := range tasks {
		var st unix.Stat_t
		if err := unix.Stat(filepath.Join("/proc/self/task", task.Name(), "ns/net"), &st); err != nil {
			continue // the thread exited
		}
		if (NetnsID{Dev: st.Dev, Ino: st.Ino}) != id {
			bad = append(bad, task.Name())
		}
	}
	return bad
}

func TestPrivilegedNetnsHandles(t *testing.T) {
	requireRoot(t)
	host, err := CurrentNetns()
	if err != nil {
		t.Fatal(err)
	}
	defer host.Close()
	if got, want := host.ID(), inode(t, "/proc/self/ns/net"); got != want {
		t.Fatalf("current netns %s, /proc/self/ns/net %s", got, want)
	}

	pod := newTestNetns(t)
	if pod.ID() == host.ID() {
		t.Fatal("new namespace has the host's identity")
	}

	t.Run("same namespace, same identity, however opened", func(t *testing.T) {
		dup, err := pod.DupFd()
		if err != nil {
			t.Fatal(err)
		}
		fromFD, err := NetnsFromFD(dup)
		if err != nil {
			t.Fatal(err)
		}
		defer fromFD.Close()
		if fromFD.ID() != pod.ID() {
			t.Fatalf("fd handle %s, want %s", fromFD.ID(), pod.ID())
		}
		viaProc, err := OpenNetns(fmt.Sprintf("/proc/self/fd/%d", dup))
		if err != nil {
			t.Fatal(err)
		}
		defer viaProc.Close()
		if viaProc.ID() != pod.ID() {
			t.Fatalf("/proc path handle %s, want %s", viaProc.ID(), pod.ID())
		}
		// Dup's handle has an fd of its own: it outlives the handle it came from.
		src, err := pod.Dup()
		if err != nil {
			t.Fatal(err)
		}
		own, err := src.Dup()
		if err != nil {
			t.Fatal(err)
		}
		defer own.Close()
		src.Close()
		if !own.Valid() || own.ID() != pod.ID() {
			t.Fatalf("dup valid %v, %s, want %s", own.Valid(), own.ID(), pod.ID())
		}
		if err := own.Do(func() error { return nil }); err != nil {
			t.Fatalf("Do on the dup after the original closed: %v", err)
		}
		if _, err := src.DupFd(); err == nil {
			t.Fatal("DupFd of a closed handle succeeded")
		}
	})

	t.Run("named namespace: a bind mount of the nsfs file", func(t *testing.T) {
		// What `ip netns add` leaves under /var/run/netns, made in a private directory so
		// that concurrent test runs never share or leave a system directory.
		path := filepath.Join(t.TempDir(), "ztgo-test")
		if err := os.WriteFile(path, nil, 0o444); err != nil {
			t.Fatal(err)
		}
		if err := pod.withFd(func(fd int) error {
			return unix.Mount(fmt.Sprintf("/proc/self/fd/%d", fd), path, "", unix.MS_BIND, "")
		}); err != nil {
			t.Fatalf("bind mount: %v", err)
		}
		t.Cleanup(func() {
			if err := unix.Unmount(path, unix.MNT_DETACH); err != nil {
				t.Errorf("unmount %s: %v", path, err)
			}
		})
		named, err := OpenNetns(path)
		if err != nil {
			t.Fatal(err)
		}
		defer named.Close()
		if named.ID() != pod.ID() {
			t.Fatalf("named handle %s, want %s", named.ID(), pod.ID())
		}
	})

	t.Run("rejects what is not a network namespace", func(t *testing.T) {
		if _, err := OpenNetns("/proc/self/ns/uts"); !errors.Is(err, ErrNotNetns) {
			t.Errorf("uts namespace: %v", err)
		}
		file := filepath.Join(t.TempDir(), "plain")
		if err := os.WriteFile(file, []byte("x"), 0o600); err != nil {
			t.Fatal(err)
		}
		if _, err := OpenNetns(file); !errors.Is(err, ErrNotNetns) {
			t.Errorf("regular file: %v", err)
		}
		fd, err := unix.Open(file, unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := NetnsFromFD(fd); !errors.Is(err, ErrNotNetns) {
			t.Errorf("regular file fd: %v", err)
		}
		if _, err := unix.FcntlInt(uintptr(fd), unix.F_GETFD, 0); !errors.Is(err, unix.EBADF) {
			t.Errorf("rejected fd %d left open (%v)", fd, err)
		}
		if _, err := OpenNetns("/nonexistent/netns"); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("missing path: %v", err)
		}
	})

	t.Run("Do enters and leaves", func(t *testing.T) {
		other := newTestNetns(t)
		var wg sync.WaitGroup
		errs := make(chan error, 64)
		for i := range 64 {
			ns := pod
			if i%2 == 1 {
				ns = other
			}
			wg.Go(func() {
				errs <- ns.Do(func() error {
					var st unix.Stat_t
					if err := unix.Stat("/proc/thread-self/ns/net", &st); err != nil {
						return err
					}
					if got := (NetnsID{Dev: st.Dev, Ino: st.Ino}); got != ns.ID() {
						return fmt.Errorf("inside Do: in %s, want %s", got, ns.ID())
					}
					return nil
				})
			})
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			if err != nil {
				t.Error(err)
			}
		}
		if bad := threadsNotIn(t, host.ID()); len(bad) > 0 {
			t.Fatalf("threads %v left outside the host namespace", bad)
		}
		want := errors.New("from fn")
		if err := pod.Do(func() error { return want }); !errors.Is(err, want) {
			t.Fatalf("Do returned %v, want fn's error", err)
		}
	})

	t.Run("closed handle", func(t *testing.T) {
		n := newTestNetns(t)
		if err := n.Close(); err != nil {
			t.Fatal(err)
		}
		if n.Valid() {
			t.Fatal("closed handle is valid")
		}
		if err := n.Close(); err != nil {
			t.Fatalf("second close: %v", err)
		}
		if err := n.Do(func() error { return nil }); err == nil {
			t.Fatal("Do on a closed handle succeeded")
		}
		if _, err := NewSocketFactory(n, SocketConfig{}); err == nil {
			t.Fatal("socket factory on a closed handle")
		}
		if _, err := NewSocketFactory(Netns{}, SocketConfig{}); err == nil {
			t.Fatal("socket factory on the zero handle")
		}
	})
}
