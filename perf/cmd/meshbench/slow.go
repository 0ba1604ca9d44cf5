//go:build linux

package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/ztgo/ztgo/stages/hbone"
)

// The slow-reader workload (slow): a flood server writes as fast as the path lets it while the
// client reads slowRead bytes a second. One flow through ztgo and one on the direct path run at
// the same time (the direct one shows what the kernel's socket buffers alone hold); each has a
// flood server of its own, so that each count of written bytes is that flow's.
const (
	slowWrite  = 16 << 10               // the flood server's write size: its count is exact to 16 KiB
	slowRead   = 1024                   // bytes the client reads each second
	slowSample = 500 * time.Millisecond // sampling of the servers' counts and the nodes' memory
	// slowStallSlack is what the server may still write in the second half of the run and count
	// as stalled, besides what the client read meanwhile: a few openings of the TCP receive
	// window (a loopback segment is 64 KiB) and HTTP/2 WINDOW_UPDATEs.
	slowStallSlack = 256 << 10
)

// slowBound is the most a node may grow its live Go heap for the one slow flow, derived from
// ztgo's HTTP/2 settings (ztunnel's, stages/hbone): one stream window, the data node a may have
// accepted on the stream and not yet written to the slow client (performance.md: "bounded
// (<= window size)"), plus one frame of the largest size it allows, the frame reader's buffer
// on the pooled connection.
const slowBound = hbone.DefaultStreamWindow + hbone.DefaultMaxFrameSize

// slowPoint is one sample of the slow-reader run.
type slowPoint struct {
	at      time.Duration // since the flows started
	written []int64       // bytes each flood server wrote, by path (direct, ztgo)
	heap    []float64     // each node's go_memstats_heap_inuse_bytes
	rss     []int64       // each node's VmRSS, bytes
}

// slowRun is one slow-reader run.
type slowRun struct {
	paths []string // path names, in the order of slowPoint.written
	heap0 []float64
	rss0  []int64
	// live0 and live1 are each node's heap in use after a forced GC: before the flows start,
	// and at the end of the run while they are still stalled.
	live0, live1 []float64
	points       []slowPoint
	read         []int64 // bytes each client read during the run
	drained      []int64 // bytes each client read after the run, at full speed
	duration     time.Duration
}

// slowReaders runs one slow flow on each of paths at once, to its flood server (srvs, in the same
// order), for dur, sampling every slowSample; then each client half-closes and reads the rest at
// full speed, and the servers must see the close.
func slowReaders(ctx context.Context, paths []path, srvs []*server, dur time.Duration, ns nodeSet) (run slowRun, err error) {
	for _, p := range paths {
		run.paths = append(run.paths, p.name)
	}
	// One scrape first, so that the scrape's own memory is there in every reading.
	if _, err := ns.goMem(ctx); err != nil {
		return run, err
	}
	if run.live0, err = ns.liveHeap(ctx); err != nil {
		return run, err
	}
	mem, err := ns.goMem(ctx)
	if err != nil {
		return run, err
	}
	for _, m := range mem {
		run.heap0 = append(run.heap0, m.heapInuse)
	}
	if run.rss0, err = ns.rss(); err != nil {
		return run, err
	}
	w0 := make([]int64, len(srvs))
	for i, s := range srvs {
		w0[i] = s.bytes.Load()
	}

	conns := make([]*net.TCPConn, 0, len(paths))
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	hard := time.Now().Add(dur + 2*drainLimit)
	for _, p := range paths {
		c, err := p.dial(ctx, slowPortOf(p.name))
		if err != nil {
			return run, fmt.Errorf("slow reader %s: %w", p.name, err)
		}
		c.SetDeadline(hard)
		conns = append(conns, c)
	}

	// The readers: slowRead bytes every second until stop.
	stop := make(chan struct{})
	read := make([]atomic.Int64, len(conns))
	errs := make([]error, len(conns))
	var wg sync.WaitGroup
	for i, c := range conns {
		wg.Add(1)
		go func() {
			defer wg.Done()
			t := time.NewTicker(time.Second)
			defer t.Stop()
			buf := make([]byte, slowRead)
			for {
				select {
				case <-stop:
					return
				case <-t.C:
				}
				n, err := io.ReadFull(c, buf)
				read[i].Add(int64(n))
				if err != nil {
					errs[i] = fmt.Errorf("slow reader %s: read: %w", paths[i].name, err)
					return
				}
			}
		}()
	}
	stopReaders := func() {
		select {
		case <-stop:
		default:
			close(stop)
		}
	}
	defer func() {
		// On an early return a reader may be blocked in a read: closing unblocks it.
		stopReaders()
		for _, c := range conns {
			c.Close()
		}
		wg.Wait()
	}()

	t0 := time.Now()
	tick := time.NewTicker(slowSample)
	defer tick.Stop()
	for time.Since(t0) < dur {
		select {
		case <-ctx.Done():
			return run, ctx.Err()
		case <-tick.C:
		}
		pt := slowPoint{at: time.Since(t0)}
		for i, s := range srvs {
			pt.written = append(pt.written, s.bytes.Load()-w0[i])
		}
		mem, err := ns.goMem(ctx)
		if err != nil {
			return run, err
		}
		for _, m := range mem {
			pt.heap = append(pt.heap, m.heapInuse)
		}
		if pt.rss, err = ns.rss(); err != nil {
			return run, err
		}
		run.points = append(run.points, pt)
		if err := ns.alive(); err != nil {
			return run, err
		}
	}
	run.duration = time.Since(t0)
	if run.live1, err = ns.liveHeap(ctx); err != nil {
		return run, err
	}
	stopReaders()
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		return run, err
	}
	for i := range read {
		run.read = append(run.read, read[i].Load())
	}

	// Half-close (the flood server stops writing) and read the rest at full speed.
	for i, c := range conns {
		if err := c.CloseWrite(); err != nil {
			return run, fmt.Errorf("slow reader %s: close write: %w", paths[i].name, err)
		}
		n, err := io.Copy(io.Discard, c)
		if err != nil {
			return run, fmt.Errorf("slow reader %s: draining after the run: %d bytes, %w", paths[i].name, n, err)
		}
		run.drained = append(run.drained, n)
	}
	for _, s := range srvs {
		if err := s.waitIdle(drainLimit); err != nil {
			return run, err
		}
	}
	return run, nil
}

// slowPortOf is the flood server port of a path's slow flow.
func slowPortOf(path string) int {
	if path == "direct" {
		return slowDirectPort
	}
	return slowZtgoPort
}

// serveFlood writes slowWrite-byte chunks as fast as the client takes them until the client
// half-closes.
func serveFlood(s *server, c *net.TCPConn) { sourceWith(s, c, make([]byte, slowWrite)) }

// slowResult is what the report says of one slow-reader run.
type slowResult struct {
	written     []int64         // total written by each flood server during the run
	secondHalf  []int64         // written in the second half of the run
	stalledBy   []time.Duration // first sample from which the count grew by at most slowStallSlack more
	stalled     []bool          // second half within slowStallSlack + what the client read
	heapGrowth  []float64       // each node's largest heap in use during the run minus before (no GC forced)
	heapEnd     []float64       // each node's heap in use at the last sample minus before
	liveGrowth  []float64       // each node's live heap (after a forced GC) at the end minus before
	rssGrowth   []int64         // each node's largest VmRSS during the run minus before
	heapBounded bool            // every node's liveGrowth ≤ slowBound
}

// summarize derives the report's figures from the samples.
func (run slowRun) summarize() slowResult {
	var r slowResult
	if len(run.points) == 0 {
		return r
	}
	last := run.points[len(run.points)-1]
	half := run.points[0]
	for _, pt := range run.points {
		if pt.at <= run.duration/2 {
			half = pt
		}
	}
	for i := range run.paths {
		r.written = append(r.written, last.written[i])
		grow := last.written[i] - half.written[i]
		r.secondHalf = append(r.secondHalf, grow)
		readHalf := int64(slowRead) * int64((run.duration-half.at)/time.Second+1)
		r.stalled = append(r.stalled, grow <= slowStallSlack+readHalf)
		by := last.at
		for j := len(run.points) - 1; j >= 0; j-- {
			if last.written[i]-run.points[j].written[i] > slowStallSlack {
				break
			}
			by = run.points[j].at
		}
		r.stalledBy = append(r.stalledBy, by)
	}
	r.heapBounded = true
	for n := range run.heap0 {
		var hmax float64
		var rmax int64
		for _, pt := range run.points {
			hmax = max(hmax, pt.heap[n])
			rmax = max(rmax, pt.rss[n])
		}
		r.heapGrowth = append(r.heapGrowth, hmax-run.heap0[n])
		r.heapEnd = append(r.heapEnd, last.heap[n]-run.heap0[n])
		r.rssGrowth = append(r.rssGrowth, rmax-run.rss0[n])
		live := run.live1[n] - run.live0[n]
		r.liveGrowth = append(r.liveGrowth, live)
		if live > slowBound {
			r.heapBounded = false
		}
	}
	return r
}
