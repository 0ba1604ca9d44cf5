package certs

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/ztgo/ztgo/tls/ca"
	"github.com/ztgo/ztgo/tls/spiffe"
)

func mustID(t testing.TB, s string) spiffe.ID {
	t.Helper()
	id, err := spiffe.Parse(s)
	if err != nil {
		t.Fatal(err)
	}
	return id
}

// fakeClock is a settable clock shared by the CA and the manager.
type fakeClock struct {
	mu sync.Mutex
	t  time.Time
}

func newFakeClock() *fakeClock {
	return &fakeClock{t: time.Date(2026, 6, 1, 8, 0, 0, 0, time.UTC)}
}

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *fakeClock) Set(t time.Time) {
	c.mu.Lock()
	c.t = t
	c.mu.Unlock()
}

// fakeWait replaces the renewal timer: each wait reports its duration on waits and returns
// when the test sends on release, or when its context ends (reported on cancelled).
type fakeWait struct {
	waits     chan time.Duration
	release   chan struct{}
	cancelled chan struct{}
}

func newFakeWait() *fakeWait {
	return &fakeWait{
		waits:     make(chan time.Duration, 16),
		release:   make(chan struct{}),
		cancelled: make(chan struct{}, 16),
	}
}

func (f *fakeWait) Wait(ctx context.Context, d time.Duration) error {
	f.waits <- d
	select {
	case <-f.release:
		return nil
	case <-ctx.Done():
		f.cancelled <- struct{}{}
		return ctx.Err()
	}
}

func (f *fakeWait) next(t *testing.T) time.Duration {
	t.Helper()
	select {
	case d := <-f.waits:
		return d
	case <-time.After(10 * time.Second):
		t.Fatal("no renewal was scheduled")
		return 0
	}
}

func (f *fakeWait) fire(t *testing.T) {
	t.Helper()
	select {
	case f.release <- struct{}{}:
	case <-time.After(10 * time.Second):
		t.Fatal("renewal goroutine is not waiting")
	}
}

// testSigner counts calls, can fail on demand and can hold signings at a gate.
type testSigner struct {
	next  ca.Signer
	calls atomic.Int32
	fail  atomic.Bool
	gate  chan struct{} // when non-nil, Sign waits for it to close
}

func (s *testSigner) Sign(ctx context.Context, csr []byte, id spiffe.ID, ttl time.Duration) ([]string, error) {
	s.calls.Add(1)
	if s.gate != nil {
		select {
		case <-s.gate:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
	if s.fail.Load() {
		return nil, errors.New("ca unavailable")
	}
	return s.next.Sign(ctx, csr, id, ttl)
}

type testManager struct {
	*Manager
	signer *testSigner
	clock  *fakeClock
	wait   *fakeWait
	reg    *prometheus.Registry
	ca     *ca.Local
}

// newTestManager builds a started manager on an ephemeral CA for td. With fake set, both share
// a settable clock and renewals wait for the test.
func newTestManager(t testing.TB, td string, fake bool) *testManager {
	t.Helper()
	tm := &testManager{reg: prometheus.NewRegistry()}
	var caOpts []ca.Option
	cfg := Config{Registerer: tm.reg, TTL: 24 * time.Hour}
	if fake {
		tm.clock = newFakeClock()
		tm.wait = newFakeWait()
		caOpts = append(caOpts, ca.WithClock(tm.clock.Now))
		cfg.Now = tm.clock.Now
		cfg.Wait = tm.wait.Wait
	}
	local, err := ca.NewEphemeral(td, caOpts...)
	if err != nil {
		t.Fatal(err)
	}
	tm.ca = local
	tm.signer = &testSigner{next: local}
	cfg.Signer = tm.signer
	m, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := m.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(m.Stop)
	tm.Manager = m
	return tm
}

func TestGetSingleFlight(t *testing.T) {
	tm := newTestManager(t, "cluster.local", false)
	tm.signer.gate = make(chan struct{})
	id := mustID(t, "spiffe://cluster.local/ns/default/sa/app")

	const n = 50
	var started, done sync.WaitGroup
	certs := make([]*Certificate, n)
	errs := make([]error, n)
	started.Add(n)
	done.Add(n)
	for i := range n {
		go func() {
			defer done.Done()
			started.Done()
			certs[i], errs[i] = tm.Get(context.Background(), id)
		}()
	}
	started.Wait()
	time.Sleep(20 * time.Millisecond) // let the callers pile up behind the gate
	close(tm.signer.gate)
	done.Wait()

	for i := range n {
		if errs[i] != nil {
			t.Fatalf("Get %d: %v", i, errs[i])
		}
		if certs[i] != certs[0] {
			t.Fatalf("Get %d returned a different certificate", i)
		}
	}
	if got := tm.signer.calls.Load(); got != 1 {
		t.Fatalf("signer called %d times, want 1", got)
	}
	c := certs[0]
	if c.TLS.Leaf == nil || len(c.TLS.Certificate) != 1 || c.Identity != id {
		t.Fatalf("certificate: leaf=%v chain=%d identity=%v", c.TLS.Leaf != nil, len(c.TLS.Certificate), c.Identity)
	}
	if len(c.RootCerts) != 1 || !c.RootCerts[0].Equal(tm.ca.Certificate()) || len(c.ChainPEM) != 2 {
		t.Fatal("roots are not the CA's root bundle")
	}
	if got := testutil.ToFloat64(tm.metrics.Issued.WithLabelValues(resultSuccess)); got != 1 {
		t.Errorf("issued success = %v", got)
	}
	if got := testutil.ToFloat64(tm.metrics.Expiry.WithLabelValues(id.String())); got != float64(c.NotAfter.Unix()) {
		t.Errorf("expiry gauge = %v, want %v", got, c.NotAfter.Unix())
	}
	// Metrics went to the injected registry.
	if n, err := testutil.GatherAndCount(tm.reg, "ztgo_cert_issued_total", "ztgo_cert_expiry_timestamp_seconds"); err != nil || n != 3 {
		t.Errorf("registry holds %d series (%v), want 3", n, err)
	}
}

func TestRenewAtHalfLife(t *testing.T) {
	tm := newTestManager(t, "cluster.local", true)
	id := mustID(t, "spiffe://cluster.local/ns/default/sa/app")
	t0 := tm.clock.Now()

	c1, err := tm.Get(context.Background(), id)
	if err != nil {
		t.Fatal(err)
	}
	// NotBefore is backdated a minute by the CA; half-life counts from it, as in ztunnel.
	wantRefresh := c1.NotBefore.Add(c1.NotAfter.Sub(c1.NotBefore) / 2)
	if !c1.RefreshAt().Equal(wantRefresh) {
		t.Fatalf("RefreshAt %v, want %v", c1.RefreshAt(), wantRefresh)
	}
	if d := tm.wait.next(t); d != wantRefresh.Sub(t0) {
		t.Fatalf("renewal scheduled in %v, want %v", d, wantRefresh.Sub(t0))
	}

	tm.clock.Set(wantRefresh.Add(-time.Second))
	if c, _ := tm.Get(context.Background(), id); c != c1 {
		t.Fatal("certificate changed before half-life")
	}

	tm.clock.Set(wantRefresh)
	tm.wait.fire(t)
	d2 := tm.wait.next(t) // the renewal has been published once the next wait starts
	c2, err := tm.Get(context.Background(), id)
	if err != nil {
		t.Fatal(err)
	}
	if c2 == c1 || c2.TLS.Leaf.SerialNumber.Cmp(c1.TLS.Leaf.SerialNumber) == 0 {
		t.Fatal("certificate was not renewed")
	}
	if c2.TLS.PrivateKey.(*ecdsa.PrivateKey).Equal(c1.TLS.PrivateKey) {
		t.Error("renewal reused the private key")
	}
	if d2 != c2.RefreshAt().Sub(wantRefresh) {
		t.Errorf("second renewal in %v, want %v", d2, c2.RefreshAt().Sub(wantRefresh))
	}
	if got := tm.signer.calls.Load(); got != 2 {
		t.Errorf("signer called %d times, want 2", got)
	}
	if got := testutil.ToFloat64(tm.metrics.Expiry.WithLabelValues(id.String())); got != float64(c2.NotAfter.Unix()) {
		t.Errorf("expiry gauge = %v, want %v", got, c2.NotAfter.Unix())
	}
}

func TestBackoffKeepsOldCertificate(t *testing.T) {
	tm := newTestManager(t, "cluster.local", true)
	id := mustID(t, "spiffe://cluster.local/ns/default/sa/app")
	c1, err := tm.Get(context.Background(), id)
	if err != nil {
		t.Fatal(err)
	}
	tm.wait.next(t)

	tm.signer.fail.Store(true)
	tm.clock.Set(c1.RefreshAt())
	for i, base := range []time.Duration{time.Second, 2 * time.Second, 4 * time.Second, 8 * time.Second} {
		tm.wait.fire(t)
		d := tm.wait.next(t)
		lo, hi := time.Duration(float64(base)*0.8), time.Duration(float64(base)*1.2)
		if d < lo || d > hi {
			t.Fatalf("retry %d after %v, want within [%v, %v]", i+1, d, lo, hi)
		}
		c, err := tm.Get(context.Background(), id)
		if err != nil || c != c1 {
			t.Fatalf("retry %d: Get = %v, %v; want the old certificate", i+1, c, err)
		}
	}
	st := tm.Snapshot()
	if len(st) != 1 || st[0].State != StateAvailable || !strings.Contains(st[0].LastError, "ca unavailable") {
		t.Fatalf("snapshot while failing: %+v", st)
	}
	if got := testutil.ToFloat64(tm.metrics.Issued.WithLabelValues(resultFailure)); got != 4 {
		t.Errorf("issued failure = %v, want 4", got)
	}

	// Once the old certificate expires, Get fails and says why.
	tm.clock.Set(c1.NotAfter)
	_, err = tm.Get(context.Background(), id)
	if err == nil || !strings.Contains(err.Error(), "expired") || !strings.Contains(err.Error(), "ca unavailable") {
		t.Fatalf("Get after expiry: %v", err)
	}
	if st := tm.Snapshot(); st[0].State != StateUnavailable {
		t.Fatalf("state after expiry %q", st[0].State)
	}

	// The CA recovers: the next retry publishes a fresh certificate.
	tm.signer.fail.Store(false)
	tm.wait.fire(t)
	tm.wait.next(t)
	c2, err := tm.Get(context.Background(), id)
	if err != nil || c2 == c1 {
		t.Fatalf("Get after recovery: %v", err)
	}
	if st := tm.Snapshot(); st[0].State != StateAvailable || st[0].LastError != "" || len(st[0].ChainPEM) != 2 {
		t.Fatalf("snapshot after recovery: %+v", st[0])
	}
}

func TestFirstIssueFailure(t *testing.T) {
	tm := newTestManager(t, "cluster.local", true)
	tm.signer.fail.Store(true)
	id := mustID(t, "spiffe://cluster.local/ns/default/sa/app")
	_, err := tm.Get(context.Background(), id)
	if err == nil || !strings.Contains(err.Error(), "ca unavailable") || !strings.HasPrefix(err.Error(), "get certificate ") {
		t.Fatalf("Get = %v", err)
	}
	tm.wait.next(t) // the retry is scheduled
	// Later callers get the last error at once instead of waiting for the retry.
	if _, err := tm.Get(context.Background(), id); err == nil {
		t.Fatal("second Get succeeded without a successful signing")
	}
	if st := tm.Snapshot(); st[0].State != StateUnavailable {
		t.Fatalf("state %q", st[0].State)
	}
	tm.signer.fail.Store(false)
	tm.wait.fire(t)
	tm.wait.next(t)
	if _, err := tm.Get(context.Background(), id); err != nil {
		t.Fatal(err)
	}
}

func TestForgetStopsRenewal(t *testing.T) {
	tm := newTestManager(t, "cluster.local", true)
	id := mustID(t, "spiffe://cluster.local/ns/default/sa/app")
	if _, err := tm.Get(context.Background(), id); err != nil {
		t.Fatal(err)
	}
	tm.wait.next(t)
	tm.Forget(id)
	select {
	case <-tm.wait.cancelled:
	case <-time.After(10 * time.Second):
		t.Fatal("renewal goroutine still waiting after Forget")
	}
	if n := testutil.CollectAndCount(tm.metrics.Expiry); n != 0 {
		t.Errorf("%d expiry series left after Forget", n)
	}
	if len(tm.Snapshot()) != 0 {
		t.Error("forgotten identity still in snapshot")
	}
	if got := tm.signer.calls.Load(); got != 1 {
		t.Errorf("signer called %d times, want 1", got)
	}

	// A waiter for a first certificate is released by Forget.
	tm.signer.gate = make(chan struct{})
	id2 := mustID(t, "spiffe://cluster.local/ns/default/sa/other")
	errc := make(chan error, 1)
	go func() {
		_, err := tm.Get(context.Background(), id2)
		errc <- err
	}()
	for tm.signer.calls.Load() != 2 {
		time.Sleep(time.Millisecond)
	}
	tm.Forget(id2)
	if err := <-errc; !errors.Is(err, ErrForgotten) {
		t.Fatalf("waiter got %v, want ErrForgotten", err)
	}
	close(tm.signer.gate)
}

func TestLifecycle(t *testing.T) {
	local, err := ca.NewEphemeral("cluster.local")
	if err != nil {
		t.Fatal(err)
	}
	m, err := New(Config{Signer: local})
	if err != nil {
		t.Fatal(err)
	}
	id := mustID(t, "spiffe://cluster.local/ns/default/sa/app")
	if _, err := m.Get(context.Background(), id); !errors.Is(err, ErrNotStarted) {
		t.Fatalf("Get before Start: %v", err)
	}
	if err := m.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	if err := m.Start(context.Background()); err == nil {
		t.Fatal("second Start succeeded")
	}
	c, err := m.Get(context.Background(), id)
	if err != nil {
		t.Fatal(err)
	}
	m.Stop() // waits for the renewal goroutine
	if got, err := m.Get(context.Background(), id); err != nil || got != c {
		t.Fatalf("Get of an issued certificate after Stop: %v", err)
	}
	if _, err := m.Get(context.Background(), mustID(t, "spiffe://cluster.local/ns/x/sa/y")); !errors.Is(err, ErrStopped) {
		t.Fatalf("Get of a new identity after Stop: %v", err)
	}

	// Caller context bounds the wait only.
	m2, err := New(Config{Signer: &testSigner{next: local, gate: make(chan struct{})}})
	if err != nil {
		t.Fatal(err)
	}
	if err := m2.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel()
	if _, err := m2.Get(ctx, id); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Get with expired ctx: %v", err)
	}
	m2.Stop()

	if _, err := New(Config{}); err == nil {
		t.Fatal("New without Signer succeeded")
	}
	reg := prometheus.NewRegistry()
	if _, err := New(Config{Signer: local, Registerer: reg}); err != nil {
		t.Fatal(err)
	}
	if _, err := New(Config{Signer: local, Registerer: reg}); err == nil {
		t.Fatal("registering the metrics twice succeeded")
	}
}

func TestBackoffBounds(t *testing.T) {
	for n := 1; n <= 30; n++ {
		base := min(time.Second<<min(n-1, 20), 150*time.Second)
		for range 50 {
			d := backoff(n)
			if d < time.Duration(float64(base)*0.8) || d > min(time.Duration(float64(base)*1.2), 150*time.Second) {
				t.Fatalf("backoff(%d) = %v, base %v", n, d, base)
			}
		}
	}
}

func TestNewCertificateChecks(t *testing.T) {
	local, err := ca.NewEphemeral("cluster.local")
	if err != nil {
		t.Fatal(err)
	}
	other, err := ca.NewEphemeral("cluster.local")
	if err != nil {
		t.Fatal(err)
	}
	id := mustID(t, "spiffe://cluster.local/ns/default/sa/app")
	otherID := mustID(t, "spiffe://cluster.local/ns/default/sa/intruder")
	key, csr, err := newKeyAndCSR(id)
	if err != nil {
		t.Fatal(err)
	}
	good, err := local.Sign(context.Background(), csr, id, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	// The CSR carries one critical URI SAN, as ztunnel's.
	p, _ := pem.Decode(csr)
	block, err := x509.ParseCertificateRequest(p.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	if len(block.URIs) != 1 || block.URIs[0].String() != id.String() || len(block.Subject.Names) != 0 {
		t.Fatalf("csr SANs %v subject %v", block.URIs, block.Subject)
	}
	for _, e := range block.Extensions {
		if e.Id.Equal(oidSubjectAltName) && !e.Critical {
			t.Error("csr SAN not critical")
		}
	}

	key2, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	// A CA that signs a different identity than asked for (same key, so only the SAN differs).
	otherCSR, err := createCSR(key, otherID)
	if err != nil {
		t.Fatal(err)
	}
	forOther, err := local.Sign(context.Background(), otherCSR, otherID, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name  string
		chain []string
		key   *ecdsa.PrivateKey
		want  string
	}{
		{"ok", good, key, ""},
		{"leaf only", good[:1], key, "want at least a leaf and a root bundle"},
		{"wrong identity", forOther, key, "is for spiffe://cluster.local/ns/default/sa/intruder"},
		{"wrong key", good, key2, "does not hold the requested key"},
		{"foreign root", []string{good[0], other.RootsPEM()}, key, "does not verify"},
		{"garbage root", []string{good[0], "nope"}, key, "root bundle"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, err := newCertificate(id, tt.key, tt.chain, time.Now())
			if tt.want == "" {
				if err != nil {
					t.Fatal(err)
				}
				if c.Identity != id || c.TLS.Leaf == nil {
					t.Fatal("bad certificate")
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("err = %v, want containing %q", err, tt.want)
			}
		})
	}
}
