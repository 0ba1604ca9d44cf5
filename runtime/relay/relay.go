// Package relay moves the bytes of an established flow between its two ends until both halves
// are closed.
//
// Each direction is copied on its own: when one side reaches EOF, the other side's write half
// is closed (TCP FIN or HTTP/2 END_STREAM) and the opposite direction keeps flowing, so
// half-close is preserved end to end. An error in either direction aborts both. No byte is
// lost or reordered: a direction never runs on two goroutines at once.
//
// How bytes move depends on the ends: TCP to TCP goes through splice(2) and a pooled pipe, so
// the bytes never enter user space; an HBONE stream is drained straight from its receive
// buffer (Stream.WriteAvailable); TCP into an HBONE stream uses a pooled buffer, taken only
// while a read is in flight.
//
// # No goroutine per idle flow
//
// A direction runs in bursts. A burst moves bytes on a goroutine until its source would block;
// then the direction parks: a TCP source is armed on the event loop (runtime/eventloop, one
// epoll set with one-shot arming), an HBONE stream source arms NotifyReadable, and the
// goroutine ends. The next readiness report starts the next burst on a new goroutine. An idle
// flow therefore holds no goroutine, no buffer and no pipe, only its sockets and small state;
// a busy direction holds one goroutine, also while it waits for its far side (HTTP/2 send
// window, a full socket), which is the backpressure: a parked source that nobody re-arms is
// not read, so its sender stalls. Without an event loop (New with nil, or not Linux), a TCP
// source keeps a goroutine for the direction's life as before.
package relay

import (
	"errors"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"syscall"

	"github.com/ztgo/ztgo/runtime/eventloop"
	"github.com/ztgo/ztgo/stages/hbone"
)

// Conn is one end of a flow.
type Conn interface {
	io.ReadWriteCloser
	CloseWrite() error
}

// Relay copies flows. It is safe for concurrent use.
type Relay struct {
	bufs    sync.Pool
	bufSize int
	inUse   atomic.Int64
	pipes   sync.Pool
	loop    *eventloop.Loop
	running atomic.Int64
	inline  atomic.Int64
}

// New returns a relay whose copy buffers are bufSize bytes (default 256 KiB). With loop, idle
// TCP sources park on it instead of holding a goroutine; loop must run (Start) while flows do.
func New(bufSize int, loop *eventloop.Loop) *Relay {
	if bufSize <= 0 {
		bufSize = 256 << 10
	}
	r := &Relay{bufSize: bufSize, loop: loop}
	r.bufs.New = func() any { b := make([]byte, bufSize); return &b }
	return r
}

func (r *Relay) getBuf() *[]byte {
	r.inUse.Add(1)
	return r.bufs.Get().(*[]byte)
}

func (r *Relay) putBuf(bp *[]byte) {
	r.inUse.Add(-1)
	r.bufs.Put(bp)
}

// BuffersInUse is the number of copy buffers currently held by flows: bytes in flight, not
// idle flows.
func (r *Relay) BuffersInUse() int64 { return r.inUse.Load() }

// Running is the number of flow directions currently on a goroutine (moving bytes, or waiting
// for their far side); parked directions are not counted.
func (r *Relay) Running() int64 { return r.running.Load() }

// InlineWrites counts the times bytes from an HBONE stream went to their socket straight
// from the connection's read loop, without a goroutine.
func (r *Relay) InlineWrites() int64 { return r.inline.Load() }

// Result of a finished flow.
type Result struct {
	// Sent counts bytes from down to up (client to server); Recv from up to down.
	Sent, Recv int64
	// Err is the first error that aborted the flow, nil when both sides closed cleanly.
	Err error
}

// Counter receives byte counts as they are moved (for live metrics); it may be nil.
type Counter interface{ Add(int64) int64 }

// Run copies between down and up until both directions are finished, then closes both, and
// returns the result. It blocks; see Start.
func (r *Relay) Run(down, up Conn, sent, recv Counter, firstRecv func()) Result {
	ch := make(chan Result, 1)
	r.Start(down, up, sent, recv, firstRecv, func(res Result) { ch <- res })
	return <-ch
}

// Start copies between down and up until both directions are finished, then closes both and
// calls done with the result, on some goroutine. It returns at once. firstRecv, if not nil, is
// called once when the first bytes from up reach down, on paths that move bytes through user
// space (an HBONE stream on either end); a TCP-to-TCP splice is not observed byte by byte, so
// there it is never called.
//
// Whoever closes down or up from outside must call the returned Flow's Abort instead (or as
// well): a parked direction learns of a close only through it.
func (r *Relay) Start(down, up Conn, sent, recv Counter, firstRecv func(), done func(Result)) *Flow {
	f := &Flow{r: r, down: down, up: up, done: done}
	f.left.Store(2)
	f.dirs[0].init(f, up, down, sent, nil)
	f.dirs[1].init(f, down, up, recv, firstRecv)
	for i := range f.dirs {
		f.dirs[i].begin()
	}
	return f
}

// Flow is a running relay.
type Flow struct {
	r        *Relay
	down, up Conn
	done     func(Result)
	dirs     [2]dir // 0: down -> up (sent), 1: up -> down (recv)
	left     atomic.Int32
	aborted  atomic.Bool
}

// Abort closes both ends and wakes the flow's parked directions, which then finish with the
// close's error. It is safe to call at any time, more than once, and after the flow finished.
func (f *Flow) Abort() {
	if f.aborted.Swap(true) {
		return
	}
	f.down.Close()
	f.up.Close()
	for i := range f.dirs {
		f.dirs[i].wake()
	}
}

func (f *Flow) dirFinished() {
	if f.left.Add(-1) != 0 {
		return
	}
	f.down.Close()
	f.up.Close()
	d0, d1 := &f.dirs[0], &f.dirs[1]
	f.done(Result{Sent: d0.n, Recv: d1.n, Err: errors.Join(d0.err, d1.err)})
}

// mode is how a direction moves bytes.
type mode uint8

const (
	// modeBlocking: one goroutine copies until EOF (a source that cannot park).
	modeBlocking mode = iota
	// modeSplice: TCP to TCP through a pipe.
	modeSplice
	// modeRead: a TCP source read into a pooled buffer, written to dst.
	modeRead
	// modeStream: an HBONE stream source drained into dst.
	modeStream
)

// dir is one direction of a flow. Only one goroutine runs it at a time: parked is claimed
// with a compare-and-swap by whoever starts the next burst.
type dir struct {
	f        *Flow
	dst, src Conn
	count    Counter // live byte counter (wraps firstRecv), may be nil
	mode     mode
	srcRC    syscall.RawConn
	dstRC    syscall.RawConn
	watch    *eventloop.Watch
	wakeFn   func() // d.wake, made once: a method value allocates
	armErr   error
	parked   atomic.Bool

	// Results, read once both directions finished.
	n   int64
	err error
}

func (d *dir) init(f *Flow, dst, src Conn, c Counter, first func()) {
	d.f, d.dst, d.src, d.count = f, dst, src, c
	d.wakeFn = d.wake
	srcTCP, _ := src.(*net.TCPConn)
	dstTCP, _ := dst.(*net.TCPConn)
	if first != nil && (srcTCP == nil || dstTCP == nil) {
		// A splice is not observed byte by byte: no first-bytes hook there.
		d.count = &firstCounter{c: c, fn: first}
	}
	switch {
	case isStream(src):
		d.mode = modeStream
		if dstTCP != nil {
			if rc, err := dstTCP.SyscallConn(); err == nil {
				d.dstRC = rc
				d.wakeFn = d.wakeStream
			}
		}
	case srcTCP != nil && f.r.loop != nil:
		rc, err := srcTCP.SyscallConn()
		if err != nil {
			return // modeBlocking
		}
		d.srcRC, d.mode = rc, modeRead
		if dstTCP != nil {
			if rc, err := dstTCP.SyscallConn(); err == nil {
				d.dstRC, d.mode = rc, modeSplice
			}
		}
	}
}

// begin starts the direction parked: its first burst runs once the source is readable.
func (d *dir) begin() {
	if d.mode == modeBlocking {
		d.f.r.running.Add(1)
		go func() {
			n, err := d.f.r.pipe(d.dst, d.src, d.count)
			d.n = n
			d.finish(err)
		}()
		return
	}
	d.parked.Store(true)
	if d.sleep() && d.parked.CompareAndSwap(true, false) {
		d.f.r.running.Add(1)
		go d.run()
	}
}

// wake starts the next burst if the direction is parked. It never blocks: it runs on the
// event loop and under a stream's lock.
func (d *dir) wake() {
	if d.parked.CompareAndSwap(true, false) {
		d.f.r.running.Add(1)
		go d.run()
	}
}

// wakeStream is wake for an HBONE stream source with a TCP destination, called by the stream
// on its connection's read loop: it writes what arrived straight to the socket, without
// blocking and without handing over to another goroutine, when the socket takes all of it
// (the common case: a request or a response smaller than the socket buffer); anything else (a
// full socket, the end of the stream, an error) goes to a burst goroutine as before.
func (d *dir) wakeStream() {
	if !d.parked.CompareAndSwap(true, false) {
		return
	}
	d.f.r.running.Add(1)
	for range 4 { // a few rounds at most: the read loop has other streams to serve
		if d.f.aborted.Load() || d.armErr != nil {
			break
		}
		n, done, err := d.src.(*hbone.Stream).WriteAvailable(countWriter{nonBlocking{d.dstRC}, d.count})
		d.n += n
		if n > 0 {
			d.f.r.inline.Add(1)
		}
		if err != nil || done {
			break // the goroutine sees the same error or end, and finishes
		}
		d.parked.Store(true)
		if !d.sleep() {
			d.f.r.running.Add(-1)
			return // drained and armed again
		}
		if !d.parked.CompareAndSwap(true, false) {
			d.f.r.running.Add(-1)
			return // a concurrent wake runs it
		}
	}
	go d.run()
}

// nonBlocking writes to a socket once, without waiting: a partial write returns errWouldBlock.
type nonBlocking struct{ rc syscall.RawConn }

var errWouldBlock = errors.New("relay: socket full")

func (w nonBlocking) Write(p []byte) (int, error) {
	var n int
	var werr error
	err := w.rc.Write(func(fd uintptr) bool {
		n, werr = writeFD(int(fd), p)
		return true
	})
	if err != nil {
		return n, err
	}
	if isAgain(werr) || (werr == nil && n < len(p)) {
		return n, errWouldBlock
	}
	return n, werr
}

// run moves bytes until the source would block, then parks, or finishes the direction.
func (d *dir) run() {
	for {
		if d.armErr != nil {
			d.finish(d.armErr)
			return
		}
		idle, err := d.burst()
		if !idle {
			d.finish(err)
			return
		}
		d.parked.Store(true)
		if !d.sleep() {
			d.f.r.running.Add(-1)
			return // armed: the next report runs the next burst
		}
		if !d.parked.CompareAndSwap(true, false) {
			d.f.r.running.Add(-1)
			return // a concurrent wake runs it
		}
	}
}

// sleep arms the direction's wakeup. It reports true when the caller should run a burst now
// instead: the source is readable already, the flow was aborted, or arming failed (armErr).
func (d *dir) sleep() bool {
	if d.f.aborted.Load() {
		return true
	}
	if d.mode == modeStream {
		return !d.src.(*hbone.Stream).NotifyReadable(d.wakeFn)
	}
	if d.watch == nil {
		w, err := d.f.r.loop.Watch(d.src.(*net.TCPConn), d.wakeFn)
		if err != nil {
			d.armErr = err
			return true
		}
		d.watch = w
	}
	if err := d.watch.Arm(); err != nil {
		d.armErr = err
		return true
	}
	return false
}

// finish ends the direction: an error aborts the flow; the second direction to finish closes
// both ends and reports.
func (d *dir) finish(err error) {
	if d.watch != nil {
		d.watch.Close()
	}
	d.err = err
	d.f.r.running.Add(-1)
	if err != nil {
		d.f.Abort()
	}
	d.f.dirFinished()
}

// burst moves bytes until the source would block (idle) or the direction is over (EOF
// propagated as a half-close, or an error).
func (d *dir) burst() (idle bool, err error) {
	switch d.mode {
	case modeStream:
		n, done, err := d.src.(*hbone.Stream).WriteAvailable(countWriter{d.dst, d.count})
		d.n += n
		if err != nil {
			return false, err
		}
		if done {
			return false, d.dst.CloseWrite()
		}
		return true, nil
	case modeSplice:
		return d.burstSplice()
	default:
		return d.burstRead()
	}
}

// burstRead reads the TCP source into a pooled buffer, held only while bytes are in flight,
// and writes them to dst, which may block (HTTP/2 send window, a full socket).
func (d *dir) burstRead() (bool, error) {
	r := d.f.r
	for {
		var bp *[]byte
		var n int
		var rerr error
		err := d.srcRC.Read(func(fd uintptr) bool {
			bp = r.getBuf()
			n, rerr = readFD(int(fd), *bp)
			if n <= 0 {
				r.putBuf(bp)
				bp = nil
			}
			return true // never wait on the netpoller: an idle source parks on the loop
		})
		if err != nil {
			return false, err
		}
		if n > 0 {
			_, werr := d.dst.Write((*bp)[:n])
			r.putBuf(bp)
			d.n += int64(n)
			if d.count != nil {
				d.count.Add(int64(n))
			}
			if werr != nil {
				return false, werr
			}
			if n < r.bufSize {
				// A short read of a stream socket drained it: park now rather than spend a
				// read on EAGAIN; re-arming reports at once if more came in the meantime.
				return true, nil
			}
			continue
		}
		switch {
		case isAgain(rerr):
			return true, nil
		case rerr != nil:
			return false, rerr
		default:
			return false, d.dst.CloseWrite() // EOF: FIN or END_STREAM
		}
	}
}

// pipe copies src to dst on the calling goroutine until src's EOF, then closes dst's write
// half: the path of a source that cannot park. c counts bytes as they move, except on a
// TCP-to-TCP splice (counted once at the end).
func (r *Relay) pipe(dst, src Conn, c Counter) (int64, error) {
	var n int64
	var err error
	switch {
	case isTCP(dst) && isTCP(src):
		// splice(2): the bytes never enter user space.
		n, err = dst.(*net.TCPConn).ReadFrom(src.(*net.TCPConn))
		if c != nil && n > 0 {
			c.Add(n)
		}
	case isStream(src):
		n, err = src.(*hbone.Stream).WriteTo(countWriter{dst, c})
	case isStream(dst) && isTCP(src):
		n, err = r.tcpToStream(dst.(*hbone.Stream), src.(*net.TCPConn), c)
		if err == nil {
			return n, nil // tcpToStream already sent END_STREAM
		}
	case isStream(dst):
		bp := r.getBuf()
		n, err = dst.(*hbone.Stream).ReadFromBuffer(countReader{src, c}, *bp)
		r.putBuf(bp)
		if err == nil {
			return n, nil // ReadFromBuffer already sent END_STREAM
		}
	default:
		bp := r.getBuf()
		n, err = io.CopyBuffer(writerOnly{countWriter{dst, c}}, readerOnly{src}, *bp)
		r.putBuf(bp)
	}
	if err != nil {
		return n, err
	}
	return n, dst.CloseWrite()
}

// tcpToStream copies a TCP socket into an HBONE stream. It takes a buffer from the pool only
// once the socket is readable, and gives it back before waiting again, so an idle flow holds no
// buffer at all: memory follows the bytes in flight, not the number of flows.
func (r *Relay) tcpToStream(dst *hbone.Stream, src *net.TCPConn, c Counter) (int64, error) {
	rc, err := src.SyscallConn()
	if err != nil {
		return 0, err
	}
	var total int64
	for {
		var bp *[]byte
		var n int
		var rerr error
		err := rc.Read(func(fd uintptr) bool {
			bp = r.getBuf()
			n, rerr = readFD(int(fd), *bp)
			if isAgain(rerr) {
				r.putBuf(bp)
				bp = nil
				return false // wait for readability without holding the buffer
			}
			return true
		})
		if err == nil {
			err = rerr
		}
		if n > 0 {
			_, werr := dst.Write((*bp)[:n])
			total += int64(n)
			if c != nil {
				c.Add(int64(n))
			}
			if werr != nil {
				r.putBuf(bp)
				return total, werr
			}
		}
		if bp != nil {
			r.putBuf(bp)
		}
		if err != nil {
			return total, err
		}
		if n == 0 {
			return total, dst.CloseWrite()
		}
	}
}

// firstCounter forwards to c (which may be nil) and calls fn once, on the first non-empty Add.
type firstCounter struct {
	c     Counter
	fired bool // one direction is one goroutine: no synchronisation needed
	fn    func()
}

func (f *firstCounter) Add(n int64) int64 {
	if n > 0 && !f.fired {
		f.fired = true
		f.fn()
	}
	if f.c == nil {
		return 0
	}
	return f.c.Add(n)
}

func isTCP(c Conn) bool    { _, ok := c.(*net.TCPConn); return ok }
func isStream(c Conn) bool { _, ok := c.(*hbone.Stream); return ok }

type countWriter struct {
	w io.Writer
	c Counter
}

func (cw countWriter) Write(p []byte) (int, error) {
	n, err := cw.w.Write(p)
	if cw.c != nil && n > 0 {
		cw.c.Add(int64(n))
	}
	return n, err
}

type countReader struct {
	r io.Reader
	c Counter
}

func (cr countReader) Read(p []byte) (int, error) {
	n, err := cr.r.Read(p)
	if cr.c != nil && n > 0 {
		cr.c.Add(int64(n))
	}
	return n, err
}

// writerOnly and readerOnly hide ReadFrom/WriteTo so io.CopyBuffer uses our buffer.
type writerOnly struct{ io.Writer }
type readerOnly struct{ io.Reader }
