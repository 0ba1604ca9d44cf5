package node

import (
	"context"
	"io"
	"net"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// flakyListener fails its first Accept calls as a process out of file descriptors does.
type flakyListener struct {
	net.Listener
	fails atomic.Int32
}

func (l *flakyListener) Accept() (net.Conn, error) {
	if l.fails.Add(-1) >= 0 {
		return nil, &net.OpError{Op: "accept", Net: "tcp", Addr: l.Addr(), Err: syscall.EMFILE}
	}
	return l.Listener.Accept()
}

// An accept error that passes (EMFILE) does not end an accept loop: the listener, which the
// kernel keeps filling (the SOCKS5 entry here, a pod's captured ports alike), is served again
// once accepting works.
func TestAcceptSurvivesPassingErrors(t *testing.T) {
	n, err := New(Config{Name: "n", DefaultConfig: []byte("workloads: []\n")})
	if err != nil {
		t.Fatal(err)
	}
	if err := n.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	defer n.Stop(context.Background())
	tl, err := net.ListenTCP("tcp", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	ln := &flakyListener{Listener: tl}
	ln.fails.Store(3)
	n.mu.Lock()
	n.socksLn = ln // Stop closes it
	n.mu.Unlock()
	n.wg.Add(1)
	go n.acceptSOCKS(ln)

	c, err := net.DialTimeout("tcp", tl.Addr().String(), 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	// The SOCKS5 greeting (no authentication) gets its answer: the connection became a flow.
	if _, err := c.Write([]byte{5, 1, 0}); err != nil {
		t.Fatal(err)
	}
	var reply [2]byte
	if _, err := io.ReadFull(c, reply[:]); err != nil {
		t.Fatalf("no SOCKS5 method reply after %d failed accepts: %v", 3, err)
	}
	if reply != [2]byte{5, 0} {
		t.Fatalf("method reply % x, want 05 00", reply)
	}
	if left := ln.fails.Load(); left >= 0 {
		t.Fatalf("%d accept errors not consumed", left+1)
	}
}
