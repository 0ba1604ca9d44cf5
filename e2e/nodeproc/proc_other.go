//go:build !linux

package nodeproc

import "syscall"

// childAttrs: outside Linux the nodes keep the default process attributes.
func childAttrs() *syscall.SysProcAttr { return nil }
