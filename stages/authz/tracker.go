package authz

import (
	"context"
	"log/slog"

	"github.com/puzpuzpuz/xsync/v3"

	"github.com/ztgo/ztgo/control/snapshot"
)

// Tracker holds the established inbound flows so that a policy change can close the ones it now
// denies. Add and Remove are called per connection from many goroutines, so flows live in a
// concurrent map keyed by flow id rather than behind one lock.
type Tracker struct {
	log   *slog.Logger
	flows *xsync.MapOf[uint64, *trackedFlow]
}

type trackedFlow struct {
	dstUID  string
	conn    Conn
	closeFn func(Decision)
}

// NewTracker returns an empty tracker. A nil log discards.
func NewTracker(log *slog.Logger) *Tracker {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Tracker{log: log, flows: xsync.NewMapOf[uint64, *trackedFlow]()}
}

// Add tracks flow id towards the workload dstUID. closeFn is called at most once, from a
// Recheck that denies the flow, and the flow is then no longer tracked. Call Add before the
// flow's first Evaluate (see the package doc); closeFn must therefore be safe to call before the
// flow is fully set up. Ids must be unique among tracked flows: adding an id again replaces the
// earlier flow, whose closeFn will not be called.
func (t *Tracker) Add(id uint64, dstUID string, c Conn, closeFn func(Decision)) {
	t.flows.Store(id, &trackedFlow{dstUID: dstUID, conn: c, closeFn: closeFn})
}

// Remove stops tracking flow id; a close that a concurrent Recheck has already claimed still
// runs.
func (t *Tracker) Remove(id uint64) { t.flows.Delete(id) }

// Len is the number of tracked flows.
func (t *Tracker) Len() int { return t.flows.Size() }

// Recheck evaluates every tracked flow against snap and closes those it denies, returning how
// many it closed. A flow whose destination workload is not in snap is left alone: the workload
// is usually being replaced, and its connections end with it.
func (t *Tracker) Recheck(snap *snapshot.Snapshot) int {
	closed := 0
	// Range holds no lock while calling back, so closeFn may call Remove or Add.
	t.flows.Range(func(id uint64, f *trackedFlow) bool {
		dst := snap.WorkloadByUID(f.dstUID)
		if dst == nil {
			t.log.Debug("authz recheck: destination workload not in snapshot, leaving flow open",
				"flow", id, "dst_workload", f.dstUID, "conn", f.conn.String(), "snapshot", snap.Version())
			return true
		}
		d := Evaluate(snap, dst, f.conn)
		for _, r := range d.DryRun {
			t.log.Debug("authz recheck: dry-run", "result", r.Message, "flow", id, "policy", r.Policy, "conn", f.conn.String())
		}
		if d.Allow {
			return true
		}
		if !t.claim(id, f) {
			return true // removed or re-added meanwhile: not ours to close
		}
		closed++
		t.log.Info("connection closed because it's no longer allowed after a policy update",
			"flow", id, "conn", f.conn.String(), "dst_workload", f.dstUID,
			"reason", d.Reason, "snapshot", snap.Version())
		if f.closeFn != nil {
			f.closeFn(d)
		}
		return true
	})
	return closed
}

// claim removes flow id if it is still f. Whoever removes the entry owns the close, which makes
// closeFn run at most once even when Rechecks overlap or race with Remove.
func (t *Tracker) claim(id uint64, f *trackedFlow) bool {
	claimed := false
	t.flows.Compute(id, func(old *trackedFlow, loaded bool) (*trackedFlow, bool) {
		if !loaded {
			return nil, true // nothing to delete; returning false would store nil
		}
		if old != f {
			return old, false
		}
		claimed = true
		return nil, true
	})
	return claimed
}

// Run rechecks the tracked flows after every publish to store until ctx is done. It rechecks
// once at start, because a snapshot published before it subscribed would otherwise go unseen.
// Publishes that arrive during a recheck are coalesced into one more recheck of the newest
// snapshot.
func (t *Tracker) Run(ctx context.Context, store *snapshot.Store) {
	wake, unsubscribe := store.Subscribe()
	defer unsubscribe()
	var last *snapshot.Snapshot
	for {
		if snap := store.Load(); snap != last {
			last = snap
			if n := t.Recheck(snap); n > 0 {
				t.log.Debug("authz recheck done", "closed", n, "tracked", t.Len(), "snapshot", snap.Version())
			}
		}
		select {
		case <-ctx.Done():
			return
		case <-wake:
		}
	}
}
