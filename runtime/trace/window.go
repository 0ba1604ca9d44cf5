package trace

import (
	"math"
	"math/bits"
	"sort"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// The window: what the admin dashboard shows of the last minute.
//
// Per (stage, direction) series the Recorder keeps a ring of one-second slots; each slot is a
// log-linear histogram of the stage's work time (8 sub-buckets per power of two from 512ns, 64ns
// linear steps below that, up to ~137s), so a quantile read from it is within about 6% of the
// true value, and memory is fixed: one series is about 60 KiB whatever the load. A series is
// allocated the first time its (stage, direction) is seen, at most maxSeries of them.
//
// The slowest flows of the last minute are kept the same way: per ten-second slot, the
// slowFlowsPerSlot slowest records.

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

// series is one (stage, direction): its Prometheus observers (looked up once) and its window.
type series struct {
	stage, dir string
	// pos is the lowest index the stage had in a record's spans: the pipeline order.
	pos        int
	work, wait prometheus.Observer
	slots      [windowSlots]histSlot
}

func (s *series) add(sec, ns int64) {
	sl := &s.slots[sec%windowSlots]
	if sl.sec != sec {
		sl.sec = sec
		sl.h = hist{}
	}
	sl.h.add(ns)
}

type slowEntry struct {
	total time.Duration
	done  int64 // unix nanoseconds of Finish
	rec   Record
}

type slowSlot struct {
	epoch int64 // unix seconds / slowSlotSeconds
	n     int
	e     [slowFlowsPerSlot]slowEntry
}

// offer keeps rec if it is among the slot's slowest.
func (s *slowSlot) offer(epoch, done int64, total time.Duration, rec *Record) {
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
	s.e[i].total, s.e[i].done, s.e[i].rec = total, done, *rec
}

// lookup returns the series of (stage, dir), creating it if there is room; r.mu is held.
func (r *Recorder) lookup(stage, dir string, pos int) *series {
	for _, s := range r.series {
		if s.stage == stage && s.dir == dir {
			if pos < s.pos {
				s.pos = pos
			}
			return s
		}
	}
	if len(r.series) == maxSeries {
		return nil
	}
	s := &series{stage: stage, dir: dir, pos: pos,
		work: r.hist.WithLabelValues(stage, dir), wait: r.wait.WithLabelValues(stage, dir)}
	r.series = append(r.series, s)
	return s
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
	r.mu.Lock()
	for _, s := range r.series {
		all = hist{}
		sw := StageWindow{Stage: s.stage, Direction: s.dir, Points: make([]WindowPoint, points)}
		for p := range points {
			acc = hist{}
			for sec := first + int64(p)*stepSec; sec < first+int64(p+1)*stepSec; sec++ {
				if sl := &s.slots[sec%windowSlots]; sl.sec == sec && sec > cur-WindowSeconds {
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
	var es []*slowEntry
	r.mu.Lock()
	defer r.mu.Unlock()
	for i := range r.slow {
		s := &r.slow[i]
		if s.epoch <= epoch-slowSlots || s.epoch > epoch {
			continue
		}
		for j := 0; j < s.n; j++ {
			if s.e[j].done >= from {
				es = append(es, &s.e[j])
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

// Failures returns up to n of the latest records whose outcome is not "established", newest
// first.
func (r *Recorder) Failures(n int) []Record {
	r.mu.Lock()
	defer r.mu.Unlock()
	n = max(0, min(n, r.nfail, failureRing))
	out := make([]Record, 0, n)
	for i := range n {
		out = append(out, r.fails[(r.nfail-1-i)%failureRing])
	}
	return out
}
