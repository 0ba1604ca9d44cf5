package cluster

import (
	"os"
	"testing"
)

// RequireRoot skips a test that needs a Cluster when not running as root, unless CI=true:
// CI runs as root, and a skip there would hide the test, so it fails instead.
func RequireRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() == 0 {
		return
	}
	const why = "needs root (network namespaces, veth pairs, mounts under /var/run/netns)"
	if os.Getenv("CI") == "true" {
		t.Fatalf("privileged test %s but runs as uid %d with CI=true", why, os.Geteuid())
	}
	t.Skipf("skipping privileged test: %s; run `sudo make test-privileged`", why)
}
