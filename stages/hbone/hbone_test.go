package hbone

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"io"
	"math/rand/v2"
	"net"
	"sync"
	"testing"
	"time"
)

// pair starts a server Conn with handler on one end of a loopback TCP connection and returns a
// client Conn on the other.
func pair(t testing.TB, handler Handler, srvSet Settings) (*Conn, func() *Conn) {
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
		c, err := ServeConn(nc, Config{Settings: srvSet, Handler: handler})
		if err != nil {
			srvCh <- nil
			return
		}
		srvCh <- c
	}()
	nc, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	cc, err := NewClientConn(nc, Config{})
	if err != nil {
		t.Fatal(err)
	}
	var srv *Conn
	getSrv := func() *Conn {
		if srv == nil {
			srv = <-srvCh
		}
		return srv
	}
	t.Cleanup(func() {
		cc.Close()
		if s := getSrv(); s != nil {
			s.Close()
		}
	})
	return cc, getSrv
}

// echoHandler answers 200 and echoes every byte back, then ends its side.
func echoHandler(s *Stream) {
	go func() {
		defer s.Close()
		if err := s.Respond(200, []Header{{Name: "baggage", Value: "k8s.namespace.name=srv"}}); err != nil {
			return
		}
		buf := make([]byte, 64<<10)
		for {
			n, err := s.Read(buf)
			if n > 0 {
				if _, err := s.Write(buf[:n]); err != nil {
					return
				}
			}
			if err == io.EOF {
				s.CloseWrite()
				return
			}
			if err != nil {
				return
			}
		}
	}()
}

func connect(t testing.TB, c *Conn, authority string) *Stream {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	s, resp, err := c.OpenStream(ctx, &Request{Authority: authority, Header: []Header{{Name: HeaderTraceParent, Value: "00-x"}}})
	if err != nil {
		t.Fatalf("OpenStream: %v", err)
	}
	if resp.Status != 200 || resp.Get("baggage") == "" {
		t.Fatalf("unexpected response %+v", resp)
	}
	return s
}

func TestEchoSizes(t *testing.T) {
	cc, _ := pair(t, echoHandler, Settings{})
	for _, size := range []int{1, 1000, 1 << 20, 9<<20 + 7} {
		s := connect(t, cc, "10.0.0.1:80")
		data := make([]byte, size)
		fill(data, uint64(size))
		var got []byte
		var rerr error
		done := make(chan struct{})
		go func() {
			got, rerr = io.ReadAll(s)
			close(done)
		}()
		if _, err := s.Write(data); err != nil {
			t.Fatalf("size %d: write: %v", size, err)
		}
		if err := s.CloseWrite(); err != nil {
			t.Fatal(err)
		}
		<-done
		if rerr != nil {
			t.Fatalf("size %d: read: %v", size, rerr)
		}
		if sha256.Sum256(got) != sha256.Sum256(data) {
			t.Fatalf("size %d: echo differs (got %d bytes)", size, len(got))
		}
		s.Close()
	}
	if n := cc.Active(); n != 0 {
		t.Fatalf("client still has %d active streams", n)
	}
}

func TestRequestHeadersReachServer(t *testing.T) {
	got := make(chan Request, 1)
	cc, _ := pair(t, func(s *Stream) {
		got <- *s.Request()
		go func() { s.Respond(200, nil); s.Close() }()
	}, Settings{})
	ctx := context.Background()
	s, _, err := cc.OpenStream(ctx, &Request{Authority: "[fd00::1]:8080", Header: []Header{
		{Name: HeaderBaggage, Value: "k8s.namespace.name=a"}, {Name: HeaderForwarded, Value: `for="1.2.3.4:5"`},
	}})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	r := <-got
	if r.Method != "CONNECT" || r.Authority != "[fd00::1]:8080" || r.Get(HeaderBaggage) != "k8s.namespace.name=a" || r.Get(HeaderForwarded) != `for="1.2.3.4:5"` {
		t.Fatalf("server saw %+v", r)
	}
}

func TestErrorStatus(t *testing.T) {
	for _, status := range []int{400, 401, 503} {
		cc, _ := pair(t, func(s *Stream) { go func() { s.Respond(status, nil); s.Close() }() }, Settings{})
		_, resp, err := cc.OpenStream(context.Background(), &Request{Authority: "1.1.1.1:80"})
		var se *StatusError
		if !errors.As(err, &se) || se.Status != status || resp == nil || resp.Status != status {
			t.Fatalf("status %d: got resp %+v err %v", status, resp, err)
		}
		waitFor(t, func() bool { return cc.Active() == 0 })
	}
}

func TestNonConnectIs400(t *testing.T) {
	called := false
	cc, _ := pair(t, func(s *Stream) { called = true }, Settings{})
	_, _, err := cc.OpenStream(context.Background(), &Request{Method: "GET", Authority: "1.1.1.1:80"})
	var se *StatusError
	if !errors.As(err, &se) || se.Status != 400 {
		t.Fatalf("want 400, got %v", err)
	}
	if called {
		t.Fatal("handler must not see a non-CONNECT request")
	}
}

func TestHalfClose(t *testing.T) {
	// The server reads until EOF, then answers with a message and ends its side: the client
	// must see the answer after its own FIN, proving each direction closes independently.
	cc, _ := pair(t, func(s *Stream) {
		go func() {
			defer s.Close()
			s.Respond(200, nil)
			in, err := io.ReadAll(s)
			if err != nil {
				return
			}
			s.Write([]byte("got:" + string(in)))
			s.CloseWrite()
		}()
	}, Settings{})
	s := connect2(t, cc)
	s.Write([]byte("hello"))
	s.CloseWrite()
	out, err := io.ReadAll(s)
	if err != nil || string(out) != "got:hello" {
		t.Fatalf("got %q, %v", out, err)
	}
	s.Close()
}

func connect2(t *testing.T, c *Conn) *Stream {
	t.Helper()
	s, _, err := c.OpenStream(context.Background(), &Request{Authority: "10.0.0.1:80"})
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func TestConcurrentStreams(t *testing.T) {
	cc, _ := pair(t, echoHandler, Settings{})
	const n = 100
	var wg sync.WaitGroup
	errs := make(chan error, n)
	for i := 0; i < n; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			s, _, err := cc.OpenStream(context.Background(), &Request{Authority: "10.0.0.1:80"})
			if err != nil {
				errs <- err
				return
			}
			defer s.Close()
			msg := bytes.Repeat([]byte{byte(i)}, 100000+i)
			go func() { s.Write(msg); s.CloseWrite() }()
			got, err := io.ReadAll(s)
			if err != nil || !bytes.Equal(got, msg) {
				errs <- errors.New("echo mismatch")
			}
		}(i)
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
}

func TestStreamLimit(t *testing.T) {
	block := make(chan struct{})
	cc, _ := pair(t, func(s *Stream) {
		go func() { s.Respond(200, nil); <-block; s.Close() }()
	}, Settings{MaxConcurrentStreams: 2})
	defer close(block)
	s1 := connect2(t, cc)
	defer s1.Close()
	// The client learns the server's limit from its SETTINGS.
	waitFor(t, func() bool { return cc.Capacity() == 1 })
	s2 := connect2(t, cc)
	defer s2.Close()
	if cc.TryReserve() {
		t.Fatal("third stream must not fit")
	}
	if _, _, err := cc.OpenStream(context.Background(), &Request{Authority: "1.1.1.1:1"}); !errors.Is(err, ErrNoCapacity) {
		t.Fatalf("want ErrNoCapacity, got %v", err)
	}
}

func TestSlowReaderBounded(t *testing.T) {
	// The server never reads: the client must stall after about one stream window, and the
	// server must buffer no more than the window.
	var srvStream *Stream
	ready := make(chan struct{})
	var once sync.Once
	cc, _ := pair(t, func(s *Stream) {
		first := false
		once.Do(func() { srvStream, first = s, true })
		go func() {
			s.Respond(200, nil)
			if first {
				close(ready)
			} else {
				s.Close()
			}
		}()
	}, Settings{})
	s := connect2(t, cc)
	<-ready
	var written int64
	var mu sync.Mutex
	go func() {
		buf := make([]byte, 64<<10)
		for {
			n, err := s.Write(buf)
			mu.Lock()
			written += int64(n)
			mu.Unlock()
			if err != nil {
				return
			}
		}
	}()
	time.Sleep(300 * time.Millisecond)
	mu.Lock()
	w := written
	mu.Unlock()
	srvStream.mu.Lock()
	buffered := srvStream.buffered
	srvStream.mu.Unlock()
	if w > DefaultStreamWindow+maxDataPayload || buffered > DefaultStreamWindow {
		t.Fatalf("writer got %d bytes out, server buffered %d: not bounded by the %d window", w, buffered, DefaultStreamWindow)
	}
	if buffered < DefaultStreamWindow/2 {
		t.Fatalf("server buffered only %d bytes; flow control too tight", buffered)
	}
	// Another stream on the same connection is not affected by the stalled one.
	s2 := connect2(t, cc)
	s2.Close()
	s.Close()
	srvStream.Close()
}

func TestPeerCloseFailsStreams(t *testing.T) {
	cc, srv := pair(t, func(s *Stream) { go s.Respond(200, nil) }, Settings{})
	s := connect2(t, cc)
	srv().Close()
	if _, err := io.ReadAll(s); err == nil {
		t.Fatal("read must fail when the connection dies")
	}
	select {
	case <-cc.Done():
	case <-time.After(5 * time.Second):
		t.Fatal("client conn did not notice the close")
	}
	if _, _, err := cc.OpenStream(context.Background(), &Request{Authority: "1.1.1.1:1"}); err == nil {
		t.Fatal("open on a dead conn must fail")
	}
}

func TestGracefulShutdown(t *testing.T) {
	cc, srv := pair(t, echoHandler, Settings{})
	s := connect2(t, cc)
	done := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		done <- srv().Shutdown(ctx)
	}()
	// New streams are refused once the GOAWAY arrives, the old one keeps working.
	waitFor(t, func() bool { return !cc.Usable() })
	s.Write([]byte("still"))
	s.CloseWrite()
	got, err := io.ReadAll(s)
	if err != nil || string(got) != "still" {
		t.Fatalf("existing stream broken by drain: %q %v", got, err)
	}
	s.Close()
	if err := <-done; err != nil {
		t.Fatalf("shutdown: %v", err)
	}
}

func TestPingKeepalive(t *testing.T) {
	ln, _ := net.Listen("tcp", "127.0.0.1:0")
	defer ln.Close()
	go func() {
		nc, err := ln.Accept()
		if err != nil {
			return
		}
		c, err := ServeConn(nc, Config{Handler: func(*Stream) {}})
		if err == nil {
			<-c.Done()
		}
	}()
	nc, _ := net.Dial("tcp", ln.Addr().String())
	cc, err := NewClientConn(nc, Config{Settings: Settings{PingInterval: 20 * time.Millisecond, PingTimeout: 200 * time.Millisecond}})
	if err != nil {
		t.Fatal(err)
	}
	defer cc.Close()
	// A live peer answers pings: the connection survives many intervals.
	time.Sleep(300 * time.Millisecond)
	if !cc.Usable() {
		t.Fatalf("conn died although the peer answers pings: %v", cc.Err())
	}
}

func TestPingTimeoutClosesDeadPeer(t *testing.T) {
	ln, _ := net.Listen("tcp", "127.0.0.1:0")
	defer ln.Close()
	go func() {
		// A peer that accepts and never reads or answers.
		nc, err := ln.Accept()
		if err == nil {
			time.Sleep(2 * time.Second)
			nc.Close()
		}
	}()
	nc, _ := net.Dial("tcp", ln.Addr().String())
	cc, err := NewClientConn(nc, Config{Settings: Settings{PingInterval: 20 * time.Millisecond, PingTimeout: 100 * time.Millisecond}})
	if err != nil {
		t.Fatal(err)
	}
	defer cc.Close()
	select {
	case <-cc.Done():
		if !errors.Is(cc.Err(), ErrPingTimeout) {
			t.Fatalf("closed for %v, want ping timeout", cc.Err())
		}
	case <-time.After(1500 * time.Millisecond):
		t.Fatal("dead peer not detected")
	}
}

func waitFor(t *testing.T, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatal("condition not met in time")
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func fill(b []byte, seed uint64) {
	r := rand.New(rand.NewPCG(1, seed))
	for i := range b {
		b[i] = byte(r.Uint32())
	}
}
