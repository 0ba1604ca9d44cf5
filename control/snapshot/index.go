package snapshot

import (
	"encoding/binary"
	"hash/maphash"
	"maps"
	"net/netip"
	"slices"
)

// Every index of a snapshot is a table: a fixed array of shards, each a plain Go map, chosen by
// a cheap hash of the key. A snapshot holds a pointer to each table. Apply gives the new
// snapshot a private copy of a table's array (its map pointers) on the first write to that
// table, and a private clone of a shard on the first write to that shard: one change costs a
// few arrays and a few small shards instead of the whole mesh, and everything else is shared,
// read-only, with the snapshot Apply started from. A lookup costs a hash and two loads more
// than a single map.
//
// 512 shards keep the largest shard of a 100k-workload mesh at ~200 entries. What an Apply
// allocates (and so what it costs in GC assists, which make its tail latency) is about one
// 4 KB array per table it writes plus one clone per shard: with 256 shards the clones double,
// with 1024 the arrays do.
const (
	shardBits = 9
	numShards = 1 << shardBits
)

// shard is a shard number, below numShards.
type shard = uint16

// table is one sharded index. A published snapshot's tables and shards are never written. A
// nil table is empty.
type table[K comparable, V any] [numShards]map[K]V

// at returns shard i of t (nil when t is).
func (t *table[K, V]) at(i shard) map[K]V {
	if t == nil {
		return nil
	}
	return t[i]
}

// cow writes to a table of a snapshot under construction: the first write replaces the table
// with a private copy, and the first write to a shard replaces the shard with a private clone,
// so the snapshot it came from keeps its own.
type cow[K comparable, V any] struct {
	t     **table[K, V]
	own   bool // *t is private
	owned [numShards / 64]uint64
	hint  int // size of a new shard (Build knows how many entries are coming)
}

func (c *cow[K, V]) get(i shard, k K) (V, bool) {
	v, ok := (*c.t).at(i)[k]
	return v, ok
}

func (c *cow[K, V]) shard(i shard) map[K]V {
	if !c.own {
		c.own = true
		t := new(table[K, V])
		if *c.t != nil {
			*t = **c.t
		}
		*c.t = t
	}
	t := *c.t
	if bit := uint64(1) << (i & 63); c.owned[i>>6]&bit == 0 {
		c.owned[i>>6] |= bit
		if t[i] == nil {
			t[i] = make(map[K]V, c.hint)
		} else {
			t[i] = maps.Clone(t[i])
		}
	}
	return t[i]
}

func (c *cow[K, V]) set(i shard, k K, v V) { c.shard(i)[k] = v }

// del removes k, copying only if k is there.
func (c *cow[K, V]) del(i shard, k K) {
	if _, ok := (*c.t).at(i)[k]; ok {
		delete(c.shard(i), k)
	}
}

// Shard hashes. They need to be cheap and to spread keys evenly, not to resist attack: each
// shard is an ordinary Go map with its own seeded hash. Strings use the runtime's string hash
// (hash/maphash) with a seed each Build draws and every Apply from it inherits; addresses are
// spread by a Fibonacci multiply, which costs a nanosecond where a byte-wise hash costs twenty.

func shardOfString(seed maphash.Seed, s string) shard {
	return shard(maphash.String(seed, s) >> (64 - shardBits))
}

// Services are sharded by hostname in every table keyed by a service (by key, by hostname, and
// the endpoint lists keyed by the object), so one service change touches one shard of each.
func shardOfHost(seed maphash.Seed, hostname string) shard { return shardOfString(seed, hostname) }

// shardOfIP spreads addresses by a Fibonacci multiply of their low bits (all of an IPv4
// address, the two halves of an IPv6 one folded). The network is left out: addresses on
// different networks may share a shard, which is harmless. It is small enough to be inlined
// into every lookup, where a call and a byte-wise hash cost more than the map probe itself.
func shardOfIP(a netip.Addr) shard {
	var x uint64
	if a.Is4() {
		b := a.As4()
		x = uint64(b[0])<<24 | uint64(b[1])<<16 | uint64(b[2])<<8 | uint64(b[3])
	} else {
		x = ipv6Bits(a)
	}
	return shard((x * fibonacci) >> (64 - shardBits))
}

func ipv6Bits(a netip.Addr) uint64 {
	b := a.As16()
	return binary.BigEndian.Uint64(b[:8]) ^ binary.BigEndian.Uint64(b[8:])
}

const fibonacci = 0x9E3779B97F4A7C15 // 2^64 / golden ratio

func shardOfPrefix(p netip.Prefix) shard {
	return (shardOfIP(p.Addr()) ^ shard(p.Bits())) & (numShards - 1)
}

// listEdit collects the changes one Apply makes to one sorted list of an index (the endpoints
// of a service, the services at a VIP, ...): the sort keys of the entries to remove and the
// entries to insert. They are merged into the old list once, at the end of the Apply, so a
// delta that adds many entries to one list costs one sort of the additions and one pass over
// the list, not one copy per entry.
type listEdit[T any, K any] struct {
	dels []K
	adds []T
}

// editList returns base with e applied, as a new slice with len == cap (an append by a caller
// copies rather than writes behind the end), or nil when empty. base must be sorted by key
// under cmp with unique keys; base itself is not written. An addition whose key is already in
// base replaces that entry, and additions with equal keys count once.
func editList[T any, K any](base []T, e *listEdit[T, K], key func(T) K, cmp func(a, b K) int) []T {
	adds, dels := e.adds, e.dels
	slices.SortFunc(adds, func(a, b T) int { return cmp(key(a), key(b)) })
	adds = slices.CompactFunc(adds, func(a, b T) bool { return cmp(key(a), key(b)) == 0 })
	slices.SortFunc(dels, cmp)
	merge := func(emit func(T)) {
		i, j := 0, 0
		for _, x := range base {
			kx := key(x)
			for i < len(adds) && cmp(key(adds[i]), kx) < 0 {
				emit(adds[i])
				i++
			}
			for j < len(dels) && cmp(dels[j], kx) < 0 {
				j++
			}
			switch {
			case i < len(adds) && cmp(key(adds[i]), kx) == 0:
				emit(adds[i])
				i++
			case j < len(dels) && cmp(dels[j], kx) == 0:
			default:
				emit(x)
			}
		}
		for ; i < len(adds); i++ {
			emit(adds[i])
		}
	}
	n := 0
	merge(func(T) { n++ })
	if n == 0 {
		return nil
	}
	out := make([]T, 0, n)
	merge(func(x T) { out = append(out, x) })
	return out
}
