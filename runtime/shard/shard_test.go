package shard

import (
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"unsafe"
)

func TestCount(t *testing.T) {
	for procs, want := range map[int]int{-1: 2, 0: 2, 1: 2, 2: 2, 3: 4, 4: 4, 5: 8, 8: 8, 9: 16, 16: 16, 17: 16, 256: 16} {
		if got := Count(procs); got != want {
			t.Errorf("Count(%d) = %d, want %d", procs, got, want)
		}
	}
}

func TestNewPickerRefusesNoShards(t *testing.T) {
	for _, k := range []int{0, -1} {
		func() {
			defer func() {
				if recover() == nil {
					t.Errorf("NewPicker(%d) did not panic", k)
				}
			}()
			NewPicker(k)
		}()
	}
}

// New hands out the preallocated tokens round-robin, so every index gets picked when the
// pool has nothing to give, and no token is allocated.
func TestNewIsRoundRobinOverPreallocatedTokens(t *testing.T) {
	p := NewPicker(3)
	for n := range 7 {
		tok := p.newToken().(*token)
		if tok.i != n%3 {
			t.Fatalf("token %d has index %d, want %d", n, tok.i, n%3)
		}
		if tok != &p.tokens[tok.i] {
			t.Fatalf("token %d is not the preallocated one", n)
		}
	}
	if n := testing.AllocsPerRun(100, func() { p.newToken() }); n != 0 {
		t.Errorf("New allocates %v times", n)
	}
}

// Picks from many goroutines at once, across garbage collections, are always in range, and
// with as many goroutines as Ps busy, more than one shard gets picked (with K > 1).
func TestPickInRange(t *testing.T) {
	for _, k := range []int{1, 2, 3, 16} {
		p := NewPicker(k)
		if p.Len() != k {
			t.Fatalf("Len = %d, want %d", p.Len(), k)
		}
		hits := make([]atomic.Int64, k)
		var wg sync.WaitGroup
		for g := range 8 {
			wg.Go(func() {
				for i := range 20000 {
					j := p.Pick()
					if j < 0 || j >= k {
						t.Errorf("K=%d: picked %d", k, j)
						return
					}
					hits[j].Add(1)
					if g == 0 && i%5000 == 0 {
						runtime.GC()
					}
				}
			})
		}
		wg.Wait()
		var total int64
		for i := range hits {
			total += hits[i].Load()
		}
		if total != 8*20000 {
			t.Errorf("K=%d: %d picks counted, want %d", k, total, 8*20000)
		}
	}
}

// A goroutine that does not block keeps to its P, so it keeps picking the same shard.
func TestPickIsSticky(t *testing.T) {
	if raceEnabled {
		t.Skip("under the race detector sync.Pool drops Puts on purpose")
	}
	p := NewPicker(16)
	const n = 10000
	same, last := 0, p.Pick()
	for range n {
		i := p.Pick()
		if i == last {
			same++
		}
		last = i
	}
	// Each preemption (every 10ms at most) or GC can move it; 10000 picks take well under 1ms.
	if same < n*9/10 {
		t.Errorf("%d of %d consecutive picks on one goroutine were the same shard", same, n)
	}
}

// Pick does not allocate (sync.Pool's own allocation after a GC, once per cycle, rounds to
// zero here).
func TestPickDoesNotAllocate(t *testing.T) {
	p := NewPicker(4)
	p.Pick()
	if n := testing.AllocsPerRun(10000, func() { p.Pick() }); n != 0 {
		t.Fatalf("Pick allocates %v times", n)
	}
}

// counter is a sharded counter as callers build them: one padded cell per shard.
type counter struct {
	pick  *Picker
	cells []struct {
		n atomic.Int64
		_ [56]byte
	}
}

func (c *counter) add(d int64) { c.cells[c.pick.Pick()].n.Add(d) }

func (c *counter) sum() (n int64) {
	for i := range c.cells {
		n += c.cells[i].n.Load()
	}
	return n
}

// Increments and decrements of one value land in arbitrary shards; the sum is exact.
func TestShardedCounterExact(t *testing.T) {
	k := Count(runtime.GOMAXPROCS(0))
	c := &counter{pick: NewPicker(k)}
	c.cells = make([]struct {
		n atomic.Int64
		_ [56]byte
	}, k)
	if unsafe.Sizeof(c.cells[0]) != 64 {
		t.Fatal("cell is not a cache line")
	}
	var wg sync.WaitGroup
	for range 8 {
		wg.Go(func() {
			for range 10000 {
				c.add(1)
				runtime.Gosched()
				c.add(-1)
				c.add(2)
			}
		})
	}
	wg.Wait()
	if got := c.sum(); got != 8*10000*2 {
		t.Fatalf("sum = %d, want %d", got, 8*10000*2)
	}
}

func BenchmarkPick(b *testing.B) {
	p := NewPicker(Count(runtime.GOMAXPROCS(0)))
	b.ReportAllocs()
	for b.Loop() {
		p.Pick()
	}
}

func BenchmarkPickParallel(b *testing.B) {
	p := NewPicker(Count(runtime.GOMAXPROCS(0)))
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			p.Pick()
		}
	})
}
