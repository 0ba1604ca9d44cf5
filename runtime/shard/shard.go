// Package shard picks which of K shards of some hot-path state a caller writes, so that calls
// running on one processor (a P of the Go scheduler) keep to one shard and its cache lines
// stay in that CPU's cache, without linkname into the runtime.
//
// A Picker holds K tokens, one per shard index, in a sync.Pool. Pick takes a token and puts it
// straight back: sync.Pool keeps one item per P aside (its private slot), so on a P that
// already holds a token Get returns that token, and the same index, every time. The affinity
// is to the P, not to the goroutine: a goroutine that the scheduler moves to another P picks
// that P's shard from then on, which is what keeps a shard's lines in one CPU. Flow IDs or
// random numbers spread calls over the shards evenly, but a shard is then written by every
// CPU in turn and its lines (and, for a shard with a mutex, the mutex) move between CPUs on
// almost every call; with a Picker, each P keeps writing the shard it last wrote.
//
// Affinity is best effort, never a guarantee:
//
//   - a goroutine can be preempted and move to another P between the Get and the Put of a
//     Pick: its token then lands in the other P's pool, and the P it left steals one, or gets
//     a new one from New, at its next Pick;
//   - a P that finds no token (its own is in flight, or was moved) takes one from another P's
//     pool, or New hands out the next index round-robin (without allocating: the tokens are
//     preallocated, so an index can be in the pool more than once);
//   - each garbage collection moves the pool's items to its victim cache, where they are found
//     again (the same P's token first) unless a second collection comes before the next Pick
//     on that P;
//   - with more Ps than shards, some Ps share a shard; when GOMAXPROCS changes after the
//     Picker was made, K stays as it was;
//   - under the race detector, sync.Pool drops a quarter of the Puts on purpose, so New runs
//     often and there is little affinity left.
//
// So callers must be correct whatever index they get, and any mix of them: a value counted
// in one shard and taken back in another (a gauge incremented on open and decremented on
// close) is exact once the shards are summed, even though one shard may go negative.
//
// Cost: a Pick is a Get and a Put of sync.Pool's fast path (each pins the goroutine to its P
// and reads or writes its private slot): 15 to 18 ns on a 2-vCPU amd64 VM (BenchmarkPick),
// with nothing shared between CPUs (BenchmarkPickParallel), so less than one cache line
// moving from one CPU to another, which is what it saves. Pick itself does not allocate;
// sync.Pool does, rarely: its per-P array (GOMAXPROCS × 128 bytes, under a process-wide
// lock) on the first Pick after each garbage collection, and a queue node when a token is
// put back on a P whose private slot is taken.
package shard

import (
	"fmt"
	"sync"
	"sync/atomic"
)

// Bounds of Count.
const (
	MinCount = 2
	MaxCount = 16
)

// Count is the number of shards for procs CPUs (usually runtime.GOMAXPROCS(0)): the next power
// of two at or above procs, within [MinCount, MaxCount]. A power of two lets the caller
// replace a shard index computed from anything else by a mask.
func Count(procs int) int {
	k := MinCount
	for k < procs && k < MaxCount {
		k <<= 1
	}
	return k
}

// token is a shard index as the pool holds it.
type token struct{ i int }

// A Picker picks one of its K shard indexes, preferring the one the calling P picked last.
// It is safe for concurrent use. See the package documentation for how far the preference
// goes.
type Picker struct {
	pool   sync.Pool
	tokens []token
	next   atomic.Uint64
}

// NewPicker returns a Picker of k shards (k >= 1; any k, not only a power of two).
func NewPicker(k int) *Picker {
	if k < 1 {
		panic(fmt.Sprintf("shard: NewPicker(%d)", k))
	}
	p := &Picker{tokens: make([]token, k)}
	for i := range p.tokens {
		p.tokens[i].i = i
	}
	p.pool.New = p.newToken
	return p
}

// newToken hands out the tokens round-robin. A pointer into tokens: it does not allocate.
func (p *Picker) newToken() any {
	return &p.tokens[(p.next.Add(1)-1)%uint64(len(p.tokens))]
}

// Len is the number of shards, K.
func (p *Picker) Len() int { return len(p.tokens) }

// Pick returns a shard index in [0, K): usually the one this P picked last.
func (p *Picker) Pick() int {
	t := p.pool.Get().(*token)
	i := t.i
	p.pool.Put(t)
	return i
}
