package zds

import (
	"fmt"
	"os"
)

// NetnsID identifies a network namespace by the device and inode of its nsfs file: two fds
// name the same namespace exactly when their IDs are equal. ztunnel keys a pod's proxy by
// the same pair.
type NetnsID struct {
	Dev, Ino uint64
}

func (id NetnsID) String() string { return fmt.Sprintf("net:[%d] dev %d", id.Ino, id.Dev) }

// Netns is a pod's network namespace as the node agent sent it: an open fd, checked to be a
// network namespace. The client owns it (see Handler.AddPod).
type Netns struct {
	f  *os.File
	id NetnsID
}

// ID returns the namespace's device and inode.
func (n *Netns) ID() NetnsID { return n.id }

// Dev returns the device of the namespace's nsfs file.
func (n *Netns) Dev() uint64 { return n.id.Dev }

// Ino returns the namespace's inode number, as in "net:[<ino>]".
func (n *Netns) Ino() uint64 { return n.id.Ino }

// Fd returns the namespace's fd, for setns(2) or netlink; it is valid while the client
// holds the pod.
func (n *Netns) Fd() int { return int(n.f.Fd()) }

// File returns the namespace's fd as a file; the handler must not close it.
func (n *Netns) File() *os.File { return n.f }

func (n *Netns) String() string { return n.id.String() }

func (n *Netns) close() { _ = n.f.Close() }
