package trace

import (
	"math"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

func rec(id uint64, d time.Duration) *Record {
	t0 := time.Unix(1000, 0)
	r := &Record{Timeline: Timeline{ID: id, Direction: "outbound", Begin: t0}}
	r.Enter("identity", t0)
	r.StartStage(t0.Add(d / 4))
	r.Leave(t0.Add(d / 2))
	r.Enter("hbone", t0.Add(d/2))
	r.StartStage(t0.Add(d / 2))
	r.Leave(t0.Add(d))
	r.Established = t0.Add(d)
	return r
}

func TestRecorderRingsAndHistograms(t *testing.T) {
	reg := prometheus.NewRegistry()
	r, err := NewRecorder(3, reg)
	if err != nil {
		t.Fatal(err)
	}
	// Spread over the shards: from one goroutine the Picker keeps to one shard, whose ring
	// holds ceil(3/K) records (see TestRecentFromOneShard).
	r.pick = roundRobin(len(r.shards))
	for i, d := range []time.Duration{5, 1, 9, 3, 7} {
		r.Finish(rec(uint64(i+1), d*time.Millisecond))
	}
	recent := r.Recent(10)
	if len(recent) != 3 || recent[0].ID != 5 || recent[1].ID != 4 || recent[2].ID != 3 {
		t.Fatalf("recent = %v", ids(recent))
	}
	slow := r.Slowest(10)
	if len(slow) != 3 || slow[0].ID != 3 || slow[1].ID != 5 || slow[2].ID != 1 {
		t.Fatalf("slowest = %v", ids(slow))
	}
	if got := testutil.CollectAndCount(reg, "ztgo_stage_duration_seconds"); got != 2 {
		t.Fatalf("histogram series = %d, want 2 (identity, hbone)", got)
	}
	sp := recent[0].Spans()
	if len(sp) != 2 || sp[0].Wait() != 7*time.Millisecond/4 || recent[0].Total() != 7*time.Millisecond {
		t.Fatalf("spans = %+v total %v", sp, recent[0].Total())
	}
}

func ids(rs []Record) []uint64 {
	var out []uint64
	for _, r := range rs {
		out = append(out, r.ID)
	}
	return out
}

// clock is a settable time source for the window tests.
type clock struct{ t time.Time }

func (c *clock) now() time.Time { return c.t }

// flow returns a finished record whose only stage worked for d.
func flow(id uint64, stage, dir string, d time.Duration, outcome string) *Record {
	t0 := time.Unix(1000, 0)
	r := &Record{Timeline: Timeline{ID: id, Direction: dir, Begin: t0, Outcome: outcome}}
	r.Enter(stage, t0)
	r.StartStage(t0)
	r.Leave(t0.Add(d))
	if outcome == "established" {
		r.Established = t0.Add(d)
	}
	return r
}

// near fails the test unless got is within 6.5% of want: the histogram's buckets are 12.5%
// wide, and the estimate interpolates inside one.
func near(t *testing.T, name string, got, want time.Duration) {
	t.Helper()
	if d := math.Abs(float64(got-want)) / float64(want); d > 0.065 {
		t.Errorf("%s = %v, want %v ±6.5%%", name, got, want)
	}
}

func TestHistogramBuckets(t *testing.T) {
	prev := -1
	for ns := int64(0); ns < 1<<37; ns = ns*9/8 + 1 {
		b := bucketOf(ns)
		if b < prev {
			t.Fatalf("bucketOf(%d) = %d after %d: not monotonic", ns, b, prev)
		}
		prev = b
		if lo, hi := bucketLow(b), bucketLow(b+1); ns < lo || ns >= hi {
			t.Fatalf("%dns in bucket %d = [%d, %d)", ns, b, lo, hi)
		}
		if lo, hi := bucketLow(b), bucketLow(b+1); b >= histSub && float64(hi-lo)/float64(lo) > 0.126 {
			t.Fatalf("bucket %d = [%d, %d) is wider than 12.5%%", b, lo, hi)
		}
	}
	if b := bucketOf(int64(time.Hour)); b != histBuckets-1 {
		t.Fatalf("an hour is in bucket %d, want the last", b)
	}
}

func TestWindowQuantiles(t *testing.T) {
	r, err := NewRecorder(16, prometheus.NewRegistry())
	if err != nil {
		t.Fatal(err)
	}
	c := &clock{time.Unix(10_000, 0)}
	r.now = c.now
	// 1..1000 µs, all in the current second: p50 = 500µs, p99 = 990µs.
	for i := 1; i <= 1000; i++ {
		r.Finish(flow(uint64(i), "identity", "outbound", time.Duration(i)*time.Microsecond, "established"))
	}
	// Another stage and direction, with one sample: its quantiles are exact (min = max).
	r.Finish(flow(2000, "authz", "inbound", 1234*time.Microsecond, "DENY"))
	end, ws := r.Window(time.Second)
	if !end.Equal(time.Unix(10_000, 0)) || len(ws) != 2 {
		t.Fatalf("end %v, %d series", end, len(ws))
	}
	in, out := ws[0], ws[1]
	if in.Stage != "authz" || in.Direction != "inbound" || out.Stage != "identity" || out.Direction != "outbound" {
		t.Fatalf("series = %s/%s, %s/%s", in.Stage, in.Direction, out.Stage, out.Direction)
	}
	near(t, "p50", out.P50, 500*time.Microsecond)
	near(t, "p99", out.P99, 990*time.Microsecond)
	if out.Count != 1000 || out.Max != time.Millisecond || out.Mean != 500500*time.Nanosecond {
		t.Errorf("count %d max %v mean %v", out.Count, out.Max, out.Mean)
	}
	if in.Count != 1 || in.P50 != 1234*time.Microsecond || in.P99 != 1234*time.Microsecond {
		t.Errorf("single sample: %+v", in)
	}
	if len(out.Points) != WindowSeconds {
		t.Fatalf("%d points, want %d", len(out.Points), WindowSeconds)
	}
	last := out.Points[len(out.Points)-1]
	if last.Count != 1000 || last.P50 != out.P50 || last.P99 != out.P99 {
		t.Errorf("last point %+v", last)
	}
	for _, p := range out.Points[:len(out.Points)-1] {
		if p.Count != 0 || p.P50 != 0 {
			t.Fatalf("earlier point not empty: %+v", p)
		}
	}
}

func TestWindowStepsAndExpiry(t *testing.T) {
	r, _ := NewRecorder(16, nil)
	c := &clock{time.Unix(20_000, 0)}
	r.now = c.now
	// One sample per second for 30 s: the n-th second's sample is n ms.
	for i := 1; i <= 30; i++ {
		r.Finish(flow(uint64(i), "hbone", "outbound", time.Duration(i)*time.Millisecond, "established"))
		c.t = c.t.Add(time.Second)
	}
	c.t = c.t.Add(-time.Second) // now: the second of the 30th sample
	_, ws := r.Window(10 * time.Second)
	if len(ws) != 1 || len(ws[0].Points) != 6 || ws[0].Count != 30 {
		t.Fatalf("window = %+v", ws)
	}
	// Points of 10 s, oldest first: the last three hold samples 1-10, 11-20 and 21-30.
	for i, p := range ws[0].Points {
		want := 0
		if i >= 3 {
			want = 10
		}
		if p.Count != want {
			t.Fatalf("point %d count %d, want %d", i, p.Count, want)
		}
	}
	p := ws[0].Points[5]
	near(t, "p50 of 21..30ms", p.P50, 25*time.Millisecond)
	if p.P99 != 30*time.Millisecond { // the max: quantiles are clamped to it
		t.Errorf("p99 of 21..30ms = %v, want 30ms", p.P99)
	}
	// 45 s later samples 1-15 are older than the window.
	c.t = c.t.Add(45 * time.Second)
	_, ws = r.Window(time.Second)
	if len(ws) != 1 || ws[0].Count != 15 || ws[0].Max != 30*time.Millisecond {
		t.Fatalf("after 45s: %+v", ws)
	}
	near(t, "p50 of 16..30ms", ws[0].P50, 23*time.Millisecond)
	// A minute after the last sample nothing is left, and the ring reuses the old slots cleanly.
	c.t = c.t.Add(15 * time.Second)
	if _, ws = r.Window(time.Second); len(ws) != 0 {
		t.Fatalf("after a minute: %+v", ws)
	}
	r.Finish(flow(99, "hbone", "outbound", 7*time.Millisecond, "established"))
	if _, ws = r.Window(time.Second); len(ws) != 1 || ws[0].Count != 1 || ws[0].P99 != 7*time.Millisecond {
		t.Fatalf("new sample after expiry: %+v", ws)
	}
}

func TestSlowestWindowAndFailures(t *testing.T) {
	r, _ := NewRecorder(4, nil)
	c := &clock{time.Unix(30_000, 0)}
	r.now = c.now
	// An old, very slow flow, then 50 flows over 25 s.
	r.Finish(flow(1, "hbone", "outbound", time.Second, "established"))
	c.t = c.t.Add(70 * time.Second)
	for i := 1; i <= 50; i++ {
		outcome := "established"
		if i%10 == 0 {
			outcome = "DENY"
		}
		r.Finish(flow(uint64(100+i), "hbone", "outbound", time.Duration(i)*time.Millisecond, outcome))
		c.t = c.t.Add(500 * time.Millisecond)
	}
	slow := r.SlowestWindow(5)
	if got := ids(slow); len(got) != 5 || got[0] != 150 || got[4] != 146 {
		t.Fatalf("slowest of the window = %v, want 150..146", got)
	}
	if all := r.Slowest(1); all[0].ID != 1 {
		t.Fatalf("all-time slowest = %v, want 1", ids(all))
	}
	if got := len(r.SlowestWindow(1000)); got != 30 {
		// 10 per 10-second slot; the 50 flows span 3 slots.
		t.Fatalf("SlowestWindow(1000) returned %d records, want 30", got)
	}
	if got := ids(r.Failures(3)); len(got) != 3 || got[0] != 150 || got[1] != 140 || got[2] != 130 {
		t.Fatalf("failures = %v", got)
	}
	c.t = c.t.Add(2 * time.Minute)
	if got := r.SlowestWindow(10); len(got) != 0 {
		t.Fatalf("slowest after two idle minutes = %v", ids(got))
	}
}

func TestSlowestKeepsTheSlowest(t *testing.T) {
	r, _ := NewRecorder(200, nil)
	for i := 1; i <= 500; i++ {
		d := time.Duration((i*7919)%500+1) * time.Microsecond // a permutation of 1..500
		r.Finish(flow(uint64(i), "capture", "outbound", d, "established"))
	}
	s := r.Slowest(1000)
	if len(s) != maxSlowest {
		t.Fatalf("kept %d, want %d", len(s), maxSlowest)
	}
	for i, rec := range s {
		if want := time.Duration(500-i) * time.Microsecond; rec.Total() != want {
			t.Fatalf("slowest[%d] total %v, want %v", i, rec.Total(), want)
		}
	}
}

// BenchmarkFinish is Finish from one goroutine, over flows of consecutive IDs.
func BenchmarkFinish(b *testing.B) {
	r, err := NewRecorder(512, prometheus.NewRegistry())
	if err != nil {
		b.Fatal(err)
	}
	recs := benchRecords()
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; b.Loop(); i++ {
		r.Finish(recs[i%len(recs)])
	}
}

// benchRecords are 64 established inbound flows through four stages, as BenchmarkFinish
// finishes them.
func benchRecords() []*Record {
	recs := make([]*Record, 64)
	for i := range recs {
		t0 := time.Now()
		rec := &Record{Timeline: Timeline{ID: uint64(i), Direction: "inbound", Begin: t0, Outcome: "established"}}
		for j, st := range []string{"capture", "identity", "authz", "upstream"} {
			at := t0.Add(time.Duration(j*10+i) * time.Microsecond)
			rec.Enter(st, at)
			rec.StartStage(at.Add(time.Microsecond))
			rec.Leave(at.Add(time.Duration(5+i%7) * time.Microsecond))
		}
		rec.Established = rec.Span(3).End
		recs[i] = rec
	}
	return recs
}

// BenchmarkFinishParallel is Finish from every CPU at once, as the node's stage workers
// finish flows. Each goroutine finishes its own copies of the records under pseudo-random
// flow IDs (the pipeline hands out IDs from one counter, so the flows a CPU finishes have
// unrelated IDs). The shard does not depend on them: see BenchmarkFinishParallelAffine.
func BenchmarkFinishParallel(b *testing.B) {
	r, err := NewRecorder(512, prometheus.NewRegistry())
	if err != nil {
		b.Fatal(err)
	}
	src := benchRecords()
	var seed atomic.Uint64
	b.ReportAllocs()
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		recs := make([]Record, len(src))
		for i := range recs {
			recs[i] = *src[i]
		}
		x := seed.Add(0x9e3779b97f4a7c15) | 1
		for i := 0; pb.Next(); i++ {
			x ^= x << 13
			x ^= x >> 7
			x ^= x << 17
			rec := &recs[i%len(recs)]
			rec.ID = x
			r.Finish(rec)
		}
	})
}

// BenchmarkObserveFirstByte is the first-byte observation every established flow makes.
func BenchmarkObserveFirstByte(b *testing.B) {
	r, err := NewRecorder(512, prometheus.NewRegistry())
	if err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		for i := 0; pb.Next(); i++ {
			r.ObserveFirstByte("inbound", time.Duration(i%1000)*time.Microsecond)
		}
	})
}

// BenchmarkFinishParallelAffine is BenchmarkFinishParallel with one flow ID per goroutine.
// When the flow ID chose the shard, this was the best case (every goroutine in a shard of
// its own, whose lines stayed with its CPU) and about three times as fast per flow on 2 CPUs
// as the random IDs of BenchmarkFinishParallel, whose shards moved between CPUs. The Picker
// keeps a CPU on its shard whatever the IDs: the two should now be level.
func BenchmarkFinishParallelAffine(b *testing.B) {
	r, err := NewRecorder(512, prometheus.NewRegistry())
	if err != nil {
		b.Fatal(err)
	}
	src := benchRecords()
	var g atomic.Uint64
	b.ReportAllocs()
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		recs := make([]Record, len(src))
		id := g.Add(1)
		for i := range recs {
			recs[i] = *src[i]
			recs[i].ID = id
		}
		for i := 0; pb.Next(); i++ {
			r.Finish(&recs[i%len(recs)])
		}
	})
}

// TestSpanTimes: the compact spans give back the times they were given, including a stage
// entered at the very instant the flow began, and unset times stay zero.
func TestSpanTimes(t *testing.T) {
	t0 := time.Now()
	rec := &Record{Timeline: Timeline{Begin: t0}}
	rec.Enter("capture", t0)
	rec.StartStage(t0.Add(3 * time.Microsecond))
	rec.Leave(t0.Add(10 * time.Microsecond))
	rec.Enter("identity", t0.Add(11*time.Microsecond))
	if rec.NumSpans() != 2 {
		t.Fatalf("%d spans", rec.NumSpans())
	}
	s := rec.Span(0)
	if !s.Queued.Equal(t0) || s.Wait() != 3*time.Microsecond || s.Work() != 7*time.Microsecond {
		t.Fatalf("span 0 = %+v (wait %v, work %v)", s, s.Wait(), s.Work())
	}
	s = rec.Span(1)
	if !s.Queued.Equal(t0.Add(11*time.Microsecond)) || !s.Start.IsZero() || !s.End.IsZero() {
		t.Fatalf("span 1 = %+v", s)
	}
	if got := rec.Spans(); len(got) != 2 || got[0] != rec.Span(0) {
		t.Fatalf("Spans() = %+v", got)
	}
	// Without Begin, the first Enter sets it.
	var r2 Record
	r2.Enter("capture", t0)
	if !r2.Begin.Equal(t0) || !r2.Span(0).Queued.Equal(t0) {
		t.Fatalf("record without Begin: %+v %+v", r2.Begin, r2.Span(0))
	}
}
