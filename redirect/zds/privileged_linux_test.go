package zds

import (
	"fmt"
	"net"
	"os"
	"runtime"
	"slices"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/ztgo/ztgo/redirect"
)

// requireRoot skips a test that needs root, or fails it under CI, which runs as root.
func requireRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() == 0 {
		return
	}
	if os.Getenv("CI") == "true" {
		t.Fatal("this test needs root (network namespaces) and CI=true: CI must run as root")
	}
	t.Skip("skipping: this test needs root to create network namespaces (run as root, or `make test-privileged`)")
}

// newNetnsFile creates a network namespace and returns an fd for it. The namespace is
// entered on a locked thread that is never unlocked, so the thread ends with its goroutine
// and no other goroutine runs in the new namespace.
func newNetnsFile(t *testing.T) *os.File {
	t.Helper()
	type result struct {
		f   *os.File
		err error
	}
	ch := make(chan result, 1)
	go func() {
		runtime.LockOSThread()
		if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
			ch <- result{err: fmt.Errorf("unshare: %w", err)}
			return
		}
		f, err := os.Open(fmt.Sprintf("/proc/self/task/%d/ns/net", unix.Gettid()))
		ch <- result{f, err}
	}()
	r := <-ch
	if r.err != nil {
		t.Fatal(r.err)
	}
	t.Cleanup(func() { r.f.Close() })
	return r.f
}

func fileID(t *testing.T, f *os.File) redirect.NetnsID {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err != nil {
		t.Fatal(err)
	}
	return redirect.NetnsID{Dev: uint64(st.Dev), Ino: uint64(st.Ino)}
}

// interfacesIn lists the interfaces seen from inside ns.
func interfacesIn(ns redirect.Netns) ([]string, error) {
	var names []string
	err := ns.Do(func() error {
		ifs, err := net.Interfaces()
		for _, i := range ifs {
			names = append(names, i.Name)
		}
		return err
	})
	return names, err
}

// TestPrivilegedNetns drives the client with real, distinct network namespaces: the handler
// gets the namespace the agent sent (same device and inode) and can enter it; a re-add with
// the same namespace changes nothing; a re-add with a new one replaces the pod.
func TestPrivilegedNetns(t *testing.T) {
	requireRoot(t)
	ns1, ns2 := newNetnsFile(t), newNetnsFile(t)
	id1, id2 := fileID(t, ns1), fileID(t, ns2)
	if id1 == id2 {
		t.Fatal("two new namespaces share an id")
	}

	a := newTestAgent(t)
	h := newFakeHandler(t)
	var seen []redirect.NetnsID
	h.inspect = func(uid string, ns redirect.Netns) error {
		// Runs under h.mu, from the client's goroutine.
		seen = append(seen, ns.ID())
		names, err := interfacesIn(ns)
		if err != nil {
			return err
		}
		if !slices.Equal(names, []string{"lo"}) {
			return fmt.Errorf("interfaces in %v: %v, want only lo", ns, names)
		}
		return nil
	}
	c, reg := testClient(t, a, h)
	conn := a.accept()
	conn.mustAck(addReq("a"), int(ns1.Fd()))
	conn.mustSnapshot()
	expectReady(t, c)
	h.expect("add a", "snapshot a")

	// The same namespace through another fd: nothing to do.
	dup, err := unix.Dup(int(ns1.Fd()))
	if err != nil {
		t.Fatal(err)
	}
	conn.mustAck(addReq("a"), dup)
	unix.Close(dup)
	h.expect()

	// The pod's sandbox was recreated with a new namespace.
	conn.mustAck(addReq("a"), int(ns2.Fd()))
	h.expect("del a", "add a")

	conn.mustDel("a")
	h.expect("del a")
	if want := []redirect.NetnsID{id1, id2}; !slices.Equal(seen, want) {
		t.Errorf("handler saw namespaces %v, want %v", seen, want)
	}
	expectMetrics(t, reg, 0, 0, 2, 2)
}
