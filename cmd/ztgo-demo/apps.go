package main

import (
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"time"
)

// appConnTimeout bounds every connection an app serves.
const appConnTimeout = 10 * time.Second

// connRecord is what an app saw of one connection.
type connRecord struct {
	// Peer is the client address as the app saw it.
	Peer string
	// In and Out count bytes received and sent (Out includes the greeting line).
	In, Out int64
	// InSum is the SHA-256 of every byte received.
	InSum [sha256.Size]byte
	Err   error
}

// echoApp is a TCP server standing in for a workload's application: it greets each client with
// the address it sees ("<name> app: you are 127.0.1.10:40312"), then echoes every byte until
// the client half-closes, and records what it saw.
type echoApp struct {
	name     string
	ln       net.Listener
	accepted atomic.Int64
	records  chan connRecord
	wg       sync.WaitGroup

	mu    sync.Mutex
	conns map[net.Conn]struct{}
}

func startEchoApp(name, addr string) (*echoApp, error) {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("app %s: %w", name, err)
	}
	a := &echoApp{name: name, ln: ln, records: make(chan connRecord, 16), conns: map[net.Conn]struct{}{}}
	a.wg.Add(1)
	go a.accept()
	return a, nil
}

func (a *echoApp) accept() {
	defer a.wg.Done()
	for {
		c, err := a.ln.Accept()
		if err != nil {
			return
		}
		a.accepted.Add(1)
		a.mu.Lock()
		a.conns[c] = struct{}{}
		a.mu.Unlock()
		a.wg.Add(1)
		go func() {
			defer a.wg.Done()
			rec := a.serve(c)
			a.mu.Lock()
			delete(a.conns, c)
			a.mu.Unlock()
			select {
			case a.records <- rec:
			default: // nobody is waiting for this many records; drop it
			}
		}()
	}
}

func (a *echoApp) serve(c net.Conn) connRecord {
	defer c.Close()
	c.SetDeadline(time.Now().Add(appConnTimeout))
	rec := connRecord{Peer: c.RemoteAddr().String()}
	n, err := fmt.Fprintf(c, "%s app: you are %s\n", a.name, rec.Peer)
	rec.Out += int64(n)
	if err != nil {
		rec.Err = err
		return rec
	}
	h := sha256.New()
	buf := make([]byte, 64<<10)
	for {
		n, rerr := c.Read(buf)
		if n > 0 {
			h.Write(buf[:n])
			rec.In += int64(n)
			w, werr := c.Write(buf[:n])
			rec.Out += int64(w)
			if werr != nil {
				rec.Err = werr
				break
			}
		}
		if rerr != nil {
			if !errors.Is(rerr, io.EOF) {
				rec.Err = rerr
			}
			break
		}
	}
	h.Sum(rec.InSum[:0])
	if tc, ok := c.(*net.TCPConn); ok {
		tc.CloseWrite()
	}
	return rec
}

// next waits up to timeout for the record of the next finished connection.
func (a *echoApp) next(timeout time.Duration) (connRecord, bool) {
	select {
	case r := <-a.records:
		return r, true
	case <-time.After(timeout):
		return connRecord{}, false
	}
}

// stop closes the listener and every open connection, and waits for the goroutines.
func (a *echoApp) stop() {
	a.ln.Close()
	a.mu.Lock()
	for c := range a.conns {
		c.Close()
	}
	a.mu.Unlock()
	a.wg.Wait()
}
