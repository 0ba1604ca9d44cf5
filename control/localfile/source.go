package localfile

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"sync"
	"time"

	"github.com/ztgo/ztgo/control/snapshot"
)

const (
	// DefaultPollInterval is how often a file Source checks its file for changes.
	DefaultPollInterval = time.Second
	// MaxFileSize bounds the config a Source reads; a local config is a few kilobytes.
	MaxFileSize = 64 << 20
	// racyWindow: a file modified this recently may change again without its stat changing
	// (timestamps have a granularity), so its content is re-hashed on every poll until it ages.
	racyWindow = 2 * time.Second
)

// Option configures a Source.
type Option func(*options)

type options struct {
	pollInterval time.Duration
	metrics      *Metrics
}

// WithPollInterval sets how often a file Source stats its file (default DefaultPollInterval).
func WithPollInterval(d time.Duration) Option {
	return func(o *options) { o.pollInterval = d }
}

// WithMetrics makes the Source count its loads in m (see NewMetrics). Without it the Source
// counts into metrics that are not registered anywhere.
func WithMetrics(m *Metrics) Option {
	return func(o *options) { o.metrics = m }
}

// Source feeds a snapshot.Store from a local config: a file (LOCAL_XDS_PATH), watched for
// changes, or inline text (LOCAL_XDS), loaded once.
type Source struct {
	path    string // "" for an inline source
	inline  []byte
	store   *snapshot.Store
	log     *slog.Logger
	poll    time.Duration
	metrics *Metrics

	mu      sync.Mutex // guards started, cancel and done
	started bool
	cancel  context.CancelFunc
	done    chan struct{}

	// Watch state: written by Start, then only by the watcher goroutine.
	last      fileState
	settled   bool     // last is old enough that an unchanged stat means unchanged content
	tried     [32]byte // hash of the content last loaded, good or bad
	published [32]byte // hash of the content in force
	failing   bool     // the file could not be read at the last poll

	afterCheck func() // test hook, called after each poll
}

// fileState is what a poll compares to decide whether to read the file again.
type fileState struct {
	mtime, ctime int64
	size         int64
	dev, ino     uint64
}

// NewFile returns a Source for the config file at path. log may be nil.
func NewFile(path string, store *snapshot.Store, log *slog.Logger, opts ...Option) (*Source, error) {
	if path == "" {
		return nil, errors.New("new local config source: empty path")
	}
	return newSource(path, nil, store, log, opts)
}

// NewInline returns a Source for config text given inline (LOCAL_XDS). log may be nil.
func NewInline(text string, store *snapshot.Store, log *slog.Logger, opts ...Option) (*Source, error) {
	return newSource("", []byte(text), store, log, opts)
}

func newSource(path string, inline []byte, store *snapshot.Store, log *slog.Logger, opts []Option) (*Source, error) {
	o := options{pollInterval: DefaultPollInterval}
	for _, opt := range opts {
		opt(&o)
	}
	if store == nil {
		return nil, errors.New("new local config source: nil store")
	}
	if o.pollInterval <= 0 {
		return nil, fmt.Errorf("new local config source: poll interval %v must be positive", o.pollInterval)
	}
	if o.metrics == nil {
		m, err := NewMetrics(nil)
		if err != nil {
			return nil, fmt.Errorf("new local config source: %w", err)
		}
		o.metrics = m
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if path != "" {
		log = log.With("path", path)
	} else {
		log = log.With("source", "LOCAL_XDS")
	}
	return &Source{path: path, inline: inline, store: store, log: log, poll: o.pollInterval, metrics: o.metrics}, nil
}

// Start loads the config and publishes it. It fails if the config cannot be read or is invalid:
// the process should refuse to start. A file Source then watches the file until Stop is called or
// ctx ends.
func (s *Source) Start(ctx context.Context) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.started {
		return errors.New("start local config source: already started")
	}
	if s.path == "" {
		if err := s.apply(s.inline); err != nil {
			return fmt.Errorf("load local config from LOCAL_XDS: %w", err)
		}
		s.started = true
		return nil
	}
	st, data, err := s.read()
	if err != nil {
		s.metrics.reloadsError.Inc()
		return fmt.Errorf("load local config: %w", err)
	}
	if err := s.apply(data); err != nil {
		return fmt.Errorf("load local config %s: %w", s.path, err)
	}
	s.tried = sha256.Sum256(data)
	s.published = s.tried
	s.note(st)
	wctx, cancel := context.WithCancel(ctx)
	s.cancel, s.done, s.started = cancel, make(chan struct{}), true
	go s.watch(wctx)
	return nil
}

// Stop ends the watcher and waits for it. It may be called more than once, and before Start.
func (s *Source) Stop() {
	s.mu.Lock()
	cancel, done := s.cancel, s.done
	s.mu.Unlock()
	if cancel == nil {
		return
	}
	cancel()
	<-done
}

func (s *Source) watch(ctx context.Context) {
	defer close(s.done)
	t := time.NewTicker(s.poll)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			s.check()
			if s.afterCheck != nil {
				s.afterCheck()
			}
		}
	}
}

// check polls the file once and reloads it if its content changed.
func (s *Source) check() {
	st, err := s.stat()
	if err != nil {
		s.readFailed(err)
		return
	}
	if s.settled && st == s.last {
		return
	}
	st, data, err := s.read()
	if err != nil {
		s.readFailed(err)
		return
	}
	if s.failing {
		s.failing = false
		s.log.Info("local config file is readable again")
	}
	s.note(st)
	h := sha256.Sum256(data)
	if h == s.tried {
		return
	}
	s.tried = h
	if h == s.published {
		s.log.Info("local config file is back to the config in force; nothing to publish")
		return
	}
	if err := s.apply(data); err != nil {
		s.log.Error("local config reload rejected; the last good config stays in force", "error", err)
		return
	}
	s.published = h
}

// readFailed logs and counts a file that cannot be read, once until it can be read again.
func (s *Source) readFailed(err error) {
	s.last, s.settled = fileState{}, false
	if s.failing {
		return
	}
	s.failing = true
	s.metrics.reloadsError.Inc()
	s.log.Error("cannot read local config file; the last good config stays in force", "error", err)
}

// note records the stat of the content just read.
func (s *Source) note(st fileState) {
	s.last = st
	s.settled = time.Since(time.Unix(0, st.mtime)) > racyWindow
}

func (s *Source) stat() (fileState, error) {
	fi, err := os.Stat(s.path)
	if err != nil {
		return fileState{}, err
	}
	if !fi.Mode().IsRegular() {
		return fileState{}, fmt.Errorf("%s is not a regular file", s.path)
	}
	dev, ino, ctime := fileIdentity(fi)
	return fileState{mtime: fi.ModTime().UnixNano(), ctime: ctime, size: fi.Size(), dev: dev, ino: ino}, nil
}

// read returns the file's content and its stat from before the read (so a change during the
// read is seen at the next poll).
func (s *Source) read() (fileState, []byte, error) {
	st, err := s.stat()
	if err != nil {
		return fileState{}, nil, err
	}
	f, err := os.Open(s.path)
	if err != nil {
		return fileState{}, nil, err
	}
	defer f.Close()
	data, err := io.ReadAll(io.LimitReader(f, MaxFileSize+1))
	if err != nil {
		return fileState{}, nil, fmt.Errorf("read %s: %w", s.path, err)
	}
	if len(data) > MaxFileSize {
		return fileState{}, nil, fmt.Errorf("read %s: larger than %d bytes", s.path, MaxFileSize)
	}
	return st, data, nil
}

// apply loads data and publishes it, counting the result.
func (s *Source) apply(data []byte) error {
	snap, err := Load(data)
	if err != nil {
		s.metrics.reloadsError.Inc()
		return err
	}
	// Counted before the publish: whoever sees the new snapshot sees the count too.
	s.metrics.reloadsOK.Inc()
	s.metrics.lastSuccess.SetToCurrentTime()
	s.store.Publish(snap)
	s.log.Info("local config loaded", "version", snap.Version(), "workloads", len(snap.Workloads()),
		"services", len(snap.Services()), "policies", len(snap.Policies()))
	if staged := snap.StagedServices(); len(staged) > 0 {
		s.log.Warn("workloads name services that the local config does not define", "services", staged)
	}
	return nil
}
