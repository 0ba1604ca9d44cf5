//go:build !linux

package relay

import "errors"

type kpipe struct{}

// burstSplice is never used without an event loop, which needs Linux.
func (d *dir) burstSplice() (bool, error) { return false, errors.New("relay: splice needs Linux") }
