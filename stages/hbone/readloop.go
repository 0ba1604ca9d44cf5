package hbone

import (
	"errors"
	"fmt"
	"io"
	"strconv"
	"time"

	"golang.org/x/net/http2"
)

// readLoop owns frame reading. It never writes to the socket: answers go through queueCtrl.
func (c *Conn) readLoop() {
	defer c.wg.Done()
	for {
		f, err := c.fr.ReadFrame()
		if err != nil {
			var se http2.StreamError
			if errors.As(err, &se) {
				c.resetStream(se.StreamID, se.Code, fmt.Errorf("%w: %v", ErrStreamReset, se))
				continue
			}
			var ce http2.ConnectionError
			if errors.As(err, &ce) {
				c.shutdown(fmt.Errorf("hbone: protocol error: %w", err), http2.ErrCode(ce))
				return
			}
			if errors.Is(err, io.EOF) {
				c.shutdown(nil, http2.ErrCodeNo)
			} else {
				c.shutdown(fmt.Errorf("read frame: %w", err), http2.ErrCodeInternal)
			}
			return
		}
		if err := c.dispatch(f); err != nil {
			var ce http2.ConnectionError
			code := http2.ErrCodeProtocol
			if errors.As(err, &ce) {
				code = http2.ErrCode(ce)
			}
			c.shutdown(err, code)
			return
		}
	}
}

func connErr(code http2.ErrCode, format string, args ...any) error {
	return fmt.Errorf("hbone: %s: %w", fmt.Sprintf(format, args...), http2.ConnectionError(code))
}

func (c *Conn) dispatch(f http2.Frame) error {
	switch f := f.(type) {
	case *http2.DataFrame:
		return c.onData(f)
	case *http2.MetaHeadersFrame:
		return c.onHeaders(f)
	case *http2.WindowUpdateFrame:
		return c.onWindowUpdate(f)
	case *http2.SettingsFrame:
		return c.onSettings(f)
	case *http2.PingFrame:
		if f.IsAck() {
			c.pingOut.Store(0)
		} else {
			c.queueCtrl(ctrlFrame{kind: ctrlPingAck, data: f.Data})
		}
	case *http2.RSTStreamFrame:
		c.mu.Lock()
		s := c.streams[f.StreamID]
		c.mu.Unlock()
		if s != nil {
			if c.server && !s.answered() && c.countEarlyReset() {
				// Rapid Reset (CVE-2023-44487): each opened-then-reset stream still costs a
				// trip through the pipeline, which the stream limit no longer bounds.
				return connErr(http2.ErrCodeEnhanceYourCalm, "too many streams reset before their answer")
			}
			err := fmt.Errorf("%w: %v", ErrStreamReset, f.ErrCode)
			if f.ErrCode == http2.ErrCodeNo || f.ErrCode == http2.ErrCodeCancel {
				// ztunnel treats a NO_ERROR or CANCEL reset as the end of the stream.
				err = io.EOF
			}
			s.peerReset(err)
		}
	case *http2.GoAwayFrame:
		c.onGoAway(f)
	case *http2.PushPromiseFrame:
		return connErr(http2.ErrCodeProtocol, "push is disabled")
	case *http2.PriorityFrame, *http2.UnknownFrame:
		// Priorities are advisory and unknown frame types must be ignored.
	}
	return nil
}

func (c *Conn) onData(f *http2.DataFrame) error {
	id := f.StreamID
	length := f.Length
	// Connection-level credit is returned as data arrives: stream windows bound the buffering.
	c.recvUnacked += length
	if c.recvUnacked >= c.set.ConnWindow/4 {
		c.queueCtrl(ctrlFrame{kind: ctrlWindowUpdate, stream: 0, n: c.recvUnacked})
		c.recvUnacked = 0
	}
	c.mu.Lock()
	s := c.streams[id]
	c.mu.Unlock()
	if s == nil {
		if c.isIdleStreamID(id) {
			return connErr(http2.ErrCodeProtocol, "DATA on idle stream %d", id)
		}
		c.queueCtrl(ctrlFrame{kind: ctrlRST, stream: id, n: uint32(http2.ErrCodeStreamClosed)})
		return nil
	}
	data := f.Data()
	if code := s.receive(data, length, f.StreamEnded()); code != http2.ErrCodeNo {
		c.resetStream(id, code, fmt.Errorf("%w: %v", ErrStreamReset, code))
	}
	if f.StreamEnded() {
		c.maybeRemove(s)
	}
	return nil
}

func (c *Conn) isIdleStreamID(id uint32) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.server {
		return id > c.lastPeerID
	}
	return id%2 == 1 && id >= c.nextID
}

func (c *Conn) onHeaders(f *http2.MetaHeadersFrame) error {
	id := f.StreamID
	c.mu.Lock()
	s := c.streams[id]
	c.mu.Unlock()
	if s != nil {
		if c.server {
			// Trailers from the client: only valid as the end of the stream.
			if !f.StreamEnded() {
				c.resetStream(id, http2.ErrCodeProtocol, fmt.Errorf("%w: headers mid-stream", ErrStreamReset))
				return nil
			}
			s.receive(nil, 0, true)
			c.maybeRemove(s)
			return nil
		}
		return c.onResponse(s, f)
	}
	if !c.server {
		if c.isIdleStreamID(id) {
			return connErr(http2.ErrCodeProtocol, "HEADERS on idle stream %d", id)
		}
		c.queueCtrl(ctrlFrame{kind: ctrlRST, stream: id, n: uint32(http2.ErrCodeStreamClosed)})
		return nil
	}
	return c.onRequest(f)
}

func (c *Conn) onRequest(f *http2.MetaHeadersFrame) error {
	id := f.StreamID
	c.mu.Lock()
	if id%2 == 0 || id <= c.lastPeerID {
		c.mu.Unlock()
		return connErr(http2.ErrCodeProtocol, "bad client stream id %d", id)
	}
	c.lastPeerID = id
	refuse := c.goingAway || c.closed || c.active >= int(c.set.MaxConcurrentStreams)
	c.mu.Unlock()
	if refuse {
		c.queueCtrl(ctrlFrame{kind: ctrlRST, stream: id, n: uint32(http2.ErrCodeRefusedStream)})
		return nil
	}
	s := c.newStream(id)
	s.req.Method = f.PseudoValue("method")
	s.req.Authority = f.PseudoValue("authority")
	for _, hf := range f.RegularFields() {
		s.req.Header = append(s.req.Header, Header{Name: hf.Name, Value: hf.Value})
	}
	c.mu.Lock()
	c.streams[id] = s
	c.active++
	s.sendWindow = c.peerInitWindow
	c.mu.Unlock()
	if f.StreamEnded() {
		s.receive(nil, 0, true)
	}
	// A CONNECT carries only :method and :authority (RFC 9113 8.5); anything else is a 400.
	if s.req.Method != "CONNECT" || s.req.Authority == "" || f.PseudoValue("path") != "" || f.PseudoValue("scheme") != "" {
		s.respondQueued(400)
		return nil
	}
	c.handler(s)
	return nil
}

func (c *Conn) onResponse(s *Stream, f *http2.MetaHeadersFrame) error {
	if s.gotResponse {
		// Trailers: only meaningful as the end of the stream.
		s.receive(nil, 0, true)
		c.maybeRemove(s)
		return nil
	}
	status, err := strconv.Atoi(f.PseudoValue("status"))
	if err != nil || status < 100 || status > 999 {
		c.resetStream(s.id, http2.ErrCodeProtocol, fmt.Errorf("%w: bad :status", ErrStreamReset))
		return nil
	}
	if status >= 100 && status < 200 {
		return nil // informational; wait for the final answer
	}
	s.gotResponse = true
	resp := &Response{Status: status}
	for _, hf := range f.RegularFields() {
		resp.Header = append(resp.Header, Header{Name: hf.Name, Value: hf.Value})
	}
	if f.StreamEnded() {
		s.receive(nil, 0, true)
	}
	s.respCh <- resp
	if f.StreamEnded() {
		c.maybeRemove(s)
	}
	return nil
}

func (c *Conn) onWindowUpdate(f *http2.WindowUpdateFrame) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	inc := int64(f.Increment)
	if f.StreamID == 0 {
		if c.sendWindow+inc > 1<<31-1 {
			return connErr(http2.ErrCodeFlowControl, "connection window overflow")
		}
		c.sendWindow += inc
	} else if s := c.streams[f.StreamID]; s != nil {
		if s.sendWindow+inc > 1<<31-1 {
			c.mu.Unlock()
			c.resetStream(f.StreamID, http2.ErrCodeFlowControl, fmt.Errorf("%w: window overflow", ErrStreamReset))
			c.mu.Lock()
			return nil
		}
		s.sendWindow += inc
	}
	c.flowCond.Broadcast()
	return nil
}

func (c *Conn) onSettings(f *http2.SettingsFrame) error {
	if f.IsAck() {
		return nil
	}
	var err error
	c.mu.Lock()
	f.ForeachSetting(func(s http2.Setting) error {
		switch s.ID {
		case http2.SettingInitialWindowSize:
			delta := int64(s.Val) - c.peerInitWindow
			c.peerInitWindow = int64(s.Val)
			for _, st := range c.streams {
				st.sendWindow += delta
			}
		case http2.SettingMaxFrameSize:
			// RFC 9113 6.5.2: outside [2^14, 2^24-1] is a connection error. A zero here would
			// make every write loop forever on empty frames.
			if s.Val < 1<<14 || s.Val > 1<<24-1 {
				err = connErr(http2.ErrCodeProtocol, "SETTINGS_MAX_FRAME_SIZE %d out of range", s.Val)
				return err
			}
			c.peerMaxFrame = s.Val
		case http2.SettingMaxConcurrentStreams:
			c.peerMaxStreams = s.Val
		}
		return nil
	})
	c.flowCond.Broadcast()
	c.mu.Unlock()
	c.queueCtrl(ctrlFrame{kind: ctrlSettingsAck})
	return err
}

func (c *Conn) onGoAway(f *http2.GoAwayFrame) {
	c.mu.Lock()
	c.goingAway = true
	var refused []*Stream
	if !c.server {
		for id, s := range c.streams {
			if id > f.LastStreamID {
				refused = append(refused, s)
			}
		}
	}
	idle := c.active == 0
	c.mu.Unlock()
	for _, s := range refused {
		s.fail(ErrGoAway)
		c.remove(s)
	}
	if idle {
		go c.shutdown(nil, http2.ErrCodeNo)
	}
}

// resetStream sends RST_STREAM and fails the local side of the stream.
func (c *Conn) resetStream(id uint32, code http2.ErrCode, err error) {
	c.queueCtrl(ctrlFrame{kind: ctrlRST, stream: id, n: uint32(code)})
	c.mu.Lock()
	s := c.streams[id]
	c.mu.Unlock()
	if s != nil {
		s.fail(err)
		c.remove(s)
	}
}

// maybeRemove drops a stream from the table once both sides have ended it.
func (c *Conn) maybeRemove(s *Stream) {
	if s.bothClosed() {
		c.remove(s)
	}
}

func (c *Conn) remove(s *Stream) {
	c.mu.Lock()
	if c.streams[s.id] != s {
		c.mu.Unlock()
		return
	}
	delete(c.streams, s.id)
	c.active--
	idle := c.active == 0
	if idle {
		c.idleSince = time.Now()
	}
	drain := idle && c.goingAway && !c.server
	c.flowCond.Broadcast()
	c.mu.Unlock()
	if idle && c.onIdle != nil {
		c.onIdle(c)
	}
	if drain {
		go c.shutdown(nil, http2.ErrCodeNo)
	}
}

// Early-reset limit: a peer may reset at most maxEarlyResets streams before we answered them
// within earlyResetWindow. Legitimate clients rarely abandon a CONNECT before its answer.
const (
	maxEarlyResets   = 2 * ServerMaxStreams
	earlyResetWindow = 10 * time.Second
)

// countEarlyReset records one reset of an unanswered stream (read loop only) and reports
// whether the peer went over the limit.
func (c *Conn) countEarlyReset() bool {
	now := time.Now()
	if now.Sub(c.resetWindow) > earlyResetWindow {
		c.resetWindow, c.earlyResets = now, 0
	}
	c.earlyResets++
	return c.earlyResets > maxEarlyResets
}
