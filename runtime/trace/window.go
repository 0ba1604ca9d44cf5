package trace

import (
	"math"
	"math/bits"
	"sort"
	"time"
)

// The window: what the admin dashboard shows of the last minute.
//
// Per (stage, direction) series the Recorder keeps a ring of one-second slots; each slot is a
// log-linear histogram of the stage's work time (8 sub-buckets per power of two from 512ns, 64ns
// linear steps below that, up to ~137s), so a quantile read from it is within about 6% of the
// true value, and memory is fixed: one series is about 60 KiB whatever the load. A series is
// allocated the first time its (stage, direction) is seen, at most maxSeries of them.
//
// The ring is kept once per series, under Recorder.mu, not per shard (it would weigh K times
// as much). Each shard adds its flows to its own slot of the current second (entry.pend) and
// merges that slot into the ring (flush) when a flow of a later second comes, or when Window
// reads: once a second per shard and series. Histograms add up exactly, and a sample is in the
// shard's slot or in the ring, never in both, so the window is what a single ring would hold.
//
// The slowest flows of the last minute are kept per shard: per ten-second slot, the
// slowFlowsPerSlot slowest records of the shard; SlowestWindow takes the slowFlowsPerSlot
// slowest of each slot over the shards, which are those of the Recorder.

const (
	// WindowSeconds is how far back the window reaches.
	WindowSeconds = 60

	windowSlots = 64 // > WindowSeconds: the ring never reuses a slot still in the window

	histUnitShift = 6 // the linear part's step: 64ns
	histSubBits   = 3 // 8 sub-buckets per power of two
	histSub       = 1 << histSubBits
	histBuckets   = 232 // up to 2^37ns (~137s); slower samples go to the last bucket

	// maxSeries bounds the (stage, direction) pairs the window tracks.
	maxSeries = 32

	slowSlotSeconds  = 10
	slowSlots        = WindowSeconds/slowSlotSeconds + 1
	slowFlowsPerSlot = 10
	// SlowestWindowMax is the most records SlowestWindow can return.
	SlowestWindowMax = slowFlowsPerSlot * slowSlots

	failureRing = 32
)

// bucketOf maps a duration in nanoseconds to its histogram bucket.
func bucketOf(ns int64) int {
	if ns <= 0 {
		return 0
	}
	u := uint64(ns) >> histUnitShift
	if u < histSub {
		return int(u)
	}
	e := bits.Len64(u) - 1 // >= histSubBits
	m := int(u>>(e-histSubBits)) & (histSub - 1)
	b := (e-histSubBits+1)*histSub + m
	if b >= histBuckets {
		b = histBuckets - 1
	}
	return b
}

// bucketLow is the smallest duration (ns) of bucket b; bucketLow(b+1) is its end.
func bucketLow(b int) int64 {
	if b < histSub {
		return int64(b) << histUnitShift
	}
	e := b/histSub + histSubBits - 1
	m := b % histSub
	return int64(histSub+m) << (e - histSubBits) << histUnitShift
}

// hist is a log-linear histogram with the count, sum, min and max of its samples.
type hist struct {
	n        uint64
	sum      int64
	min, max int64
	counts   [histBuckets]uint32
}

func (h *hist) add(ns int64) {
	if ns < 0 {
		ns = 0
	}
	if h.n == 0 || ns < h.min {
		h.min = ns
	}
	if ns > h.max {
		h.max = ns
	}
	h.n++
	h.sum += ns
	h.counts[bucketOf(ns)]++
}

func (h *hist) merge(o *hist) {
	if o.n == 0 {
		return
	}
	if h.n == 0 || o.min < h.min {
		h.min = o.min
	}
	if o.max > h.max {
		h.max = o.max
	}
	h.n += o.n
	h.sum += o.sum
	for i, c := range o.counts {
		h.counts[i] += c
	}
}

// quantile estimates the q-quantile (nearest rank, interpolated inside its bucket, clamped to
// the observed min and max); 0 when empty.
func (h *hist) quantile(q float64) time.Duration {
	if h.n == 0 {
		return 0
	}
	rank := uint64(math.Ceil(q * float64(h.n)))
	rank = max(1, min(rank, h.n))
	var cum uint64
	for b, c := range h.counts {
		if c == 0 {
			continue
		}
		if cum+uint64(c) >= rank {
			lo, hi := bucketLow(b), bucketLow(b+1)
			frac := (float64(rank-cum) - 0.5) / float64(c)
			v := lo + int64(frac*float64(hi-lo))
			return time.Duration(max(h.min, min(v, h.max)))
		}
		cum += uint64(c)
	}
	return time.Duration(h.max)
}

type histSlot struct {
	sec int64 // the unix second the slot holds; a slot of another second is stale
	h   hist
}

// window adds a work time of second sec to the shard's slot, after moving what the slot holds
// of an earlier second into the ring; the shard's mu is held.
func (e *entry) window(r *Recorder, sec, ns int64) {
	p := e.pend
	if p.sec != sec {
		if p.h.n > 0 {
			r.mu.Lock()
			e.flushLocked(sec)
			r.mu.Unlock()
		}
		p.sec = sec
	}
	p.h.add(ns)
}

// flushLocked moves the shard's slot into the series' ring, cur being the current second, and
// the shard's pipeline position into the series'; the shard's mu and r.mu are held.
func (e *entry) flushLocked(cur int64) {
	e.s.pos = min(e.s.pos, e.pos)
	p := e.pend
	if p.h.n == 0 {
		return
	}
	sl := &e.s.win[p.sec%windowSlots]
	switch {
	case sl.sec == p.sec:
	case sl.sec < p.sec || sl.sec > cur:
		// The ring's slot holds an older second, or one ahead of the clock (which went back):
		// either way stale, as a single ring would have overwritten it.
		sl.sec, sl.h = p.sec, hist{}
	default:
		// The ring's slot already holds a later second of the present: this one (from a
		// shard that had no flow for over a minute) is past the window.
		p.h = hist{}
		return
	}
	sl.h.merge(&p.h)
	p.h = hist{}
}

// flush moves every shard's slots into the rings, cur being the current second.
func (r *Recorder) flush(cur int64) {
	r.eachShard(func(sh *shard) {
		r.mu.Lock()
		for _, e := range sh.entries {
			if e.pend != nil {
				e.flushLocked(cur)
			}
		}
		r.mu.Unlock()
	})
}

type slowEntry struct {
	total time.Duration
	done  int64 // unix nanoseconds of Finish
	at    int64 // the order key of Finish (see Recorder.t0)
	rec   Record
}

type slowSlot struct {
	epoch int64 // unix seconds / slowSlotSeconds
	n     int
	e     [slowFlowsPerSlot]slowEntry
}

// offer keeps rec if it is among the slot's slowest.
func (s *slowSlot) offer(epoch, done, at int64, total time.Duration, rec *Record) {
	if s.epoch != epoch {
		s.epoch, s.n = epoch, 0
	}
	if s.n == slowFlowsPerSlot && total <= s.e[s.n-1].total {
		return
	}
	i := s.n
	if i == slowFlowsPerSlot {
		i-- // drops the fastest
	} else {
		s.n++
	}
	for ; i > 0 && s.e[i-1].total < total; i-- {
		s.e[i] = s.e[i-1]
	}
	e := &s.e[i]
	e.total, e.done, e.at, e.rec = total, done, at, *rec
}

// WindowPoint is one step of a StageWindow.
type WindowPoint struct {
	Count    int
	P50, P99 time.Duration
}

// StageWindow is the work time of one stage in one direction over the window.
type StageWindow struct {
	Stage, Direction string
	// Count, P50, P99, Mean and Max are over the whole window.
	Count               int
	P50, P99, Mean, Max time.Duration
	// Points are consecutive steps, oldest first; the last one holds the current second.
	Points []WindowPoint
}

// Window returns, for every (stage, direction) with samples in the last WindowSeconds, its
// work-time quantiles over the whole window and per step (step is rounded to whole seconds,
// between 1s and the window). The end is the current second. Series are ordered by direction,
// then by their place in the pipeline.
func (r *Recorder) Window(step time.Duration) (end time.Time, out []StageWindow) {
	stepSec := int64(max(1, min(step/time.Second, WindowSeconds)))
	points := int((WindowSeconds + stepSec - 1) / stepSec)
	now := r.now()
	cur := now.Unix()
	first := cur - int64(points)*stepSec + 1
	type sorted struct {
		sw  StageWindow
		pos int
	}
	var res []sorted
	var all, acc hist
	r.flush(cur)
	r.mu.Lock()
	for _, s := range r.series {
		if s.win == nil {
			continue
		}
		all = hist{}
		sw := StageWindow{Stage: s.key.stage, Direction: s.key.dir, Points: make([]WindowPoint, points)}
		for p := range points {
			acc = hist{}
			for sec := first + int64(p)*stepSec; sec < first+int64(p+1)*stepSec; sec++ {
				if sl := &s.win[sec%windowSlots]; sl.sec == sec && sec > cur-WindowSeconds {
					acc.merge(&sl.h)
				}
			}
			sw.Points[p] = WindowPoint{Count: int(acc.n), P50: acc.quantile(.5), P99: acc.quantile(.99)}
			all.merge(&acc)
		}
		if all.n == 0 {
			continue
		}
		sw.Count, sw.P50, sw.P99 = int(all.n), all.quantile(.5), all.quantile(.99)
		sw.Mean, sw.Max = time.Duration(all.sum/int64(all.n)), time.Duration(all.max)
		res = append(res, sorted{sw, s.pos})
	}
	r.mu.Unlock()
	sort.Slice(res, func(i, j int) bool {
		a, b := res[i], res[j]
		if a.sw.Direction != b.sw.Direction {
			return a.sw.Direction < b.sw.Direction
		}
		if a.pos != b.pos {
			return a.pos < b.pos
		}
		return a.sw.Stage < b.sw.Stage
	})
	out = make([]StageWindow, len(res))
	for i := range res {
		out[i] = res[i].sw
	}
	return time.Unix(cur, 0), out
}

// SlowestWindow returns up to n (at most SlowestWindowMax) of the slowest records finished in
// the last WindowSeconds, slowest first. Slowest means the longest Total: the time to establish
// the flow, or to fail it.
func (r *Recorder) SlowestWindow(n int) []Record {
	now := r.now()
	from := now.Add(-WindowSeconds * time.Second).UnixNano()
	epoch := now.Unix() / slowSlotSeconds
	// The slots of the window, by index: each holds one epoch, the same in every shard.
	var slots [slowSlots][][]slowEntry
	r.eachShard(func(sh *shard) {
		for i := range sh.slow {
			s := &sh.slow[i]
			if s.epoch <= epoch-slowSlots || s.epoch > epoch || s.n == 0 {
				continue
			}
			slots[i] = append(slots[i], append([]slowEntry(nil), s.e[:s.n]...))
		}
	})
	var es []*slowEntry
	for i := range slots {
		// The slot's slowest over the shards are its slowest: each shard kept its own.
		for _, e := range merge(slots[i], slowFlowsPerSlot, slower) {
			if e.done >= from {
				es = append(es, e)
			}
		}
	}
	sort.SliceStable(es, func(i, j int) bool { return es[i].total > es[j].total })
	n = max(0, min(n, len(es)))
	out := make([]Record, n)
	for i := range n {
		out[i] = es[i].rec
	}
	return out
}
