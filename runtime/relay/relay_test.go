package relay

import (
	"bytes"
	"context"
	"crypto/sha256"
	"io"
	"net"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/ztgo/ztgo/runtime/eventloop"
	"github.com/ztgo/ztgo/stages/hbone"
)

// relays returns a relay of each kind: one whose TCP sources keep a goroutine (no event loop)
// and one whose idle sources park on a running event loop.
func relays(t *testing.T) map[string]*Relay {
	t.Helper()
	loop, err := eventloop.New(nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	loop.Start()
	t.Cleanup(loop.Stop)
	return map[string]*Relay{"goroutines": New(0, nil), "eventloop": New(0, loop)}
}

// eachRelay runs fn as a subtest with each kind of relay.
func eachRelay(t *testing.T, fn func(t *testing.T, r *Relay)) {
	for name, r := range relays(t) {
		t.Run(name, func(t *testing.T) { fn(t, r) })
	}
}

// tcpPair returns the two ends of a loopback TCP connection.
func tcpPair(t *testing.T) (*net.TCPConn, *net.TCPConn) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	ch := make(chan net.Conn, 1)
	go func() { c, _ := ln.Accept(); ch <- c }()
	a, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	b := <-ch
	return a.(*net.TCPConn), b.(*net.TCPConn)
}

// TestTCPRelayHalfClose runs client -> [down | relay | up] -> server and checks bytes both
// ways, byte counts, and that the server's reply still flows after the client's FIN.
func TestTCPRelayHalfClose(t *testing.T) {
	eachRelay(t, func(t *testing.T, r *Relay) {
		client, down := tcpPair(t)
		up, server := tcpPair(t)
		var sent, recv atomic.Int64
		done := make(chan Result, 1)
		go func() { done <- r.Run(down, up, &sent, &recv, nil) }()

		payload := bytes.Repeat([]byte("0123456789"), 300000)
		go func() {
			client.Write(payload)
			client.CloseWrite()
		}()
		got, err := io.ReadAll(server)
		if err != nil || sha256.Sum256(got) != sha256.Sum256(payload) {
			t.Fatalf("server got %d bytes, err %v", len(got), err)
		}
		// After the client's FIN the server still answers.
		server.Write([]byte("reply"))
		server.CloseWrite()
		back, err := io.ReadAll(client)
		if err != nil || string(back) != "reply" {
			t.Fatalf("client got %q, %v", back, err)
		}
		res := <-done
		if res.Err != nil || res.Sent != int64(len(payload)) || res.Recv != 5 {
			t.Fatalf("result %+v", res)
		}
		if sent.Load() != int64(len(payload)) || recv.Load() != 5 {
			t.Fatalf("counters sent=%d recv=%d", sent.Load(), recv.Load())
		}
	})
}

func TestAbortOnReset(t *testing.T) {
	eachRelay(t, func(t *testing.T, r *Relay) {
		client, down := tcpPair(t)
		up, server := tcpPair(t)
		done := make(chan Result, 1)
		go func() { done <- r.Run(down, up, nil, nil, nil) }()
		// An abortive close of the server (RST) must tear down the client side too.
		server.SetLinger(0)
		server.Close()
		buf := make([]byte, 1)
		client.Read(buf)
		<-done
		client.Close()
	})
}

// streamPair returns both ends of one HBONE stream over loopback TCP (no TLS).
func streamPair(t *testing.T) (client, server *hbone.Stream) {
	t.Helper()
	a, b := tcpPair(t)
	srvCh := make(chan *hbone.Stream, 1)
	sc, err := func() (*hbone.Conn, error) {
		ch := make(chan *hbone.Conn, 1)
		errCh := make(chan error, 1)
		go func() {
			c, err := hbone.ServeConn(b, hbone.Config{Handler: func(s *hbone.Stream) {
				go func() { s.Respond(200, nil); srvCh <- s }()
			}})
			ch <- c
			errCh <- err
		}()
		cc, err := hbone.NewClientConn(a, hbone.Config{})
		if err != nil {
			return nil, err
		}
		t.Cleanup(func() { cc.Close() })
		client, _, err = cc.OpenStream(context.Background(), &hbone.Request{Authority: "10.0.0.1:1"})
		if err != nil {
			return nil, err
		}
		return <-ch, <-errCh
	}()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { sc.Close() })
	return client, <-srvCh
}

// TestTCPToStreamHoldsNoBufferWhenIdle runs app -> [tcp | relay | stream] -> peer: bytes and
// half-close arrive, and while the flow is idle the relay holds no copy buffer.
func TestTCPToStreamHoldsNoBufferWhenIdle(t *testing.T) {
	eachRelay(t, func(t *testing.T, r *Relay) {
		app, down := tcpPair(t)
		up, peer := streamPair(t)
		done := make(chan Result, 1)
		go func() { done <- r.Run(down, up, nil, nil, nil) }()

		app.Write([]byte("first"))
		buf := make([]byte, 5)
		if _, err := io.ReadFull(peer, buf); err != nil || string(buf) != "first" {
			t.Fatalf("peer got %q %v", buf, err)
		}
		time.Sleep(50 * time.Millisecond) // idle: both directions wait for data
		if n := r.BuffersInUse(); n != 0 {
			t.Fatalf("idle flow holds %d buffers", n)
		}
		payload := bytes.Repeat([]byte("z"), 3<<20)
		go func() { app.Write(payload); app.CloseWrite() }()
		got, err := io.ReadAll(peer)
		if err != nil || !bytes.Equal(got, payload) {
			t.Fatalf("peer got %d bytes, %v", len(got), err)
		}
		peer.Write([]byte("bye"))
		peer.CloseWrite()
		back, _ := io.ReadAll(app)
		if string(back) != "bye" {
			t.Fatalf("app got %q", back)
		}
		res := <-done
		if res.Err != nil || res.Sent != int64(5+len(payload)) || res.Recv != 3 {
			t.Fatalf("result %+v", res)
		}
		if n := r.BuffersInUse(); n != 0 {
			t.Fatalf("finished flow holds %d buffers", n)
		}
		peer.Close()
	})
}

// TestFirstRecv: the first-bytes hook fires once when the peer's bytes come back through an
// HBONE stream, and never on a TCP-to-TCP splice, which is not observed byte by byte.
func TestFirstRecv(t *testing.T) {
	eachRelay(t, func(t *testing.T, r *Relay) {
		app, down := tcpPair(t)
		up, peer := streamPair(t)
		var fired atomic.Int32
		done := make(chan Result, 1)
		go func() { done <- r.Run(down, up, nil, nil, func() { fired.Add(1) }) }()
		peer.Write([]byte("one"))
		buf := make([]byte, 3)
		io.ReadFull(app, buf)
		peer.Write([]byte("two"))
		io.ReadFull(app, buf)
		if n := fired.Load(); n != 1 {
			t.Fatalf("hook fired %d times after two reads, want 1", n)
		}
		app.CloseWrite()
		peer.CloseWrite()
		io.ReadAll(app)
		io.ReadAll(peer)
		<-done
		peer.Close()

		client, down2 := tcpPair(t)
		up2, server := tcpPair(t)
		var spliced atomic.Int32
		done2 := make(chan Result, 1)
		go func() { done2 <- r.Run(down2, up2, nil, nil, func() { spliced.Add(1) }) }()
		server.Write([]byte("x"))
		server.CloseWrite()
		io.ReadAll(client)
		client.CloseWrite()
		io.ReadAll(server)
		<-done2
		if n := spliced.Load(); n != 0 {
			t.Fatalf("hook fired %d times on a splice", n)
		}
	})
}

// TestIdleFlowsHoldNoGoroutine: with the event loop, idle flows (TCP to TCP and TCP to an
// HBONE stream) hold no goroutine and no buffer, and each still carries bytes both ways and
// closes cleanly afterwards.
func TestIdleFlowsHoldNoGoroutine(t *testing.T) {
	r := relays(t)["eventloop"]
	const n = 50
	type flow struct {
		client io.ReadWriter
		server io.ReadWriter
		closeC func() error
		closeS func() error
		done   chan Result
	}
	var flows []flow
	type ends struct {
		down, up Conn
	}
	var pairs []ends
	for i := range 2 * n {
		client, down := tcpPair(t)
		f := flow{client: client, closeC: client.CloseWrite, done: make(chan Result, 1)}
		var up Conn
		if i%2 == 0 {
			u, s := tcpPair(t)
			up, f.server, f.closeS = u, s, s.CloseWrite
		} else {
			u, s := streamPair(t)
			up, f.server, f.closeS = u, s, s.CloseWrite
		}
		flows = append(flows, f)
		pairs = append(pairs, ends{down, up})
	}
	// Every socket and HBONE connection exists (with its read loop): what follows is the
	// relay's own.
	base := runtime.NumGoroutine()
	for i, p := range pairs {
		done := flows[i].done
		r.Start(p.down, p.up, nil, nil, nil, func(res Result) { done <- res })
	}
	// One exchange each, then idle.
	for _, f := range flows {
		exchange(t, f.client, f.server, "hello")
	}
	waitFor(t, "every direction parked", func() bool { return r.Running() == 0 })
	// A few goroutines may be on their way out; none may stay per flow.
	var g int
	for range 100 {
		if g = runtime.NumGoroutine(); g <= base+2 {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	if g > base+2 {
		t.Fatalf("%d goroutines with %d idle flows, %d before the relays started", g, len(flows), base)
	}
	if b := r.BuffersInUse(); b != 0 {
		t.Fatalf("idle flows hold %d buffers", b)
	}
	// Every TCP source is registered with the loop: each flow's down, and the up of half.
	if w := r.loop.Watches(); w != 3*n {
		t.Fatalf("%d sockets watched with %d idle flows, want %d", w, len(flows), 3*n)
	}
	for _, f := range flows {
		exchange(t, f.client, f.server, "again")
		f.closeC()
		f.closeS()
	}
	for i, f := range flows {
		select {
		case res := <-f.done:
			if res.Err != nil || res.Sent != 10 || res.Recv != 10 {
				t.Fatalf("flow %d: %+v", i, res)
			}
		case <-time.After(5 * time.Second):
			t.Fatalf("flow %d did not finish", i)
		}
	}
	if r.Running() != 0 {
		t.Fatalf("%d directions running after every flow finished", r.Running())
	}
	if w := r.loop.Watches(); w != 0 {
		t.Fatalf("%d sockets still watched after every flow finished", w)
	}
}

// exchange sends msg from client to server and back.
func exchange(t *testing.T, client, server io.ReadWriter, msg string) {
	t.Helper()
	buf := make([]byte, len(msg))
	for _, p := range [][2]io.ReadWriter{{client, server}, {server, client}} {
		if _, err := p[0].Write([]byte(msg)); err != nil {
			t.Fatal(err)
		}
		if _, err := io.ReadFull(p[1], buf); err != nil || string(buf) != msg {
			t.Fatalf("got %q, %v", buf, err)
		}
	}
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(2 * time.Millisecond)
	}
}

// TestAbortWakesParkedFlow: Abort ends an idle flow at once (its parked directions learn of
// the close only through it), closing both ends.
func TestAbortWakesParkedFlow(t *testing.T) {
	eachRelay(t, func(t *testing.T, r *Relay) {
		for _, kind := range []string{"tcp", "stream"} {
			client, down := tcpPair(t)
			var up Conn
			var server io.Reader
			if kind == "tcp" {
				up, server = tcpPair(t)
			} else {
				up, server = streamPair(t)
			}
			done := make(chan Result, 1)
			f := r.Start(down, up, nil, nil, nil, func(res Result) { done <- res })
			time.Sleep(20 * time.Millisecond)
			f.Abort()
			f.Abort()
			select {
			case res := <-done:
				if res.Err == nil {
					t.Errorf("%s: aborted flow finished without an error", kind)
				}
			case <-time.After(5 * time.Second):
				t.Fatalf("%s: aborted idle flow did not finish", kind)
			}
			client.SetReadDeadline(time.Now().Add(5 * time.Second))
			if _, err := client.Read(make([]byte, 1)); err == nil {
				t.Errorf("%s: client read succeeded after abort", kind)
			}
			if _, err := io.ReadAll(server); err != nil && kind == "tcp" {
				t.Logf("%s: server read after abort: %v", kind, err)
			}
			f.Abort() // after the end: a no-op
		}
	})
}

// TestBackpressure: when the far side stops reading, the relay stops reading too: the bytes
// the sender gets rid of are bounded by socket buffers and, through HBONE, the stream window,
// and no copy buffer is held while it waits.
func TestBackpressure(t *testing.T) {
	r := relays(t)["eventloop"]
	for _, kind := range []string{"tcp", "stream"} {
		client, down := tcpPair(t)
		var up Conn
		var server io.Reader
		if kind == "tcp" {
			up, server = tcpPair(t)
		} else {
			up, server = streamPair(t)
		}
		// Fixed socket buffers (the kernel doubles them, and autotuning could otherwise grow a
		// loopback receive buffer to tcp_rmem's maximum): the bound below is theirs.
		for _, c := range []any{client, down, up, server} {
			if tc, ok := c.(*net.TCPConn); ok {
				tc.SetReadBuffer(256 << 10)
				tc.SetWriteBuffer(256 << 10)
			}
		}
		done := make(chan Result, 1)
		r.Start(down, up, nil, nil, nil, func(res Result) { done <- res })
		// Push until the client's writes stall for a while.
		chunk := make([]byte, 64<<10)
		var pushed int64
		for {
			client.SetWriteDeadline(time.Now().Add(300 * time.Millisecond))
			n, err := client.Write(chunk)
			pushed += int64(n)
			if err != nil {
				break
			}
			if pushed > 256<<20 {
				t.Fatalf("%s: sender pushed %d MiB into a flow nobody reads", kind, pushed>>20)
			}
		}
		// Four socket buffers of 512 KiB, the relay's pipe (1 MiB) and, through HBONE, the
		// stream window (4 MiB) and the HBONE connection's socket buffers (autotuned).
		limit := int64(4<<20 + 1<<20)
		if kind == "stream" {
			limit += 4<<20 + 16<<20
		}
		if pushed > limit {
			t.Fatalf("%s: %d MiB accepted while the far side does not read, want < %d MiB", kind, pushed>>20, limit>>20)
		}
		if b := r.BuffersInUse(); b > 1 {
			t.Fatalf("%s: %d buffers held while stalled", kind, b)
		}
		// Everything pushed still arrives, in order, once the far side reads.
		client.SetWriteDeadline(time.Time{})
		client.CloseWrite()
		got, err := io.Copy(io.Discard, server)
		if err != nil || got != pushed {
			t.Fatalf("%s: server read %d of %d bytes, %v", kind, got, pushed, err)
		}
		if c, ok := up.(*hbone.Stream); ok {
			c.CloseWrite()
		}
		if s, ok := server.(interface{ CloseWrite() error }); ok {
			s.CloseWrite()
		}
		io.ReadAll(client)
		select {
		case res := <-done:
			if res.Err != nil || res.Sent != pushed {
				t.Fatalf("%s: %+v, pushed %d", kind, res, pushed)
			}
		case <-time.After(5 * time.Second):
			t.Fatalf("%s: flow did not finish", kind)
		}
		t.Logf("%s: %d KiB accepted before the sender stalled", kind, pushed>>10)
	}
}

// TestStreamToTCPWriteThrough: bytes from an HBONE stream reach an idle socket straight from
// the connection's read loop; when the socket is full, the rest waits on a goroutine, the
// stream's window stops the sender, and nothing is lost.
func TestStreamToTCPWriteThrough(t *testing.T) {
	r := relays(t)["eventloop"]
	app, down := tcpPair(t)
	up, peer := streamPair(t)
	done := make(chan Result, 1)
	r.Start(down, up, nil, nil, nil, func(res Result) { done <- res })
	exchange(t, app, peer, "ping")
	// The count follows the write, which the app may see first.
	waitFor(t, "a small response written through from the read loop", func() bool { return r.InlineWrites() > 0 })
	// The app stops reading: the peer's writes stall at the stream window.
	var pushed atomic.Int64
	var stop atomic.Bool
	pusherDone := make(chan struct{})
	go func() {
		defer close(pusherDone)
		chunk := make([]byte, 64<<10)
		for !stop.Load() && pushed.Load() < 256<<20 {
			n, err := peer.Write(chunk)
			pushed.Add(int64(n))
			if err != nil {
				return
			}
		}
	}()
	var last int64
	for i := 0; ; i++ {
		time.Sleep(100 * time.Millisecond)
		now := pushed.Load()
		if now == last && now > 0 {
			break
		}
		last = now
		if i > 100 {
			t.Fatal("the peer never stalled")
		}
	}
	if p := pushed.Load(); p > 32<<20 {
		t.Fatalf("%d MiB pushed into a flow whose app does not read", p>>20)
	}
	// Everything arrives once the app reads.
	stop.Store(true)
	readCh := make(chan int64, 1)
	go func() { n, _ := io.Copy(io.Discard, app); readCh <- n }()
	<-pusherDone
	want := pushed.Load()
	peer.CloseWrite()
	if got := <-readCh; got != want {
		t.Fatalf("app read %d of %d bytes", got, want)
	}
	app.CloseWrite()
	io.ReadAll(peer)
	select {
	case res := <-done:
		if res.Err != nil || res.Recv != want+4 {
			t.Fatalf("%+v, want %d received", res, want+4)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("flow did not finish")
	}
	peer.Close()
}

// TestEstablishedPathAllocs: once a flow runs, moving bytes allocates nothing per burst or per
// read, neither TCP to TCP (splice, parking on the event loop) nor through an HBONE stream
// (pooled buffer one way, write-through from the read loop the other).
func TestEstablishedPathAllocs(t *testing.T) {
	r := relays(t)["eventloop"]
	// Under the race detector a sync.Pool drops a quarter of what is put back, at random, and
	// each refill allocates: allow that much there. A closure, a method value or an interface
	// conversion per burst costs at least one more per round and still fails.
	limit := 0.0
	if raceEnabled {
		limit = 1
	}
	for _, kind := range []string{"tcp", "stream"} {
		client, down := tcpPair(t)
		var up Conn
		var server io.ReadWriter
		if kind == "tcp" {
			u, s := tcpPair(t)
			up, server = u, s
		} else {
			u, s := streamPair(t)
			up, server = u, s
		}
		done := make(chan Result, 1)
		r.Start(down, up, nil, nil, nil, func(res Result) { done <- res })
		p := make([]byte, 16<<10)
		back := make([]byte, len(p))
		round := func() {
			for _, c := range [][2]io.ReadWriter{{client, server}, {server, client}} {
				if _, err := c[0].Write(p); err != nil {
					t.Fatal(err)
				}
				if _, err := io.ReadFull(c[1], back); err != nil {
					t.Fatal(err)
				}
			}
		}
		for range 50 {
			round() // warm pools and buffers
		}
		if n := testing.AllocsPerRun(200, round); n > limit {
			t.Errorf("%s: %v allocations per 16 KiB round trip through an established flow", kind, n)
		}
		client.Close()
		if c, ok := server.(io.Closer); ok {
			c.Close()
		}
		select {
		case <-done:
		case <-time.After(5 * time.Second):
			t.Fatalf("%s: flow did not finish after both ends closed", kind)
		}
	}
}

// TestFarEndCloseEndsIdleFlow: when the ends go away while the flow is idle (the app's FIN
// and close; the server's close, which through HBONE is a RST_STREAM CANCEL the stream treats
// as its end; or the whole HBONE connection lost), the parked directions wake and the flow
// finishes.
func TestFarEndCloseEndsIdleFlow(t *testing.T) {
	eachRelay(t, func(t *testing.T, r *Relay) {
		for _, kind := range []string{"tcp", "stream", "connection lost"} {
			client, down := tcpPair(t)
			var up Conn
			var server io.ReadWriteCloser
			if kind == "tcp" {
				up, server = tcpPair(t)
			} else {
				up, server = streamPair(t)
			}
			done := make(chan Result, 1)
			r.Start(down, up, nil, nil, nil, func(res Result) { done <- res })
			exchange(t, client, server, "hi")
			waitFor(t, "the flow idle", func() bool { return r.loop == nil || r.Running() == 0 })
			if kind == "connection lost" {
				up.(*hbone.Stream).Conn().Close() // the app keeps its socket open
			} else {
				server.Close()
				client.Close()
			}
			select {
			case res := <-done:
				if kind == "connection lost" && res.Err == nil {
					t.Errorf("%s: flow finished without an error", kind)
				}
			case <-time.After(5 * time.Second):
				t.Fatalf("%s: idle flow did not finish", kind)
			}
			client.Close()
			server.Close()
		}
	})
}

// TestAbortDuringBursts: aborts that land while directions are moving bytes, parking or being
// woken (from a user, or from the other direction's error) end every flow, and leave nothing
// behind: no direction running, no socket watched, no buffer held.
func TestAbortDuringBursts(t *testing.T) {
	eachRelay(t, func(t *testing.T, r *Relay) {
		const n = 40
		var wg sync.WaitGroup
		for i := range n {
			client, down := tcpPair(t)
			var up Conn
			var server io.ReadWriteCloser
			if i%2 == 0 {
				up, server = tcpPair(t)
			} else {
				up, server = streamPair(t)
			}
			done := make(chan Result, 1)
			f := r.Start(down, up, nil, nil, nil, func(res Result) { done <- res })
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer client.Close()
				defer server.Close()
				// Small writes both ways keep both directions bursting and parking.
				for _, c := range []io.ReadWriter{client, server} {
					go func() {
						buf := make([]byte, 512)
						for {
							if _, err := c.Write(buf); err != nil {
								return
							}
							if _, err := c.Read(buf); err != nil {
								return
							}
						}
					}()
				}
				time.Sleep(time.Duration(i%8) * time.Millisecond)
				if i%4 == 3 {
					client.SetLinger(0)
					client.Close() // a reset: the relay aborts itself
				} else {
					f.Abort()
				}
				select {
				case <-done:
				case <-time.After(5 * time.Second):
					t.Errorf("flow %d did not finish after its abort", i)
				}
			}()
		}
		wg.Wait()
		waitFor(t, "no direction running", func() bool { return r.Running() == 0 })
		if r.loop != nil {
			if w := r.loop.Watches(); w != 0 {
				t.Errorf("%d sockets still watched after every flow finished", w)
			}
		}
		if b := r.BuffersInUse(); b != 0 {
			t.Errorf("%d buffers held after every flow finished", b)
		}
	})
}
