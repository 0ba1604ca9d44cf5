package snapshot

import (
	"log/slog"
	"sync"
	"sync/atomic"
)

// Store publishes snapshots. Load is a single atomic load and never blocks; Publish replaces the
// current snapshot and wakes subscribers.
type Store struct {
	// VerifyImmutable turns on the debug check of the rule that nothing mutates a published
	// snapshot: Publish fingerprints every snapshot it publishes and, at the next Publish,
	// fingerprints the previous one again and reports what changed (see Verify). It costs a walk
	// of the whole snapshot and a few bytes per object per Publish, none of it on the lookup
	// path, so it is off by default. Set it before the first Publish; cmd/ztgo sets it when
	// DebugFromEnv(os.Getenv) holds (ZTGO_DEBUG_SNAPSHOT=1).
	VerifyImmutable bool
	// Logger receives the violations Publish finds. With nil they are only returned by Verify.
	Logger *slog.Logger

	cur     atomic.Pointer[Snapshot]
	version atomic.Uint64

	// pubMu serialises Publish and Verify, so versions are stored in the order they are
	// stamped and the debug fingerprint always belongs to the current snapshot.
	pubMu sync.Mutex
	print *fingerprint // of the current snapshot, when VerifyImmutable
	found []error      // violations Publish found that Verify has not returned yet
	lost  int          // violations dropped because found was full

	mu   sync.Mutex
	subs map[chan struct{}]struct{}
}

// NewStore returns a store holding the empty snapshot.
func NewStore() *Store {
	st := &Store{subs: map[chan struct{}]struct{}{}}
	empty, _ := Build(Config{})
	st.cur.Store(empty)
	return st
}

// Load returns the current snapshot.
func (st *Store) Load() *Snapshot { return st.cur.Load() }

// Publish makes s current, stamping it with the next version. s must come fresh from Build or
// Apply and must not have been published before.
func (st *Store) Publish(s *Snapshot) {
	st.pubMu.Lock()
	if st.VerifyImmutable {
		st.checkBeforePublish(s)
	}
	s.version = st.version.Add(1)
	st.cur.Store(s)
	st.pubMu.Unlock()

	st.mu.Lock()
	for ch := range st.subs {
		select {
		case ch <- struct{}{}:
		default: // a wake-up is already pending; the subscriber will Load the newest.
		}
	}
	st.mu.Unlock()
}

// Subscribe returns a channel that receives a value after each Publish (coalesced: a slow
// subscriber sees one wake-up for several publishes) and a function that ends the subscription.
func (st *Store) Subscribe() (<-chan struct{}, func()) {
	ch := make(chan struct{}, 1)
	st.mu.Lock()
	st.subs[ch] = struct{}{}
	st.mu.Unlock()
	return ch, func() {
		st.mu.Lock()
		delete(st.subs, ch)
		st.mu.Unlock()
	}
}
