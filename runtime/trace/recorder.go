package trace

import (
	"fmt"
	"runtime"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"
	"unicode/utf8"

	"github.com/prometheus/client_golang/prometheus"

	shardpkg "github.com/ztgo/ztgo/runtime/shard"
)

// cacheLine is the line size of amd64 and of most arm64 cores: what the per-shard counters are
// padded to.
const cacheLine = 64

// maxSlowest bounds the all-time slowest records kept (Slowest).
const maxSlowest = 64

// Recorder aggregates finished records. See the package documentation for how its state is
// split between CPUs.
type Recorder struct {
	// now is time.Now, replaced in tests.
	now func() time.Time
	// t0 is when the Recorder was made: the records' order keys are durations since then, so
	// they follow the monotonic clock.
	t0 time.Time

	size   int // the most records Recent returns: the budget of the recent rings together
	per    int // the records a shard's recent ring holds: ceil(size/K)
	nslow  int // the all-time slowest records kept, per shard and in all
	shards []atomic.Pointer[shard]
	// pick picks the shard of a Finish or ObserveFirstByte: runtime/shard's Picker, so that a
	// CPU keeps to the shard it last locked. What it picks never changes what the readers show.
	pick func() int

	workDesc, waitDesc *prometheus.Desc

	// mu guards the registry of series (byKey, series) and the series' windows.
	mu     sync.Mutex
	byKey  map[seriesKey]*series
	series []*series // in creation order; append-only, so a reader may keep a prefix
	nwin   int       // series with a window

	// firstByte holds the first_byte series by direction, filled in order: ObserveFirstByte
	// finds its series here without the lock or a hash.
	firstByte [4]atomic.Pointer[series]
}

// NewRecorder keeps the last size records and the min(size, 64) slowest ones, plus the window
// of the last minute (Window, SlowestWindow) and the latest failures (Failures), and registers
// its histograms on reg (if not nil).
func NewRecorder(size int, reg prometheus.Registerer) (*Recorder, error) {
	return newRecorder(size, reg, shardpkg.Count(runtime.GOMAXPROCS(0)))
}

// newRecorder is NewRecorder with k shards.
func newRecorder(size int, reg prometheus.Registerer, k int) (*Recorder, error) {
	if k < 1 {
		return nil, fmt.Errorf("trace: %d shards", k)
	}
	if size <= 0 {
		size = 256
	}
	labels := []string{"stage", "direction"}
	r := &Recorder{
		workDesc: prometheus.NewDesc("ztgo_stage_duration_seconds",
			"Time a connection spends in each stage of the pipeline (work, excluding mailbox wait).", labels, nil),
		waitDesc: prometheus.NewDesc("ztgo_stage_queue_seconds",
			"Time a connection waits in a stage's mailbox before a worker takes it.", labels, nil),
		now:    time.Now,
		t0:     time.Now(),
		size:   size,
		per:    (size + k - 1) / k,
		nslow:  min(size, maxSlowest),
		shards: make([]atomic.Pointer[shard], k),
		pick:   shardpkg.NewPicker(k).Pick,
		byKey:  make(map[seriesKey]*series),
	}
	if reg != nil {
		if err := reg.Register((*collector)(r)); err != nil {
			return nil, err
		}
	}
	return r, nil
}

// seriesKey is a (stage, direction) as the records spell it.
type seriesKey struct{ stage, dir string }

// series is one (stage, direction): its labels, its window if it has one, and its place in
// the registry. The histogram counts are in the shards' entries.
type series struct {
	key     seriesKey
	labels  [2]string // the key, made valid UTF-8 for the exposition
	idx     int       // in Recorder.series
	created time.Time
	// pos is the lowest index the stage had in a record's spans (the pipeline order), as far
	// as the shards have told; r.mu guards it.
	pos int
	// win is the window: nil past maxSeries, and for first_byte. r.mu guards it.
	win *[windowSlots]histSlot
}

// seriesLocked returns the series of (stage, dir), creating it, with a window if window is
// set and there is room; r.mu is held.
func (r *Recorder) seriesLocked(stage, dir string, pos int, window bool) *series {
	k := seriesKey{stage, dir}
	if s := r.byKey[k]; s != nil {
		return s
	}
	s := &series{key: k, labels: [2]string{validUTF8(stage), validUTF8(dir)}, idx: len(r.series),
		created: time.Now(), pos: pos}
	if window && r.nwin < maxSeries {
		s.win = new([windowSlots]histSlot)
		r.nwin++
	}
	r.byKey[k] = s
	r.series = append(r.series, s)
	return s
}

// validUTF8 makes a label value valid UTF-8: the registry fails a whole scrape on one that is
// not (where a HistogramVec panicked on the hot path).
func validUTF8(s string) string {
	if utf8.ValidString(s) {
		return s
	}
	return strings.ToValidUTF8(s, "\uFFFD")
}

// shard returns shard i, allocating it on first use.
func (r *Recorder) shard(i int) *shard {
	p := &r.shards[i]
	if sh := p.Load(); sh != nil {
		return sh
	}
	sh := &shard{recent: make([]recEntry, r.per), slowest: make([]slowEntry, 0, r.nslow)}
	if p.CompareAndSwap(nil, sh) {
		return sh
	}
	return p.Load()
}

// Finish observes rec's stages and keeps it in the rings and the window. rec is copied. It is
// on every flow's completion path: it locks only one shard, the one r.pick gives, and in
// steady state it does not allocate.
func (r *Recorder) Finish(rec *Record) {
	total := rec.Total()
	sh := r.shard(r.pick())
	sh.mu.Lock()
	// The clock is read under the shard's lock, so a shard's rings are in the order of their
	// times, as the readers' merges need, whichever goroutines share the shard.
	now := r.now()
	sec := now.Unix()
	at := int64(now.Sub(r.t0))
	for i := range int(rec.n) {
		s := &rec.spans[i]
		if s.end == 0 || s.start == 0 {
			continue
		}
		work := s.end - s.start
		e := sh.entry(r, s.stage, rec.Direction, i)
		if e.pend != nil {
			e.window(r, sec, work)
		}
		e.work.observe(work)
		e.wait.observe(s.start - s.queued)
	}
	re := &sh.recent[sh.next]
	re.at, re.rec = at, *rec
	sh.next++
	if sh.next == len(sh.recent) {
		sh.next, sh.full = 0, true
	}
	if rec.Outcome != "established" {
		if sh.fails == nil {
			sh.fails = make([]recEntry, failureRing)
		}
		fe := &sh.fails[sh.nfail%failureRing]
		fe.at, fe.rec = at, *rec
		sh.nfail++
	}
	epoch := sec / slowSlotSeconds
	sh.slow[epoch%slowSlots].offer(epoch, now.UnixNano(), at, total, rec)
	sh.keepSlowest(r.nslow, total, at, rec)
	sh.mu.Unlock()
}

// StageFirstByte is the stage label of ObserveFirstByte.
const StageFirstByte = "first_byte"

// ObserveFirstByte records how long an established flow waited for the first byte from the
// server, as the "first_byte" stage of the stage histogram. It is kept out of the live
// per-stage window: it includes the application's own response time, which would swamp the
// proxy's setup stages in the stacked view. It counts in the shard r.pick gives, as Finish.
func (r *Recorder) ObserveFirstByte(direction string, d time.Duration) {
	s := r.firstByteSeries(direction)
	sh := r.shard(r.pick())
	sh.mu.Lock()
	sh.part(s).work.observe(int64(d))
	sh.mu.Unlock()
}

// firstByteSeries returns the first_byte series of direction.
func (r *Recorder) firstByteSeries(direction string) *series {
	for i := range r.firstByte {
		s := r.firstByte[i].Load()
		if s == nil {
			break
		}
		if s.key.dir == direction {
			return s
		}
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	s := r.seriesLocked(StageFirstByte, direction, 0, false)
	for i := range r.firstByte {
		switch r.firstByte[i].Load() {
		case nil:
			r.firstByte[i].Store(s)
			return s
		case s:
			return s
		}
	}
	return s // more directions than the cache holds: this one takes the lock every time
}

// recEntry is a record in a ring, with when Finish kept it (see Recorder.t0).
type recEntry struct {
	at  int64
	rec Record
}

// newer orders records newest first: by the time they were finished, then by flow ID (the
// pipeline hands IDs out in order), for records of the same instant.
func newer(a, b *recEntry) bool {
	if a.at != b.at {
		return a.at > b.at
	}
	return a.rec.ID > b.rec.ID
}

// slower orders records slowest first; of two as slow, the one finished first (as a single
// sorted set, which keeps the first of equals, would).
func slower(a, b *slowEntry) bool {
	if a.total != b.total {
		return a.total > b.total
	}
	if a.at != b.at {
		return a.at < b.at
	}
	return a.rec.ID < b.rec.ID
}

// merge merges lists, each in before order, into the first n of them all in that order. The
// order of each list is kept as it is, as a k-way merge does.
func merge[T any](lists [][]T, n int, before func(a, b *T) bool) []*T {
	total := 0
	for _, l := range lists {
		total += len(l)
	}
	n = max(0, min(n, total))
	out := make([]*T, 0, n)
	idx := make([]int, len(lists))
	for len(out) < n {
		best := -1
		for i, l := range lists {
			if idx[i] < len(l) && (best < 0 || before(&l[idx[i]], &lists[best][idx[best]])) {
				best = i
			}
		}
		out = append(out, &lists[best][idx[best]])
		idx[best]++
	}
	return out
}

// eachShard calls f with every shard allocated so far, locked.
func (r *Recorder) eachShard(f func(*shard)) {
	for i := range r.shards {
		if sh := r.shards[i].Load(); sh != nil {
			sh.mu.Lock()
			f(sh)
			sh.mu.Unlock()
		}
	}
}

// Recent returns up to n of the latest records (at most the size given to NewRecorder), newest
// first. Each of the K shards keeps ceil(size/K) records, so the first ceil(size/K) returned
// are always the latest; past that, if the latest flows went unevenly to the shards, the list
// skips the records a busier shard has dropped already (and can be shorter than size).
func (r *Recorder) Recent(n int) []Record {
	n = max(0, min(n, r.size))
	var lists [][]recEntry
	r.eachShard(func(sh *shard) {
		count := sh.next
		if sh.full {
			count = len(sh.recent)
		}
		l := make([]recEntry, min(n, count))
		for i := range l {
			l[i] = sh.recent[(sh.next-1-i+len(sh.recent))%len(sh.recent)]
		}
		lists = append(lists, l)
	})
	return records(merge(lists, n, newer))
}

// records copies the merged records out.
func records(m []*recEntry) []Record {
	out := make([]Record, len(m))
	for i, e := range m {
		out[i] = e.rec
	}
	return out
}

// Slowest returns up to n of the slowest records, slowest first.
func (r *Recorder) Slowest(n int) []Record {
	n = max(0, min(n, r.nslow))
	var lists [][]slowEntry
	r.eachShard(func(sh *shard) {
		lists = append(lists, append([]slowEntry(nil), sh.slowest[:min(n, len(sh.slowest))]...))
	})
	var out []Record
	for _, e := range merge(lists, n, slower) {
		out = append(out, e.rec)
	}
	return out
}

// Failures returns up to n of the latest records whose outcome is not "established", newest
// first.
func (r *Recorder) Failures(n int) []Record {
	n = max(0, min(n, failureRing))
	var lists [][]recEntry
	r.eachShard(func(sh *shard) {
		l := make([]recEntry, min(n, sh.nfail))
		for i := range l {
			l[i] = sh.fails[(sh.nfail-1-i)%failureRing]
		}
		lists = append(lists, l)
	})
	return records(merge(lists, n, newer))
}

// shard is one K-th of a Recorder's state; mu guards all of it. A shard is over 60 KiB (the
// window's slowest slots are inline), so it gets its own span and shares no cache line with
// another; the per-series counters it writes are in entries padded apart.
type shard struct {
	mu sync.Mutex

	recent []recEntry // ring of ceil(size/K)
	next   int
	full   bool

	fails []recEntry // ring of failureRing, allocated at the first failure
	nfail int

	slowest []slowEntry // sorted, slowest first; at most nslow
	slow    [slowSlots]slowSlot

	// entries are this shard's part of every series it has met, in the order it met them;
	// entry finds the first maxSeries by scanning, the others in more. bySeries indexes them
	// by series.idx (nil: not met).
	entries  []*entry
	more     map[seriesKey]*entry
	bySeries []*entry
}

// entry is a shard's part of one series: the histogram counts and, for a series with a window,
// the current second. It is padded at both ends, so that what one shard writes shares no line
// with what another does, whatever the allocator puts next to it.
type entry struct {
	_ [cacheLine]byte

	work, wait counts

	key  seriesKey
	s    *series
	pos  int       // as series.pos, for this shard's flows; moved into s.pos with pend
	pend *histSlot // the current second of the window; nil if the series has no window

	_ [cacheLine]byte
}

// entry returns the shard's entry of (stage, dir), first met at span index pos; sh.mu is held.
func (sh *shard) entry(r *Recorder, stage, dir string, pos int) *entry {
	for _, e := range sh.entries[:min(len(sh.entries), maxSeries)] {
		if e.key.stage == stage && e.key.dir == dir {
			if pos < e.pos {
				e.pos = pos
			}
			return e
		}
	}
	if sh.more != nil {
		if e := sh.more[seriesKey{stage, dir}]; e != nil {
			if pos < e.pos {
				e.pos = pos
			}
			return e
		}
	}
	r.mu.Lock()
	s := r.seriesLocked(stage, dir, pos, true)
	r.mu.Unlock()
	e := sh.part(s)
	e.pos = min(e.pos, pos)
	return e
}

// part returns the shard's entry of s, creating it; sh.mu is held.
func (sh *shard) part(s *series) *entry {
	if s.idx < len(sh.bySeries) && sh.bySeries[s.idx] != nil {
		return sh.bySeries[s.idx]
	}
	e := &entry{key: s.key, s: s, pos: MaxSpans}
	if s.win != nil { // set before s was published, never changed
		e.pend = new(histSlot)
	}
	if len(sh.entries) >= maxSeries {
		if sh.more == nil {
			sh.more = make(map[seriesKey]*entry)
		}
		sh.more[s.key] = e
	}
	sh.entries = append(sh.entries, e)
	for len(sh.bySeries) <= s.idx {
		sh.bySeries = append(sh.bySeries, nil)
	}
	sh.bySeries[s.idx] = e
	return e
}

// keepSlowest inserts rec into the sorted all-time slowest records if it belongs there.
func (sh *shard) keepSlowest(nslow int, total time.Duration, at int64, rec *Record) {
	n := len(sh.slowest)
	if n == nslow {
		if total <= sh.slowest[n-1].total {
			return
		}
		n-- // the fastest drops out
	} else {
		sh.slowest = sh.slowest[:n+1]
	}
	i := sort.Search(n, func(i int) bool { return sh.slowest[i].total < total })
	copy(sh.slowest[i+1:n+1], sh.slowest[i:n])
	s := &sh.slowest[i]
	s.total, s.at, s.rec = total, at, *rec
}
