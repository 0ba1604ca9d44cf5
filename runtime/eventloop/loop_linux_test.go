package eventloop

import (
	"net"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

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
	if b == nil {
		t.Fatal("accept failed")
	}
	t.Cleanup(func() { a.Close(); b.Close() })
	return a.(*net.TCPConn), b.(*net.TCPConn)
}

func startLoop(t *testing.T, reg prometheus.Registerer) *Loop {
	t.Helper()
	l, err := New(nil, reg)
	if err != nil {
		t.Fatal(err)
	}
	l.Start()
	t.Cleanup(l.Stop)
	return l
}

// reports counts a Watch's calls and lets a test wait for the next one.
type reports struct {
	n  atomic.Int32
	ch chan struct{}
}

func newReports() *reports { return &reports{ch: make(chan struct{}, 64)} }

func (r *reports) fn() { r.n.Add(1); r.ch <- struct{}{} }

func (r *reports) expect(t *testing.T, what string) {
	t.Helper()
	select {
	case <-r.ch:
	case <-time.After(5 * time.Second):
		t.Fatalf("no report: %s", what)
	}
}

func (r *reports) expectNone(t *testing.T, what string) {
	t.Helper()
	select {
	case <-r.ch:
		t.Fatalf("unexpected report: %s", what)
	case <-time.After(100 * time.Millisecond):
	}
}

// TestOneShot: a report per Arm, none while disarmed even as more bytes arrive, an immediate
// one when re-armed on a socket that is still readable, and one for FIN.
func TestOneShot(t *testing.T) {
	l := startLoop(t, nil)
	a, b := tcpPair(t)
	r := newReports()
	w, err := l.Watch(b, r.fn)
	if err != nil {
		t.Fatal(err)
	}
	r.expectNone(t, "registered but never armed")
	if err := w.Arm(); err != nil {
		t.Fatal(err)
	}
	r.expectNone(t, "armed, idle socket")
	a.Write([]byte("x"))
	r.expect(t, "bytes arrived")
	a.Write([]byte("y"))
	r.expectNone(t, "disarmed after a report, more bytes")
	// Nothing was read: re-arming reports at once.
	if err := w.Arm(); err != nil {
		t.Fatal(err)
	}
	r.expect(t, "re-armed while readable")
	buf := make([]byte, 8)
	if n, _ := b.Read(buf); n != 2 {
		t.Fatalf("read %d bytes, want 2", n)
	}
	if err := w.Arm(); err != nil {
		t.Fatal(err)
	}
	r.expectNone(t, "drained and re-armed")
	a.CloseWrite()
	r.expect(t, "FIN")
	if got := r.n.Load(); got != 3 {
		t.Fatalf("%d reports, want 3", got)
	}
}

// TestCloseAndClosedConn: a closed Watch reports nothing and refuses Arm; Arm on a closed
// connection fails instead of touching a descriptor number the kernel may have reused.
func TestCloseAndClosedConn(t *testing.T) {
	reg := prometheus.NewPedanticRegistry()
	l := startLoop(t, reg)
	a, b := tcpPair(t)
	r := newReports()
	w, err := l.Watch(b, r.fn)
	if err != nil {
		t.Fatal(err)
	}
	if err := w.Arm(); err != nil {
		t.Fatal(err)
	}
	if got := testutil.ToFloat64(l.m.watches); got != 1 {
		t.Fatalf("watches gauge %v, want 1", got)
	}
	w.Close()
	w.Close()
	a.Write([]byte("x"))
	r.expectNone(t, "closed watch")
	if err := w.Arm(); err == nil {
		t.Fatal("Arm after Close succeeded")
	}
	if got := testutil.ToFloat64(l.m.watches); got != 0 {
		t.Fatalf("watches gauge %v after Close, want 0", got)
	}

	c, d := tcpPair(t)
	w2, err := l.Watch(d, r.fn)
	if err != nil {
		t.Fatal(err)
	}
	d.Close()
	if err := w2.Arm(); err == nil {
		t.Fatal("Arm on a closed connection succeeded")
	}
	w2.Close()
	c.Close()
	if problems, err := testutil.GatherAndLint(reg); err != nil || len(problems) > 0 {
		t.Fatalf("lint: %v %v", problems, err)
	}
}

// TestManyWatches: every one of many armed sockets is reported exactly once, more than one
// epoll_wait batch's worth.
func TestManyWatches(t *testing.T) {
	l := startLoop(t, nil)
	const n = 3 * maxEvents / 2
	var got [n]atomic.Int32
	done := make(chan int, n)
	ins := make([]*net.TCPConn, n)
	for i := range n {
		a, b := tcpPair(t)
		ins[i] = a
		w, err := l.Watch(b, func() { got[i].Add(1); done <- i })
		if err != nil {
			t.Fatal(err)
		}
		if err := w.Arm(); err != nil {
			t.Fatal(err)
		}
	}
	for _, a := range ins {
		a.Write([]byte("x"))
	}
	deadline := time.After(10 * time.Second)
	for range n {
		select {
		case <-done:
		case <-deadline:
			t.Fatal("not every socket was reported")
		}
	}
	time.Sleep(50 * time.Millisecond)
	for i := range got {
		if c := got[i].Load(); c != 1 {
			t.Fatalf("socket %d reported %d times", i, c)
		}
	}
}

// TestStop: Stop returns with the loop gone, twice is fine, and a never-started loop stops.
func TestStop(t *testing.T) {
	l, err := New(nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	l.Start()
	l.Stop()
	l.Stop()
	select {
	case <-l.done:
	default:
		t.Fatal("loop goroutine still running after Stop")
	}
	l2, err := New(nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	l2.Stop()
	l2.Start() // after Stop: nothing runs
	if l2.started.Load() {
		t.Fatal("Start after Stop started the loop")
	}
}
