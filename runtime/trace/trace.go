// Package trace records where each connection spends its time, stage by stage.
//
// Every flow carries a Record: for each stage it passes through, the time it entered the
// stage's mailbox, the time a worker picked it up and the time the stage finished. When a flow
// is finished (established, or failed) the Recorder observes the per-stage durations into the
// ztgo_stage_duration_seconds and ztgo_stage_queue_seconds histograms and keeps the record in
// bounded rings: the most recent flows, the slowest ones, the slowest of the last minute and
// the latest failures. It also keeps a window of the last minute, per stage and direction,
// from which the admin dashboard reads p50 and p99 per second (Window). All of it is bounded
// memory, whatever the load.
//
// # Sharding
//
// Finish runs once per flow on every CPU, so on that path flows of different shards share no
// lock and write no common cache line. The state is split into K shards, K the next power of
// two at or above GOMAXPROCS within [2, 16] (runtime/shard's Count). Finish and
// ObserveFirstByte take the shard a runtime/shard Picker gives: the one the calling CPU (its P)
// last took, as far as the Go scheduler keeps a goroutine on its P. So a shard's mutex and
// lines mostly stay with one CPU, instead of moving between CPUs on almost every flow, as they
// did when the flow ID chose the shard (BenchmarkFinishParallel on 2 CPUs: 330 ns a flow
// then, 125 ns now). Nothing depends on which shard a call gets: the readers below are exact
// (Recent within its bound) whatever the placement. Each shard, allocated on first use, has
// its own mutex and its own:
//
//   - ring of recent records, ceil(size/K) of them: the size given to NewRecorder is a budget
//     for the whole Recorder, not per shard;
//   - failure ring (the last 32 failures of the shard) and all-time slowest records (the
//     min(size, 64) slowest of the shard), so that the merged views are exact;
//   - slowest records of each ten-second slot of the window (10 per slot);
//   - share of each (stage, direction) histogram: plain bucket counts and a sum in integer
//     nanoseconds, written under the shard's mutex (Finish holds it anyway) and padded to
//     their own cache lines;
//   - current second of each (stage, direction) window series.
//
// The failure, slowest and slowest-of-the-window sets are whole in every shard (a shard may
// hold all of the Recorder's slowest), about 150 KiB a shard once full: that, not the recent
// rings, is what grows with K.
//
// The one-minute window itself is kept once, under the Recorder's own mutex: a shard adds a
// flow's work time to its current second and moves that second into the window when it sees
// the next one (once per second per shard and series), or when a reader asks. A sample is
// always in exactly one of the two places, so the window is exact and does not grow K-fold.
// The same mutex guards the registry of (stage, direction) series, taken by a shard only the
// first time it meets a series.
//
// Readers are rare (the admin server and its dashboard) and pay for the split: Recent and
// Failures merge the shards newest first by the time Finish ran (monotonic, read under the
// shard's mutex so that each shard's rings are in that order; ties broken by the higher flow
// ID), Slowest and SlowestWindow by duration; Window first moves every shard's current second
// into the window. Each shard is locked in turn, never all at once. The Prometheus collector
// adds the shards' counts up at scrape time. Slowest, Failures, SlowestWindow, Window and the
// histograms give what a single lock would have given. So does Recent for up to
// ceil(size/K) records; past that, when the latest flows went unevenly to the shards, it skips
// the records a busier shard has dropped already. With shards kept by CPU, that is the usual
// case when the load is uneven over the CPUs (a single busy connection, say): Recent is then
// exact for its first ceil(size/K) records only.
package trace

import (
	"time"
)

// MaxSpans bounds the stages one record holds.
const MaxSpans = 6

// Span is one stage of one flow.
type Span struct {
	Stage string
	// Queued is when the flow entered the stage's mailbox; Start when a worker took it; End
	// when the stage was done with it.
	Queued, Start, End time.Time
}

// Wait is the time spent in the mailbox; Work the time spent in the stage.
func (s Span) Wait() time.Duration { return s.Start.Sub(s.Queued) }
func (s Span) Work() time.Duration { return s.End.Sub(s.Start) }

// Record is the trace of one flow. It is written by one goroutine at a time (the flow moves
// from stage to stage), so it needs no lock.
type Record struct {
	Timeline
	Src, Dst    string
	SrcIdentity string
	DstIdentity string
	TraceParent string
}

// Timeline is the part of a Record a flow carries while it lives: when it entered and left
// each stage. The endpoints are added once, when the flow is recorded (Record), so that a
// long-lived flow does not hold them twice.
type Timeline struct {
	ID          uint64
	Direction   string
	Begin       time.Time
	Established time.Time
	Outcome     string
	spans       [MaxSpans]span
	n           uint8
}

// span is a Span kept small: every flow carries one Record, and idle flows are most of a
// node's memory. Times are nanoseconds after Begin, plus one, so that zero means not set.
type span struct {
	stage              string
	queued, start, end int64
}

// at is t as stored in a span.
func (r *Timeline) at(t time.Time) int64 {
	if r.Begin.IsZero() {
		r.Begin = t
	}
	return max(int64(t.Sub(r.Begin)), 0) + 1
}

// time is the inverse of at.
func (r *Timeline) time(v int64) time.Time {
	if v == 0 {
		return time.Time{}
	}
	return r.Begin.Add(time.Duration(v - 1))
}

// Enter marks the flow queued for stage at t. Begin, when not set yet, becomes t.
func (r *Timeline) Enter(stage string, t time.Time) {
	if r.n == MaxSpans {
		return
	}
	r.spans[r.n] = span{stage: stage, queued: r.at(t)}
	r.n++
}

// StartStage marks the current stage taken by a worker.
func (r *Timeline) StartStage(t time.Time) {
	if r.n > 0 {
		r.spans[r.n-1].start = r.at(t)
	}
}

// Leave marks the current stage done.
func (r *Timeline) Leave(t time.Time) {
	if r.n > 0 {
		r.spans[r.n-1].end = r.at(t)
	}
}

// NumSpans is how many stages the record holds; Span(i) is the i-th, in order.
func (r *Timeline) NumSpans() int { return int(r.n) }

// Span returns the i-th recorded stage.
func (r *Timeline) Span(i int) Span {
	s := &r.spans[i]
	return Span{Stage: s.stage, Queued: r.time(s.queued), Start: r.time(s.start), End: r.time(s.end)}
}

// Spans returns the recorded stages in order, in a new slice.
func (r *Timeline) Spans() []Span {
	out := make([]Span, r.n)
	for i := range out {
		out[i] = r.Span(i)
	}
	return out
}

// Total is the time from the first stage to establishment (or to the end, if it failed).
func (r *Timeline) Total() time.Duration {
	if r.n == 0 {
		return 0
	}
	end := r.Established
	if end.IsZero() {
		end = r.time(r.spans[r.n-1].end)
	}
	return end.Sub(r.Begin)
}
