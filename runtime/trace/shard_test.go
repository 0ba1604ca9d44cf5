package trace

import (
	"bytes"
	"fmt"
	"math"
	"math/rand/v2"
	"reflect"
	"runtime"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/prometheus/client_golang/prometheus/testutil/promlint"
	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"

	shardpkg "github.com/ztgo/ztgo/runtime/shard"
)

// roundRobin is a deterministic picker: 0, 1, ..., k-1, 0, ... (safe for concurrent use):
// calls spread over the shards as evenly as they can.
func roundRobin(k int) func() int {
	var n atomic.Uint64
	return func() int { return int((n.Add(1) - 1) % uint64(k)) }
}

// onShards makes r's next calls (Finish, ObserveFirstByte) land in the given shards, in
// order; one call more fails t.
func onShards(t *testing.T, r *Recorder, shards ...int) {
	r.pick = func() int {
		if len(shards) == 0 {
			t.Fatal("a call past the scripted shards")
		}
		i := shards[0]
		shards = shards[1:]
		return i
	}
}

// NewRecorder makes one shard per CPU (see runtime/shard's Count), with a picker of that
// many; newRecorder refuses no shards, and splits the recent records over the shards.
func TestShardCount(t *testing.T) {
	r, err := NewRecorder(16, nil)
	if err != nil {
		t.Fatal(err)
	}
	want := shardpkg.Count(runtime.GOMAXPROCS(0))
	if len(r.shards) != want {
		t.Errorf("%d shards, want %d", len(r.shards), want)
	}
	for range 1000 {
		if i := r.pick(); i < 0 || i >= want {
			t.Fatalf("picked shard %d of %d", i, want)
		}
	}
	for _, k := range []int{0, -1} {
		if _, err := newRecorder(8, nil, k); err == nil {
			t.Errorf("%d shards accepted", k)
		}
	}
	r, err = newRecorder(100, nil, 8)
	if err != nil {
		t.Fatal(err)
	}
	if r.per != 13 {
		t.Errorf("a shard of a 100-record recorder in 8 holds %d recent records, want 13", r.per)
	}
}

// The stage histograms count in integer nanoseconds: every sample must land in the bucket
// client_golang's Observe(d.Seconds()) puts it in.
func TestStageBucketsMatchSeconds(t *testing.T) {
	check := func(ns int64) {
		want := numStageBuckets
		for i, b := range stageBuckets {
			if time.Duration(ns).Seconds() <= b {
				want = i
				break
			}
		}
		var c counts
		c.observe(ns)
		if c.n[want] != 1 {
			t.Fatalf("%dns counted in %v, want bucket %d", ns, c.n, want)
		}
	}
	for _, b := range stageBucketsNS {
		for ns := b - 3; ns <= b+3; ns++ {
			check(ns)
		}
	}
	for _, ns := range []int64{math.MinInt64, -1, 0, 1, 1 << 40, math.MaxInt64} {
		check(ns)
	}
}

// stages and dirs are what the generated flows go through.
var (
	genStages = []string{"capture", "identity", "authz", "hbone", "upstream"}
	genDirs   = []string{"inbound", "outbound", "inbound_plaintext"}
)

// genFlow returns a flow through some of genStages, in order, with pseudo-random durations:
// half the flows take whole milliseconds and no wait (so their totals tie), the others spread
// from a nanosecond to seconds.
func genFlow(rng *rand.Rand, id uint64) *Record { return genFlowOf(rng, id, rng.IntN(2) == 0) }

// genFlowOf is genFlow, all coarse (whole milliseconds, no wait) if coarse is set.
func genFlowOf(rng *rand.Rand, id uint64, coarse bool) *Record {
	t0 := time.Unix(5000, 0)
	rec := &Record{Timeline: Timeline{ID: id, Direction: genDirs[rng.IntN(len(genDirs))], Begin: t0, Outcome: "established"}, Src: fmt.Sprint("10.0.0.", id%250)}
	at := t0
	var stages []string
	for _, st := range genStages {
		if rng.IntN(4) != 0 {
			stages = append(stages, st)
		}
	}
	if len(stages) == 0 {
		stages = genStages[:1]
	}
	for i, st := range stages {
		var wait, work time.Duration
		if coarse {
			work = time.Duration(1+rng.IntN(4)) * time.Millisecond
		} else {
			wait = time.Duration(rng.IntN(50_000))
			work = time.Duration(math.Exp(rng.Float64() * math.Log(3e9)))
		}
		rec.Enter(st, at)
		if i == len(stages)-1 && rng.IntN(20) == 0 {
			break // never started: the span is skipped
		}
		rec.StartStage(at.Add(wait))
		at = at.Add(wait + work)
		rec.Leave(at)
	}
	if rng.IntN(8) == 0 {
		rec.Outcome = "DENY"
	} else {
		rec.Established = at
	}
	return rec
}

// readers is everything a Recorder shows, read at one moment.
type readers struct {
	Recent, Slowest, Failures, SlowestWindow [][]Record
	Windows                                  [][]StageWindow
	End                                      []time.Time
}

// read reads r: Recent up to recentMax records.
func read(r *Recorder, recentMax int) readers {
	var out readers
	for _, n := range []int{-1, 0, 1, 2, 5, recentMax / 2, recentMax} {
		out.Recent = append(out.Recent, r.Recent(n))
	}
	for _, n := range []int{-1, 0, 1, 3, 20, 63, 64, 65} {
		out.Slowest = append(out.Slowest, r.Slowest(n))
	}
	for _, n := range []int{-1, 0, 1, 7, 20, 32, 40} {
		out.Failures = append(out.Failures, r.Failures(n))
	}
	for _, n := range []int{-1, 0, 1, 5, 20, SlowestWindowMax, 1000} {
		out.SlowestWindow = append(out.SlowestWindow, r.SlowestWindow(n))
	}
	for _, step := range []time.Duration{time.Second, 7 * time.Second, time.Minute} {
		end, w := r.Window(step)
		out.End = append(out.End, end)
		out.Windows = append(out.Windows, w)
	}
	return out
}

// scrape returns what reg exposes, in the text format, without the created timestamps (a
// series' is when it was first used, which differs between recorders).
func scrape(t *testing.T, reg *prometheus.Registry) string {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	var buf bytes.Buffer
	for _, mf := range mfs {
		for _, m := range mf.Metric {
			m.Histogram.CreatedTimestamp = nil
		}
		if _, err := expfmt.MetricFamilyToText(&buf, mf); err != nil {
			t.Fatal(err)
		}
	}
	return buf.String()
}

// TestShardsMergeExactly drives recorders of 1, 2, 3, 8 and 16 shards through the same flows
// and checks that every reader, and the scrape, shows the same in all of them: what the
// single-lock recorder showed. Finish spreads the flows over the shards in turn, so Recent is
// exact too; ObserveFirstByte lands anywhere. Flows are numbered in the order they finish,
// as the pipeline numbers them (ties of the clock go to the higher ID). With only coarse
// flows, the slowest are mostly ties.
func TestShardsMergeExactly(t *testing.T) {
	t.Run("mixed", func(t *testing.T) { testShardsMergeExactly(t, func(rng *rand.Rand) bool { return rng.IntN(2) == 0 }) })
	t.Run("coarse", func(t *testing.T) { testShardsMergeExactly(t, func(*rand.Rand) bool { return true }) })
}

func testShardsMergeExactly(t *testing.T, coarse func(*rand.Rand) bool) {
	const size = 100
	type rig struct {
		r     *Recorder
		reg   *prometheus.Registry
		c     *clock
		shard *int // where the next call lands, mod K
	}
	var rigs []rig
	for _, k := range []int{1, 2, 3, 8, 16} {
		reg := prometheus.NewRegistry()
		r, err := newRecorder(size, reg, k)
		if err != nil {
			t.Fatal(err)
		}
		c := &clock{time.Unix(50_000, 0)}
		r.now = c.now
		shard := new(int)
		r.pick = func() int { return *shard % k }
		rigs = append(rigs, rig{r, reg, c, shard})
	}
	rng := rand.New(rand.NewPCG(1, 2))
	reads := 0
	for id := uint64(1); id <= 6000; id++ {
		rec := genFlowOf(rng, id, coarse(rng))
		// Often several flows in one instant (ties), sometimes a gap longer than the window.
		var step time.Duration
		switch x := rng.IntN(100); {
		case x < 30:
		case x < 99:
			step = time.Duration(rng.IntN(int(200 * time.Millisecond)))
		default:
			step = time.Duration(40+rng.IntN(60)) * time.Second
		}
		fb := time.Duration(rng.IntN(int(time.Second)))
		fbShard := rng.IntN(48)
		for _, g := range rigs {
			g.c.t = g.c.t.Add(step)
			*g.shard = int(id) // in turn
			g.r.Finish(rec)
			*g.shard = fbShard
			g.r.ObserveFirstByte(rec.Direction, fb)
		}
		if id%500 == 0 || rng.IntN(300) == 0 {
			reads++
			want := read(rigs[0].r, size)
			wantScrape := scrape(t, rigs[0].reg)
			for _, g := range rigs[1:] {
				if got := read(g.r, size); !reflect.DeepEqual(got, want) {
					t.Fatalf("after flow %d, %d shards read differently from one:\n%s", id, len(g.r.shards), diffReaders(got, want))
				}
				if got := scrape(t, g.reg); got != wantScrape {
					t.Fatalf("after flow %d, %d shards scrape differently from one:\n%s\nwant\n%s", id, len(g.r.shards), got, wantScrape)
				}
			}
		}
	}
	// The run must have covered what the readers merge.
	r := rigs[0].r
	if n := len(r.Failures(40)); n != failureRing {
		t.Errorf("%d failures kept, want %d", n, failureRing)
	}
	if n := len(r.Slowest(100)); n != maxSlowest {
		t.Errorf("%d slowest kept, want %d", n, maxSlowest)
	}
	if n := len(r.Recent(1000)); n != size {
		t.Errorf("%d recent kept, want %d", n, size)
	}
	if reads < 15 {
		t.Errorf("only %d reads", reads)
	}
	for _, g := range rigs {
		for i := range g.r.shards {
			if g.r.shards[i].Load() == nil {
				t.Errorf("%d shards: shard %d never used", len(g.r.shards), i)
			}
		}
	}
}

// With flows finishing in any order of their IDs and landing unevenly on the shards (in runs
// on one shard, as calls from one CPU do, switching at random), every reader is still exact
// but Recent, which is exact up to ceil(size/K) records.
func TestShardsMergeExactlyAnyOrder(t *testing.T) {
	const size, k = 64, 8
	one, _ := newRecorder(size, nil, 1)
	many, _ := newRecorder(size, nil, k)
	c := &clock{time.Unix(70_000, 0)}
	one.now, many.now = c.now, c.now
	rng := rand.New(rand.NewPCG(3, 4))
	on := 0
	many.pick = func() int {
		if rng.IntN(6) == 0 {
			on = rng.IntN(k)
		}
		return on
	}
	order := map[uint64]int{} // flow ID -> when it finished
	for i := range 4000 {
		rec := genFlow(rng, rng.Uint64())
		order[rec.ID] = i
		c.t = c.t.Add(1 + time.Duration(rng.IntN(int(50*time.Millisecond)))) // no two at one instant
		one.Finish(rec)
		many.Finish(rec)
		if i%400 == 399 {
			got, want := read(many, size/k), read(one, size/k)
			if !reflect.DeepEqual(got, want) {
				t.Fatalf("after %d flows:\n%s", i+1, diffReaders(got, want))
			}
			// Past size/k, Recent is newest first still, and all of the last flows of
			// every shard are there.
			all := many.Recent(size)
			if len(all) != size {
				t.Fatalf("Recent(%d) = %d records", size, len(all))
			}
			for j := 1; j < len(all); j++ {
				if order[all[j-1].ID] <= order[all[j].ID] {
					t.Fatalf("Recent: %d (finished %d) before %d (finished %d)", all[j-1].ID, order[all[j-1].ID],
						all[j].ID, order[all[j].ID])
				}
			}
		}
	}
}

// diffReaders names the first reader that differs.
func diffReaders(got, want readers) string {
	gv, wv := reflect.ValueOf(got), reflect.ValueOf(want)
	for i := range gv.NumField() {
		g, w := gv.Field(i), wv.Field(i)
		for j := range w.Len() {
			if !reflect.DeepEqual(g.Index(j).Interface(), w.Index(j).Interface()) {
				return fmt.Sprintf("%s[%d]:\n got %s\nwant %s", gv.Type().Field(i).Name, j,
					brief(g.Index(j).Interface()), brief(w.Index(j).Interface()))
			}
		}
	}
	return "(no difference)"
}

func brief(v any) string {
	if rs, ok := v.([]Record); ok {
		return fmt.Sprint(ids(rs))
	}
	return fmt.Sprintf("%+v", v)
}

// TestConcurrentHistogramsExact finishes flows and observes first bytes from many goroutines
// while others read, and checks the scrape against client_golang's HistogramVec fed the same
// samples: the same buckets, counts and sums. The calls land where the Picker puts them, or
// on random shards (no affinity at all).
func TestConcurrentHistogramsExact(t *testing.T) {
	t.Run("picker", func(t *testing.T) { testConcurrentHistogramsExact(t, false) })
	t.Run("random", func(t *testing.T) { testConcurrentHistogramsExact(t, true) })
}

func testConcurrentHistogramsExact(t *testing.T, random bool) {
	const goroutines, perG, k = 8, 1500, 4
	reg := prometheus.NewRegistry()
	r, err := newRecorder(256, reg, k)
	if err != nil {
		t.Fatal(err)
	}
	if random {
		r.pick = func() int { return rand.IntN(k) }
	}
	recs := make([][]*Record, goroutines)
	fbs := make([][]time.Duration, goroutines)
	for g := range recs {
		rng := rand.New(rand.NewPCG(uint64(g), 99))
		for i := range perG {
			recs[g] = append(recs[g], genFlow(rng, uint64(g*perG+i+1)))
			fbs[g] = append(fbs[g], time.Duration(rng.Int64N(int64(20*time.Second))))
		}
	}
	var wg, readers sync.WaitGroup
	stop := make(chan struct{})
	for range 2 {
		readers.Add(1)
		go func() {
			defer readers.Done()
			for {
				select {
				case <-stop:
					return
				default:
				}
				r.Recent(50)
				r.Slowest(20)
				r.SlowestWindow(20)
				r.Failures(20)
				r.Window(time.Second)
				if _, err := reg.Gather(); err != nil {
					t.Error(err)
					return
				}
			}
		}()
	}
	for g := range goroutines {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i, rec := range recs[g] {
				r.Finish(rec)
				r.ObserveFirstByte(rec.Direction, fbs[g][i])
			}
		}()
	}
	wg.Wait()
	close(stop)
	readers.Wait()

	// The reference: HistogramVecs as the Recorder had them, fed the same samples.
	ref := prometheus.NewRegistry()
	work, wait := referenceVecs(ref)
	flows, spans := 0, 0
	for g := range recs {
		for i, rec := range recs[g] {
			flows++
			for _, s := range rec.Spans() {
				if s.Start.IsZero() || s.End.IsZero() {
					continue
				}
				spans++
				work.WithLabelValues(s.Stage, rec.Direction).Observe(s.Work().Seconds())
				wait.WithLabelValues(s.Stage, rec.Direction).Observe(s.Wait().Seconds())
			}
			work.WithLabelValues(StageFirstByte, rec.Direction).Observe(fbs[g][i].Seconds())
		}
	}
	got, want := gather(t, reg), gather(t, ref)
	if len(got) != len(want) || len(got) != 2 {
		t.Fatalf("%d families, want %d", len(got), len(want))
	}
	var observed uint64
	for i := range want {
		g, w := got[i], want[i]
		if g.GetName() != w.GetName() || g.GetHelp() != w.GetHelp() || g.GetType() != w.GetType() || len(g.Metric) != len(w.Metric) {
			t.Fatalf("family %s %q %v with %d series, want %s %q %v with %d", g.GetName(), g.GetHelp(), g.GetType(), len(g.Metric),
				w.GetName(), w.GetHelp(), w.GetType(), len(w.Metric))
		}
		for j := range w.Metric {
			gm, wm := g.Metric[j], w.Metric[j]
			if !reflect.DeepEqual(labels(gm), labels(wm)) {
				t.Fatalf("%s series %d: labels %v, want %v", g.GetName(), j, labels(gm), labels(wm))
			}
			gh, wh := gm.GetHistogram(), wm.GetHistogram()
			observed += gh.GetSampleCount()
			if gh.GetSampleCount() != wh.GetSampleCount() {
				t.Errorf("%s%v: count %d, want %d", g.GetName(), labels(gm), gh.GetSampleCount(), wh.GetSampleCount())
			}
			if d := math.Abs(gh.GetSampleSum() - wh.GetSampleSum()); d > 1e-9*math.Abs(wh.GetSampleSum()) {
				t.Errorf("%s%v: sum %v, want %v", g.GetName(), labels(gm), gh.GetSampleSum(), wh.GetSampleSum())
			}
			if len(gh.Bucket) != len(wh.Bucket) {
				t.Fatalf("%s%v: %d buckets, want %d", g.GetName(), labels(gm), len(gh.Bucket), len(wh.Bucket))
			}
			for k := range wh.Bucket {
				if gh.Bucket[k].GetUpperBound() != wh.Bucket[k].GetUpperBound() ||
					gh.Bucket[k].GetCumulativeCount() != wh.Bucket[k].GetCumulativeCount() {
					t.Errorf("%s%v bucket %d: le %v count %d, want le %v count %d", g.GetName(), labels(gm), k,
						gh.Bucket[k].GetUpperBound(), gh.Bucket[k].GetCumulativeCount(),
						wh.Bucket[k].GetUpperBound(), wh.Bucket[k].GetCumulativeCount())
				}
			}
			if gh.CreatedTimestamp == nil {
				t.Errorf("%s%v has no created timestamp", g.GetName(), labels(gm))
			}
		}
	}
	if want := uint64(2*spans + flows); observed != want {
		t.Errorf("%d samples in all, want %d", observed, want)
	}
	if !random {
		return
	}
	if n := len(r.Recent(1000)); n != 256 {
		t.Errorf("Recent kept %d records, want 256", n)
	}
	// First bytes went to more than one shard.
	fb := r.firstByteSeries("outbound")
	spread := 0
	r.eachShard(func(sh *shard) {
		if fb.idx < len(sh.bySeries) && sh.bySeries[fb.idx] != nil {
			spread++
		}
	})
	if spread < 2 {
		t.Errorf("first bytes counted in %d shard(s) of 4", spread)
	}
}

// Of records as slow as each other, the first ones finished are kept and come first.
func TestSlowestKeepsTheFirstOfEquals(t *testing.T) {
	for _, k := range []int{1, 4} {
		r, _ := newRecorder(500, nil, k)
		r.pick = roundRobin(k)
		c := &clock{time.Unix(300_000, 0)}
		r.now = c.now
		for i := 1; i <= 300; i++ {
			r.Finish(flow(uint64(i), "hbone", "inbound", 5*time.Millisecond, "established"))
			if i%3 == 0 {
				c.t = c.t.Add(time.Millisecond) // some at one instant, some not
			}
		}
		for name, got := range map[string][]Record{"Slowest": r.Slowest(100), "SlowestWindow": r.SlowestWindow(100)} {
			want := maxSlowest
			if name == "SlowestWindow" {
				want = slowFlowsPerSlot
			}
			if len(got) != want {
				t.Fatalf("%d shards: %s kept %d, want %d", k, name, len(got), want)
			}
			for i, rec := range got {
				if rec.ID != uint64(i+1) {
					t.Fatalf("%d shards: %s = %v, want the first %d", k, name, ids(got), want)
				}
			}
		}
	}
}

// A clock that went back more than the ring (a wall clock step) does not hide new flows
// behind the seconds it had reached.
func TestWindowClockBack(t *testing.T) {
	r, _ := newRecorder(16, nil, 2)
	c := &clock{time.Unix(400_000, 0)}
	r.now = c.now
	onShards(t, r, 1, 0)
	r.Finish(flow(1, "hbone", "outbound", time.Millisecond, "established"))
	r.Window(time.Second)
	c.t = c.t.Add(-windowSlots * time.Second) // the same slot of the ring
	r.Finish(flow(2, "hbone", "outbound", 2*time.Millisecond, "established"))
	if _, ws := r.Window(time.Second); len(ws) != 1 || ws[0].Count != 1 || ws[0].Max != 2*time.Millisecond {
		t.Fatalf("window after the clock went back = %+v", ws)
	}
}

// Window orders a direction's stages by the lowest place they had in a flow, whichever shard
// saw it.
func TestWindowPipelineOrder(t *testing.T) {
	r, _ := newRecorder(16, nil, 2)
	c := &clock{time.Unix(200_000, 0)}
	r.now = c.now
	onShards(t, r, 1, 0, 1, 0)
	through := func(id uint64, stages ...string) {
		t0 := time.Unix(5000, 0)
		rec := &Record{Timeline: Timeline{ID: id, Direction: "outbound", Begin: t0, Outcome: "established"}}
		for _, st := range stages {
			rec.Enter(st, t0)
			rec.StartStage(t0)
			rec.Leave(t0.Add(time.Millisecond))
		}
		r.Finish(rec)
	}
	through(1, "capture", "identity", "zeta", "hbone") // shard 1: zeta third
	through(2, "capture", "hbone")                     // shard 0
	through(3, "zeta", "alpha")                        // shard 1: zeta first
	through(4, "capture", "identity", "alpha")         // shard 0: alpha third
	_, ws := r.Window(time.Second)
	var got []string
	for _, w := range ws {
		got = append(got, w.Stage)
	}
	// capture and zeta were first somewhere (then by name); alpha, hbone and identity second.
	if want := []string{"capture", "zeta", "alpha", "hbone", "identity"}; !slices.Equal(got, want) {
		t.Errorf("order = %v, want %v", got, want)
	}
}

// referenceVecs registers on reg the HistogramVecs the Recorder used to have: the same names,
// help, labels and buckets (copied here from before the change, not from the code).
func referenceVecs(reg *prometheus.Registry) (work, wait *prometheus.HistogramVec) {
	buckets := []float64{.00001, .000025, .00005, .0001, .00025, .0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10}
	work = prometheus.NewHistogramVec(prometheus.HistogramOpts{
		Name:    "ztgo_stage_duration_seconds",
		Help:    "Time a connection spends in each stage of the pipeline (work, excluding mailbox wait).",
		Buckets: buckets,
	}, []string{"stage", "direction"})
	wait = prometheus.NewHistogramVec(prometheus.HistogramOpts{
		Name:    "ztgo_stage_queue_seconds",
		Help:    "Time a connection waits in a stage's mailbox before a worker takes it.",
		Buckets: buckets,
	}, []string{"stage", "direction"})
	reg.MustRegister(work, wait)
	return work, wait
}

func gather(t *testing.T, g prometheus.Gatherer) []*dto.MetricFamily {
	t.Helper()
	mfs, err := g.Gather()
	if err != nil {
		t.Fatal(err)
	}
	return mfs
}

func labels(m *dto.Metric) map[string]string {
	out := map[string]string{}
	for _, l := range m.GetLabel() {
		out[l.GetName()] = l.GetValue()
	}
	return out
}

// The scrape passes promlint, and exposes the same families, with the same help, labels and
// bucket bounds, as the HistogramVecs did.
func TestScrapeLint(t *testing.T) {
	reg := prometheus.NewRegistry()
	r, err := NewRecorder(16, reg)
	if err != nil {
		t.Fatal(err)
	}
	if n := testutil.CollectAndCount(reg); n != 0 {
		t.Fatalf("%d series before any flow", n)
	}
	r.Finish(rec(1, 3*time.Millisecond))
	r.ObserveFirstByte("outbound", 40*time.Millisecond)
	mfs := gather(t, reg)
	problems, err := promlint.NewWithMetricFamilies(mfs).Lint()
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range problems {
		t.Errorf("promlint: %s: %s", p.Metric, p.Text)
	}
	// The same samples through HistogramVecs as the Recorder had them expose the same text.
	ref := prometheus.NewRegistry()
	work, wait := referenceVecs(ref)
	for _, sp := range rec(1, 3*time.Millisecond).Spans() {
		work.WithLabelValues(sp.Stage, "outbound").Observe(sp.Work().Seconds())
		wait.WithLabelValues(sp.Stage, "outbound").Observe(sp.Wait().Seconds())
	}
	work.WithLabelValues(StageFirstByte, "outbound").Observe((40 * time.Millisecond).Seconds())
	if got, want := scrape(t, reg), scrape(t, ref); got != want {
		t.Errorf("scrape:\n%s\nwant (HistogramVec):\n%s", got, want)
	}
	var names []string
	for _, mf := range mfs {
		for _, m := range mf.Metric {
			names = append(names, mf.GetName()+"/"+labels(m)["stage"])
		}
	}
	slices.Sort(names)
	if want := []string{"ztgo_stage_duration_seconds/first_byte", "ztgo_stage_duration_seconds/hbone",
		"ztgo_stage_duration_seconds/identity", "ztgo_stage_queue_seconds/hbone", "ztgo_stage_queue_seconds/identity"}; !slices.Equal(names, want) {
		t.Errorf("series = %v, want %v (first_byte has no queue time)", names, want)
	}
	// A second recorder on the same registry is refused, as the HistogramVecs were.
	if _, err := NewRecorder(16, reg); err == nil {
		t.Error("a second recorder registered the same metrics")
	}
}

// Finish and ObserveFirstByte do not allocate once the shards and series exist, including
// when a shard moves a second into the window, and including the Picker.
func TestFinishDoesNotAllocate(t *testing.T) {
	const k = 4
	r, err := newRecorder(64, prometheus.NewRegistry(), k)
	if err != nil {
		t.Fatal(err)
	}
	c := &clock{time.Unix(90_000, 0)}
	r.now = c.now
	recs := benchRecords()
	for _, rec := range recs {
		rec.Outcome = "DENY" // through the failure rings too
	}
	picker, shard := r.pick, 0
	r.pick = func() int { return shard }
	for i := range 1000 {
		shard = i % k // every shard meets every series
		r.Finish(recs[i%len(recs)])
		r.ObserveFirstByte("inbound", time.Millisecond)
	}
	r.pick = picker
	i := 0
	if n := testing.AllocsPerRun(1000, func() {
		c.t = c.t.Add(300 * time.Millisecond)
		r.Finish(recs[i%len(recs)])
		i++
	}); n != 0 {
		t.Errorf("Finish allocates %v times", n)
	}
	if n := testing.AllocsPerRun(1000, func() { r.ObserveFirstByte("inbound", time.Millisecond) }); n != 0 {
		t.Errorf("ObserveFirstByte allocates %v times", n)
	}
}

// A shard that saw no flow for a while keeps its last second apart from the window until it
// sees a flow again; what it holds then counts where it belongs, or not at all if it is past
// the window, and never overwrites a later second.
func TestWindowIdleShard(t *testing.T) {
	r, _ := newRecorder(16, nil, 2)
	c := &clock{time.Unix(100_000, 0)}
	r.now = c.now
	onShards(t, r, 1, 0, 0, 1, 1, 0, 1)
	r.Finish(flow(1, "hbone", "outbound", 3*time.Millisecond, "established")) // shard 1, second 0
	c.t = c.t.Add(10 * time.Second)
	r.Finish(flow(2, "hbone", "outbound", 5*time.Millisecond, "established")) // shard 0, second 10
	_, ws := r.Window(time.Second)
	if len(ws) != 1 || ws[0].Count != 2 || ws[0].Points[49].Count != 1 || ws[0].Points[59].Count != 1 {
		t.Fatalf("window = %+v", ws)
	}
	// 64 s after shard 1's flow, shard 0 fills the ring slot of that second; shard 1's old
	// second (already moved by Window above) must not come back.
	c.t = c.t.Add(54 * time.Second)
	r.Finish(flow(4, "hbone", "outbound", 7*time.Millisecond, "established")) // shard 0
	r.Finish(flow(3, "hbone", "outbound", 9*time.Millisecond, "established")) // shard 1
	_, ws = r.Window(time.Second)
	if len(ws) != 1 || ws[0].Count != 3 || ws[0].Points[59].Count != 2 || ws[0].Max != 9*time.Millisecond {
		t.Fatalf("window after 64s = %+v", ws)
	}
	// Shard 1 idles 70 s with a sample in its own slot, while shard 0 fills that second's
	// ring slot 64 s later: the stale sample is dropped.
	c.t = c.t.Add(time.Second)
	r.Finish(flow(5, "hbone", "outbound", time.Millisecond, "established")) // shard 1
	c.t = c.t.Add(64 * time.Second)
	r.Finish(flow(6, "hbone", "outbound", 2*time.Millisecond, "established")) // shard 0, same slot
	r.Window(time.Second)                                                     // moves it into the ring
	c.t = c.t.Add(time.Second)
	r.Finish(flow(7, "hbone", "outbound", 4*time.Millisecond, "established")) // shard 1 moves its old second
	_, ws = r.Window(time.Second)
	if len(ws) != 1 || ws[0].Count != 2 || ws[0].Max != 4*time.Millisecond || ws[0].Points[58].Count != 1 {
		t.Fatalf("window after an idle shard = %+v", ws)
	}
}

// When the latest flows all land on one shard (one busy CPU), Recent is exact for the
// ceil(size/K) records that shard holds; past them come the older records of the other
// shards, still newest first.
func TestRecentFromOneShard(t *testing.T) {
	const size, k = 8, 4
	r, _ := newRecorder(size, nil, k)
	c := &clock{time.Unix(60_000, 0)}
	r.now = c.now
	r.pick = roundRobin(k)
	for id := uint64(1); id <= 8; id++ { // two in every shard
		c.t = c.t.Add(time.Millisecond)
		r.Finish(flow(id, "hbone", "outbound", time.Millisecond, "established"))
	}
	r.pick = func() int { return 2 }
	for id := uint64(9); id <= 14; id++ {
		c.t = c.t.Add(time.Millisecond)
		r.Finish(flow(id, "hbone", "outbound", time.Millisecond, "established"))
	}
	if got, want := ids(r.Recent(size)), []uint64{14, 13, 8, 6, 5, 4, 2, 1}; !slices.Equal(got, want) {
		t.Errorf("Recent = %v, want %v", got, want)
	}
}

// Goroutines finishing flows on the same shards at once, on the real clock, leave every
// shard's rings in the order of their finish times (the merges of Recent, Failures and
// Slowest rely on it): Finish reads the clock under the shard's lock.
func TestConcurrentFinishKeepsShardOrder(t *testing.T) {
	const goroutines, perG, k = 8, 5000, 2
	r, err := newRecorder(256, nil, k)
	if err != nil {
		t.Fatal(err)
	}
	r.pick = func() int { return rand.IntN(k) }
	var wg sync.WaitGroup
	for g := range goroutines {
		wg.Go(func() {
			for i := range perG {
				outcome := "established"
				if i%2 == 0 {
					outcome = "DENY"
				}
				// Few distinct durations: many ties among the slowest.
				r.Finish(flow(uint64(g*perG+i+1), "hbone", "outbound", time.Duration(i%3)*time.Millisecond, outcome))
			}
		})
	}
	wg.Wait()
	inOrder := func(what string, shard int, at []int64) {
		t.Helper()
		for i := 1; i < len(at); i++ {
			if at[i] < at[i-1] {
				t.Fatalf("shard %d: %s out of finish order at %d of %d", shard, what, i, len(at))
			}
		}
	}
	for i := range r.shards {
		sh := r.shards[i].Load()
		if sh == nil {
			t.Fatalf("shard %d never used", i)
		}
		sh.mu.Lock()
		var recent, fails, ties []int64
		for j := range len(sh.recent) { // oldest first: the ring is full
			recent = append(recent, sh.recent[(sh.next+j)%len(sh.recent)].at)
		}
		for j := sh.nfail - failureRing; j < sh.nfail; j++ {
			fails = append(fails, sh.fails[j%failureRing].at)
		}
		for j, e := range sh.slowest {
			if j > 0 && e.total == sh.slowest[j-1].total {
				ties = append(ties, sh.slowest[j-1].at, e.at)
			}
		}
		sh.mu.Unlock()
		inOrder("recent ring", i, recent)
		inOrder("failure ring", i, fails)
		if len(ties) == 0 {
			t.Fatalf("shard %d: no ties among the slowest", i)
		}
		for j := 0; j < len(ties); j += 2 {
			if ties[j+1] < ties[j] {
				t.Fatalf("shard %d: of two as slow, the later finished comes first", i)
			}
		}
	}
}
