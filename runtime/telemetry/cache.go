package telemetry

import (
	"hash/maphash"
	"sync/atomic"
	"unsafe"

	"github.com/puzpuzpuz/xsync/v3"

	"github.com/ztgo/ztgo/control/snapshot"
	"github.com/ztgo/ztgo/stages"
	"github.com/ztgo/ztgo/tls/spiffe"
)

// maxSeries bounds the entries of one cache generation. A node sees far fewer distinct label
// sets than this per snapshot; past it, the cache starts over rather than grow.
const maxSeries = 4096

// seriesKey is everything labelValues reads from a flow. Workloads and the service are keyed
// by pointer: a published snapshot is immutable (control/snapshot), so one pointer always
// yields the same labels, and comparing it is cheaper than comparing the strings it holds.
type seriesKey struct {
	src, dst     *snapshot.Workload
	svc          *snapshot.Service
	srcID, dstID spiffe.ID
	dir          stages.Direction
	failure      stages.Failure
	mtls         bool
}

func keyOf(f *stages.Flow) seriesKey {
	return seriesKey{
		src: f.SrcWorkload, dst: f.DstWorkload, svc: f.DstService,
		srcID: f.SrcIdentity, dstID: f.DstIdentity,
		dir: f.Dir, failure: f.Failure, mtls: mutualTLS(f),
	}
}

// seriesCache maps a flow's label-determining inputs to its series, so the hot path computes
// and hashes the 23 label values once per label set instead of on every open and close.
// Reads are lock-free (xsync); on a miss the series comes from Metrics' registry, under its
// lock, once per label set and generation.
//
// Bounds: a generation belongs to a snapshot version. A flow from a newer snapshot starts a
// new, empty generation, which drops the old one and with it the references to the old
// snapshot's workloads; a full generation starts over too. Flows from an older snapshot still
// use the current generation: their keys are exact (pointers into the snapshot they loaded),
// so they cannot get another flow's labels. Dropping the cache does not drop series: they
// live in Metrics and keep counting and being exported, as Prometheus expects of counters.
type seriesCache struct {
	gen  atomic.Pointer[generation]
	seed maphash.Seed
	reg  *Metrics
}

type generation struct {
	version uint64
	m       *xsync.MapOf[seriesKey, *series]
	n       atomic.Int64
}

func (c *seriesCache) newGeneration(version uint64) *generation {
	return &generation{version: version, m: xsync.NewMapOfWithHasher[seriesKey, *series](c.hash)}
}

func (c *seriesCache) init(reg *Metrics) {
	c.reg = reg
	c.seed = maphash.MakeSeed()
	c.gen.Store(c.newGeneration(0))
}

// hash replaces xsync's default hasher, which hashes a struct field by field through type
// metadata and cost more than everything else on the path. Pointers are hashed as numbers;
// of the identities, only the parts that tell peers apart are hashed (a partial hash is still
// correct: equal keys hash equally, and the map compares whole keys).
func (c *seriesCache) hash(k seriesKey, seed uint64) uint64 {
	h := seed
	h = mix(h, uint64(uintptr(unsafe.Pointer(k.src))))
	h = mix(h, uint64(uintptr(unsafe.Pointer(k.dst))))
	h = mix(h, uint64(uintptr(unsafe.Pointer(k.svc))))
	flags := uint64(k.dir) | uint64(k.failure)<<8
	if k.mtls {
		flags |= 1 << 16
	}
	h = mix(h, flags)
	if k.src == nil {
		h = mix(h, maphash.String(c.seed, k.srcID.ServiceAccount)^maphash.String(c.seed, k.srcID.Namespace)<<1)
	}
	if k.dst == nil {
		h = mix(h, maphash.String(c.seed, k.dstID.ServiceAccount)^maphash.String(c.seed, k.dstID.Namespace)<<1)
	}
	// splitmix64's finaliser: xsync takes bits from both ends of the hash.
	h ^= h >> 30
	h *= 0xbf58476d1ce4e5b9
	h ^= h >> 27
	h *= 0x94d049bb133111eb
	return h ^ h>>31
}

func mix(h, v uint64) uint64 {
	h ^= v
	h *= 0x9e3779b97f4a7c15
	return h ^ h>>32
}

func (c *seriesCache) get(f *stages.Flow) *series {
	var version uint64
	if f.Snap != nil {
		version = f.Snap.Version()
	}
	k := keyOf(f)
	g := c.gen.Load()
	if version > g.version {
		g = c.replace(g, version)
	}
	if s, ok := g.m.Load(k); ok {
		return s
	}
	if g.n.Load() >= maxSeries {
		g = c.replace(g, g.version)
	}
	v := labelValues(f)
	s, loaded := g.m.LoadOrStore(k, c.reg.series(&v))
	if !loaded {
		g.n.Add(1)
	}
	return s
}

// replace installs an empty generation for version in place of old, unless another flow
// already replaced old; it returns the current generation.
func (c *seriesCache) replace(old *generation, version uint64) *generation {
	ng := c.newGeneration(version)
	if c.gen.CompareAndSwap(old, ng) {
		return ng
	}
	return c.gen.Load()
}

// len is the number of entries in the current generation (for tests).
func (c *seriesCache) len() int { return c.gen.Load().m.Size() }
