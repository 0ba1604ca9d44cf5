package telemetry

import (
	"fmt"
	"hash/maphash"
	"runtime"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"
	"unicode/utf8"
	"unsafe"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"google.golang.org/protobuf/types/known/timestamppb"

	shardpkg "github.com/ztgo/ztgo/runtime/shard"
	"github.com/ztgo/ztgo/stages"
)

// cacheLine is the size a shard is padded to: the line size of amd64 and of most arm64 cores.
const cacheLine = 64

// shard is one cache line of a series' counters. Shards are allocated one by one, on first
// use; a 64-byte object sits on a 64-byte boundary (the allocator's 64-byte size class), so
// two shards never share a line.
type shard struct {
	opened, closed, failed atomic.Uint64
	received, sent         atomic.Uint64
	_                      [cacheLine - 5*8]byte
}

// A shard is exactly one cache line: either array length is negative otherwise.
var (
	_ [unsafe.Sizeof(shard{}) - cacheLine]struct{}
	_ [cacheLine - unsafe.Sizeof(shard{})]struct{}
)

// openShard is one padded shard of an istio_tcp_sockets_open series.
type openShard struct {
	n atomic.Int64
	_ [cacheLine - 8]byte
}

// series is the istio_tcp_* counters of one label set. It lives as long as Metrics: a
// counter's label set is exported from its first count on, as a CounterVec child would be.
type series struct {
	vals [numLabels]string
	// shards are indexed by Metrics.pick; a nil shard has counted nothing yet.
	shards []atomic.Pointer[shard]
	// established and failed are when the series first counted an established or a failed
	// flow, in Unix nanoseconds (0: never). The opened/closed/bytes families are exported only
	// for a label set that had an established flow, the failed family only for one that had a
	// failed flow, so no label set exports counters stuck at zero. The time is the counters'
	// created timestamp.
	established, failed atomic.Int64
	// next is another series whose label values have the same hash.
	next *series
}

// shard returns shard i, allocating it on first use.
func (s *series) shard(i int) *shard {
	p := &s.shards[i]
	if sh := p.Load(); sh != nil {
		return sh
	}
	return newShard(p)
}

func newShard(p *atomic.Pointer[shard]) *shard {
	sh := new(shard)
	if p.CompareAndSwap(nil, sh) {
		return sh
	}
	return p.Load()
}

// since records, once, when a family of the series was first counted. After the first call
// it only reads, so the line holding it stays shared between CPUs.
func since(t *atomic.Int64) {
	if t.Load() == 0 {
		t.CompareAndSwap(0, time.Now().UnixNano())
	}
}

// sum adds up the shards.
func (s *series) sum() (opened, closed, failed, received, sent uint64) {
	for i := range s.shards {
		if sh := s.shards[i].Load(); sh != nil {
			opened += sh.opened.Load()
			closed += sh.closed.Load()
			failed += sh.failed.Load()
			received += sh.received.Load()
			sent += sh.sent.Load()
		}
	}
	return
}

// Reporters of istio_tcp_sockets_open; stages.Direction.Reporter maps every direction to one.
const (
	reporterSource = iota
	reporterDestination
	numReporters
)

func reporterOf(d stages.Direction) int {
	if d == stages.Outbound {
		return reporterSource
	}
	return reporterDestination
}

var reporterNames = [numReporters]string{stages.Outbound.Reporter(), stages.Inbound.Reporter()}

// Metrics are Istio's TCP connection metrics. Metrics owns the series and exports them
// through its own collector (not CounterVecs): each series is split into shards, one cache
// line each, and a call counts in the shard its CPU last wrote (see pick), so concurrent
// flows of one label set seldom write the same line; the shards are summed when the metrics
// are collected.
type Metrics struct {
	opened, closed, failed, received, sent, open *prometheus.Desc

	shards int
	// pick picks the shard a call counts in, of the series and of sockets: runtime/shard's
	// Picker, so that a CPU keeps writing the same lines. What it picks never changes a sum.
	pick func() int
	seed maphash.Seed

	// mu guards the registry: byHash, by the hash of the label values, and all, in creation
	// order. The hot path takes it only for a label set its cache does not hold; Collect only
	// to read all, which is append-only, so it then reads the series without it.
	mu     sync.Mutex
	byHash map[uint64]*series
	all    []*series

	// sockets are the shards of istio_tcp_sockets_open by reporter, exported once a
	// Telemetry uses the metrics (socketsExported), as the gauge's children were.
	sockets         [numReporters][]openShard
	socketsExported atomic.Bool
}

// NewMetrics registers the metrics on reg.
func NewMetrics(reg prometheus.Registerer) (*Metrics, error) {
	return newMetrics(reg, shardpkg.Count(runtime.GOMAXPROCS(0)))
}

// newMetrics is NewMetrics with the number of shards per series.
func newMetrics(reg prometheus.Registerer, shards int) (*Metrics, error) {
	if shards < 1 {
		return nil, fmt.Errorf("telemetry: %d shards", shards)
	}
	counter := func(name, help string) *prometheus.Desc {
		return prometheus.NewDesc(name, help, labelNames, nil)
	}
	m := &Metrics{
		opened:   counter("istio_tcp_connections_opened_total", "The total number of TCP connections opened"),
		closed:   counter("istio_tcp_connections_closed_total", "The total number of TCP connections closed"),
		failed:   counter("istio_tcp_connections_failed_total", "The total number of TCP connections that failed to establish"),
		received: counter("istio_tcp_received_bytes_total", "The size of total bytes received during request in case of a TCP connection"),
		sent:     counter("istio_tcp_sent_bytes_total", "The size of total bytes sent during response in case of a TCP connection"),
		open: prometheus.NewDesc("istio_tcp_sockets_open", "The current number of open proxied TCP connections",
			[]string{"reporter"}, nil),
		shards: shards,
		pick:   shardpkg.NewPicker(shards).Pick,
		seed:   maphash.MakeSeed(),
		byHash: make(map[uint64]*series),
	}
	for r := range m.sockets {
		m.sockets[r] = make([]openShard, shards)
	}
	if reg != nil {
		if err := reg.Register((*istioCollector)(m)); err != nil {
			return nil, fmt.Errorf("register istio metrics: %w", err)
		}
	}
	return m, nil
}

// series returns the series of the label values v, creating it on first use. Values that
// are not UTF-8 are made so: the registry would fail the whole scrape on them (where a
// CounterVec panicked on the hot path).
func (m *Metrics) series(v *[numLabels]string) *series {
	for i := range v {
		if !utf8.ValidString(v[i]) {
			v[i] = strings.ToValidUTF8(v[i], "\uFFFD")
		}
	}
	var h maphash.Hash
	h.SetSeed(m.seed)
	for i := range v {
		h.WriteString(v[i])
		h.WriteByte(0)
	}
	sum := h.Sum64()
	m.mu.Lock()
	defer m.mu.Unlock()
	for s := m.byHash[sum]; s != nil; s = s.next {
		if s.vals == *v {
			return s
		}
	}
	s := &series{vals: *v, shards: make([]atomic.Pointer[shard], m.shards), next: m.byHash[sum]}
	m.byHash[sum] = s
	m.all = append(m.all, s)
	return s
}

// openGauge is shard i of the istio_tcp_sockets_open series of direction d. A flow may be
// counted open in one shard and closed in another: a shard can go negative, the sum cannot.
func (m *Metrics) openGauge(d stages.Direction, i int) *atomic.Int64 {
	return &m.sockets[reporterOf(d)][i].n
}

// istioCollector exports Metrics.
type istioCollector Metrics

func (c *istioCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{c.opened, c.closed, c.failed, c.received, c.sent, c.open} {
		ch <- d
	}
}

func (c *istioCollector) Collect(ch chan<- prometheus.Metric) {
	c.mu.Lock()
	all := c.all
	c.mu.Unlock()
	for _, s := range all {
		est, fail := s.established.Load(), s.failed.Load()
		if est == 0 && fail == 0 {
			continue
		}
		opened, closed, failed, received, sent := s.sum()
		sc := newScrape(s)
		if est != 0 {
			ct := sc.created(0, est)
			ch <- sc.counter(0, c.opened, float64(opened), ct)
			ch <- sc.counter(1, c.closed, float64(closed), ct)
			ch <- sc.counter(2, c.received, float64(received), ct)
			ch <- sc.counter(3, c.sent, float64(sent), ct)
		}
		if fail != 0 {
			ch <- sc.counter(4, c.failed, float64(failed), sc.created(1, fail))
		}
	}
	if c.socketsExported.Load() {
		for r, g := range c.sockets {
			var n int64
			for i := range g {
				n += g[i].n.Load()
			}
			ch <- prometheus.MustNewConstMetric(c.open, prometheus.GaugeValue, float64(n), reporterNames[r])
		}
	}
}

// sortedLabels are the indexes of labelNames sorted by name: the order of a metric's label
// pairs.
var sortedLabels = func() (idx [numLabels]int) {
	for i := range idx {
		idx[i] = i
	}
	slices.SortFunc(idx[:], func(a, b int) int { return strings.Compare(labelNames[a], labelNames[b]) })
	return idx
}()

// scrape is one series' part of one Collect, in one allocation: its label pairs, built once
// and shared by the series' metrics (as a CounterVec child shares its own between scrapes,
// but here they are not kept between scrapes, which is most of what a child weighs), and the
// metrics themselves.
type scrape struct {
	pairs    [numLabels]dto.LabelPair
	labels   [numLabels]*dto.LabelPair
	ts       [2]timestamppb.Timestamp
	counters [5]counterMetric
}

func newScrape(s *series) *scrape {
	sc := new(scrape)
	for i, l := range sortedLabels {
		sc.pairs[i].Name = &labelNames[l]
		sc.pairs[i].Value = &s.vals[l]
		sc.labels[i] = &sc.pairs[i]
	}
	return sc
}

func (sc *scrape) created(i int, unixNano int64) *timestamppb.Timestamp {
	ts := &sc.ts[i]
	ts.Seconds, ts.Nanos = unixNano/1e9, int32(unixNano%1e9)
	return ts
}

func (sc *scrape) counter(i int, d *prometheus.Desc, v float64, created *timestamppb.Timestamp) *counterMetric {
	c := &sc.counters[i]
	c.desc, c.v, c.labels = d, v, sc.labels[:]
	c.c.Value, c.c.CreatedTimestamp = &c.v, created
	return c
}

// counterMetric is a counter's value in one scrape.
type counterMetric struct {
	desc   *prometheus.Desc
	v      float64
	labels []*dto.LabelPair
	c      dto.Counter
}

func (c *counterMetric) Desc() *prometheus.Desc { return c.desc }

func (c *counterMetric) Write(out *dto.Metric) error {
	out.Label = c.labels
	out.Counter = &c.c
	return nil
}
