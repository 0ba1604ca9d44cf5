//go:build !linux

package upstream

import (
	"errors"
	"syscall"
)

func control(rc syscall.RawConn, mark int, transparent bool) error {
	if mark != 0 {
		return errors.New("SO_MARK is only supported on Linux")
	}
	return nil
}
