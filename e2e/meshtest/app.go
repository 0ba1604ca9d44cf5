package meshtest

import (
	"io"
	"net"
	"net/netip"
	"sync"
	"testing"
)

// App is a TCP server standing in for a workload's application. It records the address of
// every client it accepts; Echo and Sink also count the bytes they read.
type App struct {
	ln net.Listener
	wg sync.WaitGroup

	mu       sync.Mutex
	closed   bool
	conns    map[*net.TCPConn]struct{}
	peers    []netip.AddrPort
	received int64
}

// Handler serves one connection of a; the App closes c when it returns.
type Handler func(a *App, c *net.TCPConn)

// StartApp listens on addr and serves every connection with h in its own goroutine. The
// test's cleanup closes the listener and every connection still open (a failed test may leave
// clients behind) and waits for the handlers to return.
func StartApp(t testing.TB, addr string, h Handler) *App {
	t.Helper()
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	a := &App{ln: ln, conns: map[*net.TCPConn]struct{}{}}
	a.wg.Add(1)
	go func() {
		defer a.wg.Done()
		for {
			nc, err := ln.Accept()
			if err != nil {
				return
			}
			c := nc.(*net.TCPConn)
			if !a.track(c) {
				c.Close()
				return
			}
			a.wg.Add(1)
			go func() {
				defer a.wg.Done()
				defer a.untrack(c)
				h(a, c)
			}()
		}
	}()
	t.Cleanup(a.close)
	return a
}

// track records a new connection, unless the app is closed already.
func (a *App) track(c *net.TCPConn) bool {
	ap := c.RemoteAddr().(*net.TCPAddr).AddrPort()
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.closed {
		return false
	}
	a.peers = append(a.peers, netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port()))
	a.conns[c] = struct{}{}
	return true
}

func (a *App) untrack(c *net.TCPConn) {
	c.Close()
	a.mu.Lock()
	delete(a.conns, c)
	a.mu.Unlock()
}

func (a *App) close() {
	a.ln.Close()
	a.mu.Lock()
	a.closed = true
	for c := range a.conns {
		c.Close()
	}
	a.mu.Unlock()
	a.wg.Wait()
}

// Peers returns the client address of every connection accepted so far, in order.
func (a *App) Peers() []netip.AddrPort {
	a.mu.Lock()
	defer a.mu.Unlock()
	return append([]netip.AddrPort(nil), a.peers...)
}

// Received returns how many bytes Echo and Sink have read so far.
func (a *App) Received() int64 {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.received
}

func (a *App) count(n int64) {
	a.mu.Lock()
	a.received += n
	a.mu.Unlock()
}

// Echo writes back everything it reads and ends its side at EOF.
func Echo(a *App, c *net.TCPConn) {
	n, _ := io.Copy(c, c)
	a.count(n)
	c.CloseWrite()
	n, _ = io.Copy(io.Discard, c)
	a.count(n)
}

// Sink reads everything and discards it.
func Sink(a *App, c *net.TCPConn) {
	n, _ := io.Copy(io.Discard, c)
	a.count(n)
}
