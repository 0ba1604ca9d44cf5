// Package trace records where each connection spends its time, stage by stage.
//
// Every flow carries a Record: for each stage it passes through, the time it entered the
// stage's mailbox, the time a worker picked it up and the time the stage finished. When a flow
// is finished (closed, or failed) the Recorder observes the per-stage durations into the
// ztgo_stage_duration_seconds histogram and keeps the record in bounded rings: the most recent
// flows, the slowest ones, the slowest of the last minute and the latest failures. It also
// keeps a window of the last minute, per stage and direction, from which the admin dashboard
// reads p50 and p99 per second (Window). All of it is bounded memory, whatever the load.
package trace

import (
	"sort"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// MaxSpans bounds the stages one record holds.
const MaxSpans = 8

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
	ID          uint64
	Direction   string
	Src, Dst    string
	SrcIdentity string
	DstIdentity string
	TraceParent string
	Begin       time.Time
	Established time.Time
	Outcome     string
	spans       [MaxSpans]Span
	n           int
}

// Enter marks the flow queued for stage at t.
func (r *Record) Enter(stage string, t time.Time) {
	if r.n == MaxSpans {
		return
	}
	r.spans[r.n] = Span{Stage: stage, Queued: t}
	r.n++
}

// Begin marks the current stage taken by a worker.
func (r *Record) StartStage(t time.Time) {
	if r.n > 0 {
		r.spans[r.n-1].Start = t
	}
}

// Leave marks the current stage done.
func (r *Record) Leave(t time.Time) {
	if r.n > 0 {
		r.spans[r.n-1].End = t
	}
}

// Spans returns the recorded stages in order.
func (r *Record) Spans() []Span { return r.spans[:r.n] }

// Total is the time from the first stage to establishment (or to the end, if it failed).
func (r *Record) Total() time.Duration {
	if r.n == 0 {
		return 0
	}
	end := r.Established
	if end.IsZero() {
		end = r.spans[r.n-1].End
	}
	return end.Sub(r.Begin)
}

// Recorder aggregates finished records.
type Recorder struct {
	hist *prometheus.HistogramVec
	wait *prometheus.HistogramVec
	// now is time.Now, replaced in tests.
	now func() time.Time

	mu      sync.Mutex
	recent  []Record
	next    int
	full    bool
	slowest []Record // sorted, slowest first
	size    int
	nslow   int
	series  []*series
	slow    [slowSlots]slowSlot
	fails   [failureRing]Record
	nfail   int
}

// maxSlowest bounds the all-time slowest records kept (Slowest).
const maxSlowest = 64

// NewRecorder keeps the last size records and the min(size, 64) slowest ones, plus the window
// of the last minute (Window, SlowestWindow) and the latest failures (Failures), and registers
// its histograms on reg (if not nil).
func NewRecorder(size int, reg prometheus.Registerer) (*Recorder, error) {
	if size <= 0 {
		size = 256
	}
	buckets := []float64{.00001, .000025, .00005, .0001, .00025, .0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10}
	r := &Recorder{
		hist: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "ztgo_stage_duration_seconds",
			Help:    "Time a connection spends in each stage of the pipeline (work, excluding mailbox wait).",
			Buckets: buckets,
		}, []string{"stage", "direction"}),
		wait: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "ztgo_stage_queue_seconds",
			Help:    "Time a connection waits in a stage's mailbox before a worker takes it.",
			Buckets: buckets,
		}, []string{"stage", "direction"}),
		now:    time.Now,
		recent: make([]Record, size),
		size:   size,
		nslow:  min(size, maxSlowest),
	}
	r.slowest = make([]Record, 0, r.nslow)
	if reg != nil {
		if err := reg.Register(r.hist); err != nil {
			return nil, err
		}
		if err := reg.Register(r.wait); err != nil {
			return nil, err
		}
	}
	return r, nil
}

// Finish observes rec's stages and keeps it in the rings and the window. rec is copied. It is
// on every flow's completion path: in steady state it does not allocate.
// ObserveFirstByte records how long an established flow waited for the first byte from the
// server, as the "first_byte" stage of the stage histogram. It is kept out of the live
// per-stage window: it includes the application's own response time, which would swamp the
// proxy's setup stages in the stacked view.
func (r *Recorder) ObserveFirstByte(direction string, d time.Duration) {
	r.hist.WithLabelValues(StageFirstByte, direction).Observe(d.Seconds())
}

// StageFirstByte is the stage label of ObserveFirstByte.
const StageFirstByte = "first_byte"

func (r *Recorder) Finish(rec *Record) {
	type obs struct {
		s          *series
		work, wait float64
	}
	var o [MaxSpans]obs
	no := 0
	now := r.now()
	sec := now.Unix()
	total := rec.Total()
	r.mu.Lock()
	for i, s := range rec.Spans() {
		if s.End.IsZero() || s.Start.IsZero() {
			continue
		}
		work := s.Work()
		if se := r.lookup(s.Stage, rec.Direction, i); se != nil {
			se.add(sec, int64(work))
			o[no] = obs{se, work.Seconds(), s.Wait().Seconds()}
			no++
		} else {
			// More (stage, direction) pairs than the window tracks: metrics only.
			r.hist.WithLabelValues(s.Stage, rec.Direction).Observe(work.Seconds())
			r.wait.WithLabelValues(s.Stage, rec.Direction).Observe(s.Wait().Seconds())
		}
	}
	r.recent[r.next] = *rec
	r.next++
	if r.next == r.size {
		r.next, r.full = 0, true
	}
	if rec.Outcome != "established" {
		r.fails[r.nfail%failureRing] = *rec
		r.nfail++
	}
	epoch := sec / slowSlotSeconds
	r.slow[epoch%slowSlots].offer(epoch, now.UnixNano(), total, rec)
	r.keepSlowest(total, rec)
	r.mu.Unlock()
	for _, x := range o[:no] {
		x.s.work.Observe(x.work)
		x.s.wait.Observe(x.wait)
	}
}

// keepSlowest inserts rec into the sorted all-time slowest records if it belongs there.
func (r *Recorder) keepSlowest(total time.Duration, rec *Record) {
	n := len(r.slowest)
	if n == r.nslow {
		if total <= r.slowest[n-1].Total() {
			return
		}
		n-- // the fastest drops out
	} else {
		r.slowest = r.slowest[:n+1]
	}
	i := sort.Search(n, func(i int) bool { return r.slowest[i].Total() < total })
	copy(r.slowest[i+1:n+1], r.slowest[i:n])
	r.slowest[i] = *rec
}

// Recent returns up to n of the latest records, newest first.
func (r *Recorder) Recent(n int) []Record {
	r.mu.Lock()
	defer r.mu.Unlock()
	count := r.next
	if r.full {
		count = r.size
	}
	n = min(n, count)
	out := make([]Record, 0, n)
	for i := 0; i < n; i++ {
		idx := (r.next - 1 - i + r.size) % r.size
		out = append(out, r.recent[idx])
	}
	return out
}

// Slowest returns up to n of the slowest records, slowest first.
func (r *Recorder) Slowest(n int) []Record {
	r.mu.Lock()
	defer r.mu.Unlock()
	n = min(n, len(r.slowest))
	return append([]Record(nil), r.slowest[:n]...)
}
