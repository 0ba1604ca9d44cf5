// Command istiohbone runs one side of a pair built on Istio's Go HBONE package
// (istio.io/istio/pkg/hbone), the peer that shared/spec/performance.md names "Istio's Go HBONE".
// perf/cmd/meshbench starts two of these processes and measures ztgo against the pair; the
// program exists for that benchmark only (nothing under cmd/ztgo imports Istio's hbone package).
//
// Server mode terminates HBONE: mutual TLS (TLS 1.3, it requires a client certificate that
// chains to --ca and presents --cert), HTTP/2 negotiated with ALPN, and Istio's own CONNECT
// handler (hbone.NewServer), which dials each CONNECT's :authority and copies both ways:
//
//	istiohbone --mode server --listen 127.40.4.2:15008 --cert server.pem --key server.key --ca ca.pem
//
// Client mode listens for plain TCP on --listen at each of --ports; every accepted connection
// becomes one HBONE CONNECT to --target-host:<that port> through --server, made with Istio's
// dialer (hbone.NewDialer: one shared HTTP/2 transport, so the streams share one pooled mTLS
// connection, presenting --cert and verifying the server against --ca):
//
//	istiohbone --mode client --listen 127.40.4.1 --ports 17001,17002 --server 127.40.4.2:15008 \
//	    --target-host 127.40.2.10 --cert client.pem --key client.key --ca ca.pem
//
// Istio's dialer hands back one end of a net.Pipe, which has no half-close: when the TCP client
// half-closes, the client closes the pipe, which ends the request body (END_STREAM) and also
// stops the response half; bytes the server still sends after the client's FIN are dropped
// and the client sees EOF. Istio's dialer ignores its context, so each CONNECT is bounded here
// by --dial-timeout. Istio's "hbone" log scope is set to warn, so neither side logs per
// connection.
//
// Both modes run until SIGTERM or SIGINT and then exit 0; a failure to start exits 1. Errors on
// single connections are written to stderr and the connection is closed.
package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"flag"
	"fmt"
	"io"
	"log"
	"net"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"istio.io/istio/pkg/hbone"
	istiolog "istio.io/istio/pkg/log"
)

// copyBuf is the client's copy buffer size in each direction; Istio's own copies use 32 KiB.
const copyBuf = 32 << 10

func main() {
	if err := run(); err != nil {
		fmt.Fprintf(os.Stderr, "istiohbone: %v\n", err)
		os.Exit(1)
	}
}

func run() error {
	var (
		mode        = flag.String("mode", "", "server or client")
		listen      = flag.String("listen", "", "server: host:port of the HBONE listener; client: the host whose --ports it listens on")
		ports       = flag.String("ports", "", "client: comma-separated ports to listen on, each forwarded to --target-host on the same port")
		server      = flag.String("server", "", "client: host:port of the HBONE server")
		targetHost  = flag.String("target-host", "", "client: host each CONNECT asks for, with the accepting port")
		serverName  = flag.String("server-name", "", "client: name to verify in the server's certificate (default: the host of --server)")
		certFile    = flag.String("cert", "", "PEM certificate to present")
		keyFile     = flag.String("key", "", "PEM private key of --cert")
		caFile      = flag.String("ca", "", "PEM CA that the peer's certificate must chain to")
		dialTimeout = flag.Duration("dial-timeout", 10*time.Second, "client: bound of one HBONE CONNECT (Istio's dialer has none of its own over TLS)")
	)
	flag.Parse()
	if flag.NArg() > 0 {
		return fmt.Errorf("unexpected arguments %q", flag.Args())
	}
	if *listen == "" || *certFile == "" || *keyFile == "" || *caFile == "" {
		return errors.New("--listen, --cert, --key and --ca are required")
	}
	cert, err := tls.LoadX509KeyPair(*certFile, *keyFile)
	if err != nil {
		return fmt.Errorf("load certificate %s: %w", *certFile, err)
	}
	caPEM, err := os.ReadFile(*caFile)
	if err != nil {
		return fmt.Errorf("read CA: %w", err)
	}
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(caPEM) {
		return fmt.Errorf("CA %s: no PEM certificate", *caFile)
	}
	// Istio's scope logs every CONNECT at info; the benchmark would measure its logging.
	if s := istiolog.FindScope("hbone"); s != nil {
		s.SetOutputLevel(istiolog.WarnLevel)
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	switch *mode {
	case "server":
		return serve(ctx, *listen, cert, roots)
	case "client":
		if *server == "" || *targetHost == "" || *ports == "" {
			return errors.New("client mode needs --server, --target-host and --ports")
		}
		var ps []int
		for _, f := range strings.Split(*ports, ",") {
			p, err := strconv.Atoi(strings.TrimSpace(f))
			if err != nil || p <= 0 || p > 65535 {
				return fmt.Errorf("--ports: bad port %q", f)
			}
			ps = append(ps, p)
		}
		name := *serverName
		if name == "" {
			h, _, err := net.SplitHostPort(*server)
			if err != nil {
				return fmt.Errorf("--server %q: %w", *server, err)
			}
			name = h
		}
		tcfg := &tls.Config{
			Certificates: []tls.Certificate{cert},
			RootCAs:      roots,
			ServerName:   name,
			MinVersion:   tls.VersionTLS13,
		}
		d := hbone.NewDialer(hbone.Config{ProxyAddress: *server, TLS: tcfg})
		return forward(ctx, *listen, ps, *targetHost, d, *dialTimeout)
	default:
		return fmt.Errorf("--mode %q: want server or client", *mode)
	}
}

// serve runs Istio's HBONE server on addr over mutual TLS until ctx ends.
func serve(ctx context.Context, addr string, cert tls.Certificate, clientRoots *x509.CertPool) error {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return fmt.Errorf("listen %s: %w", addr, err)
	}
	tcfg := &tls.Config{
		Certificates: []tls.Certificate{cert},
		NextProtos:   []string{"h2"},
		ClientAuth:   tls.RequireAndVerifyClientCert,
		ClientCAs:    clientRoots,
		MinVersion:   tls.VersionTLS13,
	}
	// The way Istio's own echo test server serves it: tls.NewListener and http.Server.Serve.
	srv := hbone.NewServer()
	srv.ErrorLog = log.New(os.Stderr, "istiohbone server: ", log.LstdFlags)
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(tls.NewListener(ln, tcfg)) }()
	select {
	case err := <-errc:
		return fmt.Errorf("serve %s: %w", addr, err)
	case <-ctx.Done():
	}
	// Close ends the listener and every connection; Serve then returns ErrServerClosed.
	if err := srv.Close(); err != nil {
		return fmt.Errorf("close server: %w", err)
	}
	select {
	case <-errc:
	case <-time.After(5 * time.Second):
		return errors.New("server did not stop within 5 s of closing")
	}
	return nil
}

// forward listens on host at each port and forwards every accepted connection through d to
// target:port until ctx ends.
func forward(ctx context.Context, host string, ports []int, target string, d hbone.Dialer, dialTimeout time.Duration) error {
	var lns []net.Listener
	defer func() {
		for _, ln := range lns {
			ln.Close()
		}
	}()
	for _, p := range ports {
		ln, err := net.Listen("tcp", net.JoinHostPort(host, strconv.Itoa(p)))
		if err != nil {
			return fmt.Errorf("listen %s port %d: %w", host, p, err)
		}
		lns = append(lns, ln)
	}
	var wg sync.WaitGroup
	errc := make(chan error, len(lns))
	for i, ln := range lns {
		dst := net.JoinHostPort(target, strconv.Itoa(ports[i]))
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				c, err := ln.Accept()
				if err != nil {
					if ctx.Err() == nil {
						errc <- fmt.Errorf("accept on %s: %w", ln.Addr(), err)
					}
					return
				}
				go func() {
					if err := relay(c.(*net.TCPConn), d, dst, dialTimeout); err != nil {
						fmt.Fprintf(os.Stderr, "istiohbone client: %s -> %s: %v\n", c.RemoteAddr(), dst, err)
					}
				}()
			}
		}()
	}
	var err error
	select {
	case <-ctx.Done():
	case err = <-errc:
	}
	for _, ln := range lns {
		ln.Close()
	}
	wg.Wait()
	return err
}

// relay carries c through one HBONE CONNECT to dst and returns once both directions ended.
func relay(c *net.TCPConn, d hbone.Dialer, dst string, dialTimeout time.Duration) error {
	defer c.Close()
	up, err := dialBounded(d, dst, dialTimeout)
	if err != nil {
		return err
	}
	defer up.Close()
	done := make(chan error, 1)
	go func() {
		// client -> server. The pipe has no half-close: closing it is the only way to end the
		// request body, and it ends the response half too.
		_, err := io.CopyBuffer(onlyWriter{up}, onlyReader{c}, make([]byte, copyBuf))
		up.Close()
		if errors.Is(err, io.ErrClosedPipe) {
			err = nil // the response ended first and Istio's dialer closed its end
		}
		if err != nil {
			err = fmt.Errorf("client to server: %w", err)
		}
		done <- err
	}()
	// server -> client: ends when the stream's response ends or the pipe was closed above.
	_, err = io.CopyBuffer(onlyWriter{c}, onlyReader{up}, make([]byte, copyBuf))
	if errors.Is(err, io.ErrClosedPipe) {
		err = nil // closed by the other direction after the client's FIN
	}
	if err != nil {
		err = fmt.Errorf("server to client: %w", err)
	}
	if cerr := c.CloseWrite(); cerr != nil && err == nil && !errors.Is(cerr, net.ErrClosed) {
		err = fmt.Errorf("close write to client: %w", cerr)
	}
	// The client closes or half-closes once it has what it wanted; a client that does neither
	// is cut after dialTimeout.
	c.SetReadDeadline(time.Now().Add(dialTimeout))
	return errors.Join(err, <-done)
}

// dialBounded dials dst through d within timeout. Istio's dialer ignores its context, so a hang
// is turned into an error here and its goroutine closes the late connection, if any.
func dialBounded(d hbone.Dialer, dst string, timeout time.Duration) (net.Conn, error) {
	type result struct {
		c   net.Conn
		err error
	}
	ch := make(chan result) // unbuffered: a late result goes to abandoned instead
	abandoned := make(chan struct{})
	go func() {
		c, err := d.DialContext(context.Background(), "tcp", dst)
		select {
		case ch <- result{c, err}:
		case <-abandoned:
			if c != nil {
				c.Close()
			}
		}
	}()
	t := time.NewTimer(timeout)
	defer t.Stop()
	select {
	case r := <-ch:
		if r.err != nil {
			return nil, fmt.Errorf("hbone CONNECT %s: %w", dst, r.err)
		}
		return r.c, nil
	case <-t.C:
		close(abandoned)
		return nil, fmt.Errorf("hbone CONNECT %s: no answer in %s", dst, timeout)
	}
}

// onlyReader and onlyWriter hide ReadFrom and WriteTo, so io.CopyBuffer uses its buffer rather
// than a TCP connection's splice or sendfile paths (which do not apply to a pipe anyway).
type onlyReader struct{ io.Reader }
type onlyWriter struct{ io.Writer }
