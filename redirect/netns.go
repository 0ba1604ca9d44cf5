package redirect

import (
	"fmt"
	"os"
	"sync"
)

// NetnsID identifies a network namespace: the (device, inode) pair of its nsfs file. Two
// handles to the same namespace, however they were opened, have the same NetnsID; ZDS uses
// it to tell a re-added pod with a new namespace from a repeated add.
type NetnsID struct {
	Dev uint64
	Ino uint64
}

func (id NetnsID) String() string { return fmt.Sprintf("net:[%d] dev %d", id.Ino, id.Dev) }

// Netns is an open handle to a pod's network namespace. It is a small value: copies refer to
// the same open file, and Close closes it for all of them, so the owner closes it once, after
// every SocketFactory and rule operation using it is done. Sockets already created in the
// namespace keep working after Close. The zero Netns is invalid.
type Netns struct{ h *nsHandle }

type nsHandle struct {
	mu     sync.RWMutex // guards f against Close while Do or a netlink dial uses the fd
	f      *os.File
	id     NetnsID
	source string // where it came from, for messages
}

// Valid reports whether n refers to an open namespace.
func (n Netns) Valid() bool {
	if n.h == nil {
		return false
	}
	n.h.mu.RLock()
	defer n.h.mu.RUnlock()
	return n.h.f != nil
}

// ID returns the namespace's (dev, inode) identity.
func (n Netns) ID() NetnsID {
	if n.h == nil {
		return NetnsID{}
	}
	return n.h.id
}

// String names the namespace for logs.
func (n Netns) String() string {
	if n.h == nil {
		return "netns:<invalid>"
	}
	return fmt.Sprintf("%s (%s)", n.h.id, n.h.source)
}

// Close releases the handle. Closing an invalid or already closed Netns is a no-op.
func (n Netns) Close() error {
	if n.h == nil {
		return nil
	}
	n.h.mu.Lock()
	defer n.h.mu.Unlock()
	if n.h.f == nil {
		return nil
	}
	err := n.h.f.Close()
	n.h.f = nil
	return err
}

// withFd runs fn with the namespace's fd held open.
func (n Netns) withFd(fn func(fd int) error) error {
	if n.h == nil {
		return fmt.Errorf("redirect: invalid netns")
	}
	n.h.mu.RLock()
	defer n.h.mu.RUnlock()
	if n.h.f == nil {
		return fmt.Errorf("redirect: %s is closed", n.h.id)
	}
	return fn(int(n.h.f.Fd()))
}
