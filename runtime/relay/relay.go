// Package relay moves the bytes of an established flow between its two ends until both halves
// are closed.
//
// Each direction is copied on its own: when one side reaches EOF, the other side's write half
// is closed (TCP FIN or HTTP/2 END_STREAM) and the opposite direction keeps flowing, so
// half-close is preserved end to end. An error in either direction aborts both. No byte is
// lost or reordered: each direction is a single sequential copy.
//
// How bytes move depends on the ends: TCP to TCP goes through splice(2) in the kernel (Go's
// TCPConn.ReadFrom), an HBONE stream is drained straight from its receive buffer
// (Stream.WriteTo), and TCP into an HBONE stream uses a pooled buffer. A pooled buffer is held
// only while a read is in flight.
package relay

import (
	"errors"
	"io"
	"net"
	"sync"
	"sync/atomic"

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
}

// New returns a relay whose copy buffers are bufSize bytes (default 256 KiB).
func New(bufSize int) *Relay {
	if bufSize <= 0 {
		bufSize = 256 << 10
	}
	r := &Relay{bufSize: bufSize}
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

// Result of a finished flow.
type Result struct {
	// Sent counts bytes from down to up (client to server); Recv from up to down.
	Sent, Recv int64
	// Err is the first error that aborted the flow, nil when both sides closed cleanly.
	Err error
}

// Counter receives byte counts as they are moved (for live metrics); it may be nil.
type Counter interface{ Add(int64) int64 }

// Run copies between down and up until both directions are finished, then closes both. It
// blocks; the up-to-down direction runs on a second goroutine. firstRecv, if not nil, is
// called once when the first bytes from up reach down, on paths that move bytes through user
// space (an HBONE stream on either end); a TCP-to-TCP splice is not observed byte by byte, so
// there it is never called.
func (r *Relay) Run(down, up Conn, sent, recv Counter, firstRecv func()) Result {
	var res Result
	var upErr error
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		res.Recv, upErr = r.pipe(down, up, recv, firstRecv)
		if upErr != nil {
			// Abort: unblock the other direction.
			down.Close()
			up.Close()
		}
	}()
	var downErr error
	res.Sent, downErr = r.pipe(up, down, sent, nil)
	if downErr != nil {
		down.Close()
		up.Close()
	}
	wg.Wait()
	down.Close()
	up.Close()
	res.Err = errors.Join(downErr, upErr)
	return res
}

// pipe copies src to dst until src's EOF, then closes dst's write half. first, if set, is
// called once on the first bytes moved, where bytes are counted as they move.
func (r *Relay) pipe(dst, src Conn, c Counter, first func()) (int64, error) {
	var n int64
	var err error
	live := c // counts as bytes move; notices the first ones
	if first != nil {
		live = &firstCounter{c: c, fn: first}
	}
	switch {
	case isTCP(dst) && isTCP(src):
		// splice(2): the bytes never enter user space.
		n, err = dst.(*net.TCPConn).ReadFrom(src.(*net.TCPConn))
	case isStream(src):
		n, err = src.(*hbone.Stream).WriteTo(countWriter{dst, live})
		c = nil
	case isStream(dst) && isTCP(src):
		n, err = r.tcpToStream(dst.(*hbone.Stream), src.(*net.TCPConn), live)
		c = nil
		if err == nil {
			return n, nil // tcpToStream already sent END_STREAM
		}
	case isStream(dst):
		bp := r.getBuf()
		n, err = dst.(*hbone.Stream).ReadFromBuffer(countReader{src, live}, *bp)
		r.putBuf(bp)
		c = nil
		if err == nil {
			return n, nil // ReadFromBuffer already sent END_STREAM
		}
	default:
		bp := r.getBuf()
		n, err = io.CopyBuffer(writerOnly{dst}, readerOnly{src}, *bp)
		r.putBuf(bp)
	}
	if c != nil && n > 0 {
		c.Add(n)
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
