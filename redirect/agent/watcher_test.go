package agent

import (
	"bytes"
	"context"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"
)

// logRecorder keeps the messages logged, for tests that count them.
type logRecorder struct {
	mu  sync.Mutex
	buf bytes.Buffer
	t   testing.TB
}

func (r *logRecorder) Write(b []byte) (int, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.t.Log(strings.TrimSuffix(string(b), "\n"))
	return r.buf.Write(b)
}

// count returns how many log lines contain all of subs.
func (r *logRecorder) count(subs ...string) int {
	r.mu.Lock()
	defer r.mu.Unlock()
	n := 0
	for line := range strings.Lines(r.buf.String()) {
		all := true
		for _, s := range subs {
			all = all && strings.Contains(line, s)
		}
		if all {
			n++
		}
	}
	return n
}

func newTestWatcher(t *testing.T) (*Watcher, string, *logRecorder) {
	t.Helper()
	dir := t.TempDir()
	rec := &logRecorder{t: t}
	w, err := NewWatcher(WatcherConfig{Dir: dir, Logger: slog.New(slog.NewTextHandler(rec, nil))})
	if err != nil {
		t.Fatal(err)
	}
	return w, dir, rec
}

func podYAML(uid, name, netns string) string {
	s := fmt.Sprintf("name: %s\nnamespace: ns\nnetns: %s\n", name, netns)
	if uid != "" {
		s = "uid: " + uid + "\n" + s
	}
	return s
}

// writeAtomic writes a file the recommended way: elsewhere, then renamed into place.
func writeAtomic(t *testing.T, dir, name, content string) {
	t.Helper()
	tmp := filepath.Join(dir, "."+name+".tmp")
	if err := os.WriteFile(tmp, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, filepath.Join(dir, name)); err != nil {
		t.Fatal(err)
	}
}

// evs renders events as "add uid name netns" / "delete uid name netns".
func evs(es []Event) []string {
	out := []string{}
	for _, e := range es {
		out = append(out, fmt.Sprintf("%s %s %s %s", e.Op, e.Pod.UID, e.Pod.Name, e.Pod.Netns))
	}
	return out
}

func expectScan(t *testing.T, w *Watcher, want ...string) []Event {
	t.Helper()
	es, err := w.Scan()
	if err != nil {
		t.Fatal(err)
	}
	if want == nil {
		want = []string{}
	}
	if got := evs(es); !slices.Equal(got, want) {
		t.Fatalf("scan: %q, want %q", got, want)
	}
	return es
}

func TestWatcherAddChangeDelete(t *testing.T) {
	w, dir, _ := newTestWatcher(t)
	expectScan(t, w)

	writeAtomic(t, dir, "a.yaml", podYAML("a", "pa", "/n/a"))
	writeAtomic(t, dir, "b.json", `{"uid": "b", "name": "pb", "namespace": "ns", "netns": "/n/b"}`)
	writeAtomic(t, dir, "c.yml", podYAML("", "pc", "/n/c"))
	es := expectScan(t, w, "add a pa /n/a", "add b pb /n/b", "add ns/pc pc /n/c")
	if es[0].File != filepath.Join(dir, "a.yaml") {
		t.Errorf("File = %q", es[0].File)
	}
	expectScan(t, w)

	// Ignored: other extensions, hidden files, directories.
	writeAtomic(t, dir, "d.txt", podYAML("d", "pd", "/n/d"))
	writeAtomic(t, dir, ".e.yaml", podYAML("e", "pe", "/n/e"))
	if err := os.Mkdir(filepath.Join(dir, "f.yaml"), 0o755); err != nil {
		t.Fatal(err)
	}
	expectScan(t, w)

	// A new netns or new info: delete, then add.
	writeAtomic(t, dir, "a.yaml", podYAML("a", "pa", "/n/a2"))
	writeAtomic(t, dir, "b.json", `{"uid": "b", "name": "pb2", "namespace": "ns", "netns": "/n/b"}`)
	expectScan(t, w, "delete a pa /n/a", "delete b pb /n/b", "add a pa /n/a2", "add b pb2 /n/b")

	// Same content rewritten, or the pod moved to another file name: nothing.
	writeAtomic(t, dir, "a.yaml", podYAML("a", "pa", "/n/a2"))
	if err := os.Rename(filepath.Join(dir, "c.yml"), filepath.Join(dir, "c2.yaml")); err != nil {
		t.Fatal(err)
	}
	expectScan(t, w)

	// A changed UID is another pod.
	writeAtomic(t, dir, "c2.yaml", podYAML("c", "pc", "/n/c"))
	expectScan(t, w, "delete ns/pc pc /n/c", "add c pc /n/c")

	if err := os.Remove(filepath.Join(dir, "a.yaml")); err != nil {
		t.Fatal(err)
	}
	expectScan(t, w, "delete a pa /n/a2")
}

// TestWatcherInPlaceRewrite: a same-size rewrite in place, within the file system's
// timestamp granularity, is still seen.
func TestWatcherInPlaceRewrite(t *testing.T) {
	w, dir, _ := newTestWatcher(t)
	path := filepath.Join(dir, "a.yaml")
	if err := os.WriteFile(path, []byte(podYAML("a", "pa", "/n/1")), 0o644); err != nil {
		t.Fatal(err)
	}
	expectScan(t, w, "add a pa /n/1")
	fi, _ := os.Stat(path)
	if err := os.WriteFile(path, []byte(podYAML("a", "pa", "/n/2")), 0o644); err != nil {
		t.Fatal(err)
	}
	// Force the same modification time, as a coarse clock would.
	if err := os.Chtimes(path, fi.ModTime(), fi.ModTime()); err != nil {
		t.Fatal(err)
	}
	expectScan(t, w, "delete a pa /n/1", "add a pa /n/2")
}

func TestWatcherBadFile(t *testing.T) {
	w, dir, rec := newTestWatcher(t)
	path := filepath.Join(dir, "a.yaml")

	// Half written: logged once, ignored, picked up once complete.
	if err := os.WriteFile(path, []byte("name: pa\nnamespace: ns\nnet"), 0o644); err != nil {
		t.Fatal(err)
	}
	expectScan(t, w)
	expectScan(t, w)
	if n := rec.count("pod file invalid; ignored until it changes", "a.yaml"); n != 1 {
		t.Fatalf("logged %d times, want once", n)
	}
	writeAtomic(t, dir, "a.yaml", podYAML("a", "pa", "/n/a"))
	expectScan(t, w, "add a pa /n/a")

	// A once valid file that turns invalid keeps its pod, with one log naming the field.
	writeAtomic(t, dir, "a.yaml", podYAML("a", "pa", "/n/a")+"color: blue\n")
	expectScan(t, w)
	expectScan(t, w)
	if n := rec.count("keeping the pod as last read", "a.yaml", `unknown field \"color\"`); n != 1 {
		t.Fatalf("logged %d times, want once", n)
	}
	writeAtomic(t, dir, "a.yaml", podYAML("a", "pa", "/n/a2"))
	expectScan(t, w, "delete a pa /n/a", "add a pa /n/a2")

	// Unreadable (root reads anything, so use a file over the size limit).
	writeAtomic(t, dir, "big.yaml", strings.Repeat("#", maxPodFile+1))
	expectScan(t, w)
	if n := rec.count("big.yaml", "more than 65536"); n != 1 {
		t.Fatalf("logged %d times, want once", n)
	}
}

func TestWatcherDuplicateUID(t *testing.T) {
	w, dir, rec := newTestWatcher(t)
	writeAtomic(t, dir, "b.yaml", podYAML("x", "pb", "/n/b"))
	expectScan(t, w, "add x pb /n/b")

	// The second file with the same UID is rejected, even though it sorts first.
	writeAtomic(t, dir, "a.yaml", podYAML("x", "pa", "/n/a"))
	expectScan(t, w)
	expectScan(t, w)
	if n := rec.count("another file defines the same uid", "a.yaml", "defined_by="+filepath.Join(dir, "b.yaml")); n != 1 {
		t.Fatalf("logged %d times, want once", n)
	}
	// Within one scan, the first by name wins.
	writeAtomic(t, dir, "d.yaml", podYAML("y", "pd", "/n/d"))
	writeAtomic(t, dir, "c.yaml", podYAML("y", "pc", "/n/c"))
	expectScan(t, w, "add y pc /n/c")
	if n := rec.count("another file defines the same uid", "d.yaml"); n != 1 {
		t.Fatalf("logged %d times, want once", n)
	}

	// When the owner goes, the rejected file takes over.
	if err := os.Remove(filepath.Join(dir, "b.yaml")); err != nil {
		t.Fatal(err)
	}
	expectScan(t, w, "delete x pb /n/b", "add x pa /n/a")
}

func TestWatcherSymlinks(t *testing.T) {
	// A Kubernetes volume: name -> ..data/name, ..data -> a timestamped directory swapped
	// atomically.
	w, dir, _ := newTestWatcher(t)
	for i, netns := range []string{"/n/1", "/n/2"} {
		ts := filepath.Join(dir, fmt.Sprintf("..v%d", i))
		if err := os.Mkdir(ts, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(ts, "a.yaml"), []byte(podYAML("a", "pa", netns)), 0o644); err != nil {
			t.Fatal(err)
		}
		tmp := filepath.Join(dir, "..data_tmp")
		if err := os.Symlink(filepath.Base(ts), tmp); err != nil {
			t.Fatal(err)
		}
		if err := os.Rename(tmp, filepath.Join(dir, "..data")); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Symlink("..data/a.yaml", filepath.Join(dir, "a.yaml")); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink("..data/gone.yaml", filepath.Join(dir, "dangling.yaml")); err != nil {
		t.Fatal(err)
	}
	expectScan(t, w, "add a pa /n/2")
}

func TestWatcherDirectoryError(t *testing.T) {
	w, dir, _ := newTestWatcher(t)
	writeAtomic(t, dir, "a.yaml", podYAML("a", "pa", "/n/a"))
	expectScan(t, w, "add a pa /n/a")
	moved := dir + ".moved"
	if err := os.Rename(dir, moved); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(moved) })
	if _, err := w.Scan(); err == nil {
		t.Fatal("scan of a missing directory: no error")
	}
	// Back: nothing changed.
	if err := os.Rename(moved, dir); err != nil {
		t.Fatal(err)
	}
	expectScan(t, w)
}

func TestWatcherRun(t *testing.T) {
	dir := t.TempDir()
	w, err := NewWatcher(WatcherConfig{Dir: dir, Interval: 5 * time.Millisecond, Logger: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	got := make(chan []Event, 100)
	done := make(chan error)
	go func() { done <- w.Run(ctx, func(es []Event) { got <- es }) }()
	if es := <-got; len(es) != 0 {
		t.Fatalf("first scan of an empty directory: %v", evs(es))
	}
	writeAtomic(t, dir, "a.yaml", podYAML("a", "pa", "/n/a"))
	for es := range got {
		if len(es) > 0 {
			if want := []string{"add a pa /n/a"}; !slices.Equal(evs(es), want) {
				t.Fatalf("got %q, want %q", evs(es), want)
			}
			break
		}
	}
	cancel()
	if err := <-done; err != context.Canceled {
		t.Fatalf("Run returned %v", err)
	}
}

func TestNewWatcherConfig(t *testing.T) {
	if _, err := NewWatcher(WatcherConfig{}); err == nil {
		t.Error("no directory: no error")
	}
	if _, err := NewWatcher(WatcherConfig{Dir: "/x", Interval: -1}); err == nil {
		t.Error("negative interval: no error")
	}
}
