// Package buildinfo holds the version stamped into the binary at link time.
package buildinfo

import (
	"runtime"
	"runtime/debug"
)

// Version is set with -ldflags "-X github.com/ztgo/ztgo/runtime/buildinfo.Version=...".
// It is a link-time constant in practice: nothing assigns it at run time.
var Version = "dev"

// String describes the build: version, Go version and VCS revision when known.
func String() string {
	s := "ztgo " + Version + " (" + runtime.Version()
	if bi, ok := debug.ReadBuildInfo(); ok {
		for _, kv := range bi.Settings {
			if kv.Key == "vcs.revision" && len(kv.Value) >= 12 {
				s += ", " + kv.Value[:12]
			}
		}
	}
	return s + ")"
}
