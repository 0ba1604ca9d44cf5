//go:build linux

package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// Bounds of every workload besides its planned duration.
const (
	drainLimit    = 15 * time.Second // clients finishing after the window, servers seeing EOF
	rttLimit      = 30 * time.Second // one round trip series
	rttWarmup     = 100              // round trips before the recorded ones
	maxConns      = 1_000_000        // connections in one connection-rate run
	maxConnErrors = 200              // per client: stop early, the run fails anyway
	closers       = 16               // goroutines closing connection-rate connections
)

// tpSample is one throughput run.
type tpSample struct {
	gbps  float64
	bytes int64     // moved in the window
	secs  float64   // the window
	cpu   []float64 // CPU seconds of each ztgo node in the window (ztgo path only)
	// The machine over the window, in CPUs (of runtime.NumCPU): busy is everything but idle;
	// softirq and steal are parts of it; self is this process (clients and servers); other is
	// busy minus steal, self and the nodes: other processes, and softirq work not run in the
	// context of this process or the nodes (softirq run in a process's context is part of its
	// stime).
	busy, softirq, steal, self, other float64
}

// throughput moves data through p with streams connections for warm+dur and measures the
// bytes that arrived during dur: at the sink (client -> server) or at the client (reverse,
// server -> client). ns, when not nil, are sampled for CPU over the same window. onWindow, when
// not nil, runs as the warm-up starts (the profile run uses it).
func throughput(ctx context.Context, pl plan, p path, reverse bool, streams int, srv *server, ns nodeSet, onWindow func()) (tpSample, error) {
	port := sinkPort
	if reverse {
		port = sourcePort
	}
	conns := make([]*net.TCPConn, 0, streams)
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	for range streams {
		c, err := p.dial(ctx, port)
		if err != nil {
			return tpSample{}, err
		}
		conns = append(conns, c)
	}
	hard := time.Now().Add(pl.tpWarm + pl.tpDur + drainLimit)
	var stop atomic.Bool
	var recv atomic.Int64
	buf := make([]byte, chunk) // only read by the writers
	errc := make(chan error, streams)
	for _, c := range conns {
		c.SetDeadline(hard)
		go func() {
			if reverse {
				errc <- readUntilStopped(c, &stop, &recv)
			} else {
				errc <- writeUntilStopped(c, &stop, buf)
			}
		}()
	}
	counter := func() int64 {
		if reverse {
			return recv.Load()
		}
		return srv.bytes.Load()
	}
	if onWindow != nil {
		onWindow()
	}
	abort := func(err error) (tpSample, error) {
		stop.Store(true)
		for _, c := range conns {
			c.Close()
		}
		for range conns {
			<-errc
		}
		return tpSample{}, err
	}
	if err := sleep(ctx, pl.tpWarm); err != nil {
		return abort(err)
	}
	cpu0, err := ns.cpu()
	if err != nil {
		return abort(err)
	}
	m0, err := machineCPU()
	if err != nil {
		return abort(err)
	}
	self0, err := procCPU("self")
	if err != nil {
		return abort(err)
	}
	b0, t0 := counter(), time.Now()
	if err := sleep(ctx, pl.tpDur); err != nil {
		return abort(err)
	}
	b1, t1 := counter(), time.Now()
	m1, err := machineCPU()
	if err != nil {
		return abort(err)
	}
	self1, err := procCPU("self")
	if err != nil {
		return abort(err)
	}
	cpu1, err := ns.cpu()
	if err != nil {
		return abort(err)
	}
	stop.Store(true)
	var errs []error
	for range conns {
		if err := <-errc; err != nil {
			errs = append(errs, err)
		}
	}
	if err := errors.Join(errs...); err != nil {
		return tpSample{}, fmt.Errorf("%s %d stream(s): %w", p.name, streams, err)
	}
	if err := srv.waitIdle(drainLimit); err != nil {
		return tpSample{}, fmt.Errorf("%s: %w", p.name, err)
	}
	s := tpSample{bytes: b1 - b0, secs: t1.Sub(t0).Seconds()}
	s.gbps = float64(s.bytes) * 8 / 1e9 / s.secs
	s.self = (self1 - self0) / s.secs
	if tot := m1.total() - m0.total(); tot > 0 {
		cpus := func(a, b uint64) float64 { return float64(b-a) / float64(tot) * float64(runtime.NumCPU()) }
		s.busy = cpus(m0.total()-m0.idle, m1.total()-m1.idle)
		s.softirq = cpus(m0.softirq, m1.softirq)
		s.steal = cpus(m0.steal, m1.steal)
		s.other = s.busy - s.steal - s.self
	}
	for i := range cpu0 {
		s.cpu = append(s.cpu, cpu1[i]-cpu0[i])
		s.other -= (cpu1[i] - cpu0[i]) / s.secs
	}
	if s.bytes <= 0 {
		return s, fmt.Errorf("%s %d stream(s): no bytes arrived in %.1fs", p.name, streams, s.secs)
	}
	return s, nil
}

// writeUntilStopped writes chunks until stop, then half-closes and waits for the server's EOF.
func writeUntilStopped(c *net.TCPConn, stop *atomic.Bool, buf []byte) error {
	defer c.Close()
	for !stop.Load() {
		if _, err := c.Write(buf); err != nil {
			return fmt.Errorf("write: %w", err)
		}
	}
	if err := c.CloseWrite(); err != nil {
		return fmt.Errorf("close write: %w", err)
	}
	if n, err := io.Copy(io.Discard, c); err != nil || n != 0 {
		return fmt.Errorf("waiting for the sink to close: %d bytes, %v", n, err)
	}
	return nil
}

// readUntilStopped reads and counts until stop, then half-closes (the source stops writing and
// closes) and reads the rest to EOF.
func readUntilStopped(c *net.TCPConn, stop *atomic.Bool, recv *atomic.Int64) error {
	defer c.Close()
	buf := make([]byte, chunk)
	for !stop.Load() {
		n, err := c.Read(buf)
		recv.Add(int64(n))
		if err != nil {
			return fmt.Errorf("read: %w", err)
		}
	}
	if err := c.CloseWrite(); err != nil {
		return fmt.Errorf("close write: %w", err)
	}
	if _, err := io.Copy(io.Discard, c); err != nil {
		return fmt.Errorf("waiting for the source to close: %w", err)
	}
	return nil
}

// roundTrips sends size bytes and reads them back count times on one established connection
// and returns each round trip's time.
func roundTrips(ctx context.Context, p path, size, count int, srv *server) ([]time.Duration, error) {
	c, err := p.dial(ctx, echoPort)
	if err != nil {
		return nil, err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(rttLimit))
	msg := make([]byte, size)
	for i := range msg {
		msg[i] = byte('a' + i%26)
	}
	got := make([]byte, size)
	samples := make([]time.Duration, 0, count)
	for i := range rttWarmup + count {
		if i%256 == 0 && ctx.Err() != nil {
			return nil, ctx.Err()
		}
		t := time.Now()
		if _, err := c.Write(msg); err != nil {
			return nil, fmt.Errorf("%s echo %d B, round trip %d: write: %w", p.name, size, i, err)
		}
		if _, err := io.ReadFull(c, got); err != nil {
			return nil, fmt.Errorf("%s echo %d B, round trip %d: read: %w", p.name, size, i, err)
		}
		d := time.Since(t)
		if !bytes.Equal(got, msg) {
			return nil, fmt.Errorf("%s echo %d B, round trip %d: wrong bytes back", p.name, size, i)
		}
		if i >= rttWarmup {
			samples = append(samples, d)
		}
	}
	if err := c.CloseWrite(); err != nil {
		return nil, fmt.Errorf("%s echo: close write: %w", p.name, err)
	}
	if n, err := io.Copy(io.Discard, c); err != nil || n != 0 {
		return nil, fmt.Errorf("%s echo: waiting for the server to close: %d bytes, %v", p.name, n, err)
	}
	c.Close()
	if err := srv.waitIdle(drainLimit); err != nil {
		return nil, fmt.Errorf("%s: %w", p.name, err)
	}
	return samples, nil
}

// connSample is one connection-rate run.
type connSample struct {
	rate     float64         // connections per second
	n        int             // connections that got their first byte
	lat      []time.Duration // setup + first byte, each
	cpu      []float64       // CPU seconds of each ztgo node over the run (ztgo path only)
	errs     int
	firstErr error
}

// connRate opens connections through p for dur from clients goroutines, each sequentially:
// connect (SOCKS5 CONNECT answered, for ztgo), read the server's first byte. The connection
// is then handed to a closer, which reads to EOF (the server closes after its byte) and
// closes, so the client never holds TIME_WAIT and the timed loop is setup + first byte only.
// onStart, when not nil, runs just before the clients start (the profile run uses it).
func connRate(ctx context.Context, p path, clients int, dur time.Duration, srv *server, ns nodeSet, onStart func()) (connSample, error) {
	closeq := make(chan *net.TCPConn, 4096)
	var closeErrs atomic.Int64
	var cw sync.WaitGroup
	for range closers {
		cw.Add(1)
		go func() {
			defer cw.Done()
			for c := range closeq {
				c.SetReadDeadline(time.Now().Add(5 * time.Second))
				if n, err := io.Copy(io.Discard, c); err != nil || n != 0 {
					closeErrs.Add(1)
				}
				c.Close()
			}
		}()
	}
	cpu0, err := ns.cpu()
	if err != nil {
		close(closeq)
		cw.Wait()
		return connSample{}, err
	}
	var (
		total atomic.Int64
		mu    sync.Mutex
		res   connSample
		wg    sync.WaitGroup
	)
	if onStart != nil {
		onStart()
	}
	start := time.Now()
	end := start.Add(dur)
	for range clients {
		wg.Add(1)
		go func() {
			defer wg.Done()
			lat := make([]time.Duration, 0, 4096)
			var errs int
			var firstErr error
			var b [1]byte
			for time.Now().Before(end) && ctx.Err() == nil && total.Load() < maxConns && errs < maxConnErrors {
				t := time.Now()
				c, err := p.dial(ctx, firstPort)
				if err != nil {
					errs++
					if firstErr == nil {
						firstErr = err
					}
					continue
				}
				c.SetReadDeadline(t.Add(dialTimeout))
				if _, err := io.ReadFull(c, b[:]); err != nil {
					c.Close()
					errs++
					if firstErr == nil {
						firstErr = fmt.Errorf("read first byte: %w", err)
					}
					continue
				}
				lat = append(lat, time.Since(t))
				total.Add(1)
				closeq <- c
			}
			mu.Lock()
			res.lat = append(res.lat, lat...)
			res.errs += errs
			if res.firstErr == nil {
				res.firstErr = firstErr
			}
			mu.Unlock()
		}()
	}
	wg.Wait()
	elapsed := time.Since(start)
	close(closeq)
	cw.Wait()
	cpu1, cerr := ns.cpu()
	if err := ctx.Err(); err != nil {
		return res, err
	}
	if cerr != nil {
		return res, cerr
	}
	res.n = len(res.lat)
	res.rate = float64(res.n) / elapsed.Seconds()
	for i := range cpu0 {
		res.cpu = append(res.cpu, cpu1[i]-cpu0[i])
	}
	if n := closeErrs.Load(); n > 0 {
		res.errs += int(n)
		if res.firstErr == nil {
			res.firstErr = fmt.Errorf("%d connections did not end with a clean EOF after the first byte", n)
		}
	}
	if err := srv.waitIdle(drainLimit); err != nil {
		return res, fmt.Errorf("%s: %w", p.name, err)
	}
	if res.n == 0 {
		return res, fmt.Errorf("%s: no connection completed (%d errors, first: %v)", p.name, res.errs, res.firstErr)
	}
	return res, nil
}

// Idle connections.
const (
	idleOpeners  = 8                   // goroutines opening the idle connections
	idleMsg      = "meshbench idle!\n" // the round trip each idle connection carries
	idleChecks   = 100                 // connections round-tripped again once measured
	fdHeadroom   = 256                 // files a process needs besides the connections
	poolStreams  = 100                 // ztgo's default streams per pooled HBONE connection
	idleMinClose = 2 * time.Second     // the least time given to the servers to see every close
)

// idleSample is one idle-connection run: each node's memory before the connections were
// opened and once they were open and idle.
type idleSample struct {
	n                    int
	open                 time.Duration // opening all n, each with its round trip
	rss0, rss1           []int64       // VmRSS, bytes
	mem0, mem1           []goMem
	wait0, wait1         time.Duration // settling of the RSS
	settled0, settled1   bool
	goroutinesAfterClose []float64
	profiles             []string // heap profiles written, if any
}

// idleConns opens n connections through p to srv (the idle echo process), each carrying one
// small round trip so that it is established end to end, leaves them idle and reads the
// memory of the nodes ns before and after: VmRSS once settled (settledRSS), and the Go heap and
// stacks in use and the goroutines from /metrics. With profileDir set it also writes heap profiles of the
// nodes while the connections are idle. It then round-trips again on idleChecks of the
// connections, closes all of them and waits for the server to see every close. Everything
// happens within limit.
func idleConns(ctx context.Context, p path, n int, limit time.Duration, srv *idleEcho, ns nodeSet, profileDir string) (s idleSample, err error) {
	s.n = n
	deadline := time.Now().Add(limit)
	ctx, cancel := context.WithDeadlineCause(ctx, deadline, fmt.Errorf("idle connections: not done within %s", limit))
	defer cancel()
	defer func() {
		if err != nil && errors.Is(err, context.DeadlineExceeded) {
			err = fmt.Errorf("%w (%v)", err, context.Cause(ctx))
		}
	}()

	// Files: this process holds the client end of every connection, the idle echo process the
	// server end, each node one socket per connection plus its share of pooled HBONE
	// connections.
	open, lim, err := procFiles("self")
	if err != nil {
		return s, fmt.Errorf("meshbench files: %w", err)
	}
	if need := open + n + fdHeadroom; need > lim {
		return s, fmt.Errorf("%d idle connections need about %d open files in meshbench, its limit is %d "+
			"(raise the hard RLIMIT_NOFILE, ulimit -Hn)", n, need, lim)
	}
	st, err := srv.stat()
	if err != nil {
		return s, err
	}
	if need := st.files + n + fdHeadroom; st.files < 0 || need > st.fileLimit {
		return s, fmt.Errorf("%d idle connections need about %d open files in the %s process, its limit is %d "+
			"(raise the hard RLIMIT_NOFILE, ulimit -Hn)", n, need, srv.name, st.fileLimit)
	}
	for _, nd := range ns {
		open, lim, err := nd.files()
		if err != nil {
			return s, err
		}
		if need := open + n + n/poolStreams + fdHeadroom; need > lim {
			return s, fmt.Errorf("%d idle connections need about %d open files in %s, its limit is %d "+
				"(raise the hard RLIMIT_NOFILE, ulimit -Hn)", n, need, nd.Name, lim)
		}
	}

	// Before: one scrape first, so that the scrape's own memory is there in both readings.
	if _, err := ns.goMem(ctx); err != nil {
		return s, err
	}
	if s.rss0, s.wait0, s.settled0, err = ns.settledRSS(ctx); err != nil {
		return s, err
	}
	if s.mem0, err = ns.goMem(ctx); err != nil {
		return s, err
	}

	conns := make([]*net.TCPConn, 0, n)
	var mu sync.Mutex
	defer func() {
		mu.Lock()
		defer mu.Unlock()
		for _, c := range conns {
			c.Close()
		}
	}()
	roundTrip := func(c *net.TCPConn) error {
		c.SetDeadline(time.Now().Add(dialTimeout))
		if _, err := c.Write([]byte(idleMsg)); err != nil {
			return fmt.Errorf("write: %w", err)
		}
		got := make([]byte, len(idleMsg))
		if _, err := io.ReadFull(c, got); err != nil {
			return fmt.Errorf("read echo: %w", err)
		}
		if string(got) != idleMsg {
			return fmt.Errorf("echo returned %q, want %q", got, idleMsg)
		}
		return c.SetDeadline(time.Time{})
	}
	octx, ocancel := context.WithCancel(ctx)
	defer ocancel()
	var (
		next     atomic.Int64
		wg       sync.WaitGroup
		firstErr error
	)
	fail := func(err error) {
		mu.Lock()
		if firstErr == nil {
			firstErr = err
		}
		mu.Unlock()
		ocancel()
	}
	t0 := time.Now()
	for range idleOpeners {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for octx.Err() == nil {
				i := next.Add(1)
				if i > int64(n) {
					return
				}
				c, err := p.dial(octx, idlePort)
				if err != nil {
					fail(fmt.Errorf("connection %d: %w", i, err))
					return
				}
				mu.Lock()
				conns = append(conns, c)
				mu.Unlock()
				if err := roundTrip(c); err != nil {
					fail(fmt.Errorf("connection %d: %w", i, err))
					return
				}
			}
		}()
	}
	wg.Wait()
	s.open = time.Since(t0)
	if firstErr == nil && ctx.Err() != nil {
		firstErr = ctx.Err()
	}
	if firstErr != nil {
		return s, fmt.Errorf("%s, %d of %d connections open after %s: %w (files: %s)",
			p.name, len(conns), n, s.open.Round(time.Millisecond), firstErr, allFiles(ns, srv))
	}
	if st, err := srv.stat(); err != nil {
		return s, err
	} else if st.active != int64(n) {
		return s, fmt.Errorf("%s: %d idle connections open, the %s server has %d", p.name, n, srv.name, st.active)
	}
	if err := ns.alive(); err != nil {
		return s, err
	}

	// Idle.
	if s.rss1, s.wait1, s.settled1, err = ns.settledRSS(ctx); err != nil {
		return s, err
	}
	if s.mem1, err = ns.goMem(ctx); err != nil {
		return s, err
	}
	if profileDir != "" {
		if err := os.MkdirAll(profileDir, 0o755); err != nil {
			return s, err
		}
		for i, nd := range ns {
			file := filepath.Join(profileDir, "idle-heap-node-"+[]string{"a", "b"}[i]+".pprof")
			if err := nd.heapProfile(ctx, file); err != nil {
				return s, err
			}
			s.profiles = append(s.profiles, file)
		}
	}

	// Still carried end to end?
	step := max(1, n/idleChecks)
	for i := 0; i < len(conns); i += step {
		if err := roundTrip(conns[i]); err != nil {
			return s, fmt.Errorf("%s: idle connection %d after the measurement: %w (files: %s)", p.name, i, err, allFiles(ns, srv))
		}
	}

	mu.Lock()
	for _, c := range conns {
		c.Close()
	}
	conns = nil
	mu.Unlock()
	if err := srv.waitIdle(max(idleMinClose, time.Until(deadline))); err != nil {
		return s, fmt.Errorf("%s: %w", p.name, err)
	}
	if errs := srv.errors(); len(errs) > 0 {
		return s, fmt.Errorf("%s: %s", p.name, strings.Join(errs, "; "))
	}
	// The nodes end their side of each flow as the server sees the close; give them a moment.
	if err := sleep(ctx, settleStep); err != nil {
		return s, err
	}
	mem, err := ns.goMem(ctx)
	if err != nil {
		return s, err
	}
	for _, m := range mem {
		s.goroutinesAfterClose = append(s.goroutinesAfterClose, m.goroutines)
	}
	return s, nil
}

// allFiles describes the open files of every process holding idle connections against their
// limits, for error messages.
func allFiles(ns nodeSet, srv *idleEcho) string {
	parts := []string{ns.files()}
	if open, lim, err := procFiles("self"); err == nil {
		parts = append(parts, fmt.Sprintf("meshbench %d of %d", open, lim))
	}
	if st, err := srv.stat(); err == nil {
		parts = append(parts, fmt.Sprintf("%s %d of %d", srv.name, st.files, st.fileLimit))
	}
	return strings.Join(parts, ", ")
}

func sleep(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}
