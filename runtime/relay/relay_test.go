package relay

import (
	"bytes"
	"crypto/sha256"
	"io"
	"net"
	"sync/atomic"
	"testing"
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
	go func() { done <- r.Run(down, up, &sent, &recv) }()

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
	go func() { done <- r.Run(down, up, nil, nil) }()
	// An abortive close of the server (RST) must tear down the client side too.
	server.SetLinger(0)
	server.Close()
	buf := make([]byte, 1)
	client.Read(buf)
	<-done
	client.Close()
}
