//go:build !linux

package zds

import (
	"errors"
	"net"
)

var errUnsupported = errors.New("zds: in-pod capture needs Linux")

var oobSize = 0

func readRequest(*net.UnixConn, []byte, []byte) (request, error) { return request{}, errUnsupported }

func newNetns(int) (*Netns, error) { return nil, errUnsupported }

func closeFd(int) {}

// Dup returns a new fd for the namespace; on this platform there is none.
func (n *Netns) Dup() (int, error) { return -1, errUnsupported }
