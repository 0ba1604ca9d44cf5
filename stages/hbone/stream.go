package hbone

import (
	"errors"
	"io"
	"sync"

	"golang.org/x/net/http2"
)

const chunkSize = 32 << 10

// chunk holds received bytes until the stream's reader takes them.
type chunk struct {
	buf  [chunkSize]byte
	r, w int
}

// Stream is one CONNECT tunnel. Read, Write and CloseWrite may be used from different
// goroutines (one reader, one writer); Close may be called from any goroutine.
//
// Ownership: the goroutine that obtained the stream (OpenStream's caller, or the server
// Handler's worker) must eventually call Close, which frees its buffers.
type Stream struct {
	c   *Conn
	id  uint32
	req Request

	// Client side: the response, delivered once by the read loop.
	respCh      chan *Response
	gotResponse bool // read loop only

	// mu guards the receive side and the close state.
	mu          sync.Mutex
	cond        sync.Cond
	chunks      []*chunk
	buffered    int
	recvWindow  int64 // bytes the peer may still send us
	unacked     uint32
	remoteEnded bool
	localEnded  bool
	responded   bool
	rerr        error // set when the stream failed (reset, connection gone, Close)
	lending     bool  // WriteAvailable is writing from the head chunk without s.mu
	peerGone    bool  // the peer reset the stream without error: no more writes
	failed      chan struct{}
	failOnce    sync.Once
	// onReadable is called once, just after mu is released, when the stream next has bytes,
	// its end or an error for the reader (NotifyReadable).
	onReadable func()

	// sendWindow is guarded by c.mu.
	sendWindow int64
}

func (c *Conn) newStream(id uint32) *Stream {
	s := &Stream{c: c, id: id, recvWindow: int64(c.set.StreamWindow), failed: make(chan struct{})}
	s.cond.L = &s.mu
	return s
}

// answered reports whether the stream got its response.
func (s *Stream) answered() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.responded
}

// Failed reports whether the stream is already dead (reset by the peer, its connection gone,
// or closed): a stage can skip work for a flow nobody waits for any more.
func (s *Stream) Failed() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.rerr != nil || s.peerGone
}

// ID is the HTTP/2 stream id.
func (s *Stream) ID() uint32 { return s.id }

// Conn is the connection carrying the stream.
func (s *Stream) Conn() *Conn { return s.c }

// Request is the CONNECT request: received (server side), or its method and authority as sent
// (client side).
func (s *Stream) Request() *Request { return &s.req }

// DropRequestHeaders lets go of a received CONNECT's headers once the server has read them:
// a tunnel can live for days and needs them only to be set up. The method and authority stay.
// Like Request, it is for the goroutine that owns the stream.
func (s *Stream) DropRequestHeaders() { s.req.Header = nil }

// receive appends data from a DATA frame (read loop). length counts padding too. It returns a
// non-zero code when the frame violates the stream's state or window.
func (s *Stream) receive(data []byte, length uint32, end bool) http2.ErrCode {
	s.mu.Lock()
	code, notify := s.receiveLocked(data, length, end)
	s.mu.Unlock()
	if notify != nil {
		notify()
	}
	return code
}

func (s *Stream) receiveLocked(data []byte, length uint32, end bool) (http2.ErrCode, func()) {
	if s.remoteEnded {
		return http2.ErrCodeStreamClosed, nil
	}
	if s.rerr != nil {
		// Closed locally: drop the data, the connection window was already returned.
		return http2.ErrCodeNo, nil
	}
	if int64(length) > s.recvWindow {
		return http2.ErrCodeFlowControl, nil
	}
	s.recvWindow -= int64(length)
	// Padding is consumed at once: it never reaches the reader.
	s.unacked += length - uint32(len(data))
	for len(data) > 0 {
		var tail *chunk
		if n := len(s.chunks); n > 0 && s.chunks[n-1].w < chunkSize {
			tail = s.chunks[n-1]
		} else {
			tail = s.c.bufs.getChunk()
			tail.r, tail.w = 0, 0
			s.chunks = append(s.chunks, tail)
		}
		n := copy(tail.buf[tail.w:], data)
		tail.w += n
		s.buffered += n
		data = data[n:]
	}
	if end {
		s.remoteEnded = true
	}
	return http2.ErrCodeNo, s.wakeLocked()
}

// wakeLocked wakes the blocked reader or writer, and returns the function armed with
// NotifyReadable, if any, disarmed: the caller calls it once s.mu is released.
func (s *Stream) wakeLocked() func() {
	s.cond.Broadcast()
	fn := s.onReadable
	s.onReadable = nil
	return fn
}

// readableLocked reports whether a reader would not wait: bytes, the end or an error.
func (s *Stream) readableLocked() bool {
	return s.buffered > 0 || s.remoteEnded || s.rerr != nil
}

// NotifyReadable arms fn to be called once when the stream has bytes, its end or an error for
// the reader, and returns true; if it has one already it returns false and does not arm fn.
// fn runs without the stream's lock, often on the connection's read loop, which reads every
// stream of the connection: it must not block (the relay writes what the socket takes at once
// and leaves the rest to a goroutine). A second NotifyReadable replaces fn.
func (s *Stream) NotifyReadable(fn func()) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.readableLocked() {
		s.onReadable = nil
		return false
	}
	s.onReadable = fn
	return true
}

// WriteAvailable writes the bytes received so far to w, straight from the receive buffer (the
// relay's way out of a stream, without a copy), and does not wait for more. done is true once
// the peer ended the stream and every byte was written (err is nil then); with done false and
// err nil the stream is open and its buffer empty: the caller waits with NotifyReadable.
func (s *Stream) WriteAvailable(w io.Writer) (n int64, done bool, err error) {
	for {
		s.mu.Lock()
		if s.rerr != nil {
			err := s.rerr
			s.mu.Unlock()
			if err == io.EOF {
				return n, true, nil
			}
			return n, true, err
		}
		if s.buffered == 0 {
			ended := s.remoteEnded
			s.mu.Unlock()
			return n, ended, nil
		}
		m, err := s.writeHeadLocked(w)
		n += int64(m)
		if err != nil {
			return n, true, err
		}
	}
}

// Read reads tunnelled bytes. It returns io.EOF once the peer has ended the stream and every
// byte was read.
func (s *Stream) Read(p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	s.mu.Lock()
	for s.buffered == 0 {
		if s.rerr != nil {
			err := s.rerr
			s.mu.Unlock()
			return 0, err
		}
		if s.remoteEnded {
			s.mu.Unlock()
			return 0, io.EOF
		}
		s.cond.Wait()
	}
	if s.rerr != nil {
		err := s.rerr
		s.mu.Unlock()
		return 0, err
	}
	n := 0
	for n < len(p) && len(s.chunks) > 0 {
		ch := s.chunks[0]
		m := copy(p[n:], ch.buf[ch.r:ch.w])
		ch.r += m
		n += m
		if ch.r == ch.w {
			s.popChunkLocked()
		}
	}
	s.consumedLocked(n)
	return n, nil
}

// writeHeadLocked writes the head chunk's bytes to w and accounts them. It is called with s.mu
// held and a non-empty buffer, and returns with s.mu released.
//
// The write happens without s.mu, so the read loop can keep appending: the reader owns bytes
// [r, w) of the head chunk and the read loop only writes past w of the tail chunk. While the
// write is in flight (lending), fail drops the chunks instead of recycling them, so a chunk
// being written can never be handed to another stream; nothing is accounted then, and the
// error is the stream's unless the write had one.
func (s *Stream) writeHeadLocked(w io.Writer) (int, error) {
	ch := s.chunks[0]
	data := ch.buf[ch.r:ch.w]
	s.lending = true
	s.mu.Unlock()

	n, err := w.Write(data)

	s.mu.Lock()
	s.lending = false
	if s.rerr != nil {
		rerr := s.rerr
		s.mu.Unlock()
		if err == nil && rerr != io.EOF {
			err = rerr
		}
		return n, err
	}
	ch.r += n
	if ch.r == ch.w {
		s.popChunkLocked()
	}
	s.consumedLocked(n)
	return n, err
}

// keepChunkSlots is how many chunk pointers a drained stream keeps room for: enough for the
// usual few chunks in flight without an allocation per refill, and nothing a burst grew
// beyond that (an idle stream holds at most this small array).
const keepChunkSlots = 4

func (s *Stream) popChunkLocked() {
	ch := s.chunks[0]
	n := copy(s.chunks, s.chunks[1:]) // keep the front of the array: appends reuse it
	s.chunks[n] = nil
	s.chunks = s.chunks[:n]
	if n == 0 && cap(s.chunks) > keepChunkSlots {
		s.chunks = nil
	}
	s.c.bufs.putChunk(ch)
}

// consumedLocked accounts n bytes read and unlocks s.mu, returning stream credit to the peer in
// batches of a quarter window.
func (s *Stream) consumedLocked(n int) {
	s.buffered -= n
	s.unacked += uint32(n)
	var inc uint32
	if !s.remoteEnded && s.rerr == nil && s.unacked >= s.c.set.StreamWindow/4 {
		inc = s.unacked
		s.unacked = 0
		s.recvWindow += int64(inc)
	}
	s.mu.Unlock()
	if inc > 0 {
		s.c.queueCtrl(ctrlFrame{kind: ctrlWindowUpdate, stream: s.id, n: inc})
	}
}

// Write sends p as DATA frames, waiting for flow-control credit.
func (s *Stream) Write(p []byte) (int, error) {
	written := 0
	for len(p) > 0 {
		n, err := s.c.awaitSend(s, len(p))
		if err != nil {
			return written, err
		}
		s.c.wmu.Lock()
		err = s.c.drainCtrlLocked()
		if err == nil {
			err = s.c.writeDataLocked(s.id, p[:n], false)
		}
		if uerr := s.c.unlockWrite(); err == nil {
			err = uerr
		}
		if err != nil {
			s.c.shutdown(err, http2.ErrCodeInternal)
			return written, err
		}
		written += n
		p = p[n:]
	}
	return written, nil
}

// awaitSend blocks until the stream and the connection both have send credit and takes up to
// want bytes of it.
func (c *Conn) awaitSend(s *Stream, want int) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for {
		if err := s.sendErr(); err != nil {
			return 0, err
		}
		if c.closed {
			return 0, ErrConnClosed
		}
		w := min(s.sendWindow, c.sendWindow)
		if w > 0 {
			n := min(int64(want), w, int64(c.peerMaxFrame), maxDataPayload)
			s.sendWindow -= n
			c.sendWindow -= n
			return int(n), nil
		}
		c.flowCond.Wait()
	}
}

func (s *Stream) sendErr() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.localEnded {
		return ErrStreamClosed
	}
	if s.peerGone {
		return ErrStreamReset
	}
	if s.rerr != nil {
		if s.rerr == io.EOF {
			return ErrStreamReset
		}
		return s.rerr
	}
	return nil
}

// CloseWrite ends our half of the stream with an empty END_STREAM DATA frame (the peer reads EOF).
func (s *Stream) CloseWrite() error {
	s.mu.Lock()
	if s.localEnded || s.rerr != nil {
		s.mu.Unlock()
		return nil
	}
	s.localEnded = true
	s.mu.Unlock()
	s.c.wmu.Lock()
	err := s.c.drainCtrlLocked()
	if err == nil {
		err = s.c.writeDataLocked(s.id, nil, true)
	}
	if uerr := s.c.unlockWrite(); err == nil {
		err = uerr
	}
	s.c.maybeRemove(s)
	return err
}

// Respond answers a CONNECT (server side). A status other than 200 ends the stream. It never
// blocks on the socket: the answer is queued for the connection's writer, which sends it
// before any DATA of the stream (every writer drains the queue first), so a peer that stops
// reading cannot hold the caller (a shared stage worker).
func (s *Stream) Respond(status int, hdr []Header) error {
	s.mu.Lock()
	if s.responded {
		s.mu.Unlock()
		return errors.New("hbone: stream already answered")
	}
	s.responded = true
	end := status != 200
	if end {
		s.localEnded = true
	}
	dead := s.rerr != nil
	s.mu.Unlock()
	if dead {
		return ErrStreamClosed
	}
	c := s.c
	c.mu.Lock()
	closed := c.closed
	c.mu.Unlock()
	if closed {
		return ErrConnClosed
	}
	c.queueCtrl(ctrlFrame{kind: ctrlRespond, stream: s.id, n: uint32(status), hdr: hdr})
	if end {
		c.maybeRemove(s)
	}
	return nil
}

// respondQueued answers with an error status from the read loop, which must not write, and
// releases the stream: nobody else owns it (the handler never saw it), so it is reset with
// NO_ERROR right after the answer and its buffers freed, and data the peer still sends is
// dropped instead of buffered.
func (s *Stream) respondQueued(status int) {
	s.mu.Lock()
	s.responded = true
	s.localEnded = true
	remoteEnded := s.remoteEnded
	s.mu.Unlock()
	s.c.queueCtrl(ctrlFrame{kind: ctrlRespond, stream: s.id, n: uint32(status)})
	if !remoteEnded {
		s.c.queueCtrl(ctrlFrame{kind: ctrlRST, stream: s.id, n: uint32(http2.ErrCodeNo)})
	}
	s.fail(ErrStreamClosed)
	s.c.remove(s)
}

// Close releases the stream. If either side had not ended it, the peer gets RST_STREAM
// (NO_ERROR after a complete error answer, CANCEL otherwise).
func (s *Stream) Close() error {
	s.mu.Lock()
	clean := s.localEnded && s.remoteEnded || s.peerGone
	code := http2.ErrCodeCancel
	if s.localEnded && s.responded {
		code = http2.ErrCodeNo
	}
	alreadyFailed := s.rerr != nil
	s.mu.Unlock()
	if !clean && !alreadyFailed && s.id != 0 {
		s.c.queueCtrl(ctrlFrame{kind: ctrlRST, stream: s.id, n: uint32(code)})
	}
	s.fail(ErrStreamClosed)
	s.c.remove(s)
	return nil
}

// fail marks the stream dead with err, wakes its reader and writer and frees its buffers.
func (s *Stream) fail(err error) {
	s.mu.Lock()
	if s.rerr == nil {
		s.rerr = err
	}
	if !s.lending {
		for _, ch := range s.chunks {
			s.c.bufs.putChunk(ch)
		}
	}
	s.chunks = nil
	s.buffered = 0
	notify := s.wakeLocked()
	s.mu.Unlock()
	if notify != nil {
		notify()
	}
	s.failOnce.Do(func() { close(s.failed) })
	s.c.mu.Lock()
	s.c.flowCond.Broadcast()
	s.c.mu.Unlock()
}

// peerReset handles RST_STREAM from the peer. NO_ERROR and CANCEL (err == io.EOF) end the
// stream like END_STREAM, as ztunnel treats them: bytes already received are still delivered,
// writes fail. Other codes fail the stream at once.
func (s *Stream) peerReset(err error) {
	if err == io.EOF {
		s.mu.Lock()
		s.remoteEnded = true
		s.peerGone = true
		notify := s.wakeLocked()
		s.mu.Unlock()
		if notify != nil {
			notify()
		}
		s.failOnce.Do(func() { close(s.failed) })
		s.c.mu.Lock()
		s.c.flowCond.Broadcast()
		s.c.mu.Unlock()
	} else {
		s.fail(err)
	}
	s.c.remove(s)
}

func (s *Stream) err() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.rerr == nil {
		return ErrStreamClosed
	}
	return s.rerr
}

func (s *Stream) bothClosed() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.localEnded && s.remoteEnded
}
