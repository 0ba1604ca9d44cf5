package cluster

import (
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
)

// newTestProcess is a Process with no program behind it, fed through write.
func newTestProcess(t *testing.T) *Process {
	t.Helper()
	path := filepath.Join(t.TempDir(), "p.log")
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return &Process{name: "p", logPath: path, log: f, done: make(chan struct{}), changed: make(chan struct{})}
}

func TestProcessLines(t *testing.T) {
	p := newTestProcess(t)
	for _, chunk := range []string{"fir", "st\r\nsec", "ond\n\nthi", "rd"} {
		p.write([]byte(chunk))
	}
	if got, want := p.Lines(), []string{"first", "second", ""}; !slices.Equal(got, want) {
		t.Fatalf("lines %q, want %q", got, want)
	}
	if got := p.Tail(2); got != "second\n\nthird" {
		t.Fatalf("tail %q", got)
	}
	if n := p.LineCount(); n != 3 {
		t.Fatalf("line count %d", n)
	}
	b, err := os.ReadFile(p.logPath)
	if err != nil || string(b) != "first\r\nsecond\n\nthird" {
		t.Fatalf("log file %q, %v", b, err)
	}

	// A line written while WaitLog waits wakes it; a matcher may call p's methods.
	mark := p.LineCount()
	time.AfterFunc(50*time.Millisecond, func() { p.write([]byte(" line\nready\n")) })
	line, err := p.WaitLogSince(mark, wait, func(l string) bool { return p.LineCount() > 0 && strings.HasPrefix(l, "rea") })
	if err != nil || line != "ready" {
		t.Fatalf("WaitLogSince: %q, %v", line, err)
	}
	// Lines before the mark do not count.
	if _, err := p.WaitLogSince(mark, 50*time.Millisecond, func(l string) bool { return l == "first" }); err == nil {
		t.Fatal("WaitLogSince matched a line before the mark")
	}
	if _, err := p.WaitLog(wait, func(l string) bool { return l == "first" }); err != nil {
		t.Fatal(err)
	}
}

func TestProcessKeepsRecentLines(t *testing.T) {
	p := newTestProcess(t)
	const total = 2*maxLogLines + 17
	var b strings.Builder
	for i := range total {
		fmt.Fprintf(&b, "line %d\n", i)
		if b.Len() > 1<<16 {
			p.write([]byte(b.String()))
			b.Reset()
		}
	}
	p.write([]byte(b.String()))
	if n := p.LineCount(); n != total {
		t.Fatalf("line count %d, want %d", n, total)
	}
	lines := p.Lines()
	if len(lines) < maxLogLines || len(lines) > maxLogLines+maxLogLines/4 {
		t.Fatalf("%d lines held", len(lines))
	}
	if last := lines[len(lines)-1]; last != fmt.Sprintf("line %d", total-1) {
		t.Fatalf("last line %q", last)
	}
	if _, err := p.WaitLog(wait, func(l string) bool { return l == fmt.Sprintf("line %d", total-maxLogLines) }); err != nil {
		t.Fatal(err)
	}
}
