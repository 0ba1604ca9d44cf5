//go:build linux

package main

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// serverConnLimit bounds every connection a bench server serves.
const serverConnLimit = 2 * time.Minute

// chunk is the write size of the throughput workloads.
const chunk = 256 << 10

// server is one of the bench's in-process TCP servers, on the same port of one or more
// addresses (serverIP, and passthroughIP for the passthrough path's servers); its counters
// cover all of them.
type server struct {
	name     string
	lns      []net.Listener // one per address
	bytes    atomic.Int64   // bytes received (sink) or sent (source)
	active   atomic.Int64   // connections open
	accepted atomic.Int64
	errs     atomic.Int64 // connections that ended with an unexpected error
	cut      atomic.Int64 // source connections whose last write was abandoned (sourceWith)
	lastErr  atomic.Value // string
	wg       sync.WaitGroup
	serve    func(s *server, c *net.TCPConn)
}

// Addresses a server listens on.
var (
	meshOnly        = []string{serverIP}
	withPassthrough = []string{serverIP, passthroughIP} // the servers of the passthrough path's workloads
)

// startServer listens on port of every address in ips and serves each connection with serve.
func startServer(name string, ips []string, port int, serve func(s *server, c *net.TCPConn)) (*server, error) {
	s := &server{name: name, serve: serve}
	for _, ip := range ips {
		ln, err := net.Listen("tcp", hostPort(ip, port))
		if err != nil {
			s.close()
			return nil, fmt.Errorf("%s server: %w", name, err)
		}
		s.lns = append(s.lns, ln)
	}
	for _, ln := range s.lns {
		s.wg.Add(1)
		go s.accept(ln)
	}
	return s, nil
}

func (s *server) accept(ln net.Listener) {
	defer s.wg.Done()
	for {
		c, err := ln.Accept()
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

// stopListening closes the listeners; connections already accepted go on.
func (s *server) stopListening() {
	for _, ln := range s.lns {
		ln.Close()
	}
}

func (s *server) close() {
	s.stopListening()
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

// sourceStopGrace bounds a source's write in progress once the client has signalled stop. The
// client drains what is on its way, so the write ends at once, unless the path stopped carrying
// the response at the client's FIN: Istio's Go HBONE dialer cannot half-close, so its stream is
// reset, and Istio's server then neither reads nor closes the upstream connection.
const sourceStopGrace = 2 * time.Second

// serveSource writes chunks until the client half-closes (or sends anything), then closes.
func serveSource(s *server, c *net.TCPConn) { sourceWith(s, c, make([]byte, chunk)) }

// sourceWith writes buf until the client half-closes (or sends anything), then closes. A write
// still blocked sourceStopGrace after that is abandoned and counted in s.cut.
func sourceWith(s *server, c *net.TCPConn, buf []byte) {
	var stop atomic.Bool
	go func() {
		var b [1]byte
		c.Read(b[:]) // EOF, a byte or an error: stop writing
		stop.Store(true)
		c.SetWriteDeadline(time.Now().Add(sourceStopGrace))
	}()
	for !stop.Load() {
		n, err := c.Write(buf)
		s.bytes.Add(int64(n))
		if err != nil {
			if !stop.Load() {
				s.fail(err)
			} else if errors.Is(err, os.ErrDeadlineExceeded) {
				s.cut.Add(1)
			}
			return
		}
	}
}

// serveEcho writes back every byte it reads until EOF.
func serveEcho(s *server, c *net.TCPConn) { echoWith(s, c, make([]byte, 64<<10)) }

// idleEchoBuf is the idle echo server's read buffer: small, since it serves thousands of
// connections at once (its memory is not measured, but 10,000 x 64 KiB would be 640 MiB).
const idleEchoBuf = 256

// serveIdleEcho is serveEcho with a small buffer.
func serveIdleEcho(s *server, c *net.TCPConn) { echoWith(s, c, make([]byte, idleEchoBuf)) }

// echoWith writes back every byte it reads, through buf, until EOF.
func echoWith(s *server, c *net.TCPConn, buf []byte) {
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

// servers are the bench's in-process servers.
type servers struct {
	sink, source, echo, first *server
	// slowDirect and slowZtgo are the slow-reader workload's flood servers, one per path.
	slowDirect, slowZtgo *server
}

func startServers() (*servers, error) {
	var ss servers
	var err error
	if ss.sink, err = startServer("sink", withPassthrough, sinkPort, serveSink); err != nil {
		return nil, err
	}
	if ss.source, err = startServer("source", withPassthrough, sourcePort, serveSource); err != nil {
		ss.close()
		return nil, err
	}
	if ss.echo, err = startServer("echo", withPassthrough, echoPort, serveEcho); err != nil {
		ss.close()
		return nil, err
	}
	if ss.first, err = startServer("first-byte", meshOnly, firstPort, serveFirstByte); err != nil {
		ss.close()
		return nil, err
	}
	if ss.slowDirect, err = startServer("flood-direct", meshOnly, slowDirectPort, serveFlood); err != nil {
		ss.close()
		return nil, err
	}
	if ss.slowZtgo, err = startServer("flood-ztgo", meshOnly, slowZtgoPort, serveFlood); err != nil {
		ss.close()
		return nil, err
	}
	return &ss, nil
}

func (ss *servers) all() []*server {
	var out []*server
	for _, s := range []*server{ss.sink, ss.source, ss.echo, ss.first, ss.slowDirect, ss.slowZtgo} {
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

// idleEchoEnv, when set in the environment, makes meshbench the idle echo server process
// (idleEchoMain) instead of the bench. The idle connections' server ends live in a process of
// their own so that each process holds one socket per idle connection: 10,000 connections
// would need 20,000 files in one process, and the hard RLIMIT_NOFILE may be 20,000 and not
// raisable (no CAP_SYS_RESOURCE).
const idleEchoEnv = "MESHBENCH_IDLE_ECHO"

// idleEchoMain serves serveIdleEcho on serverIP:idlePort. It prints "ready" once listening,
// answers every line on stdin with one line of counters (see idleEcho.stat) and exits at EOF
// on stdin.
func idleEchoMain() int {
	s, err := startServer("idle-echo", meshOnly, idlePort, serveIdleEcho)
	if err != nil {
		fmt.Fprintf(os.Stderr, "meshbench idle echo: %v\n", err)
		return 1
	}
	defer s.stopListening()
	fmt.Println("ready")
	sc := bufio.NewScanner(os.Stdin)
	for sc.Scan() {
		open, limit, err := procFiles("self")
		if err != nil {
			open, limit = -1, -1
		}
		last, _ := s.lastErr.Load().(string)
		last = strings.Join(strings.Fields(last), " ")
		fmt.Printf("%d %d %d %d %d\t%s\n", s.active.Load(), s.accepted.Load(), s.errs.Load(), open, limit, last)
	}
	return 0
}

// idleEcho is the idle echo server process, run from this program's own executable.
type idleEcho struct {
	name string
	cmd  *exec.Cmd
	in   *os.File // its stdin
	out  *os.File // its stdout
	rd   *bufio.Reader
	done chan struct{} // closed once it has exited
}

// idleStat is what the idle echo process says about itself.
type idleStat struct {
	active, accepted, errs int64
	files, fileLimit       int // open files and the soft RLIMIT_NOFILE; -1 when unknown
	lastErr                string
}

// startIdleEcho starts the idle echo process and waits until it listens.
func startIdleEcho() (*idleEcho, error) {
	exe, err := os.Executable()
	if err != nil {
		return nil, fmt.Errorf("idle echo: %w", err)
	}
	inR, inW, err := os.Pipe()
	if err != nil {
		return nil, fmt.Errorf("idle echo: %w", err)
	}
	outR, outW, err := os.Pipe()
	if err != nil {
		inR.Close()
		inW.Close()
		return nil, fmt.Errorf("idle echo: %w", err)
	}
	e := &idleEcho{name: "idle-echo", in: inW, out: outR, rd: bufio.NewReader(outR), done: make(chan struct{})}
	e.cmd = exec.Command(exe)
	e.cmd.Env = append(os.Environ(), idleEchoEnv+"=1")
	e.cmd.Stdin, e.cmd.Stdout, e.cmd.Stderr = inR, outW, os.Stderr
	e.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	err = e.cmd.Start()
	inR.Close()
	outW.Close()
	if err != nil {
		inW.Close()
		outR.Close()
		return nil, fmt.Errorf("idle echo: start: %w", err)
	}
	go func() {
		e.cmd.Wait()
		close(e.done)
	}()
	line, err := e.readLine(readyTimeout)
	if err != nil || line != "ready" {
		e.stop()
		return nil, fmt.Errorf("idle echo: not ready (%q, %v)", line, err)
	}
	return e, nil
}

func (e *idleEcho) readLine(timeout time.Duration) (string, error) {
	e.out.SetReadDeadline(time.Now().Add(timeout))
	line, err := e.rd.ReadString('\n')
	return strings.TrimSuffix(line, "\n"), err
}

// stat asks the process for its counters.
func (e *idleEcho) stat() (idleStat, error) {
	var st idleStat
	e.in.SetWriteDeadline(time.Now().Add(5 * time.Second))
	if _, err := e.in.WriteString("stat\n"); err != nil {
		return st, fmt.Errorf("idle echo: %w", err)
	}
	line, err := e.readLine(5 * time.Second)
	if err != nil {
		return st, fmt.Errorf("idle echo: %w", err)
	}
	nums, last, _ := strings.Cut(line, "\t")
	if _, err := fmt.Sscan(nums, &st.active, &st.accepted, &st.errs, &st.files, &st.fileLimit); err != nil {
		return st, fmt.Errorf("idle echo: counters %q: %w", line, err)
	}
	st.lastErr = last
	return st, nil
}

// waitIdle waits until no connection is open, for at most timeout.
func (e *idleEcho) waitIdle(timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		st, err := e.stat()
		if err != nil {
			return err
		}
		if st.active == 0 {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s server: %d connections still open %s after the clients closed", e.name, st.active, timeout)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// errors reports the connections that ended with an unexpected error.
func (e *idleEcho) errors() []string {
	st, err := e.stat()
	if err != nil {
		return []string{err.Error()}
	}
	if st.errs > 0 {
		return []string{fmt.Sprintf("%s server: %d connections ended with an error (last: %s)", e.name, st.errs, st.lastErr)}
	}
	return nil
}

// stop closes its stdin, which ends it, and waits a little; then kills it.
func (e *idleEcho) stop() {
	e.in.Close()
	select {
	case <-e.done:
	case <-time.After(5 * time.Second):
		e.cmd.Process.Kill()
		<-e.done
	}
	e.out.Close()
}
