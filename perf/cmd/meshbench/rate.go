//go:build linux

package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"time"

	"fortio.org/fortio/periodic"
	fortiolog "fortio.org/log"
)

// The fixed-rate workload (rate): fortio's periodic engine keeps rateQPS calls per second over
// rateThreads goroutines, each with its own long-lived connection to the echo server; one call is
// one rateSize-byte request and its echo.
const (
	rateQPS     = 1000
	rateThreads = 8
	rateSize    = 1024 // "1 KB" in performance.md and on istio.io's performance page
	// rateResolution is fortio's histogram unit: 1 µs. Its buckets are then 20 µs wide from
	// 100 to 200 µs, 50 µs to 500 µs, 100 µs to 1 ms, and one bucket from 1 to 2 ms; fortio
	// interpolates within a bucket.
	rateResolution = 1e-6
)

// rateSample is one fixed-rate run.
type rateSample struct {
	qps           float64 // achieved calls per second
	calls         int64
	secs          float64   // wall time of fortio's run
	p50, p90, p99 float64   // µs, from fortio's histogram
	cpu           []float64 // CPU seconds of each ztgo node over the run (ztgo path only)
}

// echoCall is one fortio thread: each Run is one round trip on its own connection.
type echoCall struct {
	c        *net.TCPConn
	msg, got []byte
	mu       sync.Mutex
	err      error // the first failure
}

func (e *echoCall) fail(err error) (bool, string) {
	e.mu.Lock()
	if e.err == nil {
		e.err = err
	}
	e.mu.Unlock()
	return false, err.Error()
}

// Run implements periodic.Runnable.
func (e *echoCall) Run(context.Context, periodic.ThreadID) (bool, string) {
	if _, err := e.c.Write(e.msg); err != nil {
		return e.fail(fmt.Errorf("write: %w", err))
	}
	if _, err := io.ReadFull(e.c, e.got); err != nil {
		return e.fail(fmt.Errorf("read: %w", err))
	}
	if !bytes.Equal(e.got, e.msg) {
		return e.fail(errors.New("wrong bytes back"))
	}
	return true, ""
}

// quietFortio keeps fortio's logger to warnings (it logs every run at info).
func quietFortio() { fortiolog.SetLogLevelQuiet(fortiolog.Warning) }

// fixedRate runs fortio's fixed-rate engine through p for dur: rateQPS calls per second from
// rateThreads connections to the echo server, each call one rateSize-byte round trip. ns, when
// not nil, are sampled for CPU over fortio's run.
func fixedRate(ctx context.Context, p path, dur time.Duration, srv *server, ns nodeSet) (rateSample, error) {
	calls := make([]*echoCall, 0, rateThreads)
	defer func() {
		for _, e := range calls {
			e.c.Close()
		}
	}()
	msg := make([]byte, rateSize)
	for i := range msg {
		msg[i] = byte('A' + i%26)
	}
	hard := time.Now().Add(dur + drainLimit)
	for range rateThreads {
		c, err := p.dial(ctx, echoPort)
		if err != nil {
			return rateSample{}, err
		}
		e := &echoCall{c: c, msg: msg, got: make([]byte, rateSize)}
		calls = append(calls, e)
		c.SetDeadline(hard)
		// One unrecorded round trip: the connection is established end to end before the run.
		if ok, why := e.Run(ctx, 0); !ok {
			return rateSample{}, fmt.Errorf("%s fixed rate, first round trip: %s", p.name, why)
		}
	}
	// Our own Aborter: fortio then installs no SIGINT watcher of its own (which would reset the
	// process's SIGINT handling when it ends); the bench's context aborts the run instead.
	stop := periodic.NewAborter()
	opts := periodic.RunnerOptions{
		RunType:     "meshbench " + p.name,
		QPS:         rateQPS,
		Duration:    dur,
		NumThreads:  rateThreads,
		Percentiles: []float64{50, 90, 99},
		Resolution:  rateResolution,
		Uniform:     true, // threads staggered over the period: 1,000 evenly spread calls a second, not bursts of 8
		Out:         io.Discard,
		Stop:        stop,
	}
	runner := periodic.NewPeriodicRunner(&opts)
	// The runners go in after construction, as fortio's own runners do: NewPeriodicRunner
	// clears the Runners of the options it is given (and so of their shared backing array).
	if rs := runner.Options().Runners; len(rs) != len(calls) {
		stop.Abort(false)
		return rateSample{}, fmt.Errorf("fortio made %d runner slots for %d threads", len(rs), len(calls))
	}
	for i, e := range calls {
		runner.Options().Runners[i] = e
	}
	unwatch := context.AfterFunc(ctx, func() { stop.Abort(false) })
	defer unwatch()
	cpu0, err := ns.cpu()
	if err != nil {
		stop.Abort(false)
		return rateSample{}, err
	}
	t0 := time.Now()
	res := runner.Run()
	secs := time.Since(t0).Seconds()
	cpu1, err := ns.cpu()
	if err != nil {
		return rateSample{}, err
	}
	if err := ctx.Err(); err != nil {
		return rateSample{}, err
	}
	if res.Error {
		return rateSample{}, fmt.Errorf("%s fixed rate: fortio: %s", p.name, res.Message)
	}
	if n := res.ErrorsDurationHistogram.Count; n > 0 {
		var first error
		for _, e := range calls {
			if e.err != nil {
				first = e.err
				break
			}
		}
		return rateSample{}, fmt.Errorf("%s fixed rate: %d of %d calls failed (first: %v)", p.name, n, res.DurationHistogram.Count, first)
	}
	s := rateSample{qps: res.ActualQPS, calls: res.DurationHistogram.Count, secs: secs}
	for _, pc := range res.DurationHistogram.Percentiles {
		us := pc.Value * 1e6
		switch pc.Percentile {
		case 50:
			s.p50 = us
		case 90:
			s.p90 = us
		case 99:
			s.p99 = us
		}
	}
	for i := range cpu0 {
		s.cpu = append(s.cpu, cpu1[i]-cpu0[i])
	}
	// Close like roundTrips: half-close, the echo ends, and nothing more comes back.
	for _, e := range calls {
		if err := e.c.CloseWrite(); err != nil {
			return s, fmt.Errorf("%s fixed rate: close write: %w", p.name, err)
		}
	}
	for _, e := range calls {
		if n, err := io.Copy(io.Discard, e.c); err != nil || n != 0 {
			return s, fmt.Errorf("%s fixed rate: waiting for the echo to close: %d bytes, %v", p.name, n, err)
		}
	}
	if err := srv.waitIdle(drainLimit); err != nil {
		return s, fmt.Errorf("%s: %w", p.name, err)
	}
	if s.calls == 0 {
		return s, fmt.Errorf("%s fixed rate: no call completed", p.name)
	}
	return s, nil
}
