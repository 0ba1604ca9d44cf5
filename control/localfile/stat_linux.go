package localfile

import (
	"os"
	"syscall"
)

// fileIdentity adds what os.FileInfo lacks: the device and inode (a replaced file, e.g. a
// Kubernetes ConfigMap's symlink swap, has a new one) and the change time (which catches writes
// that restore the modification time).
func fileIdentity(fi os.FileInfo) (dev, ino uint64, ctimeNanos int64) {
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok {
		return 0, 0, 0
	}
	return uint64(st.Dev), uint64(st.Ino), st.Ctim.Nano() //nolint:unconvert // types vary by GOARCH
}
