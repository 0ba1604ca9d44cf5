package certs

import (
	"context"
	"slices"
	"sync"
)

// priority orders waiting signings. ztunnel distinguishes RealTime, Warmup and Background; the
// only distinction that changes latency seen by traffic is whether a connection is waiting, so
// ztgo keeps two.
type priority int

const (
	// priorityWaiting: the identity has no usable certificate, a connection may be blocked on it.
	priorityWaiting priority = iota
	// priorityRenewal: a background renewal of a certificate that is still valid.
	priorityRenewal
	numPriorities
)

// limiter bounds concurrent signings (ztunnel allows 8) and hands a freed slot to the highest
// priority waiter first, so that a burst of half-life renewals does not delay a new pod's first
// certificate.
type limiter struct {
	mu      sync.Mutex
	free    int
	waiters [numPriorities][]chan struct{}
}

func newLimiter(n int) *limiter { return &limiter{free: n} }

func (l *limiter) acquire(ctx context.Context, p priority) error {
	l.mu.Lock()
	if l.free > 0 {
		l.free--
		l.mu.Unlock()
		return nil
	}
	ch := make(chan struct{})
	l.waiters[p] = append(l.waiters[p], ch)
	l.mu.Unlock()

	select {
	case <-ch:
		return nil
	case <-ctx.Done():
		l.mu.Lock()
		i := slices.Index(l.waiters[p], ch)
		if i >= 0 {
			l.waiters[p] = slices.Delete(l.waiters[p], i, i+1)
		}
		l.mu.Unlock()
		if i < 0 {
			// release handed us the slot while ctx ended; pass it on.
			l.release()
		}
		return ctx.Err()
	}
}

func (l *limiter) release() {
	l.mu.Lock()
	defer l.mu.Unlock()
	for p := range l.waiters {
		if len(l.waiters[p]) > 0 {
			ch := l.waiters[p][0]
			l.waiters[p] = slices.Delete(l.waiters[p], 0, 1)
			close(ch) // the slot moves to the waiter without passing through free
			return
		}
	}
	l.free++
}
