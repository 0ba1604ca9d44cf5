package certs

import (
	"context"
	"errors"
	"sync"
	"testing"
	"time"
)

func TestLimiterPriority(t *testing.T) {
	l := newLimiter(1)
	if err := l.acquire(context.Background(), priorityRenewal); err != nil {
		t.Fatal(err)
	}
	order := make(chan priority, 2)
	var released sync.WaitGroup
	queue := func(p priority) {
		released.Go(func() {
			if err := l.acquire(context.Background(), p); err != nil {
				t.Error(err)
				return
			}
			order <- p
			l.release()
		})
	}
	waitQueued := func(p priority, n int) {
		for {
			l.mu.Lock()
			got := len(l.waiters[p])
			l.mu.Unlock()
			if got == n {
				return
			}
			time.Sleep(time.Millisecond)
		}
	}
	// The renewal queues first, the waiting connection second; the latter must go first.
	queue(priorityRenewal)
	waitQueued(priorityRenewal, 1)
	queue(priorityWaiting)
	waitQueued(priorityWaiting, 1)

	// A cancelled waiter leaves the queue without taking a slot.
	ctx, cancel := context.WithCancel(context.Background())
	errc := make(chan error, 1)
	go func() { errc <- l.acquire(ctx, priorityWaiting) }()
	waitQueued(priorityWaiting, 2)
	cancel()
	if err := <-errc; !errors.Is(err, context.Canceled) {
		t.Fatalf("cancelled acquire: %v", err)
	}

	l.release()
	if first, second := <-order, <-order; first != priorityWaiting || second != priorityRenewal {
		t.Fatalf("order %v, %v; want waiting before renewal", first, second)
	}
	released.Wait() // each sends its priority before it releases
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.free != 1 {
		t.Fatalf("free = %d after all releases, want 1", l.free)
	}
}
