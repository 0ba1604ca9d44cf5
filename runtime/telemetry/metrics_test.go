package telemetry

import (
	"bytes"
	"errors"
	"fmt"
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

func TestShardCount(t *testing.T) {
	for procs, want := range map[int]int{0: 2, 1: 2, 2: 2, 3: 4, 4: 4, 5: 8, 8: 8, 9: 16, 16: 16, 17: 16, 256: 16} {
		if got := shardCount(procs); got != want {
			t.Errorf("shardCount(%d) = %d, want %d", procs, got, want)
		}
	}
	for _, n := range []int{0, 3, 12} {
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
	m, err := newMetrics(nil, maxShards)
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
// (run with -race).
func TestConcurrentFlowsOneLabelSet(t *testing.T) {
	for _, shards := range []int{1, 2, maxShards} {
		t.Run(fmt.Sprint(shards), func(t *testing.T) {
			tel, reg := newShardedTelemetry(t, shards)
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

// Flows with consecutive IDs count on different shards, each shard its own cache line,
// allocated when first used; the exported values are the sums.
func TestFlowsSpreadOverShards(t *testing.T) {
	const shards = 8
	tel, reg := newShardedTelemetry(t, shards)
	base := flow()
	first := sameLabels(base, 0)
	tel.Opened(first)
	s := tel.cache.get(base)
	for i := 1; i < shards; i++ {
		if s.shards[i].Load() != nil {
			t.Fatalf("shard %d allocated before a flow used it", i)
		}
	}
	var open []*stages.Flow
	for id := uint64(1); id < shards; id++ {
		f := sameLabels(base, id)
		tel.Opened(f)
		open = append(open, f)
	}
	for i := range tel.m.sockets[reporterSource] {
		if n := tel.m.sockets[reporterSource][i].n.Load(); n != 1 {
			t.Errorf("sockets shard %d = %d, want 1", i, n)
		}
	}
	if got := value(t, reg, "open", prometheus.Labels{"reporter": "source"}); got != shards {
		t.Errorf("sockets open = %v, want %d", got, shards)
	}
	tel.Closed(first, nil)
	for _, f := range open {
		tel.Closed(f, nil)
	}
	var wantBytes uint64
	for id := uint64(shards); id < 3*shards; id++ {
		f := sameLabels(base, id)
		f.BytesSent.Store(int64(id))
		wantBytes += id
		tel.Opened(f)
		tel.Closed(f, nil)
	}
	lines := map[uintptr]int{}
	for i := range s.shards {
		sh := s.shards[i].Load()
		if sh == nil {
			t.Fatalf("shard %d never used", i)
		}
		if o, c := sh.opened.Load(), sh.closed.Load(); o != 3 || c != 3 {
			t.Errorf("shard %d counted %d opened, %d closed; want 3 and 3", i, o, c)
		}
		line := uintptr(unsafe.Pointer(sh)) / cacheLine
		if j, ok := lines[line]; ok {
			t.Errorf("shards %d and %d share a cache line", j, i)
		}
		lines[line] = i
	}
	l := Labels(base)
	if got := value(t, reg, "opened", l); got != 3*shards {
		t.Errorf("opened = %v, want %d", got, 3*shards)
	}
	if got := value(t, reg, "closed", l); got != 3*shards {
		t.Errorf("closed = %v, want %d", got, 3*shards)
	}
	if got := value(t, reg, "received", l); got != float64(wantBytes) {
		t.Errorf("received = %v, want %d", got, wantBytes)
	}
	if got := value(t, reg, "open", prometheus.Labels{"reporter": "source"}); got != 0 {
		t.Errorf("sockets open = %v, want 0", got)
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

// Opening and closing a flow of a cached label set does not allocate.
func TestOpenedClosedDoNotAllocate(t *testing.T) {
	tel, _ := newShardedTelemetry(t, maxShards)
	base := flow()
	flows := make([]*stages.Flow, 2*maxShards)
	for i := range flows {
		flows[i] = sameLabels(base, uint64(i))
		flows[i].BytesSent.Store(100)
		tel.Opened(flows[i]) // allocates the series and its shards
		tel.Closed(flows[i], nil)
	}
	i := 0
	if n := testing.AllocsPerRun(1000, func() {
		f := flows[i%len(flows)]
		i++
		tel.Opened(f)
		tel.Closed(f, nil)
	}); n != 0 {
		t.Fatalf("%v allocations per opened and closed flow, want 0", n)
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
