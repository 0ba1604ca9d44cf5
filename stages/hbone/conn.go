package hbone

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

// Errors a Conn or Stream returns.
var (
	// ErrConnClosed: the connection is gone; the request never reached the peer and may be retried.
	ErrConnClosed = errors.New("hbone: connection closed")
	// ErrGoAway: the peer is draining the connection and refused the stream; retry elsewhere.
	ErrGoAway = errors.New("hbone: connection going away")
	// ErrNoCapacity: the connection has no free stream slot.
	ErrNoCapacity = errors.New("hbone: no free stream on connection")
	// ErrStreamReset: the peer reset the stream.
	ErrStreamReset = errors.New("hbone: stream reset by peer")
	// ErrStreamClosed: the stream was closed locally.
	ErrStreamClosed = errors.New("hbone: stream closed")
	// ErrPingTimeout: the peer did not answer a keepalive PING in time.
	ErrPingTimeout = errors.New("hbone: keepalive ping timed out")
)

const (
	clientPreface = http2.ClientPreface
	// maxDataPayload caps one DATA frame we send, so a single stream cannot hold the write lock
	// for a whole megabyte while its siblings wait.
	maxDataPayload = 256 << 10
	// maxCtrlQueue bounds the control frames waiting to be written; a peer that makes us queue
	// more (PING or SETTINGS floods) loses its connection.
	maxCtrlQueue = 4096
	// writeBufSize batches frames into TLS records. readBufSize only has to hold frame
	// headers and small frames: a read for a bigger payload bypasses it (bufio reads into the
	// caller's buffer), and TLS hands over at most one 16 KiB record per read anyway. Both
	// live as long as the connection, idle or not.
	writeBufSize = 64 << 10
	readBufSize  = 16 << 10
	// prefaceTimeout bounds the wait for a client's HTTP/2 preface after the TLS handshake.
	prefaceTimeout = 10 * time.Second
)

// Handler receives each new stream on a server connection. It runs on the connection's read loop
// and must not block: hand the stream to a worker and answer it with Stream.Respond there.
type Handler func(s *Stream)

// Config configures a Conn.
type Config struct {
	Settings Settings
	// Handler is required on the server side and ignored on the client side.
	Handler Handler
	Logger  *slog.Logger
	// OnIdle, if set, is called (on the read loop) whenever the last active stream ends.
	OnIdle func(*Conn)
	// Buffers, if set, are the pools the connection shares with others (a node passes one to
	// all its connections); nil gives the connection pools of its own.
	Buffers *Buffers
}

// Conn is one HTTP/2 connection carrying HBONE streams, in the client or server role.
type Conn struct {
	nc      net.Conn
	server  bool
	set     Settings
	handler Handler
	log     *slog.Logger
	onIdle  func(*Conn)

	fr *http2.Framer

	// Write side. wmu serialises every frame written; whoever holds it drains ctrlQ first.
	wmu    sync.Mutex
	bw     batchWriter
	henc   *hpack.Encoder
	hbuf   bytes.Buffer
	hdrBuf [9]byte
	ctrlMu sync.Mutex
	ctrlQ  []ctrlFrame
	ctrlN  atomic.Int32
	kick   chan struct{}

	// mu guards the stream table, the send windows and the connection state.
	mu             sync.Mutex
	flowCond       sync.Cond
	streams        map[uint32]*Stream
	nextID         uint32 // client: next stream id to open
	lastPeerID     uint32 // server: highest stream id the peer opened
	sendWindow     int64
	peerInitWindow int64
	peerMaxFrame   uint32
	peerMaxStreams uint32
	active         int
	reserved       int
	goingAway      bool
	closed         bool
	closeErr       error
	idleSince      time.Time

	// Read-loop-only state.
	recvUnacked uint32
	resetWindow time.Time // start of the current early-reset window
	earlyResets int       // unanswered streams the peer reset in that window

	pingOut  atomic.Int64 // unix nanos of the outstanding PING, 0 if none
	bufs     *Buffers
	done     chan struct{}
	wg       sync.WaitGroup
	closeOne sync.Once
}

type ctrlKind uint8

const (
	ctrlSettingsAck ctrlKind = iota
	ctrlPing
	ctrlPingAck
	ctrlWindowUpdate
	ctrlRST
	ctrlGoAway
	ctrlRespond
)

type ctrlFrame struct {
	kind   ctrlKind
	stream uint32
	n      uint32 // window increment, error code, or status
	data   [8]byte
	hdr    []Header // extra response headers (ctrlRespond)
}

// NewClientConn starts an HTTP/2 client on an established (TLS) connection: it writes the
// preface and settings and starts the read loop. The Conn owns nc from now on.
func NewClientConn(nc net.Conn, cfg Config) (*Conn, error) {
	c := newConn(nc, false, cfg)
	c.nextID = 1
	c.wmu.Lock()
	_, err := c.bw.WriteString(clientPreface)
	if err == nil {
		err = c.writeSettingsLocked()
	}
	if err == nil {
		err = c.bw.Flush()
	}
	c.wmu.Unlock()
	if err != nil {
		nc.Close()
		return nil, fmt.Errorf("write client preface: %w", err)
	}
	c.start()
	return c, nil
}

// ServeConn runs the server side of an HTTP/2 connection until it ends: it reads the client
// preface, writes our settings and dispatches each CONNECT to cfg.Handler. It returns when the
// connection is closed, with the reason (nil for a clean close).
func ServeConn(nc net.Conn, cfg Config) (*Conn, error) {
	if cfg.Handler == nil {
		return nil, errors.New("hbone: server needs a Handler")
	}
	c := newConn(nc, true, cfg)
	c.wmu.Lock()
	err := c.writeSettingsLocked()
	if err == nil {
		err = c.bw.Flush()
	}
	c.wmu.Unlock()
	if err != nil {
		nc.Close()
		return nil, fmt.Errorf("write server settings: %w", err)
	}
	var preface [len(clientPreface)]byte
	// A client that completes TLS and then sends nothing must not hold the caller forever.
	nc.SetReadDeadline(time.Now().Add(prefaceTimeout))
	_, err = io.ReadFull(nc, preface[:])
	nc.SetReadDeadline(time.Time{})
	if err != nil || string(preface[:]) != clientPreface {
		nc.Close()
		if err == nil {
			err = errors.New("bad client preface")
		}
		return nil, fmt.Errorf("read client preface: %w", err)
	}
	c.start()
	return c, nil
}

func newConn(nc net.Conn, server bool, cfg Config) *Conn {
	def := ClientSettings()
	if server {
		def = ServerSettings()
	}
	cfg.Settings.fill(def)
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	c := &Conn{
		nc:             nc,
		server:         server,
		set:            cfg.Settings,
		handler:        cfg.Handler,
		log:            log,
		onIdle:         cfg.OnIdle,
		streams:        make(map[uint32]*Stream),
		sendWindow:     65535,
		peerInitWindow: 65535,
		peerMaxFrame:   16384,
		peerMaxStreams: 1<<31 - 1,
		kick:           make(chan struct{}, 1),
		done:           make(chan struct{}),
		idleSince:      time.Now(),
	}
	c.flowCond.L = &c.mu
	c.henc = hpack.NewEncoder(&c.hbuf)
	c.bufs = cfg.Buffers
	if c.bufs == nil {
		c.bufs = NewBuffers()
	}
	c.bw = batchWriter{w: nc, pool: c.bufs}
	c.fr = http2.NewFramer(&c.bw, bufio.NewReaderSize(nc, readBufSize))
	c.fr.SetReuseFrames()
	c.fr.SetMaxReadFrameSize(c.set.MaxFrameSize)
	c.fr.MaxHeaderListSize = c.set.MaxHeaderListSize
	c.fr.ReadMetaHeaders = hpack.NewDecoder(4096, nil)
	return c
}

func (c *Conn) writeSettingsLocked() error {
	s := []http2.Setting{
		{ID: http2.SettingInitialWindowSize, Val: c.set.StreamWindow},
		{ID: http2.SettingMaxFrameSize, Val: c.set.MaxFrameSize},
		{ID: http2.SettingMaxHeaderListSize, Val: c.set.MaxHeaderListSize},
	}
	if c.server {
		s = append(s, http2.Setting{ID: http2.SettingMaxConcurrentStreams, Val: c.set.MaxConcurrentStreams})
	} else {
		s = append(s, http2.Setting{ID: http2.SettingEnablePush, Val: 0})
	}
	if err := c.fr.WriteSettings(s...); err != nil {
		return err
	}
	if c.set.ConnWindow > 65535 {
		return c.fr.WriteWindowUpdate(0, c.set.ConnWindow-65535)
	}
	return nil
}

func (c *Conn) start() {
	c.wg.Add(2)
	go c.readLoop()
	go c.ctrlWriter()
	if c.set.PingInterval > 0 {
		c.wg.Add(1)
		go c.keepalive()
	}
}

// Done is closed when the connection has ended.
func (c *Conn) Done() <-chan struct{} { return c.done }

// Err is why the connection ended (nil while it is open or after a clean close).
func (c *Conn) Err() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.closeErr
}

// LocalAddr and RemoteAddr are the addresses of the underlying connection.
func (c *Conn) LocalAddr() net.Addr  { return c.nc.LocalAddr() }
func (c *Conn) RemoteAddr() net.Addr { return c.nc.RemoteAddr() }

// Close ends the connection at once: a GOAWAY is sent if possible and every stream fails.
func (c *Conn) Close() error {
	c.shutdown(nil, http2.ErrCodeNo)
	c.wg.Wait()
	return nil
}

// Shutdown drains the connection: a GOAWAY refuses new streams, existing ones run until they end
// or ctx is done, then the connection is closed.
func (c *Conn) Shutdown(ctx context.Context) error {
	c.mu.Lock()
	c.goingAway = true
	last := c.lastPeerID
	c.mu.Unlock()
	c.queueCtrl(ctrlFrame{kind: ctrlGoAway, stream: last, n: uint32(http2.ErrCodeNo)})
	t := time.NewTicker(20 * time.Millisecond)
	defer t.Stop()
	for {
		c.mu.Lock()
		n := c.active
		c.mu.Unlock()
		if n == 0 {
			return c.Close()
		}
		select {
		case <-ctx.Done():
			c.Close()
			return ctx.Err()
		case <-c.done:
			return nil
		case <-t.C:
		}
	}
}

// shutdown tears the connection down once; err is recorded as the reason.
func (c *Conn) shutdown(err error, code http2.ErrCode) {
	c.closeOne.Do(func() {
		c.mu.Lock()
		c.closed = true
		c.closeErr = err
		streams := make([]*Stream, 0, len(c.streams))
		for _, s := range c.streams {
			streams = append(streams, s)
		}
		c.flowCond.Broadcast()
		c.mu.Unlock()
		// Best effort GOAWAY: do not wait for a writer stuck on a dead peer.
		if c.wmu.TryLock() {
			c.nc.SetWriteDeadline(time.Now().Add(100 * time.Millisecond))
			c.fr.WriteGoAway(c.lastPeerIDLocked(), code, nil)
			c.bw.Flush()
			c.wmu.Unlock()
		}
		c.nc.Close()
		failErr := err
		if failErr == nil {
			failErr = ErrConnClosed
		}
		for _, s := range streams {
			s.fail(failErr)
		}
		close(c.done)
	})
}

func (c *Conn) lastPeerIDLocked() uint32 {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.lastPeerID
}

// Capacity reports how many more streams this connection may open (client side).
func (c *Conn) Capacity() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.capacityLocked()
}

func (c *Conn) capacityLocked() int {
	if c.closed || c.goingAway {
		return 0
	}
	limit := c.set.MaxConcurrentStreams
	if c.peerMaxStreams < limit {
		limit = c.peerMaxStreams
	}
	if c.nextID > 1<<31-1-2 {
		return 0
	}
	return int(limit) - c.active - c.reserved
}

// TryReserve takes one stream slot for a later OpenReserved; it fails when the connection is
// full, closed or going away. Each successful TryReserve must be followed by OpenReserved or
// Unreserve.
func (c *Conn) TryReserve() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.capacityLocked() <= 0 {
		return false
	}
	c.reserved++
	return true
}

// Unreserve gives back a slot taken by TryReserve.
func (c *Conn) Unreserve() {
	c.mu.Lock()
	c.reserved--
	c.mu.Unlock()
}

// Active is the number of open streams.
func (c *Conn) Active() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.active
}

// IdleSince returns when the last stream ended, and whether the connection is idle now.
func (c *Conn) IdleSince() (time.Time, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.idleSince, c.active == 0 && c.reserved == 0
}

// Usable reports whether the connection can still open streams.
func (c *Conn) Usable() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return !c.closed && !c.goingAway
}

// OpenStream sends a CONNECT and waits for the response. It takes a stream slot itself.
func (c *Conn) OpenStream(ctx context.Context, req *Request) (*Stream, *Response, error) {
	if !c.TryReserve() {
		return nil, nil, ErrNoCapacity
	}
	return c.OpenReserved(ctx, req)
}

// OpenReserved sends a CONNECT on a slot taken with TryReserve and waits for the response
// headers. A non-200 answer is returned as a *StatusError together with the response.
func (c *Conn) OpenReserved(ctx context.Context, req *Request) (*Stream, *Response, error) {
	if c.server {
		c.Unreserve()
		return nil, nil, errors.New("hbone: OpenStream on a server connection")
	}
	s := c.newStream(0)
	s.respCh = make(chan *Response, 1)
	method := req.Method
	if method == "" {
		method = "CONNECT"
	}

	c.wmu.Lock()
	c.mu.Lock()
	c.reserved--
	if c.closed || c.goingAway {
		c.mu.Unlock()
		c.wmu.Unlock()
		if c.goingAway {
			return nil, nil, ErrGoAway
		}
		return nil, nil, ErrConnClosed
	}
	s.id = c.nextID
	c.nextID += 2
	c.streams[s.id] = s
	c.active++
	s.sendWindow = c.peerInitWindow
	c.mu.Unlock()
	err := c.drainCtrlLocked()
	if err == nil {
		c.hbuf.Reset()
		c.henc.WriteField(hpack.HeaderField{Name: ":method", Value: method})
		c.henc.WriteField(hpack.HeaderField{Name: ":authority", Value: req.Authority})
		for _, h := range req.Header {
			c.henc.WriteField(hpack.HeaderField{Name: h.Name, Value: h.Value})
		}
		err = c.writeHeaderBlockLocked(s.id, false)
	}
	if err == nil {
		err = c.bw.Flush()
	}
	c.wmu.Unlock()
	if err != nil {
		c.shutdown(fmt.Errorf("write CONNECT: %w", err), http2.ErrCodeInternal)
		return nil, nil, fmt.Errorf("write CONNECT: %w", err)
	}
	// Only what identifies the stream is kept: the headers (Forwarded, baggage, traceparent)
	// would otherwise live as long as the tunnel.
	s.req = Request{Method: method, Authority: req.Authority}

	select {
	case resp := <-s.respCh:
		if resp.Status != 200 {
			s.Close()
			return nil, resp, &StatusError{Status: resp.Status}
		}
		return s, resp, nil
	case <-s.failed:
		// The answer may have raced with a reset right behind it: prefer the answer.
		select {
		case resp := <-s.respCh:
			if resp.Status == 200 {
				return s, resp, nil
			}
			s.Close()
			return nil, resp, &StatusError{Status: resp.Status}
		default:
		}
		return nil, nil, s.err()
	case <-ctx.Done():
		s.Close()
		return nil, nil, ctx.Err()
	}
}

// writeHeaderBlockLocked writes c.hbuf as HEADERS plus CONTINUATION frames.
func (c *Conn) writeHeaderBlockLocked(id uint32, endStream bool) error {
	block := c.hbuf.Bytes()
	max := int(c.peerMaxFrameSize())
	if max < 1<<14 {
		max = 1 << 14 // never below the protocol minimum (a bad peer value is rejected on receipt)
	}
	first := true
	for first || len(block) > 0 {
		frag := block
		if len(frag) > max {
			frag = frag[:max]
		}
		block = block[len(frag):]
		var err error
		if first {
			err = c.fr.WriteHeaders(http2.HeadersFrameParam{
				StreamID: id, BlockFragment: frag, EndStream: endStream, EndHeaders: len(block) == 0,
			})
			first = false
		} else {
			err = c.fr.WriteContinuation(id, len(block) == 0, frag)
		}
		if err != nil {
			return err
		}
	}
	return nil
}

func (c *Conn) peerMaxFrameSize() uint32 {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.peerMaxFrame
}

// queueCtrl queues a control frame from the read loop (or any goroutine that must not block on
// the socket) and wakes the control writer.
func (c *Conn) queueCtrl(f ctrlFrame) {
	c.ctrlMu.Lock()
	if len(c.ctrlQ) >= maxCtrlQueue {
		c.ctrlMu.Unlock()
		go c.shutdown(errors.New("hbone: peer flooded control frames"), http2.ErrCodeEnhanceYourCalm)
		return
	}
	c.ctrlQ = append(c.ctrlQ, f)
	c.ctrlN.Add(1)
	c.ctrlMu.Unlock()
	select {
	case c.kick <- struct{}{}:
	default:
	}
}

// ctrlWriter writes queued control frames when no stream writer is around to do it.
func (c *Conn) ctrlWriter() {
	defer c.wg.Done()
	for {
		select {
		case <-c.done:
			return
		case <-c.kick:
		}
		if c.ctrlN.Load() == 0 {
			continue
		}
		c.wmu.Lock()
		err := c.drainCtrlLocked()
		if err == nil {
			err = c.bw.Flush()
		}
		c.wmu.Unlock()
		if err != nil {
			c.shutdown(fmt.Errorf("write control frame: %w", err), http2.ErrCodeInternal)
			return
		}
	}
}

// unlockWrite flushes and releases the write lock, leaving queued control frames to the
// control writer if any arrived after the last drain.
func (c *Conn) unlockWrite() error {
	err := c.drainCtrlLocked()
	if err == nil {
		err = c.bw.Flush()
	}
	c.wmu.Unlock()
	if c.ctrlN.Load() > 0 {
		select {
		case c.kick <- struct{}{}:
		default:
		}
	}
	return err
}

func (c *Conn) drainCtrlLocked() error {
	if c.ctrlN.Load() == 0 {
		return nil
	}
	c.ctrlMu.Lock()
	q := c.ctrlQ
	c.ctrlQ = nil
	c.ctrlN.Store(0)
	c.ctrlMu.Unlock()
	for i := range q {
		if err := c.writeCtrlLocked(&q[i]); err != nil {
			return err
		}
	}
	return nil
}

func (c *Conn) writeCtrlLocked(f *ctrlFrame) error {
	switch f.kind {
	case ctrlSettingsAck:
		return c.fr.WriteSettingsAck()
	case ctrlPing:
		return c.fr.WritePing(false, f.data)
	case ctrlPingAck:
		return c.fr.WritePing(true, f.data)
	case ctrlWindowUpdate:
		return c.fr.WriteWindowUpdate(f.stream, f.n)
	case ctrlRST:
		return c.fr.WriteRSTStream(f.stream, http2.ErrCode(f.n))
	case ctrlGoAway:
		return c.fr.WriteGoAway(f.stream, http2.ErrCode(f.n), nil)
	case ctrlRespond:
		c.hbuf.Reset()
		c.henc.WriteField(hpack.HeaderField{Name: ":status", Value: strconv.Itoa(int(f.n))})
		for _, h := range f.hdr {
			c.henc.WriteField(hpack.HeaderField{Name: h.Name, Value: h.Value})
		}
		return c.writeHeaderBlockLocked(f.stream, f.n != 200)
	}
	return nil
}

// writeData writes one DATA frame; the caller holds wmu. The header and payload are written
// separately into the buffered writer so the payload is not copied into the framer's buffer.
func (c *Conn) writeDataLocked(id uint32, p []byte, end bool) error {
	h := c.hdrBuf[:]
	h[0], h[1], h[2] = byte(len(p)>>16), byte(len(p)>>8), byte(len(p))
	h[3] = byte(http2.FrameData)
	h[4] = 0
	if end {
		h[4] = byte(http2.FlagDataEndStream)
	}
	binary.BigEndian.PutUint32(h[5:], id)
	if _, err := c.bw.Write(h); err != nil {
		return err
	}
	_, err := c.bw.Write(p)
	return err
}

func (c *Conn) keepalive() {
	defer c.wg.Done()
	t := time.NewTicker(c.set.PingInterval)
	defer t.Stop()
	for {
		select {
		case <-c.done:
			return
		case now := <-t.C:
			if sent := c.pingOut.Load(); sent != 0 {
				if now.Sub(time.Unix(0, sent)) > c.set.PingTimeout {
					c.shutdown(ErrPingTimeout, http2.ErrCodeNo)
					return
				}
				continue
			}
			var data [8]byte
			binary.BigEndian.PutUint64(data[:], uint64(now.UnixNano()))
			c.pingOut.Store(now.UnixNano())
			c.queueCtrl(ctrlFrame{kind: ctrlPing, data: data})
		}
	}
}
