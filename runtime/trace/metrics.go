package trace

import (
	"math"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// The stage histograms, ztgo_stage_duration_seconds and ztgo_stage_queue_seconds{stage,
// direction}, are not HistogramVecs: every observation of a HistogramVec child writes the
// child's shared atomics, so all the CPUs finishing flows of one (stage, direction) would
// write the same cache lines. Each shard counts its flows in its entry of the series instead,
// under the shard's mutex that Finish holds anyway, and collector adds the shards up when the
// registry is gathered.

// stageBuckets are the upper bounds of the stage histograms' buckets, in seconds.
var stageBuckets = [...]float64{.00001, .000025, .00005, .0001, .00025, .0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10}

const numStageBuckets = len(stageBuckets)

// stageBucketsNS are stageBuckets in nanoseconds. A duration of d nanoseconds is at most
// stageBuckets[i] seconds exactly when d <= stageBucketsNS[i], so counting in nanoseconds
// puts every sample in the bucket an Observe(d.Seconds()) would have.
var stageBucketsNS = func() (ns [numStageBuckets]int64) {
	for i, b := range stageBuckets {
		ns[i] = int64(math.Round(b * 1e9))
	}
	return ns
}()

// counts is one shard's part of one histogram series, padded to whole cache lines. The sum
// comes first: it shares its line with the buckets up to 1ms, where most stages fall.
type counts struct {
	// sum is the samples' sum in nanoseconds: it adds exactly, and 2^63 ns is 292 years.
	sum int64
	// n are the samples per bucket (not cumulative); the last one is above every bound.
	n [numStageBuckets + 1]uint64
	_ [countsSize - (numStageBuckets+2)*8]byte
}

// countsSize is the size of counts: whole cache lines.
const countsSize = ((numStageBuckets+2)*8 + cacheLine - 1) / cacheLine * cacheLine

func (c *counts) observe(ns int64) {
	i := 0
	for i < numStageBuckets && ns > stageBucketsNS[i] {
		i++
	}
	c.n[i]++
	c.sum += ns
}

func (c *counts) add(o *counts) {
	for i, v := range o.n {
		c.n[i] += v
	}
	c.sum += o.sum
}

// collector exports a Recorder's stage histograms.
type collector Recorder

func (c *collector) Describe(ch chan<- *prometheus.Desc) {
	ch <- c.workDesc
	ch <- c.waitDesc
}

func (c *collector) Collect(ch chan<- prometheus.Metric) {
	r := (*Recorder)(c)
	r.mu.Lock()
	all := r.series // append-only: the prefix stays as it is
	r.mu.Unlock()
	if len(all) == 0 {
		return
	}
	type pair struct{ work, wait counts }
	sums := make([]pair, len(all))
	r.eachShard(func(sh *shard) {
		for _, e := range sh.entries {
			if i := e.s.idx; i < len(sums) {
				sums[i].work.add(&e.work)
				sums[i].wait.add(&e.wait)
			}
		}
	})
	for i, s := range all {
		emit(ch, r.workDesc, &sums[i].work, s)
		emit(ch, r.waitDesc, &sums[i].wait, s)
	}
}

// emit sends the histogram of c, unless it has no sample: a series with no sample in a family
// is not exported in it, as there was no HistogramVec child (the first_byte stage has no
// queue time).
func emit(ch chan<- prometheus.Metric, d *prometheus.Desc, c *counts, s *series) {
	var n uint64
	for _, v := range c.n {
		n += v
	}
	if n == 0 {
		return
	}
	buckets := make(map[float64]uint64, numStageBuckets)
	var cum uint64
	for i, b := range stageBuckets {
		cum += c.n[i]
		buckets[b] = cum
	}
	m, err := prometheus.NewConstHistogramWithCreatedTimestamp(d, n, time.Duration(c.sum).Seconds(), buckets,
		s.created, s.labels[0], s.labels[1])
	if err != nil {
		m = prometheus.NewInvalidMetric(d, err)
	}
	ch <- m
}
