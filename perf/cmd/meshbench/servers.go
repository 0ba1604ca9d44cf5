//go:build linux

package main

import (
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"time"
)

// serverConnLimit bounds every connection a bench server serves.
const serverConnLimit = 2 * time.Minute

// chunk is the write size of the throughput workloads.
const chunk = 256 << 10

// server is one of the bench's in-process TCP servers on serverIP.
type server struct {
	name     string
	ln       net.Listener
	bytes    atomic.Int64 // bytes received (sink) or sent (source)
	active   atomic.Int64 // connections open
	accepted atomic.Int64
	errs     atomic.Int64 // connections that ended with an unexpected error
	lastErr  atomic.Value // string
	wg       sync.WaitGroup
	serve    func(s *server, c *net.TCPConn)
}

func startServer(name string, port int, serve func(s *server, c *net.TCPConn)) (*server, error) {
	ln, err := net.Listen("tcp", hostPort(serverIP, port))
	if err != nil {
		return nil, fmt.Errorf("%s server: %w", name, err)
	}
	s := &server{name: name, ln: ln, serve: serve}
	s.wg.Add(1)
	go s.accept()
	return s, nil
}

func (s *server) accept() {
	defer s.wg.Done()
	for {
		c, err := s.ln.Accept()
		if err != nil {
			return
		}
		s.accepted.Add(1)
		s.active.Add(1)
		c.SetDeadline(time.Now().Add(serverConnLimit))
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			defer s.active.Add(-1)
			defer c.Close()
			s.serve(s, c.(*net.TCPConn))
		}()
	}
}

func (s *server) fail(err error) {
	s.errs.Add(1)
	s.lastErr.Store(err.Error())
}

// waitIdle waits until no connection is open, for at most timeout.
func (s *server) waitIdle(timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for s.active.Load() != 0 {
		if time.Now().After(deadline) {
			return fmt.Errorf("%s server: %d connections still open %s after the clients closed", s.name, s.active.Load(), timeout)
		}
		time.Sleep(2 * time.Millisecond)
	}
	return nil
}

func (s *server) close() {
	s.ln.Close()
	s.wg.Wait()
}

// serveSink reads and discards until EOF, counting bytes.
func serveSink(s *server, c *net.TCPConn) {
	buf := make([]byte, chunk)
	for {
		n, err := c.Read(buf)
		s.bytes.Add(int64(n))
		if err != nil {
			if !errors.Is(err, io.EOF) {
				s.fail(err)
			}
			return
		}
	}
}

// serveSource writes chunks until the client half-closes (or sends anything), then closes.
func serveSource(s *server, c *net.TCPConn) {
	var stop atomic.Bool
	go func() {
		var b [1]byte
		c.Read(b[:]) // EOF, a byte or an error: stop writing
		stop.Store(true)
	}()
	buf := make([]byte, chunk)
	for !stop.Load() {
		n, err := c.Write(buf)
		s.bytes.Add(int64(n))
		if err != nil {
			if !stop.Load() {
				s.fail(err)
			}
			return
		}
	}
}

// serveEcho writes back every byte it reads until EOF.
func serveEcho(s *server, c *net.TCPConn) {
	buf := make([]byte, 64<<10)
	for {
		n, err := c.Read(buf)
		if n > 0 {
			if _, werr := c.Write(buf[:n]); werr != nil {
				s.fail(werr)
				return
			}
		}
		if err != nil {
			if !errors.Is(err, io.EOF) {
				s.fail(err)
			}
			return
		}
	}
}

// serveFirstByte writes one byte and closes.
func serveFirstByte(s *server, c *net.TCPConn) {
	if _, err := c.Write([]byte{'!'}); err != nil {
		s.fail(err)
	}
}

// servers are the bench's four servers.
type servers struct {
	sink, source, echo, first *server
}

func startServers() (*servers, error) {
	var ss servers
	var err error
	if ss.sink, err = startServer("sink", sinkPort, serveSink); err != nil {
		return nil, err
	}
	if ss.source, err = startServer("source", sourcePort, serveSource); err != nil {
		ss.close()
		return nil, err
	}
	if ss.echo, err = startServer("echo", echoPort, serveEcho); err != nil {
		ss.close()
		return nil, err
	}
	if ss.first, err = startServer("first-byte", firstPort, serveFirstByte); err != nil {
		ss.close()
		return nil, err
	}
	return &ss, nil
}

func (ss *servers) all() []*server {
	var out []*server
	for _, s := range []*server{ss.sink, ss.source, ss.echo, ss.first} {
		if s != nil {
			out = append(out, s)
		}
	}
	return out
}

// errors reports the servers' connection errors so far.
func (ss *servers) errors() []string {
	var out []string
	for _, s := range ss.all() {
		if n := s.errs.Load(); n > 0 {
			last, _ := s.lastErr.Load().(string)
			out = append(out, fmt.Sprintf("%s server: %d connections ended with an error (last: %s)", s.name, n, last))
		}
	}
	return out
}

func (ss *servers) close() {
	for _, s := range ss.all() {
		s.close()
	}
}
