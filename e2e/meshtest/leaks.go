package meshtest

import (
	"bytes"
	"runtime"
	"testing"
	"time"
)

// leakGrace is how long goroutines of a stopped node get to end before CheckLeaks fails.
const leakGrace = 5 * time.Second

// CheckLeaks fails the test if a goroutine running code of ztgo's packages (a stack frame or
// creator in github.com/ztgo/ztgo/, outside e2e/, which holds the tests and this package)
// is still alive leakGrace after the test's other cleanups have run. It fails at once if such
// goroutines run already. Call it first in a test, before starting any node, so that its check
// runs after the nodes have been stopped; once they run, RequireZtgoGoroutines proves that the
// check can see them.
func CheckLeaks(t testing.TB) {
	t.Helper()
	if g := ztgoGoroutines(); len(g) > 0 {
		t.Fatalf("%d ztgo goroutines are running before the test started, first:\n%s", len(g), g[0])
	}
	t.Cleanup(func() {
		deadline := time.Now().Add(leakGrace)
		for {
			g := ztgoGoroutines()
			if len(g) == 0 {
				return
			}
			if time.Now().After(deadline) {
				t.Errorf("%d ztgo goroutines outlived the test, first:\n%s", len(g), g[0])
				return
			}
			time.Sleep(20 * time.Millisecond)
		}
	})
}

// RequireZtgoGoroutines fails the test unless a goroutine of ztgo's packages is running.
// Called while nodes run, it shows that CheckLeaks sees their goroutines, so it could fail.
func RequireZtgoGoroutines(t testing.TB) {
	t.Helper()
	if len(ztgoGoroutines()) == 0 {
		t.Fatal("the leak check sees no goroutine of the running node; it could never fail")
	}
}

var (
	ztgoPrefix = []byte("github.com/ztgo/ztgo/")
	e2ePrefix  = []byte("github.com/ztgo/ztgo/e2e/")
)

// ztgoGoroutines returns the stacks of live goroutines with a line (a frame or "created by")
// in ztgo's packages outside e2e/.
func ztgoGoroutines() []string {
	buf := make([]byte, 1<<20)
	for {
		n := runtime.Stack(buf, true)
		if n < len(buf) {
			buf = buf[:n]
			break
		}
		buf = make([]byte, 2*len(buf)) // truncated: a goroutine could be missing
	}
	var out []string
	for _, g := range bytes.Split(buf, []byte("\n\n")) {
		for _, line := range bytes.Split(g, []byte("\n")) {
			if bytes.Contains(line, ztgoPrefix) && !bytes.Contains(line, e2ePrefix) {
				out = append(out, string(g))
				break
			}
		}
	}
	return out
}
