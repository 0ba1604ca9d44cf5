package certs

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/ztgo/ztgo/tls/ca"
	"github.com/ztgo/ztgo/tls/spiffe"
)

// Defaults, from ztunnel's SECRET_TTL and identity manager.
const (
	DefaultTTL         = 24 * time.Hour
	DefaultMaxInFlight = 8

	backoffInitial = time.Second
	backoffMax     = 150 * time.Second
	backoffJitter  = 0.2
	// minRefresh stops a CA that issues (nearly) expired certificates from making the renewal
	// loop spin.
	minRefresh = time.Second
	// signTimeout bounds one signing so that a CA that never answers cannot hold a limiter slot
	// forever; the attempt then counts as a failure and is retried with backoff.
	signTimeout = time.Minute
)

var (
	// ErrNotStarted is returned by Get before Start: issuing needs the goroutines Start allows.
	ErrNotStarted = errors.New("certificate manager not started")
	// ErrStopped is returned once Stop was called.
	ErrStopped = errors.New("certificate manager stopped")
	// ErrForgotten is returned to callers waiting for an identity that Forget dropped.
	ErrForgotten = errors.New("identity forgotten")
)

// Config configures a Manager. Signer is required; zero values of the rest take defaults.
type Config struct {
	// Signer issues the certificates: istiod's CreateCertificate client or the local CA.
	Signer ca.Signer
	// TTL is the validity requested from the CA (default 24h, ztunnel's SECRET_TTL).
	TTL time.Duration
	// Logger receives renewal events; nil discards them.
	Logger *slog.Logger
	// Registerer receives the metrics; nil leaves them unregistered.
	Registerer prometheus.Registerer
	// Now is the clock (default time.Now), also used to check peer certificates' validity.
	Now func() time.Time
	// MaxInFlight bounds concurrent signings (default 8, as ztunnel).
	MaxInFlight int
	// Wait sleeps for d or until ctx ends, then returns ctx's error. Nil uses a real timer;
	// tests inject one that they release by hand to drive renewals without sleeping.
	Wait func(ctx context.Context, d time.Duration) error
}

// State is where an identity's certificate stands, as shown in the config dump.
type State string

const (
	// StateInitializing: the first signing has not finished.
	StateInitializing State = "Initializing"
	// StateAvailable: a valid certificate is served (a renewal may be failing, see LastError).
	StateAvailable State = "Available"
	// StateUnavailable: no valid certificate; signing failed or the certificate expired.
	StateUnavailable State = "Unavailable"
)

// Status describes one identity for a config dump.
type Status struct {
	Identity spiffe.ID
	State    State
	// LastError is the error of the latest signing attempt, "" when it succeeded.
	LastError string
	// ChainPEM is the CA response of the current certificate (leaf first, root bundle last).
	ChainPEM  []string
	NotBefore time.Time
	NotAfter  time.Time
	// NextAttempt is when the next renewal or retry is due.
	NextAttempt time.Time
}

// Manager issues, caches and renews workload certificates. All methods are safe for
// concurrent use.
type Manager struct {
	signer  ca.Signer
	ttl     time.Duration
	log     *slog.Logger
	now     func() time.Time
	wait    func(ctx context.Context, d time.Duration) error
	limit   *limiter
	metrics *Metrics

	mu      sync.RWMutex
	entries map[spiffe.ID]*entry
	ctx     context.Context // nil until Start
	cancel  context.CancelCauseFunc
	stopped bool

	wg sync.WaitGroup
}

// entry is one identity. Its goroutine (run) is the only writer of cur.
type entry struct {
	id     spiffe.ID
	ctx    context.Context
	cancel context.CancelCauseFunc

	// ready is closed when the first signing attempt ends, either way.
	ready     chan struct{}
	readyOnce sync.Once

	cur atomic.Pointer[Certificate]

	mu        sync.Mutex
	lastErr   error
	next      time.Time
	attempted bool
}

// New validates cfg and builds a Manager. It starts nothing; see Start.
func New(cfg Config) (*Manager, error) {
	if cfg.Signer == nil {
		return nil, errors.New("new certificate manager: nil Signer")
	}
	if cfg.TTL < 0 || cfg.MaxInFlight < 0 {
		return nil, fmt.Errorf("new certificate manager: negative TTL %v or MaxInFlight %d", cfg.TTL, cfg.MaxInFlight)
	}
	if cfg.TTL == 0 {
		cfg.TTL = DefaultTTL
	}
	if cfg.MaxInFlight == 0 {
		cfg.MaxInFlight = DefaultMaxInFlight
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.Wait == nil {
		cfg.Wait = sleep
	}
	metrics, err := NewMetrics(cfg.Registerer)
	if err != nil {
		return nil, fmt.Errorf("new certificate manager: %w", err)
	}
	return &Manager{
		signer:  cfg.Signer,
		ttl:     cfg.TTL,
		log:     cfg.Logger,
		now:     cfg.Now,
		wait:    cfg.Wait,
		limit:   newLimiter(cfg.MaxInFlight),
		metrics: metrics,
		entries: make(map[spiffe.ID]*entry),
	}, nil
}

func sleep(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// Start allows issuing: each identity's goroutine runs under ctx (ending ctx is like Stop
// without the wait).
func (m *Manager) Start(ctx context.Context) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	switch {
	case m.stopped:
		return fmt.Errorf("start certificate manager: %w", ErrStopped)
	case m.ctx != nil:
		return errors.New("start certificate manager: already started")
	}
	m.ctx, m.cancel = context.WithCancelCause(ctx)
	return nil
}

// Stop ends every renewal and waits for all goroutines of the manager to return. Certificates
// already issued stay usable until they expire (so draining connections can still handshake);
// Get of an identity without one fails with ErrStopped.
func (m *Manager) Stop() {
	m.mu.Lock()
	m.stopped = true
	cancel := m.cancel
	m.mu.Unlock()
	if cancel != nil {
		cancel(ErrStopped)
	}
	m.wg.Wait()
}

// Get returns a valid certificate for id, issuing one on first use; concurrent first calls
// share one signing. While a renewal is failing it keeps returning the previous certificate
// until that expires. ctx bounds only this caller's wait, never the signing, which other
// callers may share.
func (m *Manager) Get(ctx context.Context, id spiffe.ID) (*Certificate, error) {
	m.mu.RLock()
	e := m.entries[id]
	m.mu.RUnlock()
	if e != nil {
		if c := e.cur.Load(); c.usableAt(m.now()) {
			return c, nil
		}
	} else {
		var err error
		if e, err = m.add(id); err != nil {
			return nil, fmt.Errorf("get certificate %s: %w", id, err)
		}
	}
	select {
	case <-e.ready:
	case <-e.ctx.Done():
		return nil, fmt.Errorf("get certificate %s: %w", id, context.Cause(e.ctx))
	case <-ctx.Done():
		return nil, fmt.Errorf("get certificate %s: %w", id, ctx.Err())
	}
	c, err := e.result(m.now())
	if err != nil {
		return nil, fmt.Errorf("get certificate %s: %w", id, err)
	}
	return c, nil
}

// current returns id's certificate without waiting or issuing; the TLS callbacks use it where
// a certificate was already obtained for the same connection.
func (m *Manager) current(id spiffe.ID) (*Certificate, error) {
	m.mu.RLock()
	e := m.entries[id]
	m.mu.RUnlock()
	if e == nil {
		return nil, fmt.Errorf("certificate %s: %w", id, ErrForgotten)
	}
	c, err := e.result(m.now())
	if err != nil {
		return nil, fmt.Errorf("certificate %s: %w", id, err)
	}
	return c, nil
}

func (m *Manager) add(id spiffe.ID) (*entry, error) {
	if id.IsZero() {
		return nil, errors.New("empty identity")
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	switch {
	case m.stopped:
		return nil, ErrStopped
	case m.ctx == nil:
		return nil, ErrNotStarted
	}
	if e := m.entries[id]; e != nil {
		return e, nil
	}
	ctx, cancel := context.WithCancelCause(m.ctx)
	e := &entry{id: id, ctx: ctx, cancel: cancel, ready: make(chan struct{})}
	m.entries[id] = e
	m.wg.Add(1)
	go m.run(e)
	return e, nil
}

// Forget drops id: its renewal stops, its metric series goes, and callers still waiting for its
// first certificate get ErrForgotten. Certificates already handed out stay usable until they
// expire. A later Get issues afresh.
func (m *Manager) Forget(id spiffe.ID) {
	m.mu.Lock()
	e := m.entries[id]
	delete(m.entries, id)
	m.mu.Unlock()
	if e == nil {
		return
	}
	// Under e.mu so that run, which publishes under e.mu after checking e.ctx, cannot recreate
	// the metric series after it is deleted here.
	e.mu.Lock()
	e.cancel(ErrForgotten)
	m.metrics.Expiry.DeleteLabelValues(id.String())
	e.mu.Unlock()
}

// Snapshot lists every identity's certificate, sorted by identity, for the config dump.
func (m *Manager) Snapshot() []Status {
	m.mu.RLock()
	entries := make([]*entry, 0, len(m.entries))
	for _, e := range m.entries {
		entries = append(entries, e)
	}
	m.mu.RUnlock()
	now := m.now()
	out := make([]Status, 0, len(entries))
	for _, e := range entries {
		c := e.cur.Load()
		e.mu.Lock()
		s := Status{Identity: e.id, NextAttempt: e.next}
		if e.lastErr != nil {
			s.LastError = e.lastErr.Error()
		}
		attempted := e.attempted
		e.mu.Unlock()
		switch {
		case c.usableAt(now):
			s.State = StateAvailable
		case !attempted:
			s.State = StateInitializing
		default:
			s.State = StateUnavailable
		}
		if c != nil {
			s.ChainPEM, s.NotBefore, s.NotAfter = c.ChainPEM, c.NotBefore, c.NotAfter
		}
		out = append(out, s)
	}
	slices.SortFunc(out, func(a, b Status) int {
		switch as, bs := a.Identity.String(), b.Identity.String(); {
		case as < bs:
			return -1
		case as > bs:
			return 1
		}
		return 0
	})
	return out
}

// result is what Get returns once the first attempt has ended.
func (e *entry) result(now time.Time) (*Certificate, error) {
	c := e.cur.Load()
	if c.usableAt(now) {
		return c, nil
	}
	e.mu.Lock()
	lastErr := e.lastErr
	e.mu.Unlock()
	switch {
	case c != nil && lastErr != nil:
		return nil, fmt.Errorf("certificate expired at %s and renewal is failing: %w", c.NotAfter.UTC().Format(time.RFC3339), lastErr)
	case c != nil:
		return nil, fmt.Errorf("certificate expired at %s", c.NotAfter.UTC().Format(time.RFC3339))
	case lastErr != nil:
		return nil, lastErr
	default:
		return nil, errors.New("no certificate yet")
	}
}

// run issues id's certificate and renews it at half-life until the entry's context ends.
func (m *Manager) run(e *entry) {
	defer m.wg.Done()
	failures := 0
	var delay time.Duration
	for {
		if delay > 0 {
			if err := m.wait(e.ctx, delay); err != nil {
				return
			}
		}
		prio := priorityRenewal
		if !e.cur.Load().usableAt(m.now()) {
			prio = priorityWaiting
		}
		c, err := m.issue(e.ctx, e.id, prio)
		now := m.now()
		if err != nil {
			failures++
			delay = backoff(failures)
		} else {
			failures = 0
			delay = max(c.RefreshAt().Sub(now), minRefresh)
		}

		e.mu.Lock()
		if e.ctx.Err() != nil {
			// Forgotten or stopped while signing: the result has no one to go to.
			e.mu.Unlock()
			return
		}
		e.attempted = true
		e.next = now.Add(delay)
		e.lastErr = err
		if err == nil {
			e.cur.Store(c)
			m.metrics.Expiry.WithLabelValues(e.id.String()).Set(float64(c.NotAfter.Unix()))
		}
		e.mu.Unlock()

		if err != nil {
			m.metrics.Issued.WithLabelValues(resultFailure).Inc()
			old := e.cur.Load()
			m.log.Warn("workload certificate request failed",
				"identity", e.id.String(), "attempt", failures, "retry_in", delay,
				"serving_previous", old.usableAt(now), "error", err)
		} else {
			m.metrics.Issued.WithLabelValues(resultSuccess).Inc()
			m.log.Debug("workload certificate issued",
				"identity", e.id.String(), "not_after", c.NotAfter, "refresh_in", delay)
		}
		e.readyOnce.Do(func() { close(e.ready) })
	}
}

// issue makes one signing attempt: new key, CSR, CA call, response checks. Its errors do not
// repeat the identity: Get's wrapping and the renewal log already carry it.
func (m *Manager) issue(ctx context.Context, id spiffe.ID, prio priority) (*Certificate, error) {
	if err := m.limit.acquire(ctx, prio); err != nil {
		return nil, fmt.Errorf("issue certificate: %w", err)
	}
	defer m.limit.release()
	key, csr, err := newKeyAndCSR(id)
	if err != nil {
		return nil, fmt.Errorf("issue certificate: %w", err)
	}
	sctx, cancel := context.WithTimeout(ctx, signTimeout)
	defer cancel()
	chain, err := m.signer.Sign(sctx, csr, id, m.ttl)
	if err != nil {
		return nil, fmt.Errorf("issue certificate: %w", err)
	}
	c, err := newCertificate(id, key, chain, m.now())
	if err != nil {
		return nil, fmt.Errorf("issue certificate: %w", err)
	}
	return c, nil
}

// backoff returns the delay before retry number n (n >= 1): 1s doubling per failure, jittered
// by ±20% so that identities that failed together do not retry together, never above 150s.
func backoff(n int) time.Duration {
	d := backoffInitial
	for i := 1; i < n && d < backoffMax; i++ {
		d *= 2
	}
	d = min(d, backoffMax)
	j := 1 - backoffJitter + 2*backoffJitter*rand.Float64()
	return min(time.Duration(float64(d)*j), backoffMax)
}
