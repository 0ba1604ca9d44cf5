package relay

import (
	"errors"
	"fmt"
	"io"
	"runtime"
	"syscall"

	"golang.org/x/sys/unix"
)

// pipeSize is what a relay pipe asks for (F_SETPIPE_SZ, as Go's own splice does); the
// kernel's default (64 KiB) is kept when the limit refuses it.
const pipeSize = 1 << 20

// kpipe is a kernel pipe used by a splice burst; it is pooled only when empty.
type kpipe struct {
	r, w int
	size int
	// cleanup closes the descriptors of a pipe the pool lets go of: a sync.Pool drops what it
	// holds at garbage collection, and a dropped pipe would otherwise leak two descriptors.
	cleanup runtime.Cleanup
}

func (r *Relay) getPipe() (*kpipe, error) {
	if p, ok := r.pipes.Get().(*kpipe); ok {
		return p, nil
	}
	var fds [2]int
	if err := unix.Pipe2(fds[:], unix.O_CLOEXEC|unix.O_NONBLOCK); err != nil {
		return nil, fmt.Errorf("pipe2: %w", err)
	}
	p := &kpipe{r: fds[0], w: fds[1], size: 64 << 10}
	if n, err := unix.FcntlInt(uintptr(p.w), unix.F_SETPIPE_SZ, pipeSize); err == nil {
		p.size = n
	}
	p.cleanup = runtime.AddCleanup(p, closePipe, fds)
	return p, nil
}

// close closes a pipe that is not going back to the pool (it may hold bytes).
func (p *kpipe) close() {
	p.cleanup.Stop()
	closePipe([2]int{p.r, p.w})
}

func closePipe(fds [2]int) {
	unix.Close(fds[0])
	unix.Close(fds[1])
}

// initSplice makes a TCP-to-TCP direction splice through a pipe.
func (d *dir) initSplice(dstRC syscall.RawConn) {
	d.mode, d.dstRC = modeSplice, dstRC
	d.rawIn, d.rawOut = d.spliceInIO, d.spliceOutIO
}

// burstSplice moves bytes from the TCP source to the TCP destination through a pipe, in the
// kernel, until the source would block or ends. The pipe is drained before the next fill, so
// it goes back to the pool empty; after an error it may hold bytes and is closed instead.
func (d *dir) burstSplice() (idle bool, err error) {
	r := d.f.r
	p, err := r.getPipe()
	if err != nil {
		return false, err
	}
	d.pipe = p
	clean := false
	defer func() {
		d.pipe = nil
		if clean {
			r.pipes.Put(p)
		} else {
			p.close()
		}
	}()
	for {
		if err := d.srcRC.Read(d.rawIn); err != nil {
			return false, err
		}
		n, serr := d.ioN, d.ioErr
		switch {
		case isAgain(serr):
			clean = true
			return true, nil
		case serr != nil:
			return false, fmt.Errorf("splice from socket: %w", serr)
		case n == 0:
			clean = true
			return false, d.dst.CloseWrite()
		}
		if err := d.drainPipe(n); err != nil {
			return false, err
		}
	}
}

// spliceInIO fills the pipe from the source. Without an event loop it waits on the netpoller
// while the socket is empty; with one, an idle source parks on the loop instead.
func (d *dir) spliceInIO(fd uintptr) bool {
	for {
		m, err := unix.Splice(int(fd), nil, d.pipe.w, nil, d.pipe.size, unix.SPLICE_F_MOVE|unix.SPLICE_F_NONBLOCK)
		if !errors.Is(err, unix.EINTR) {
			d.ioN, d.ioErr = int(max(m, 0)), err
			return !d.wait || !isAgain(err)
		}
	}
}

// drainPipe writes n bytes from the pipe to the destination socket, waiting on the netpoller
// while the socket is full (the flow's backpressure: nothing more is read meanwhile).
func (d *dir) drainPipe(n int) error {
	for n > 0 {
		d.want = n
		if err := d.dstRC.Write(d.rawOut); err != nil {
			return err
		}
		m, werr := d.ioN, d.ioErr
		if werr != nil {
			return fmt.Errorf("splice to socket: %w", werr)
		}
		if m <= 0 {
			return fmt.Errorf("splice to socket: %w", io.ErrShortWrite)
		}
		n -= m
		d.n += int64(m)
		if d.count != nil {
			d.count.Add(int64(m))
		}
	}
	return nil
}

// spliceOutIO moves up to d.want bytes from the pipe to the destination, waiting on the
// netpoller while the socket is full.
func (d *dir) spliceOutIO(fd uintptr) bool {
	for {
		m, err := unix.Splice(d.pipe.r, nil, int(fd), nil, d.want, unix.SPLICE_F_MOVE|unix.SPLICE_F_NONBLOCK)
		if !errors.Is(err, unix.EINTR) {
			d.ioN, d.ioErr = int(max(m, 0)), err
			return !isAgain(err)
		}
	}
}
