// Package connpool pools HBONE client connections (mTLS HTTP/2) so that many flows share few
// connections: O(peers), not O(flows).
//
// Connections are keyed as ztunnel keys them: source identity, the expected peer identities,
// the next-hop address and the source IP. For a key, Get reuses a connection with a free stream
// slot; when none has one, exactly one goroutine dials a new connection while the others for
// the same key wait for it. A connection holds at most MaxStreams streams (ztunnel's
// POOL_MAX_STREAMS_PER_CONNECTION, 100, or fewer if the peer says so). Connections idle for
// IdleTimeout (POOL_UNUSED_RELEASE_TIMEOUT, 5 minutes) are closed.
package connpool

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/ztgo/ztgo/stages/hbone"
)

// Key identifies a class of interchangeable connections.
type Key struct {
	// SrcIdentity is the SPIFFE URI the connection presents.
	SrcIdentity string
	// DstSANs is the sorted list of acceptable peer identities, joined by ",".
	DstSANs string
	// Dst is the next hop (a node's HBONE port or a waypoint).
	Dst netip.AddrPort
	// SrcIP is the local address the connection is bound to.
	SrcIP netip.Addr
	// Scope is where the connection's socket lives: "" for the node's own namespace, or the
	// in-pod proxy that dials it from inside a pod's network namespace (ztunnel keeps one
	// pool per pod; a recreated pod with the same IP must not inherit its predecessor's
	// connections).
	Scope string
}

// NewKey builds a Key, normalising the SAN list so the same set always yields the same key.
func NewKey(src string, sans []string, dst netip.AddrPort, srcIP netip.Addr) Key {
	s := slices.Clone(sans)
	slices.Sort(s)
	s = slices.Compact(s)
	return Key{SrcIdentity: src, DstSANs: strings.Join(s, ","), Dst: dst, SrcIP: srcIP}
}

// SANs returns the expected peer identities of the key.
func (k Key) SANs() []string {
	if k.DstSANs == "" {
		return nil
	}
	return strings.Split(k.DstSANs, ",")
}

func (k Key) String() string {
	if k.Scope != "" {
		return fmt.Sprintf("%s -> %s [%s] from %s in %s", k.SrcIdentity, k.Dst, k.DstSANs, k.SrcIP, k.Scope)
	}
	return fmt.Sprintf("%s -> %s [%s] from %s", k.SrcIdentity, k.Dst, k.DstSANs, k.SrcIP)
}

// Dialer opens a new HBONE connection for key: TCP, TLS handshake, HTTP/2 preface. It runs
// on the goroutine that called Get, never on an event loop.
type Dialer func(ctx context.Context, key Key) (*hbone.Conn, error)

// Config configures a Pool.
type Config struct {
	Dial        Dialer
	IdleTimeout time.Duration
	Logger      *slog.Logger
	Registerer  prometheus.Registerer
}

// Pool is a set of HBONE client connections by Key.
type Pool struct {
	dial    Dialer
	idle    time.Duration
	log     *slog.Logger
	metrics *metrics

	mu      sync.Mutex
	entries map[Key]*entry
	closed  bool

	stop chan struct{}
	wg   sync.WaitGroup
}

type entry struct {
	conns   []*hbone.Conn
	dialing *dialCall
}

type dialCall struct {
	done chan struct{}
	err  error
}

// metrics are the pool's series, resolved once: a dial or an eviction never hashes labels.
type metrics struct {
	conns            prometheus.Gauge
	dialOK, dialFail prometheus.Counter
}

// Errors of Get.
var (
	// ErrClosed: Get after Close.
	ErrClosed = errors.New("connpool: pool closed")
	// ErrNoStream: the connections Get dialled had no stream to give.
	ErrNoStream = errors.New("connpool: new connection has no free stream")
)

// maxDialsPerGet bounds how many connections one Get may dial.
const maxDialsPerGet = 2

// New returns a pool; Start begins idle eviction.
func New(cfg Config) (*Pool, error) {
	if cfg.Dial == nil {
		return nil, errors.New("connpool: Dial is required")
	}
	if cfg.IdleTimeout <= 0 {
		cfg.IdleTimeout = 5 * time.Minute
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	conns := prometheus.NewGauge(prometheus.GaugeOpts{
		Name: "ztgo_pool_connections", Help: "Pooled HBONE connections.",
	})
	dials := prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "ztgo_pool_dials_total", Help: "HBONE connections dialled by the pool, by result.",
	}, []string{"result"})
	// Both results exist from the start, so a rate() over errors is 0 rather than absent.
	m := &metrics{conns: conns, dialOK: dials.WithLabelValues("ok"), dialFail: dials.WithLabelValues("error")}
	p := &Pool{
		dial: cfg.Dial, idle: cfg.IdleTimeout, log: cfg.Logger, metrics: m,
		entries: map[Key]*entry{}, stop: make(chan struct{}),
	}
	streams := prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name: "ztgo_pool_streams", Help: "Active HBONE streams (CONNECT tunnels) across the pooled connections.",
	}, func() float64 { return float64(p.Streams()) })
	if cfg.Registerer != nil {
		for _, c := range []prometheus.Collector{conns, dials, streams} {
			if err := cfg.Registerer.Register(c); err != nil {
				return nil, fmt.Errorf("register pool metrics: %w", err)
			}
		}
	}
	return p, nil
}

// Start runs idle eviction until Close.
func (p *Pool) Start() {
	p.wg.Add(1)
	go p.janitor()
}

// Get returns a connection for key with one stream slot reserved for the caller, who must use
// it with OpenReserved or give it back with Unreserve.
func (p *Pool) Get(ctx context.Context, key Key) (*hbone.Conn, error) {
	dials := 0
	for {
		p.mu.Lock()
		if p.closed {
			p.mu.Unlock()
			return nil, ErrClosed
		}
		e := p.entries[key]
		if e == nil {
			e = &entry{}
			p.entries[key] = e
		}
		for _, c := range e.conns {
			if c.TryReserve() {
				p.mu.Unlock()
				return c, nil
			}
		}
		if call := e.dialing; call != nil {
			p.mu.Unlock()
			select {
			case <-call.done:
				if call.err != nil {
					return nil, call.err
				}
				continue
			case <-ctx.Done():
				return nil, ctx.Err()
			}
		}
		if dials == maxDialsPerGet {
			// Every connection this call dialled was full at once (a peer that sends GOAWAY
			// or allows no stream): give up instead of dialling until the context ends.
			p.mu.Unlock()
			return nil, fmt.Errorf("dial %s: %w", key.Dst, ErrNoStream)
		}
		dials++
		call := &dialCall{done: make(chan struct{})}
		e.dialing = call
		p.mu.Unlock()

		c, err := p.dial(ctx, key)

		p.mu.Lock()
		e.dialing = nil
		call.err = err
		if err != nil {
			p.metrics.dialFail.Inc()
			if len(e.conns) == 0 && p.entries[key] == e {
				delete(p.entries, key)
			}
			close(call.done)
			p.mu.Unlock()
			return nil, fmt.Errorf("dial %s: %w", key.Dst, err)
		}
		p.metrics.dialOK.Inc()
		reserved := c.TryReserve()
		if p.closed {
			close(call.done)
			p.mu.Unlock()
			c.Close()
			return nil, ErrClosed
		}
		e.conns = append(e.conns, c)
		p.metrics.conns.Inc()
		close(call.done)
		p.mu.Unlock()
		p.watch(key, c)
		if reserved {
			return c, nil
		}
	}
}

// watch drops c from the pool when it dies.
func (p *Pool) watch(key Key, c *hbone.Conn) {
	p.wg.Add(1)
	go func() {
		defer p.wg.Done()
		select {
		case <-c.Done():
			p.drop(key, c)
		case <-p.stop:
		}
	}()
}

func (p *Pool) drop(key Key, c *hbone.Conn) {
	p.mu.Lock()
	defer p.mu.Unlock()
	e := p.entries[key]
	if e == nil {
		return
	}
	if i := slices.Index(e.conns, c); i >= 0 {
		e.conns = slices.Delete(e.conns, i, i+1)
		p.metrics.conns.Dec()
	}
	if len(e.conns) == 0 && e.dialing == nil {
		delete(p.entries, key)
	}
}

// Evict closes connections idle for longer than the idle timeout and returns how many.
func (p *Pool) Evict(now time.Time) int {
	var victims []*hbone.Conn
	p.mu.Lock()
	for key, e := range p.entries {
		kept := e.conns[:0]
		for _, c := range e.conns {
			since, idle := c.IdleSince()
			if idle && now.Sub(since) >= p.idle {
				victims = append(victims, c)
				p.metrics.conns.Dec()
				continue
			}
			kept = append(kept, c)
		}
		clear(e.conns[len(kept):])
		e.conns = kept
		if len(e.conns) == 0 && e.dialing == nil {
			delete(p.entries, key)
		}
	}
	p.mu.Unlock()
	for _, c := range victims {
		// Closed outside the lock: Close waits for the connection's goroutines.
		c.Close()
	}
	return len(victims)
}

func (p *Pool) janitor() {
	defer p.wg.Done()
	every := min(p.idle/4, 30*time.Second)
	if every <= 0 {
		every = time.Second
	}
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-p.stop:
			return
		case now := <-t.C:
			if n := p.Evict(now); n > 0 {
				p.log.Debug("evicted idle HBONE connections", "count", n)
			}
		}
	}
}

// Stats describes one pooled connection.
type Stats struct {
	Key    Key
	Active int
	Local  string
}

// Snapshot lists the pooled connections.
func (p *Pool) Snapshot() []Stats {
	p.mu.Lock()
	defer p.mu.Unlock()
	var out []Stats
	for k, e := range p.entries {
		for _, c := range e.conns {
			out = append(out, Stats{Key: k, Active: c.Active(), Local: c.LocalAddr().String()})
		}
	}
	slices.SortFunc(out, func(a, b Stats) int { return strings.Compare(a.Key.String(), b.Key.String()) })
	return out
}

// Len is the number of pooled connections.
func (p *Pool) Len() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	n := 0
	for _, e := range p.entries {
		n += len(e.conns)
	}
	return n
}

// Streams is the number of active streams across the pooled connections (reserved slots
// not yet opened are not counted). It is read at scrape time, so the stream path pays nothing.
func (p *Pool) Streams() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	n := 0
	for _, e := range p.entries {
		for _, c := range e.conns {
			n += c.Active()
		}
	}
	return n
}

// CloseWhere closes the pooled connections whose key matches (the connections of a removed
// pod) and returns how many. Their streams are reset; a dial in progress for a matching key
// still completes, and its connection is pooled.
func (p *Pool) CloseWhere(match func(Key) bool) int {
	var victims []*hbone.Conn
	p.mu.Lock()
	for key, e := range p.entries {
		if !match(key) {
			continue
		}
		victims = append(victims, e.conns...)
		p.metrics.conns.Sub(float64(len(e.conns)))
		e.conns = nil
		if e.dialing == nil {
			delete(p.entries, key)
		}
	}
	p.mu.Unlock()
	for _, c := range victims {
		c.Close()
	}
	return len(victims)
}

// Close closes every pooled connection and stops eviction.
func (p *Pool) Close() {
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		return
	}
	p.closed = true
	var all []*hbone.Conn
	for _, e := range p.entries {
		all = append(all, e.conns...)
	}
	p.entries = map[Key]*entry{}
	p.mu.Unlock()
	close(p.stop)
	for _, c := range all {
		c.Close()
	}
	p.wg.Wait()
}
