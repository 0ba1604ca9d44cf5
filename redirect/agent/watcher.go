package agent

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"
)

// DefaultPollInterval is how often the pods directory is scanned.
const DefaultPollInterval = 500 * time.Millisecond

// racyWindow: a file modified this recently before the previous scan is read again even if
// its size, modification time and inode look unchanged, because file timestamps are coarse
// (a jiffy) and a same-size rewrite within one tick would otherwise go unseen (git's
// "racily clean" problem).
const racyWindow = 2 * time.Second

// EventOp is what happened to a pod.
type EventOp uint8

// The events a scan reports. A pod whose file changed (another netns, name, namespace or
// service account) is reported as PodDeleted with the old spec, then PodAdded with the new.
const (
	PodAdded EventOp = iota + 1
	PodDeleted
)

func (o EventOp) String() string {
	switch o {
	case PodAdded:
		return "add"
	case PodDeleted:
		return "delete"
	}
	return fmt.Sprintf("EventOp(%d)", uint8(o))
}

// Event is one change to the set of pods.
type Event struct {
	Op  EventOp
	Pod PodSpec
	// File is the path of the file that defines the pod (PodAdded) or defined it (PodDeleted).
	File string
}

// WatcherConfig configures a Watcher; zero fields take the defaults.
type WatcherConfig struct {
	// Dir is the pods directory.
	Dir string
	// Interval is the time between scans in Run; default DefaultPollInterval.
	Interval time.Duration
	// Logger receives one message per unreadable or invalid file version and per rejected
	// duplicate UID; nil discards.
	Logger *slog.Logger
}

// Watcher turns the files of the pods directory into pod events by polling: no inotify,
// so it works on every file system and with every way of writing files. Scan and Run must
// not be called concurrently.
type Watcher struct {
	dir      string
	interval time.Duration
	log      *slog.Logger

	files    map[string]*fileState // by file name
	reported map[string]reported   // by UID: what the last events said exists
	lastScan time.Time             // start of the previous scan
	dirErr   string                // last directory error Run logged
}

// fileState is what the watcher knows of one file.
type fileState struct {
	info fs.FileInfo // from the scan that last read the file
	data []byte      // content last read
	spec *PodSpec    // last valid content; nil if it never parsed
	bad  string      // why the current content is not used ("" if it is)
	dup  string      // the file owning spec.UID, while this one is rejected as a duplicate
}

type reported struct {
	spec PodSpec
	file string
}

// NewWatcher validates cfg.
func NewWatcher(cfg WatcherConfig) (*Watcher, error) {
	if cfg.Dir == "" {
		return nil, errors.New("new pod watcher: no directory")
	}
	if cfg.Interval == 0 {
		cfg.Interval = DefaultPollInterval
	}
	if cfg.Interval < 0 {
		return nil, fmt.Errorf("new pod watcher: negative interval %v", cfg.Interval)
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	return &Watcher{
		dir:      cfg.Dir,
		interval: cfg.Interval,
		log:      cfg.Logger,
		files:    map[string]*fileState{},
		reported: map[string]reported{},
	}, nil
}

// isPodFile says whether a directory entry name is a pod file: *.yaml, *.yml or *.json,
// not hidden (editors' and tools' temporary files, and Kubernetes volume internals, start
// with a dot).
func isPodFile(name string) bool {
	if strings.HasPrefix(name, ".") {
		return false
	}
	switch filepath.Ext(name) {
	case ".yaml", ".yml", ".json":
		return true
	}
	return false
}

// Scan reads the directory once and returns what changed since the previous scan: first
// every PodDeleted, then every PodAdded, each sorted by UID. An error reading the directory
// itself changes nothing (the pods stay as they were) and is returned.
//
// Per file: a file that cannot be read or does not parse is logged once per content and
// ignored; if an earlier version of it was valid, that pod stays as it was, so a
// half-written file never removes a pod. A file whose UID another file already defines is
// rejected (logged once) until that other file goes away or changes its UID.
func (w *Watcher) Scan() ([]Event, error) {
	start := time.Now()
	entries, err := os.ReadDir(w.dir)
	if err != nil {
		return nil, fmt.Errorf("scan pods dir: %w", err)
	}
	seen := map[string]bool{}
	for _, e := range entries {
		name := e.Name()
		if !isPodFile(name) {
			continue
		}
		if w.readFile(name) {
			seen[name] = true
		}
	}
	for name := range w.files {
		if !seen[name] {
			delete(w.files, name)
		}
	}
	w.lastScan = start
	return w.diff(w.owners()), nil
}

// readFile refreshes the state of one pod file and says whether it exists as a regular
// file (following symbolic links, as a Kubernetes volume's files are).
func (w *Watcher) readFile(name string) bool {
	path := filepath.Join(w.dir, name)
	info, err := os.Stat(path)
	if err != nil || !info.Mode().IsRegular() {
		// Removed since the listing, a dangling link or not a file: absent.
		return false
	}
	st := w.files[name]
	if st == nil {
		st = &fileState{}
		w.files[name] = st
	} else if st.info != nil && os.SameFile(st.info, info) && st.info.Size() == info.Size() &&
		st.info.ModTime().Equal(info.ModTime()) && info.ModTime().Before(w.lastScan.Add(-racyWindow)) {
		return true
	}
	data, err := readLimited(path)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		delete(w.files, name)
		return false
	case err != nil:
		w.reject(st, path, err.Error())
		// Read again next scan.
		st.info = nil
		return true
	}
	st.info = info
	if st.data != nil && bytes.Equal(data, st.data) {
		return true
	}
	st.data = data
	spec, err := ParsePodSpec(data)
	if err != nil {
		w.reject(st, path, err.Error())
		return true
	}
	st.spec, st.bad = &spec, ""
	return true
}

// reject records why a file's content is not used and logs it, once per reason.
func (w *Watcher) reject(st *fileState, path, why string) {
	if st.bad == why {
		return
	}
	st.bad = why
	if st.spec != nil {
		w.log.Error("pod file invalid; keeping the pod as last read", "file", path, "uid", st.spec.UID, "error", why)
	} else {
		w.log.Error("pod file invalid; ignored until it changes", "file", path, "error", why)
	}
}

func readLimited(path string) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	data, err := io.ReadAll(io.LimitReader(f, maxPodFile+1))
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", path, err)
	}
	return data, nil
}

// owners decides which file defines each UID: the file that defined it before keeps it;
// other UIDs go to the first file by name; any other file claiming a taken UID is rejected.
func (w *Watcher) owners() map[string]string {
	own := map[string]string{}
	for uid, r := range w.reported {
		if st := w.files[r.file]; st != nil && st.spec != nil && st.spec.UID == uid {
			own[uid] = r.file
		}
	}
	for _, name := range slices.Sorted(maps.Keys(w.files)) {
		st := w.files[name]
		if st.spec == nil {
			continue
		}
		uid := st.spec.UID
		owner, taken := own[uid]
		switch {
		case !taken:
			own[uid] = name
			st.dup = ""
		case owner == name:
			st.dup = ""
		case st.dup != owner:
			st.dup = owner
			w.log.Error("pod file rejected: another file defines the same uid",
				"file", filepath.Join(w.dir, name), "uid", uid, "defined_by", filepath.Join(w.dir, owner))
		}
	}
	return own
}

// diff turns the new owners into events against what was reported before.
func (w *Watcher) diff(own map[string]string) []Event {
	var dels, adds []Event
	for _, uid := range slices.Sorted(maps.Keys(w.reported)) {
		old := w.reported[uid]
		name, ok := own[uid]
		if ok && *w.files[name].spec == old.spec {
			w.reported[uid] = reported{spec: old.spec, file: name}
			continue
		}
		dels = append(dels, Event{Op: PodDeleted, Pod: old.spec, File: filepath.Join(w.dir, old.file)})
		delete(w.reported, uid)
	}
	for _, uid := range slices.Sorted(maps.Keys(own)) {
		if _, ok := w.reported[uid]; ok {
			continue
		}
		name := own[uid]
		spec := *w.files[name].spec
		w.reported[uid] = reported{spec: spec, file: name}
		adds = append(adds, Event{Op: PodAdded, Pod: spec, File: filepath.Join(w.dir, name)})
	}
	return append(dels, adds...)
}

// Run scans now and then every interval until ctx ends, and calls fn with the events of
// every successful scan, even when there are none: the first call says the directory has
// been read. A directory error is logged (once until it changes) and retried at the next
// tick. Run returns ctx's error.
func (w *Watcher) Run(ctx context.Context, fn func([]Event)) error {
	t := time.NewTicker(w.interval)
	defer t.Stop()
	for {
		evs, err := w.Scan()
		if err != nil {
			if msg := err.Error(); msg != w.dirErr {
				w.dirErr = msg
				w.log.Error("cannot read the pods directory; pods stay as they are", "dir", w.dir, "error", err)
			}
		} else {
			if w.dirErr != "" {
				w.log.Info("pods directory readable again", "dir", w.dir)
				w.dirErr = ""
			}
			fn(evs)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-t.C:
		}
	}
}
