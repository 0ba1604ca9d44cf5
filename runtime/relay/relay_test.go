package relay

import (
	"bytes"
	"context"
	"crypto/sha256"
	"io"
	"net"
	"sync/atomic"
	"testing"
	"time"

	"github.com/ztgo/ztgo/stages/hbone"
)

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
	client, down := tcpPair(t)
	up, server := tcpPair(t)
	r := New(0)
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
}

func TestAbortOnReset(t *testing.T) {
	client, down := tcpPair(t)
	up, server := tcpPair(t)
	r := New(0)
	done := make(chan Result, 1)
	go func() { done <- r.Run(down, up, nil, nil, nil) }()
	// An abortive close of the server (RST) must tear down the client side too.
	server.SetLinger(0)
	server.Close()
	buf := make([]byte, 1)
	client.Read(buf)
	<-done
	client.Close()
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
	app, down := tcpPair(t)
	up, peer := streamPair(t)
	r := New(0)
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
}

// TestFirstRecv: the first-bytes hook fires once when the peer's bytes come back through an
// HBONE stream, and never on a TCP-to-TCP splice, which is not observed byte by byte.
func TestFirstRecv(t *testing.T) {
	app, down := tcpPair(t)
	up, peer := streamPair(t)
	r := New(0)
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
}
