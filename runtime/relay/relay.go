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
// source's bursts run the same code but wait for bytes on Go's netpoller instead of parking:
// such a direction keeps a goroutine for its life (and a spliced one its pipe, as Go's own
// splice does), though no copy buffer while idle.
//
// Nothing is allocated per burst or per read: the functions a direction hands to RawConn,
// to the event loop and to go statements are made once, when the flow starts.
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
	// modeCopy: a source that is neither TCP nor a stream, copied on one goroutine to its end.
	modeCopy mode = iota
	// modeSplice: TCP to TCP through a pipe.
	modeSplice
	// modeRead: a TCP source read into a pooled buffer, written to dst.
	modeRead
	// modeStream: an HBONE stream source drained into dst.
	modeStream
)

// dir is one direction of a flow. Only one goroutine runs it at a time (its owner): parked is
// claimed with a compare-and-swap by whoever starts the next burst, and every field below but
// parked is the owner's alone.
type dir struct {
	f        *Flow
	dst, src Conn
	count    Counter // live byte counter (wraps firstRecv), may be nil
	mode     mode
	// wait: the direction never parks; its bursts wait for the source themselves (a TCP
	// source on Go's netpoller when there is no event loop, or a blocking Read).
	wait   bool
	srcRC  syscall.RawConn
	dstRC  syscall.RawConn
	watch  *eventloop.Watch // a parking TCP source's, registered before the first park
	wakeFn func()           // d.wake or d.wakeStream, made once: a method value allocates
	runFn  func()           // d.run, made once: so is the closure of a go statement
	// rawIn and rawOut are what the direction hands to srcRC.Read and dstRC.Write, made once
	// for the mode (a closure per call would allocate on every read); they pass their
	// results in the scratch fields below.
	rawIn, rawOut func(fd uintptr) bool
	bp            *[]byte // copy buffer, held while its bytes are in flight
	pipe          *kpipe  // splice pipe, held for a burst
	p             []byte  // what writeNowIO writes
	want          int     // what spliceOutIO moves
	ioN           int
	ioErr         error
	now           bool  // Write must not wait: it runs on an HBONE read loop
	armErr        error // why parking failed, for the owner to finish with
	parked        atomic.Bool

	// Results, read once both directions finished.
	n   int64
	err error
}

func (d *dir) init(f *Flow, dst, src Conn, c Counter, first func()) {
	d.f, d.dst, d.src, d.count = f, dst, src, c
	d.wakeFn, d.runFn = d.wake, d.run
	srcTCP, _ := src.(*net.TCPConn)
	dstTCP, _ := dst.(*net.TCPConn)
	var dstRC syscall.RawConn
	if dstTCP != nil {
		dstRC, _ = dstTCP.SyscallConn()
	}
	if first != nil && (srcTCP == nil || dstTCP == nil) {
		// A splice is not observed byte by byte: no first-bytes hook there.
		d.count = &firstCounter{c: c, fn: first}
	}
	if _, ok := src.(*hbone.Stream); ok {
		d.mode = modeStream
		if dstRC != nil {
			d.dstRC, d.rawOut = dstRC, d.writeNowIO
			d.wakeFn = d.wakeStream
		}
		return
	}
	d.mode, d.wait = modeCopy, true
	if srcTCP == nil {
		return
	}
	rc, err := srcTCP.SyscallConn()
	if err != nil {
		return
	}
	d.srcRC, d.mode, d.rawIn = rc, modeRead, d.readIO
	if dstRC != nil {
		d.initSplice(dstRC) // where splice(2) exists
	}
	if f.r.loop != nil {
		// Registered now, before the direction can be woken from elsewhere: the watch is
		// then fixed for the direction's life, and finish always closes it.
		if w, err := f.r.loop.Watch(srcTCP, d.wakeFn); err == nil {
			d.watch, d.wait = w, false
		}
	}
}

// begin starts the direction parked: its first burst runs once the source is readable.
func (d *dir) begin() {
	if d.park() {
		d.f.r.running.Add(1)
		go d.runFn()
	}
}

// wake starts the next burst if the direction is parked. It never blocks: it runs on the
// event loop, on an HBONE read loop, or in Abort.
func (d *dir) wake() {
	if d.parked.CompareAndSwap(true, false) {
		d.f.r.running.Add(1)
		go d.runFn()
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
		if d.f.aborted.Load() {
			break
		}
		d.now = true
		n, done, err := d.src.(*hbone.Stream).WriteAvailable(d)
		d.now = false
		d.n += n
		if n > 0 {
			d.f.r.inline.Add(1)
		}
		if err != nil || done {
			break // the goroutine sees the same error or end, and finishes
		}
		if !d.park() {
			d.f.r.running.Add(-1)
			return // drained and armed again, or a concurrent wake runs it
		}
	}
	go d.runFn()
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
		if !d.park() {
			d.f.r.running.Add(-1)
			return // armed: the next report runs the next burst
		}
	}
}

// park arms the direction's wakeup (the event loop for a TCP source, NotifyReadable for a
// stream) and gives the direction up. It reports whether the caller still owns it and must
// run a burst now instead: the source is readable already, the flow was aborted, arming
// failed (armErr, to finish with), or the direction never parks. Once it returns false, a
// wake may run the direction on another goroutine at any moment: the caller must not touch
// it again.
func (d *dir) park() bool {
	if d.wait {
		return true
	}
	d.parked.Store(true)
	var err error
	if !d.f.aborted.Load() { // checked after parked is set: Abort's wake then finds it
		if d.mode == modeStream {
			if d.src.(*hbone.Stream).NotifyReadable(d.wakeFn) {
				return false
			}
		} else if err = d.watch.Arm(); err == nil {
			return false
		}
	}
	if !d.parked.CompareAndSwap(true, false) {
		return false // a concurrent wake claimed it and runs it
	}
	d.armErr = err
	return true
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
		n, done, err := d.src.(*hbone.Stream).WriteAvailable(d)
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
	case modeRead:
		return d.burstRead()
	default:
		bp := d.f.r.getBuf()
		n, err := io.CopyBuffer(d, d.src, *bp)
		d.f.r.putBuf(bp)
		d.n += n
		if err != nil {
			return false, err
		}
		return false, d.dst.CloseWrite()
	}
}

// Write writes p to dst and counts it: the writer a stream source drains into, and the
// generic copy's. On an HBONE read loop (now) it writes only what the socket takes at once.
func (d *dir) Write(p []byte) (int, error) {
	var n int
	var err error
	if d.now {
		n, err = d.writeNow(p)
	} else {
		n, err = d.dst.Write(p)
	}
	if n > 0 && d.count != nil {
		d.count.Add(int64(n))
	}
	return n, err
}

var errWouldBlock = errors.New("relay: socket full")

// writeNow writes p to the TCP destination once, without waiting: what the socket does not
// take at once is left, with errWouldBlock.
func (d *dir) writeNow(p []byte) (int, error) {
	d.p = p
	err := d.dstRC.Write(d.rawOut)
	d.p = nil
	if err != nil {
		return 0, err
	}
	n, werr := d.ioN, d.ioErr
	if isAgain(werr) || (werr == nil && n < len(p)) {
		return n, errWouldBlock
	}
	return n, werr
}

func (d *dir) writeNowIO(fd uintptr) bool {
	d.ioN, d.ioErr = writeFD(int(fd), d.p)
	return true // never wait on the netpoller
}

// burstRead reads the TCP source into a pooled buffer, held only while bytes are in flight,
// and writes them to dst, which may block (HTTP/2 send window, a full socket).
func (d *dir) burstRead() (bool, error) {
	r := d.f.r
	for {
		if err := d.srcRC.Read(d.rawIn); err != nil {
			return false, err
		}
		if n := d.ioN; n > 0 {
			_, werr := d.dst.Write((*d.bp)[:n])
			r.putBuf(d.bp)
			d.bp = nil
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
		switch rerr := d.ioErr; {
		case isAgain(rerr):
			return true, nil
		case rerr != nil:
			return false, rerr
		default:
			return false, d.dst.CloseWrite() // EOF: FIN or END_STREAM
		}
	}
}

// readIO reads the source into a buffer taken from the pool for the read and kept only when
// bytes came. Without an event loop it waits on the netpoller, holding no buffer, when the
// socket is empty.
func (d *dir) readIO(fd uintptr) bool {
	r := d.f.r
	d.bp = r.getBuf()
	d.ioN, d.ioErr = readFD(int(fd), *d.bp)
	if d.ioN > 0 {
		return true
	}
	r.putBuf(d.bp)
	d.bp = nil
	return !d.wait || !isAgain(d.ioErr)
}

// firstCounter forwards to c (which may be nil) and calls fn once, on the first non-empty Add.
type firstCounter struct {
	c     Counter
	fired bool // one direction has one owner at a time: no synchronisation needed
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
