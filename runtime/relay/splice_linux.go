package relay

import (
	"errors"
	"fmt"
	"io"

	"golang.org/x/sys/unix"
)

// pipeSize is what a relay pipe asks for (F_SETPIPE_SZ, as Go's own splice does); the
// kernel's default (64 KiB) is kept when the limit refuses it.
const pipeSize = 1 << 20

// pipe is a kernel pipe used by a splice burst; it is pooled only when empty.
type kpipe struct {
	r, w int
	size int
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
	return p, nil
}

func (p *kpipe) close() {
	unix.Close(p.r)
	unix.Close(p.w)
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
	clean := false
	defer func() {
		if clean {
			r.pipes.Put(p)
		} else {
			p.close()
		}
	}()
	for {
		var n int
		var serr error
		err := d.srcRC.Read(func(fd uintptr) bool {
			for {
				var m int64
				m, serr = unix.Splice(int(fd), nil, p.w, nil, p.size, unix.SPLICE_F_MOVE|unix.SPLICE_F_NONBLOCK)
				if !errors.Is(serr, unix.EINTR) {
					n = int(max(m, 0))
					return true // never wait on the netpoller: an idle source parks on the loop
				}
			}
		})
		if err != nil {
			return false, err
		}
		switch {
		case errors.Is(serr, unix.EAGAIN):
			clean = true
			return true, nil
		case serr != nil:
			return false, fmt.Errorf("splice from socket: %w", serr)
		case n == 0:
			clean = true
			return false, d.dst.CloseWrite()
		}
		if err := d.drainPipe(p, n); err != nil {
			return false, err
		}
	}
}

// drainPipe writes n bytes from the pipe to the destination socket, waiting on the netpoller
// while the socket is full (the flow's backpressure: nothing more is read meanwhile).
func (d *dir) drainPipe(p *kpipe, n int) error {
	for n > 0 {
		var m int64
		var werr error
		err := d.dstRC.Write(func(fd uintptr) bool {
			for {
				m, werr = unix.Splice(p.r, nil, int(fd), nil, n, unix.SPLICE_F_MOVE|unix.SPLICE_F_NONBLOCK)
				if !errors.Is(werr, unix.EINTR) {
					return !errors.Is(werr, unix.EAGAIN)
				}
			}
		})
		if err != nil {
			return err
		}
		if werr != nil {
			return fmt.Errorf("splice to socket: %w", werr)
		}
		if m <= 0 {
			return fmt.Errorf("splice to socket: %w", io.ErrShortWrite)
		}
		n -= int(m)
		d.n += m
		if d.count != nil {
			d.count.Add(m)
		}
	}
	return nil
}
