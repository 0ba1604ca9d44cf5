package telemetry

import (
	"bytes"
	"errors"
	"fmt"
	"math/rand/v2"
	"runtime"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"unsafe"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/prometheus/client_golang/prometheus/testutil/promlint"
	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"google.golang.org/protobuf/proto"

	shardpkg "github.com/ztgo/ztgo/runtime/shard"
	"github.com/ztgo/ztgo/stages"
	"github.com/ztgo/ztgo/tls/spiffe"
)

// familyNames are the istio_tcp_* families by the short names the tests use.
var familyNames = map[string]string{
	"opened":   "istio_tcp_connections_opened_total",
	"closed":   "istio_tcp_connections_closed_total",
	"failed":   "istio_tcp_connections_failed_total",
	"received": "istio_tcp_received_bytes_total",
	"sent":     "istio_tcp_sent_bytes_total",
	"open":     "istio_tcp_sockets_open",
}

// gather scrapes g by family name, failing t if the scrape is inconsistent (such as two
// series with the same labels).
func gather(t testing.TB, g prometheus.Gatherer) map[string]*dto.MetricFamily {
	t.Helper()
	mfs, err := g.Gather()
	if err != nil {
		t.Fatal(err)
	}
	out := make(map[string]*dto.MetricFamily, len(mfs))
	for _, mf := range mfs {
		out[mf.GetName()] = mf
	}
	return out
}

// value is the value of the series with labels l of a family (by short name), failing t if
// there is none.
func value(t testing.TB, g prometheus.Gatherer, family string, l prometheus.Labels) float64 {
	t.Helper()
	name := familyNames[family]
	for _, m := range gather(t, g)[name].GetMetric() {
		if matches(m, l) {
			if m.Gauge != nil {
				return m.Gauge.GetValue()
			}
			return m.Counter.GetValue()
		}
	}
	t.Fatalf("no %s series with labels %v", name, l)
	return 0
}

func matches(m *dto.Metric, l prometheus.Labels) bool {
	if len(m.Label) != len(l) {
		return false
	}
	for _, p := range m.Label {
		if v, ok := l[p.GetName()]; !ok || v != p.GetValue() {
			return false
		}
	}
	return true
}

// count is the number of series of a family (by short name).
func count(t testing.TB, g prometheus.Gatherer, family string) int {
	t.Helper()
	n, err := testutil.GatherAndCount(g, familyNames[family])
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// sameLabels is a new flow with ID id and the label-determining fields of base, pointers
// included (so its cache key is base's).
func sameLabels(base *stages.Flow, id uint64) *stages.Flow {
	f := &stages.Flow{ID: id, Dir: base.Dir, Snap: base.Snap, Src: base.Src, UpAddr: base.UpAddr, HBONEAddr: base.HBONEAddr,
		SrcWorkload: base.SrcWorkload, DstWorkload: base.DstWorkload, DstService: base.DstService,
		SrcIdentity: base.SrcIdentity, DstIdentity: base.DstIdentity, Failure: base.Failure, Err: base.Err}
	f.Route = base.Route
	return f
}

func newShardedTelemetry(t testing.TB, shards int) (*Telemetry, *prometheus.Registry) {
	t.Helper()
	reg := prometheus.NewRegistry()
	m, err := newMetrics(reg, shards)
	if err != nil {
		t.Fatal(err)
	}
	return New(m, nil), reg
}

// roundRobin is a deterministic picker: 0, 1, ..., k-1, 0, ... (safe for concurrent use).
func roundRobin(k int) func() int {
	var n atomic.Uint64
	return func() int { return int((n.Add(1) - 1) % uint64(k)) }
}

// randomPicker picks any shard, with no affinity at all.
func randomPicker(k int) func() int { return func() int { return rand.IntN(k) } }

// NewMetrics makes one shard per CPU (see runtime/shard's Count), each with a picker of that
// many; newMetrics refuses no shards.
func TestShardCount(t *testing.T) {
	m, err := NewMetrics(nil)
	if err != nil {
		t.Fatal(err)
	}
	want := shardpkg.Count(runtime.GOMAXPROCS(0))
	if m.shards != want || len(m.sockets[reporterSource]) != want {
		t.Errorf("%d shards, %d sockets shards; want %d", m.shards, len(m.sockets[reporterSource]), want)
	}
	for range 1000 {
		if i := m.pick(); i < 0 || i >= want {
			t.Fatalf("picked shard %d of %d", i, want)
		}
	}
	for _, n := range []int{0, -1} {
		if _, err := newMetrics(nil, n); err == nil {
			t.Errorf("newMetrics accepted %d shards", n)
		}
	}
}

// A shard is one cache line and starts on one; so does each sockets-open shard.
func TestShardIsOneCacheLine(t *testing.T) {
	if n := unsafe.Sizeof(shard{}); n != cacheLine {
		t.Fatalf("shard is %d bytes, want %d", n, cacheLine)
	}
	if n := unsafe.Sizeof(openShard{}); n != cacheLine {
		t.Fatalf("openShard is %d bytes, want %d", n, cacheLine)
	}
	keep := make([]*shard, 100)
	for i := range keep {
		keep[i] = new(shard)
		if p := uintptr(unsafe.Pointer(keep[i])); p%cacheLine != 0 {
			t.Fatalf("shard at %#x is not on a cache line boundary", p)
		}
	}
	m, err := newMetrics(nil, shardpkg.MaxCount)
	if err != nil {
		t.Fatal(err)
	}
	for _, g := range m.sockets {
		if p := uintptr(unsafe.Pointer(&g[0])); p%cacheLine != 0 {
			t.Fatalf("sockets shards at %#x are not on a cache line boundary", p)
		}
	}
}

// Many goroutines churning flows of one label set, with scrapes in between, count exactly
// (run with -race), with the Picker and with calls landing on random shards (a flow opened
// in one shard and closed in another).
func TestConcurrentFlowsOneLabelSet(t *testing.T) {
	for _, tc := range []struct {
		shards int
		random bool
	}{{1, false}, {2, false}, {shardpkg.MaxCount, false}, {3, true}, {shardpkg.MaxCount, true}} {
		name := fmt.Sprint(tc.shards)
		if tc.random {
			name += "/random"
		}
		t.Run(name, func(t *testing.T) {
			tel, reg := newShardedTelemetry(t, tc.shards)
			if tc.random {
				tel.m.pick = randomPicker(tc.shards)
			}
			base := flow()
			const goroutines, each = 16, 500
			var ids atomic.Uint64
			stop, scraped := make(chan struct{}), make(chan struct{})
			go func() {
				defer close(scraped)
				for {
					select {
					case <-stop:
						return
					default:
					}
					if _, err := reg.Gather(); err != nil {
						t.Error(err)
						return
					}
				}
			}()
			var wg sync.WaitGroup
			for range goroutines {
				wg.Go(func() {
					for range each {
						f := sameLabels(base, ids.Add(1))
						f.BytesSent.Store(3)
						f.BytesRecv.Store(5)
						tel.Opened(f)
						tel.Closed(f, nil)
					}
				})
			}
			wg.Wait()
			close(stop)
			<-scraped
			const n = goroutines * each
			l := Labels(base)
			for family, want := range map[string]float64{"opened": n, "closed": n, "received": 3 * n, "sent": 5 * n} {
				if got := value(t, reg, family, l); got != want {
					t.Errorf("%s = %v, want %v", family, got, want)
				}
			}
			if got := value(t, reg, "open", prometheus.Labels{"reporter": "source"}); got != 0 {
				t.Errorf("sockets open = %v, want 0", got)
			}
			if count(t, reg, "opened") != 1 || count(t, reg, "failed") != 0 {
				t.Error("want exactly one opened series and no failed one")
			}
		})
	}
}

// Where a call counts is the picker's choice, not the flow's: a flow can be opened in one
// shard and closed in another, a shard is allocated (its own cache line) only when a call
// lands in it, and every exported value is the exact sum whatever the placement, a
// sockets_open shard going negative included.
func TestCallsOnAnyShardSumExactly(t *testing.T) {
	const shards = 8
	tel, reg := newShardedTelemetry(t, shards)
	var script []int // the shards the next calls land in
	tel.m.pick = func() int {
		i := script[0]
		script = script[1:]
		return i
	}
	base := flow()
	on := func(shards ...int) { script = append(script, shards...) }
	s := tel.cache.get(base)
	allocated := func() (in []int) {
		for i := range s.shards {
			if s.shards[i].Load() != nil {
				in = append(in, i)
			}
		}
		return in
	}
	sockets := func() (n []int64) {
		for i := range tel.m.sockets[reporterSource] {
			n = append(n, tel.m.sockets[reporterSource][i].n.Load())
		}
		return n
	}

	// One flow of one ID, opened in shard 5 and closed in shard 2.
	f := sameLabels(base, 7)
	f.BytesSent.Store(11)
	f.BytesRecv.Store(13)
	on(5)
	tel.Opened(f)
	if got := allocated(); !slices.Equal(got, []int{5}) {
		t.Fatalf("shards allocated after one call: %v, want [5]", got)
	}
	on(2)
	tel.Closed(f, nil)
	if got, want := sockets(), []int64{0, 0, -1, 0, 0, 1, 0, 0}; !slices.Equal(got, want) {
		t.Errorf("sockets shards = %v, want %v", got, want)
	}
	if got := value(t, reg, "open", prometheus.Labels{"reporter": "source"}); got != 0 {
		t.Errorf("sockets open = %v, want 0", got)
	}
	if o, c := s.shards[5].Load().opened.Load(), s.shards[2].Load().closed.Load(); o != 1 || c != 1 {
		t.Errorf("shard 5 opened %d, shard 2 closed %d; want 1 and 1", o, c)
	}
	if r := s.shards[2].Load().received.Load(); r != 11 {
		t.Errorf("shard 2 received %d, want 11 (bytes count with the close)", r)
	}

	// Many flows of the same ID (the ID is irrelevant), all in shard 0, then the same flows
	// again spread unevenly; some stay open, some fail.
	var wantOpened, wantClosed, wantFailed, wantRecv, wantSent, wantOpen float64
	wantOpened, wantClosed, wantRecv, wantSent = 1, 1, 11, 13
	for n := range 40 {
		g := sameLabels(base, 7)
		g.BytesSent.Store(int64(n))
		g.BytesRecv.Store(int64(2 * n))
		open, close := 0, 0
		if n >= 10 {
			open, close = n%3, (n/2)%shards
		}
		on(open)
		tel.Opened(g)
		wantOpened++
		if n%4 == 3 {
			wantOpen++
			continue
		}
		on(close)
		tel.Closed(g, nil)
		wantClosed++
		wantRecv += float64(n)
		wantSent += float64(2 * n)
	}
	denied := sameLabels(base, 7)
	denied.Fail(stages.FailDeny, errors.New("denied"))
	for _, i := range []int{6, 6, 6} {
		on(i)
		tel.Failed(denied)
		wantFailed++
	}
	if len(script) != 0 {
		t.Fatalf("%d picks left over: a call did not pick, or picked twice", len(script))
	}
	if got, want := allocated(), []int{0, 1, 2, 3, 4, 5, 6, 7}; !slices.Equal(got, want) {
		t.Errorf("allocated shards %v, want %v", got, want)
	}
	lines := map[uintptr]int{}
	for i := range s.shards {
		line := uintptr(unsafe.Pointer(s.shards[i].Load())) / cacheLine
		if j, ok := lines[line]; ok {
			t.Errorf("shards %d and %d share a cache line", j, i)
		}
		lines[line] = i
	}
	l := Labels(base)
	for family, want := range map[string]float64{"opened": wantOpened, "closed": wantClosed,
		"received": wantRecv, "sent": wantSent} {
		if got := value(t, reg, family, l); got != want {
			t.Errorf("%s = %v, want %v", family, got, want)
		}
	}
	if got := value(t, reg, "failed", Labels(denied)); got != wantFailed {
		t.Errorf("failed = %v, want %v", got, wantFailed)
	}
	if got := value(t, reg, "open", prometheus.Labels{"reporter": "source"}); got != wantOpen {
		t.Errorf("sockets open = %v, want %v", got, wantOpen)
	}
	negative := false
	for _, n := range sockets() {
		negative = negative || n < 0
	}
	if !negative {
		t.Error("no sockets shard went negative: the test does not cover closing in another shard")
	}
}

// A label set keeps its series, and its counts, when the cache moves to a new generation
// (newer snapshot) or starts over (full): one series per label set in the scrape.
func TestSeriesSurviveCacheGenerations(t *testing.T) {
	tel, reg := newTelemetry(t)
	snaps := published(t, 3)
	base := flow()
	var id uint64
	churn := func(snap int) {
		id++
		f := sameLabels(base, id)
		f.Snap = snaps[snap]
		f.BytesSent.Store(10)
		tel.Opened(f)
		tel.Closed(f, nil)
	}
	churn(0)
	g0 := tel.cache.gen.Load()
	churn(1)
	churn(2)
	g2 := tel.cache.gen.Load()
	if g0 == g2 || g2.version != snaps[2].Version() {
		t.Fatal("the cache did not change generation")
	}
	// Fill the generation with failed label sets: it starts over.
	for i := range maxSeries + 1 {
		f := flow()
		f.Snap, f.Dir, f.SrcWorkload = snaps[2], stages.Inbound, nil
		f.SrcIdentity = spiffe.ID{TrustDomain: "cluster.local", Namespace: "ns", ServiceAccount: fmt.Sprintf("sa-%d", i)}
		f.Fail(stages.FailDeny, errors.New("denied"))
		tel.Failed(f)
	}
	if tel.cache.gen.Load() == g2 {
		t.Fatal("a full cache did not start over")
	}
	churn(2)
	if _, ok := tel.cache.gen.Load().m.Load(keyOf(base)); !ok {
		t.Fatal("the new generation does not hold the label set")
	}
	l := Labels(base)
	if got := value(t, reg, "opened", l); got != 4 {
		t.Errorf("opened = %v, want 4 (counts of every generation)", got)
	}
	if got := value(t, reg, "received", l); got != 40 {
		t.Errorf("received = %v, want 40", got)
	}
	if n := count(t, reg, "opened"); n != 1 {
		t.Errorf("opened has %d series, want 1", n)
	}
	if n := count(t, reg, "failed"); n != maxSeries+1 {
		t.Errorf("failed has %d series, want %d", n, maxSeries+1)
	}
	if n := len(tel.m.all); n != maxSeries+2 {
		t.Errorf("registry holds %d series, want %d", n, maxSeries+2)
	}
}

// A label set that only failed exports only the failed family, and one that only got
// established exports no failed series.
func TestFailedOnlyExportsFailed(t *testing.T) {
	tel, reg := newTelemetry(t)
	denied := flow()
	denied.Fail(stages.FailDeny, errors.New("denied"))
	tel.Failed(denied)
	tel.Failed(sameLabels(denied, 1))
	mfs := gather(t, reg)
	for _, family := range []string{"opened", "closed", "received", "sent"} {
		if mf, ok := mfs[familyNames[family]]; ok {
			t.Errorf("a failed flow exported %s: %v", family, mf)
		}
	}
	if got := value(t, reg, "failed", Labels(denied)); got != 2 {
		t.Errorf("failed = %v, want 2", got)
	}
	tel.Opened(flow())
	tel.Closed(flow(), nil)
	if n := count(t, reg, "failed"); n != 1 {
		t.Errorf("failed has %d series, want 1", n)
	}
	for _, family := range []string{"opened", "closed", "received", "sent"} {
		if n := count(t, reg, family); n != 1 {
			t.Errorf("%s has %d series, want 1", family, n)
		}
	}
}

// The scrape is what client_golang's CounterVecs and GaugeVec fed the same flows would
// export (families, help, types, labels and values), plus created timestamps as they have.
func TestScrapeMatchesCounterVecs(t *testing.T) {
	tel, reg := newTelemetry(t)
	ref := prometheus.NewRegistry()
	vec := func(name, help string) *prometheus.CounterVec {
		v := prometheus.NewCounterVec(prometheus.CounterOpts{Name: name, Help: help}, labelNames)
		ref.MustRegister(v)
		return v
	}
	opened := vec("istio_tcp_connections_opened_total", "The total number of TCP connections opened")
	closed := vec("istio_tcp_connections_closed_total", "The total number of TCP connections closed")
	failed := vec("istio_tcp_connections_failed_total", "The total number of TCP connections that failed to establish")
	received := vec("istio_tcp_received_bytes_total", "The size of total bytes received during request in case of a TCP connection")
	sent := vec("istio_tcp_sent_bytes_total", "The size of total bytes sent during response in case of a TCP connection")
	open := prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "istio_tcp_sockets_open", Help: "The current number of open proxied TCP connections"}, []string{"reporter"})
	ref.MustRegister(open)
	open.WithLabelValues("source")
	open.WithLabelValues("destination")

	inbound := flow()
	inbound.Dir, inbound.SrcWorkload = stages.Inbound, nil
	plain := flow()
	plain.Dir = stages.InboundPlain
	denied := flow()
	denied.Fail(stages.FailDeny, errors.New("denied"))
	for i, base := range []*stages.Flow{flow(), inbound, plain, flow()} {
		for j := range i + 1 {
			f := sameLabels(base, uint64(10*i+j))
			f.BytesSent.Store(int64(1000 * (i + 1)))
			f.BytesRecv.Store(int64(j))
			tel.Opened(f)
			opened.With(Labels(f)).Inc()
			open.WithLabelValues(f.Dir.Reporter()).Inc()
			if j == 1 {
				continue // stays open
			}
			tel.Closed(f, nil)
			l := Labels(f)
			closed.With(l).Inc()
			received.With(l).Add(float64(f.BytesSent.Load()))
			sent.With(l).Add(float64(f.BytesRecv.Load()))
			open.WithLabelValues(f.Dir.Reporter()).Dec()
		}
	}
	for range 3 {
		tel.Failed(denied)
		failed.With(Labels(denied)).Inc()
	}

	got, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	want, err := ref.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mfs := range [][]*dto.MetricFamily{got, want} {
		for _, mf := range mfs {
			for _, m := range mf.Metric {
				if mf.GetType() == dto.MetricType_COUNTER {
					if m.Counter.CreatedTimestamp == nil {
						t.Errorf("%s has no created timestamp", mf.GetName())
					}
					m.Counter.CreatedTimestamp = nil
				}
			}
		}
	}
	if len(got) != len(want) {
		t.Fatalf("%d families, want %d", len(got), len(want))
	}
	for i := range got {
		if !proto.Equal(got[i], want[i]) {
			t.Errorf("family %s differs:\n%s\nwant:\n%s", got[i].GetName(), text(t, got[i]), text(t, want[i]))
		}
	}
}

func text(t *testing.T, mf *dto.MetricFamily) string {
	var b bytes.Buffer
	if err := expfmt.NewEncoder(&b, expfmt.NewFormat(expfmt.TypeTextPlain)).Encode(mf); err != nil {
		t.Fatal(err)
	}
	return b.String()
}

// The families pass promlint.
func TestScrapeLints(t *testing.T) {
	tel, reg := newTelemetry(t)
	f := flow()
	f.BytesSent.Store(10)
	tel.Opened(f)
	tel.Closed(f, nil)
	denied := flow()
	denied.Fail(stages.FailDeny, errors.New("denied"))
	tel.Failed(denied)
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	if len(mfs) != 6 {
		t.Fatalf("%d families, want 6", len(mfs))
	}
	problems, err := promlint.NewWithMetricFamilies(mfs).Lint()
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range problems {
		t.Errorf("%s: %s", p.Metric, p.Text)
	}
}

// Opening, closing and failing a flow of a cached label set does not allocate, shard
// picking included.
func TestOpenedClosedDoNotAllocate(t *testing.T) {
	tel, _ := newShardedTelemetry(t, shardpkg.MaxCount)
	picker := tel.m.pick
	tel.m.pick = roundRobin(shardpkg.MaxCount)
	base := flow()
	denied := flow()
	denied.Fail(stages.FailDeny, errors.New("denied"))
	flows := make([]*stages.Flow, 2*shardpkg.MaxCount)
	for i := range flows {
		flows[i] = sameLabels(base, uint64(i))
		flows[i].BytesSent.Store(100)
		tel.Opened(flows[i]) // allocates the series and all its shards
		tel.Closed(flows[i], nil)
		tel.Failed(denied)
	}
	tel.m.pick = picker
	i := 0
	if n := testing.AllocsPerRun(1000, func() {
		f := flows[i%len(flows)]
		i++
		tel.Opened(f)
		tel.Closed(f, nil)
		tel.Failed(denied)
	}); n != 0 {
		t.Fatalf("%v allocations per opened, closed and failed flow, want 0", n)
	}
}

// A label value that is not UTF-8 neither panics nor fails the scrape.
func TestInvalidUTF8LabelValue(t *testing.T) {
	tel, reg := newTelemetry(t)
	f := flow()
	f.Dir, f.SrcWorkload = stages.Inbound, nil
	f.SrcIdentity = spiffe.ID{TrustDomain: "cluster.local", Namespace: "ns\xff", ServiceAccount: "sa"}
	tel.Opened(f)
	tel.Closed(f, nil)
	l := Labels(f)
	l["source_workload_namespace"] = "ns\uFFFD"
	l["source_principal"] = "spiffe://cluster.local/ns/ns\uFFFD/sa/sa"
	if got := value(t, reg, "closed", l); got != 1 {
		t.Fatalf("closed = %v, want 1", got)
	}
}
