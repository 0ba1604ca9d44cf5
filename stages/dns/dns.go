// Package dns is ztgo's DNS proxy, as ztunnel's (src/dns): a DNS server over UDP and TCP
// that answers A and AAAA queries for mesh service hostnames from the current snapshot and
// forwards everything else to the node's resolvers.
//
// The client is identified by its source address (a workload on the node's network); its
// namespace drives Kubernetes search expansion ("svc" -> svc.<ns>.svc.<domain>, "svc.ns" ->
// svc.ns.svc.<domain>, ...), and names that carry one of the client's search suffixes
// (<ns>.svc.<domain>, svc.<domain>, <domain>) are also tried with it stripped. A matched
// service answers with its VIPs on the client's network (A for IPv4, AAAA for IPv6; a
// headless service with one address per endpoint), TTL 30 s, shuffled; a known name with
// no record of the asked type gets an empty NOERROR. Other types and unknown names are
// forwarded over the request's protocol to the upstream resolvers (the "nameserver" lines
// of /etc/resolv.conf by default), SERVFAIL if none answers. A client that is not a known
// workload gets SERVFAIL, as in ztunnel.
//
// Metrics are ztunnel's (src/dns/metrics.rs): istio_dns_requests_total,
// istio_dns_upstream_requests_total, istio_dns_upstream_failures_total and
// istio_dns_upstream_request_duration_seconds, labelled request_query_type ("a", "aaaa",
// ...), request_protocol ("udp", "tcp"), source_canonical_service and
// source_canonical_revision ("unknown" when unset).
package dns

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/net/dns/dnsmessage"

	"github.com/ztgo/ztgo/control/snapshot"
)

// Defaults.
const (
	TTL                    = 30 // seconds, ztunnel's DEFAULT_TTL_SECONDS
	DefaultDomain          = "cluster.local"
	DefaultResolvConf      = "/etc/resolv.conf"
	DefaultUpstreamTimeout = 5 * time.Second
	DefaultWorkers         = 64
	// TCPRequestTimeout bounds reading one TCP request (ztunnel: 5 s); an idle TCP
	// connection is closed after it.
	TCPRequestTimeout = 5 * time.Second
	maxUDPResponse    = 512
)

// Config configures a Server.
type Config struct {
	// Addr is where to listen, UDP and TCP on the same port (with port 0 the UDP socket takes
	// the port TCP got).
	Addr string
	// Snapshot returns the current mesh; it is called once per query.
	Snapshot func() *snapshot.Snapshot
	// Network is the node's network: clients are looked up on it.
	Network string
	// Domain is the cluster domain (cluster.local).
	Domain string
	// Upstreams are the resolvers to forward to, "host:port" or "host" (port 53); nil reads
	// the nameserver lines of ResolvConf.
	Upstreams  []string
	ResolvConf string
	// UpstreamTimeout bounds one exchange with one upstream.
	UpstreamTimeout time.Duration
	// Workers bounds the TCP connections served and the UDP queries handled at once; UDP
	// queries beyond it are dropped (the client retries).
	Workers    int
	Logger     *slog.Logger
	Registerer prometheus.Registerer
}

// Server is a DNS proxy.
type Server struct {
	cfg       Config
	log       *slog.Logger
	upstreams []string
	m         *metrics

	sem chan struct{}

	mu    sync.Mutex
	tcp   net.Listener
	udp   *net.UDPConn
	conns map[net.Conn]struct{}
	// served are the listeners handed to Serve, closed by Stop too.
	served map[io.Closer]struct{}
	done   bool
	wg     sync.WaitGroup
}

type metrics struct {
	requests, upstream, failures *prometheus.CounterVec
	duration                     *prometheus.HistogramVec
}

var labelNames = []string{"request_query_type", "request_protocol", "source_canonical_service", "source_canonical_revision"}

// Buckets of istio_dns_upstream_request_duration_seconds. ztunnel declares
// [0.005, 0.001, 0.01, 0.1, 1, 5] (metrics.rs; not ascending, which the Go client rejects):
// the same bucket bounds, sorted.
var Buckets = []float64{0.001, 0.005, 0.01, 0.1, 1, 5}

func newMetrics(reg prometheus.Registerer) (*metrics, error) {
	m := &metrics{
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "istio_dns_requests_total", Help: "Total number of DNS requests (unstable)",
		}, labelNames),
		upstream: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "istio_dns_upstream_requests_total", Help: "Total number of DNS requests forwarded to upstream (unstable)",
		}, labelNames),
		failures: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "istio_dns_upstream_failures_total", Help: "Total number of DNS requests that failed to forward upstream (unstable)",
		}, labelNames),
		duration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "istio_dns_upstream_request_duration_seconds",
			Help:    "Total time in seconds Istio takes to get DNS response from upstream (unstable)",
			Buckets: Buckets,
		}, labelNames),
	}
	if reg != nil {
		for _, c := range []prometheus.Collector{m.requests, m.upstream, m.failures, m.duration} {
			if err := reg.Register(c); err != nil {
				return nil, fmt.Errorf("dns metrics: %w", err)
			}
		}
	}
	return m, nil
}

// New validates cfg; nothing listens until Start.
func New(cfg Config) (*Server, error) {
	if cfg.Snapshot == nil {
		return nil, errors.New("dns: no snapshot source")
	}
	if cfg.Domain == "" {
		cfg.Domain = DefaultDomain
	}
	cfg.Domain = strings.ToLower(strings.Trim(cfg.Domain, "."))
	if cfg.ResolvConf == "" {
		cfg.ResolvConf = DefaultResolvConf
	}
	if cfg.UpstreamTimeout <= 0 {
		cfg.UpstreamTimeout = DefaultUpstreamTimeout
	}
	if cfg.Workers <= 0 {
		cfg.Workers = DefaultWorkers
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	s := &Server{cfg: cfg, log: cfg.Logger, sem: make(chan struct{}, cfg.Workers), conns: map[net.Conn]struct{}{}, served: map[io.Closer]struct{}{}}
	ups := cfg.Upstreams
	if ups == nil {
		var err error
		if ups, err = ReadResolvConf(cfg.ResolvConf); err != nil {
			s.log.Warn("dns: no upstream resolvers; forwarded queries will fail", "error", err)
		}
	}
	for _, u := range ups {
		s.upstreams = append(s.upstreams, withPort(u))
	}
	var err error
	if s.m, err = newMetrics(cfg.Registerer); err != nil {
		return nil, err
	}
	return s, nil
}

func withPort(u string) string {
	if _, _, err := net.SplitHostPort(u); err == nil {
		return u
	}
	return net.JoinHostPort(strings.Trim(u, "[]"), "53")
}

// ReadResolvConf returns the nameserver addresses ("ip:53") of a resolv.conf file.
func ReadResolvConf(path string) ([]string, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var out []string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) < 2 || fields[0] != "nameserver" {
			continue
		}
		// A zone (fe80::1%eth0) is kept: net dials it.
		host := fields[1]
		if _, err := netip.ParseAddr(strings.SplitN(host, "%", 2)[0]); err != nil {
			continue
		}
		out = append(out, net.JoinHostPort(host, "53"))
	}
	if err := sc.Err(); err != nil {
		return nil, err
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("%s: no nameserver", path)
	}
	return out, nil
}

// Start listens on Addr (TCP and UDP) and serves until Stop.
func (s *Server) Start() error {
	if s.cfg.Addr == "" {
		return errors.New("dns: no listen address")
	}
	tcp, err := net.Listen("tcp", s.cfg.Addr)
	if err != nil {
		return fmt.Errorf("dns: listen tcp %s: %w", s.cfg.Addr, err)
	}
	udpAddr, err := net.ResolveUDPAddr("udp", tcp.Addr().String())
	if err != nil {
		tcp.Close()
		return err
	}
	udp, err := net.ListenUDP("udp", udpAddr)
	if err != nil {
		tcp.Close()
		return fmt.Errorf("dns: listen udp %s: %w", udpAddr, err)
	}
	s.mu.Lock()
	if s.done {
		s.mu.Unlock()
		tcp.Close()
		udp.Close()
		return errors.New("dns: server stopped")
	}
	s.tcp, s.udp = tcp, udp
	s.wg.Add(2)
	s.mu.Unlock()
	go s.serveTCP(tcp, nil, nil)
	go s.serveUDP(udp, nil, nil)
	s.log.Info("dns proxy listening", "addr", tcp.Addr().String(), "upstreams", s.upstreams)
	return nil
}

// Addr is the bound address (UDP and TCP share it), or "" before Start.
func (s *Server) Addr() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.tcp == nil {
		return ""
	}
	return s.tcp.Addr().String()
}

// Stop closes the listeners and the TCP connections and waits for every handler.
func (s *Server) Stop() {
	s.mu.Lock()
	s.done = true
	if s.tcp != nil {
		s.tcp.Close()
	}
	if s.udp != nil {
		s.udp.Close()
	}
	for c := range s.conns {
		c.Close()
	}
	for c := range s.served {
		c.Close()
	}
	s.mu.Unlock()
	s.wg.Wait()
}

// DialFunc opens a connection for a forwarded query, with net.Dialer.DialContext's signature.
type DialFunc func(ctx context.Context, network, address string) (net.Conn, error)

// Serve answers queries on listeners opened elsewhere (inside a pod's network namespace) until
// the returned stop is called or the server stops. A non-nil client names, per query, the
// address the query is answered for whatever its source address (the pod's own workload, as
// ztunnel's per-pod DNS servers know theirs; an invalid address is an unknown client and
// gets SERVFAIL); with nil the source address names the client. stop closes the listeners
// and waits for their loops; queries in flight finish on their own.
//
// A non-nil dial opens the sockets of forwarded queries (inside the pod's namespace, as
// ztunnel forwards a pod's queries from the pod); nil dials from ztgo's own namespace.
func (s *Server) Serve(tcp []*net.TCPListener, udp []*net.UDPConn, client func() netip.Addr, dial DialFunc) (stop func(), err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.done {
		return nil, errors.New("dns: server stopped")
	}
	var loops sync.WaitGroup
	for _, ln := range tcp {
		s.served[ln] = struct{}{}
		s.wg.Add(1)
		loops.Add(1)
		go func() { defer loops.Done(); s.serveTCP(ln, client, dial) }()
	}
	for _, pc := range udp {
		s.served[pc] = struct{}{}
		s.wg.Add(1)
		loops.Add(1)
		go func() { defer loops.Done(); s.serveUDP(pc, client, dial) }()
	}
	var once sync.Once
	return func() {
		once.Do(func() {
			s.mu.Lock()
			for _, ln := range tcp {
				ln.Close()
				delete(s.served, ln)
			}
			for _, pc := range udp {
				pc.Close()
				delete(s.served, pc)
			}
			s.mu.Unlock()
			loops.Wait()
		})
	}, nil
}

func (s *Server) serveUDP(pc *net.UDPConn, client func() netip.Addr, dial DialFunc) {
	defer s.wg.Done()
	buf := make([]byte, 65535)
	for {
		n, src, err := pc.ReadFromUDPAddrPort(buf)
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			continue
		}
		select {
		case s.sem <- struct{}{}:
		default:
			continue // overloaded: drop, the client retries
		}
		req := append([]byte(nil), buf[:n]...)
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			defer func() { <-s.sem }()
			from := src.Addr().Unmap()
			if client != nil {
				from = client()
			}
			if resp := s.handle(req, from, "udp", dial); resp != nil {
				pc.WriteToUDPAddrPort(resp, src)
			}
		}()
	}
}

func (s *Server) serveTCP(ln net.Listener, client func() netip.Addr, dial DialFunc) {
	defer s.wg.Done()
	for {
		c, err := ln.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				continue
			}
			time.Sleep(10 * time.Millisecond)
			continue
		}
		s.sem <- struct{}{} // bounded: at most Workers connections are served
		s.mu.Lock()
		if s.done {
			s.mu.Unlock()
			<-s.sem
			c.Close()
			return
		}
		s.conns[c] = struct{}{}
		s.wg.Add(1)
		s.mu.Unlock()
		go func() {
			defer s.wg.Done()
			defer func() { <-s.sem }()
			s.serveConn(c, client, dial)
			s.mu.Lock()
			delete(s.conns, c)
			s.mu.Unlock()
			c.Close()
		}()
	}
}

// serveConn answers length-framed requests on c one after the other until the client
// closes, a read takes longer than TCPRequestTimeout, or a frame is malformed.
func (s *Server) serveConn(c net.Conn, client func() netip.Addr, dial DialFunc) {
	var src netip.Addr
	if client != nil {
		src = client()
	} else if ta, ok := c.RemoteAddr().(*net.TCPAddr); ok {
		src = ta.AddrPort().Addr().Unmap()
	}
	var lenBuf [2]byte
	for {
		c.SetReadDeadline(time.Now().Add(TCPRequestTimeout))
		if _, err := io.ReadFull(c, lenBuf[:]); err != nil {
			return
		}
		req := make([]byte, binary.BigEndian.Uint16(lenBuf[:]))
		if _, err := io.ReadFull(c, req); err != nil {
			return
		}
		resp := s.handle(req, src, "tcp", dial)
		if resp == nil {
			return
		}
		c.SetWriteDeadline(time.Now().Add(TCPRequestTimeout))
		if _, err := c.Write(binary.BigEndian.AppendUint16(make([]byte, 0, 2+len(resp)), uint16(len(resp)))); err != nil {
			return
		}
		if _, err := c.Write(resp); err != nil {
			return
		}
	}
}

// handle answers one request from src over proto ("udp" or "tcp"), forwarding through dial
// (nil: from ztgo's own namespace); nil means no answer (the message is not a parsable query).
func (s *Server) handle(req []byte, src netip.Addr, proto string, dial DialFunc) []byte {
	var p dnsmessage.Parser
	h, err := p.Start(req)
	if err != nil || h.Response {
		return nil
	}
	q, err := p.Question()
	if err != nil {
		return reply(h, nil, dnsmessage.RCodeFormatError, nil, nil)
	}
	if h.OpCode != 0 {
		return reply(h, &q, dnsmessage.RCodeNotImplemented, nil, nil)
	}
	snap := s.cfg.Snapshot()
	var client *snapshot.Workload
	if snap != nil {
		client = snap.WorkloadByAddr(s.cfg.Network, src.Unmap())
	}
	labels := prometheus.Labels{
		"request_query_type": queryType(q.Type), "request_protocol": proto,
		"source_canonical_service": "unknown", "source_canonical_revision": "unknown",
	}
	if client != nil && client.CanonicalName != "" {
		labels["source_canonical_service"] = client.CanonicalName
	}
	if client != nil && client.CanonicalRevision != "" {
		labels["source_canonical_revision"] = client.CanonicalRevision
	}
	s.m.requests.With(labels).Inc()
	if client == nil {
		s.log.Debug("dns query from unknown client", "src", src.String(), "name", q.Name.String())
		return reply(h, &q, dnsmessage.RCodeServerFailure, nil, nil)
	}
	if q.Class == dnsmessage.ClassINET && (q.Type == dnsmessage.TypeA || q.Type == dnsmessage.TypeAAAA) {
		name := strings.ToLower(strings.TrimSuffix(q.Name.String(), "."))
		if m, ok := findService(snap, name, client.Namespace, s.cfg.Domain); ok {
			return s.answer(h, q, m, addresses(snap, m.svc, client.Network, q.Type == dnsmessage.TypeAAAA), proto)
		}
	}
	s.m.upstream.With(labels).Inc()
	start := time.Now()
	resp, err := s.forward(req, h.ID, proto, dial)
	s.m.duration.With(labels).Observe(time.Since(start).Seconds())
	if err != nil {
		s.m.failures.With(labels).Inc()
		s.log.Debug("dns forward failed", "name", q.Name.String(), "type", q.Type.String(), "error", err)
		return reply(h, &q, dnsmessage.RCodeServerFailure, nil, nil)
	}
	return resp
}

// queryType is hickory's record type name in lower case ("a", "aaaa", "srv"; the number
// for types dnsmessage does not name).
func queryType(t dnsmessage.Type) string {
	return strings.ToLower(strings.TrimPrefix(t.String(), "Type"))
}

// answer builds the authoritative answer for m: a CNAME from the requested name to the
// stripped one when a search domain was stripped (not for wildcard matches), then the
// address records.
func (s *Server) answer(h dnsmessage.Header, q dnsmessage.Question, m match, addrs []netip.Addr, proto string) []byte {
	if len(addrs) == 0 {
		return reply(h, &q, dnsmessage.RCodeSuccess, nil, nil)
	}
	recName := q.Name
	var cname *dnsmessage.Name
	if m.alias.stripped != "" && !strings.HasPrefix(m.name, "*.") {
		if n, err := dnsmessage.NewName(m.alias.stripped + "."); err == nil {
			cname, recName = &n, n
		}
	}
	resp := reply(h, &q, dnsmessage.RCodeSuccess, cname, func(b *dnsmessage.Builder) error {
		hdr := dnsmessage.ResourceHeader{Name: recName, Class: dnsmessage.ClassINET, TTL: TTL}
		for _, a := range addrs {
			var err error
			if a.Is4() {
				err = b.AResource(hdr, dnsmessage.AResource{A: a.As4()})
			} else {
				err = b.AAAAResource(hdr, dnsmessage.AAAAResource{AAAA: a.As16()})
			}
			if err != nil {
				return err
			}
		}
		return nil
	})
	if proto == "udp" && len(resp) > maxUDPResponse {
		h.Truncated = true
		return reply(h, &q, dnsmessage.RCodeSuccess, nil, nil)
	}
	return resp
}

// reply builds a response to h: the question q (if any), an optional CNAME from q's name to
// cname, and the records add writes. It is nil only if building fails.
func reply(h dnsmessage.Header, q *dnsmessage.Question, rc dnsmessage.RCode, cname *dnsmessage.Name, add func(*dnsmessage.Builder) error) []byte {
	rh := dnsmessage.Header{
		ID: h.ID, Response: true, OpCode: h.OpCode, RCode: rc, Truncated: h.Truncated && h.Response,
		RecursionDesired: h.RecursionDesired, RecursionAvailable: true,
		Authoritative: rc == dnsmessage.RCodeSuccess,
	}
	b := dnsmessage.NewBuilder(make([]byte, 0, 512), rh)
	b.EnableCompression()
	if q != nil {
		if b.StartQuestions() != nil || b.Question(*q) != nil {
			return nil
		}
	}
	if cname != nil || add != nil {
		if b.StartAnswers() != nil {
			return nil
		}
		if cname != nil {
			hdr := dnsmessage.ResourceHeader{Name: q.Name, Class: dnsmessage.ClassINET, TTL: TTL}
			if b.CNAMEResource(hdr, dnsmessage.CNAMEResource{CNAME: *cname}) != nil {
				return nil
			}
		}
		if add != nil && add(&b) != nil {
			return nil
		}
	}
	out, err := b.Finish()
	if err != nil {
		return nil
	}
	return out
}

// forward sends req to the upstreams in turn over proto and returns the first response
// that carries id.
func (s *Server) forward(req []byte, id uint16, proto string, dial DialFunc) ([]byte, error) {
	if len(s.upstreams) == 0 {
		return nil, errors.New("no upstream resolvers")
	}
	var errs []error
	for _, u := range s.upstreams {
		resp, err := exchange(u, proto, req, id, s.cfg.UpstreamTimeout, dial)
		if err == nil {
			return resp, nil
		}
		errs = append(errs, fmt.Errorf("%s: %w", u, err))
	}
	return nil, errors.Join(errs...)
}

func exchange(addr, proto string, req []byte, id uint16, timeout time.Duration, dial DialFunc) ([]byte, error) {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	if dial == nil {
		var d net.Dialer
		dial = d.DialContext
	}
	c, err := dial(ctx, proto, addr)
	if err != nil {
		return nil, err
	}
	defer c.Close()
	deadline, _ := ctx.Deadline()
	c.SetDeadline(deadline)
	if proto == "tcp" {
		msg := binary.BigEndian.AppendUint16(make([]byte, 0, 2+len(req)), uint16(len(req)))
		if _, err := c.Write(append(msg, req...)); err != nil {
			return nil, err
		}
		var lenBuf [2]byte
		if _, err := io.ReadFull(c, lenBuf[:]); err != nil {
			return nil, err
		}
		resp := make([]byte, binary.BigEndian.Uint16(lenBuf[:]))
		if _, err := io.ReadFull(c, resp); err != nil {
			return nil, err
		}
		if err := checkResponse(resp, id); err != nil {
			return nil, err
		}
		return resp, nil
	}
	if _, err := c.Write(req); err != nil {
		return nil, err
	}
	buf := make([]byte, 65535)
	for {
		n, err := c.Read(buf)
		if err != nil {
			return nil, err
		}
		if checkResponse(buf[:n], id) == nil {
			return append([]byte(nil), buf[:n]...), nil
		}
		// A stray datagram: keep waiting for ours until the deadline.
	}
}

func checkResponse(resp []byte, id uint16) error {
	var p dnsmessage.Parser
	h, err := p.Start(resp)
	if err != nil {
		return err
	}
	if !h.Response || h.ID != id {
		return errors.New("not a response to the query")
	}
	return nil
}
