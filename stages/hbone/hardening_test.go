package hbone

import (
	"bufio"
	"bytes"
	"net"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

// rawClient opens a TCP connection to a fresh server Conn running handler and returns the
// server Conn and a raw framer speaking as the client (preface written).
func rawClient(t *testing.T, handler Handler) (*Conn, *http2.Framer, net.Conn) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srvCh := make(chan *Conn, 1)
	go func() {
		nc, err := ln.Accept()
		ln.Close()
		if err != nil {
			srvCh <- nil
			return
		}
		c, _ := ServeConn(nc, Config{Handler: handler})
		srvCh <- c
	}()
	nc, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	nc.Write([]byte(http2.ClientPreface))
	fr := http2.NewFramer(nc, bufio.NewReader(nc))
	srv := <-srvCh
	if srv == nil {
		t.Fatal("server did not start")
	}
	t.Cleanup(func() { nc.Close(); srv.Close() })
	return srv, fr, nc
}

func headerBlock(fields ...string) []byte {
	var b bytes.Buffer
	enc := hpack.NewEncoder(&b)
	for i := 0; i+1 < len(fields); i += 2 {
		enc.WriteField(hpack.HeaderField{Name: fields[i], Value: fields[i+1]})
	}
	return b.Bytes()
}

// A peer advertising SETTINGS_MAX_FRAME_SIZE outside the RFC range is a protocol error, not
// a reason to write empty frames forever.
func TestMaxFrameSizeOutOfRangeClosesConn(t *testing.T) {
	srv, fr, _ := rawClient(t, func(s *Stream) { go s.Respond(200, nil) })
	fr.WriteSettings(http2.Setting{ID: http2.SettingMaxFrameSize, Val: 0})
	select {
	case <-srv.Done():
	case <-time.After(5 * time.Second):
		t.Fatal("connection survived SETTINGS_MAX_FRAME_SIZE=0")
	}
}

// A request answered 400 by the engine is released at once: no stream stays in the table
// buffering what the peer keeps sending.
func TestRejectedStreamIsReleased(t *testing.T) {
	called := false
	srv, fr, _ := rawClient(t, func(s *Stream) { called = true })
	fr.WriteSettings()
	for id := uint32(1); id <= 21; id += 2 {
		fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, EndHeaders: true,
			BlockFragment: headerBlock(":method", "GET", ":scheme", "https", ":path", "/", ":authority", "x:1")})
		fr.WriteData(id, false, make([]byte, 16000))
	}
	waitFor(t, func() bool { return srv.Active() == 0 })
	time.Sleep(50 * time.Millisecond)
	if n := srv.Active(); n != 0 || called {
		t.Fatalf("active streams %d after 400s (handler called: %v)", n, called)
	}
}

// Respond never waits for the socket: it returns while another writer holds the write lock
// (as when a peer stops reading and a relay write is stuck).
func TestRespondDoesNotBlockOnWriteLock(t *testing.T) {
	got := make(chan *Stream, 1)
	srv, fr, _ := rawClient(t, func(s *Stream) { got <- s })
	fr.WriteSettings()
	fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, EndHeaders: true,
		BlockFragment: headerBlock(":method", "CONNECT", ":authority", "10.0.0.1:80")})
	s := <-got
	srv.wmu.Lock()
	done := make(chan error, 1)
	go func() { done <- s.Respond(401, nil) }()
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(2 * time.Second):
		srv.wmu.Unlock()
		t.Fatal("Respond blocked on the write lock")
	}
	srv.wmu.Unlock()
}

// A client that completes the connection but never sends the preface is dropped after the
// preface timeout instead of holding the server forever.
func TestPrefaceTimeout(t *testing.T) {
	if testing.Short() {
		t.Skip("waits for the preface timeout")
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	errCh := make(chan error, 1)
	go func() {
		nc, err := ln.Accept()
		if err != nil {
			errCh <- err
			return
		}
		_, err = ServeConn(nc, Config{Handler: func(*Stream) {}})
		errCh <- err
	}()
	nc, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	select {
	case err := <-errCh:
		if err == nil {
			t.Fatal("ServeConn accepted a connection without a preface")
		}
	case <-time.After(prefaceTimeout + 5*time.Second):
		t.Fatal("ServeConn still waiting for the preface")
	}
}

// Rapid Reset: a peer that opens streams and resets them before their answer is cut off once
// it passes the early-reset limit, instead of feeding the pipeline at line rate.
func TestRapidResetClosesConn(t *testing.T) {
	var calls atomic.Int32
	srv, fr, _ := rawClient(t, func(s *Stream) { calls.Add(1) })
	fr.WriteSettings()
	go func() {
		for id := uint32(1); id < 2*5000; id += 2 {
			if fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, EndHeaders: true,
				BlockFragment: headerBlock(":method", "CONNECT", ":authority", "10.0.0.1:80")}) != nil {
				return
			}
			if fr.WriteRSTStream(id, http2.ErrCodeCancel) != nil {
				return
			}
		}
	}()
	select {
	case <-srv.Done():
	case <-time.After(10 * time.Second):
		t.Fatalf("connection still open after %d reset streams", calls.Load())
	}
	if n := calls.Load(); n > maxEarlyResets+ServerMaxStreams {
		t.Fatalf("handler ran %d times before the cut-off", n)
	}
}
