//go:build linux

package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"runtime"
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
