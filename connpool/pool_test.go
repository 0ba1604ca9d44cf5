package connpool

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/ztgo/ztgo/stages/hbone"
)

// server runs a plain (no TLS) HBONE server that answers every CONNECT with 200 and keeps the
// stream until the client closes it.
func server(t *testing.T) netip.AddrPort {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var conns []*hbone.Conn
	var mu sync.Mutex
	go func() {
		for {
			nc, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				c, err := hbone.ServeConn(nc, hbone.Config{Handler: func(s *hbone.Stream) {
					go func() {
						s.Respond(200, nil)
						buf := make([]byte, 1024)
						for {
							if _, err := s.Read(buf); err != nil {
								s.Close()
								return
							}
						}
					}()
				}})
				if err == nil {
					mu.Lock()
					conns = append(conns, c)
					mu.Unlock()
				}
			}()
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		mu.Lock()
		defer mu.Unlock()
		for _, c := range conns {
			c.Close()
		}
	})
	return netip.MustParseAddrPort(ln.Addr().String())
}

func newPool(t *testing.T, dials *atomic.Int32, fail *atomic.Bool) *Pool {
	t.Helper()
	return newRegisteredPool(t, dials, fail, nil)
}

// newRegisteredPool is newPool with its metrics registered on reg.
func newRegisteredPool(t *testing.T, dials *atomic.Int32, fail *atomic.Bool, reg prometheus.Registerer) *Pool {
	t.Helper()
	p, err := New(Config{Dial: func(ctx context.Context, k Key) (*hbone.Conn, error) {
		dials.Add(1)
		if fail != nil && fail.Load() {
			return nil, errors.New("boom")
		}
		// Slow enough that concurrent callers pile up behind the one dial.
		time.Sleep(20 * time.Millisecond)
		nc, err := net.Dial("tcp", k.Dst.String())
		if err != nil {
			return nil, err
		}
		return hbone.NewClientConn(nc, hbone.Config{Settings: hbone.Settings{MaxConcurrentStreams: 100}})
	}, IdleTimeout: time.Minute, Registerer: reg})
	if err != nil {
		t.Fatal(err)
	}
	p.Start()
	t.Cleanup(p.Close)
	return p
}

func TestNewKeyNormalisesSANs(t *testing.T) {
	dst := netip.MustParseAddrPort("10.0.0.1:15008")
	src := netip.MustParseAddr("10.0.0.2")
	a := NewKey("spiffe://td/ns/a/sa/x", []string{"b", "a", "b"}, dst, src)
	b := NewKey("spiffe://td/ns/a/sa/x", []string{"a", "b"}, dst, src)
	if a != b {
		t.Fatalf("keys differ: %v vs %v", a, b)
	}
	if got := a.SANs(); len(got) != 2 || got[0] != "a" || got[1] != "b" {
		t.Fatalf("SANs = %v", got)
	}
	for _, other := range []Key{
		NewKey("spiffe://td/ns/a/sa/y", []string{"a", "b"}, dst, src),
		NewKey("spiffe://td/ns/a/sa/x", []string{"a"}, dst, src),
		NewKey("spiffe://td/ns/a/sa/x", []string{"a", "b"}, netip.MustParseAddrPort("10.0.0.1:15009"), src),
		NewKey("spiffe://td/ns/a/sa/x", []string{"a", "b"}, dst, netip.MustParseAddr("10.0.0.3")),
	} {
		if other == a {
			t.Fatalf("key %v must differ from %v", other, a)
		}
	}
}

func TestSingleDialAndStreamLimit(t *testing.T) {
	dst := server(t)
	var dials atomic.Int32
	p := newPool(t, &dials, nil)
	key := NewKey("src", []string{"dst"}, dst, netip.MustParseAddr("127.0.0.1"))

	const flows = 200
	streams := make(chan *hbone.Stream, flows)
	var wg sync.WaitGroup
	for i := 0; i < flows; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c, err := p.Get(context.Background(), key)
			if err != nil {
				t.Error(err)
				return
			}
			s, _, err := c.OpenReserved(context.Background(), &hbone.Request{Authority: "1.2.3.4:80"})
			if err != nil {
				t.Error(err)
				return
			}
			streams <- s
		}()
	}
	wg.Wait()
	close(streams)
	// 200 concurrent flows at 100 streams per connection: exactly two connections, two dials.
	if got := dials.Load(); got != 2 {
		t.Fatalf("dials = %d, want 2", got)
	}
	if got := p.Len(); got != 2 {
		t.Fatalf("pooled conns = %d, want 2", got)
	}
	for _, st := range p.Snapshot() {
		if st.Active != 100 {
			t.Fatalf("conn carries %d streams, want 100", st.Active)
		}
	}
	for s := range streams {
		s.Close()
	}
	// Reuse: once streams are gone, a new flow rides an existing connection.
	waitFor(t, func() bool {
		for _, st := range p.Snapshot() {
			if st.Active != 0 {
				return false
			}
		}
		return true
	})
	c, err := p.Get(context.Background(), key)
	if err != nil {
		t.Fatal(err)
	}
	c.Unreserve()
	if got := dials.Load(); got != 2 {
		t.Fatalf("reuse dialled again: %d dials", got)
	}
}

func TestDialErrorReachesWaiters(t *testing.T) {
	var dials atomic.Int32
	var fail atomic.Bool
	fail.Store(true)
	p := newPool(t, &dials, &fail)
	key := NewKey("src", nil, netip.MustParseAddrPort("127.0.0.1:1"), netip.Addr{})
	if _, err := p.Get(context.Background(), key); err == nil {
		t.Fatal("want dial error")
	}
	if p.Len() != 0 {
		t.Fatal("failed dial must leave nothing pooled")
	}
}

func TestIdleEvictionAndDeadConns(t *testing.T) {
	dst := server(t)
	var dials atomic.Int32
	p := newPool(t, &dials, nil)
	key := NewKey("src", []string{"dst"}, dst, netip.Addr{})
	c, err := p.Get(context.Background(), key)
	if err != nil {
		t.Fatal(err)
	}
	s, _, err := c.OpenReserved(context.Background(), &hbone.Request{Authority: "1.2.3.4:80"})
	if err != nil {
		t.Fatal(err)
	}
	// Busy connections are never evicted.
	if n := p.Evict(time.Now().Add(time.Hour)); n != 0 {
		t.Fatalf("evicted %d busy conns", n)
	}
	s.Close()
	waitFor(t, func() bool { return c.Active() == 0 })
	if n := p.Evict(time.Now()); n != 0 {
		t.Fatal("evicted a connection idle for less than the timeout")
	}
	if n := p.Evict(time.Now().Add(2 * time.Minute)); n != 1 {
		t.Fatalf("evicted %d, want 1", n)
	}
	if p.Len() != 0 {
		t.Fatal("evicted conn still pooled")
	}
	// A connection that dies is dropped from the pool by its watcher.
	c2, err := p.Get(context.Background(), key)
	if err != nil {
		t.Fatal(err)
	}
	c2.Unreserve()
	c2.Close()
	waitFor(t, func() bool { return p.Len() == 0 })
}

func waitFor(t *testing.T, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatal("condition not met in time")
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// A peer whose new connections refuse every stream (GOAWAY right after the preface) must not
// make Get dial again and again.
func TestGetGivesUpOnFullNewConnections(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			nc, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				c, err := hbone.ServeConn(nc, hbone.Config{Handler: func(*hbone.Stream) {}})
				if err == nil {
					c.Shutdown(context.Background()) // GOAWAY at once
				}
			}()
		}
	}()
	var dials atomic.Int32
	p, err := New(Config{Dial: func(ctx context.Context, k Key) (*hbone.Conn, error) {
		dials.Add(1)
		nc, err := net.Dial("tcp", k.Dst.String())
		if err != nil {
			return nil, err
		}
		c, err := hbone.NewClientConn(nc, hbone.Config{})
		if err != nil {
			return nil, err
		}
		// Wait for the GOAWAY so the new connection is already unusable when Get reserves.
		deadline := time.Now().Add(5 * time.Second)
		for c.Usable() && time.Now().Before(deadline) {
			time.Sleep(5 * time.Millisecond)
		}
		return c, nil
	}})
	if err != nil {
		t.Fatal(err)
	}
	p.Start()
	t.Cleanup(p.Close)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	res := make(chan error, 1)
	go func() {
		_, err := p.Get(ctx, NewKey("src", nil, netip.MustParseAddrPort(ln.Addr().String()), netip.Addr{}))
		res <- err
	}()
	select {
	case err = <-res:
	case <-time.After(10 * time.Second):
		// The unbounded loop never looked at ctx: fail instead of hanging the suite.
		t.Fatalf("Get still dialling after 10 s (%d dials)", dials.Load())
	}
	if !errors.Is(err, ErrNoStream) {
		t.Fatalf("Get = %v, want ErrNoStream", err)
	}
	if n := dials.Load(); n > maxDialsPerGet {
		t.Fatalf("Get dialled %d times", n)
	}
}

// CloseWhere closes the connections of one scope (a removed pod) and leaves the others.
func TestCloseWhereScope(t *testing.T) {
	dst := server(t)
	var dials atomic.Int32
	p := newPool(t, &dials, nil)
	keyA := NewKey("src", []string{"dst"}, dst, netip.Addr{})
	keyA.Scope = "pod-a"
	keyB := keyA
	keyB.Scope = "pod-b"
	ca, err := p.Get(context.Background(), keyA)
	if err != nil {
		t.Fatal(err)
	}
	ca.Unreserve()
	cb, err := p.Get(context.Background(), keyB)
	if err != nil {
		t.Fatal(err)
	}
	cb.Unreserve()
	if ca == cb || dials.Load() != 2 {
		t.Fatalf("scopes share a connection (dials %d)", dials.Load())
	}
	if n := p.CloseWhere(func(k Key) bool { return k.Scope == "pod-a" }); n != 1 {
		t.Fatalf("closed %d, want 1", n)
	}
	if n := testutil.ToFloat64(p.metrics.conns); n != 1 {
		t.Fatalf("ztgo_pool_connections = %v after closing one of two, want 1", n)
	}
	select {
	case <-ca.Done():
	case <-time.After(5 * time.Second):
		t.Fatal("pod-a's connection still open")
	}
	select {
	case <-cb.Done():
		t.Fatal("pod-b's connection closed too")
	default:
	}
	if p.Len() != 1 {
		t.Fatalf("pool holds %d, want 1", p.Len())
	}
	// The next Get of the closed scope dials anew.
	c, err := p.Get(context.Background(), keyA)
	if err != nil {
		t.Fatal(err)
	}
	c.Unreserve()
	if c == ca || dials.Load() != 3 {
		t.Fatalf("closed connection reused (dials %d)", dials.Load())
	}
}

// BenchmarkGet is the pool checkout of an established flow: a warm connection found by key,
// a stream reserved and given back.
func BenchmarkGet(b *testing.B) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			nc, err := ln.Accept()
			if err != nil {
				return
			}
			go hbone.ServeConn(nc, hbone.Config{Handler: func(s *hbone.Stream) { go s.Respond(200, nil) }})
		}
	}()
	p, err := New(Config{Dial: func(ctx context.Context, k Key) (*hbone.Conn, error) {
		nc, err := net.Dial("tcp", k.Dst.String())
		if err != nil {
			return nil, err
		}
		return hbone.NewClientConn(nc, hbone.Config{})
	}, IdleTimeout: time.Minute})
	if err != nil {
		b.Fatal(err)
	}
	defer p.Close()
	key := NewKey("spiffe://cluster.local/ns/a/sa/b", []string{"spiffe://cluster.local/ns/c/sa/d"},
		netip.MustParseAddrPort(ln.Addr().String()), netip.MustParseAddr("127.0.0.1"))
	ctx := context.Background()
	b.ReportAllocs()
	b.ResetTimer()
	for range b.N {
		c, err := p.Get(ctx, key)
		if err != nil {
			b.Fatal(err)
		}
		c.Unreserve()
	}
}
