//go:build !linux

package relay

import (
	"errors"
	"syscall"
)

type kpipe struct{}

// initSplice keeps a TCP-to-TCP direction copying through a buffer: no splice(2) here.
func (d *dir) initSplice(syscall.RawConn) {}

// burstSplice is never used: initSplice never picks it.
func (d *dir) burstSplice() (bool, error) { return false, errors.New("relay: splice needs Linux") }
