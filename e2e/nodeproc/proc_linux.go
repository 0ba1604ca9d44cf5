package nodeproc

import "syscall"

// childAttrs puts a ztgo node in its own process group, so a Ctrl-C in the terminal reaches
// only the program that started it, which then stops the nodes in order; and has the kernel
// send the node SIGTERM should that program die without stopping it.
func childAttrs() *syscall.SysProcAttr {
	return &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGTERM}
}
