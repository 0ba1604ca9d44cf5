package eventloop

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"sync"
	"sync/atomic"
	"syscall"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/puzpuzpuz/xsync/v3"
	"golang.org/x/sys/unix"
)

// maxEvents is how many reports one epoll_wait returns at most; more are read by the next.
const maxEvents = 256

// armEvents is what a Watch waits for: bytes or FIN (EPOLLIN, EPOLLRDHUP), and once only.
// EPOLLERR and EPOLLHUP are always reported.
const armEvents = unix.EPOLLIN | unix.EPOLLRDHUP | unix.EPOLLONESHOT

// Loop reports readiness of watched sockets. Its methods are safe for concurrent use.
type Loop struct {
	log     *slog.Logger
	epfd    *os.File
	rc      syscall.RawConn
	watches *xsync.MapOf[uint64, *Watch]
	nextID  atomic.Uint64
	m       *metrics

	startOnce, stopOnce sync.Once
	started, stopping   atomic.Bool
	done                chan struct{}
}

type metrics struct {
	watches prometheus.GaugeFunc
	wakeups prometheus.Counter
	polls   prometheus.Counter
}

// New creates a Loop. Its metrics (ztgo_eventloop_*) are registered on reg when reg is not
// nil; log may be nil.
func New(log *slog.Logger, reg prometheus.Registerer) (*Loop, error) {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	fd, err := unix.EpollCreate1(unix.EPOLL_CLOEXEC)
	if err != nil {
		return nil, fmt.Errorf("epoll_create1: %w", err)
	}
	if err := unix.SetNonblock(fd, true); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("epoll fd nonblock: %w", err)
	}
	// A non-blocking descriptor given to os.NewFile goes to Go's netpoller: an epoll set is
	// readable while its ready list is not empty.
	f := os.NewFile(uintptr(fd), "ztgo-eventloop")
	rc, err := f.SyscallConn()
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("epoll fd rawconn: %w", err)
	}
	l := &Loop{log: log, epfd: f, rc: rc, watches: xsync.NewMapOf[uint64, *Watch](), done: make(chan struct{})}
	l.m = &metrics{
		watches: prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "ztgo_eventloop_watches",
			Help: "Sockets of established flows registered with the event loop (idle or busy).",
		}, func() float64 { return float64(l.watches.Size()) }),
		wakeups: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "ztgo_eventloop_wakeups_total",
			Help: "Readiness reports the event loop handed to a flow.",
		}),
		polls: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "ztgo_eventloop_polls_total",
			Help: "epoll_wait calls of the event loop that returned at least one report.",
		}),
	}
	if reg != nil {
		for _, c := range []prometheus.Collector{l.m.watches, l.m.wakeups, l.m.polls} {
			if err := reg.Register(c); err != nil {
				f.Close()
				return nil, fmt.Errorf("register eventloop metrics: %w", err)
			}
		}
	}
	return l, nil
}

// Start runs the loop on its own goroutine until Stop.
func (l *Loop) Start() {
	l.startOnce.Do(func() {
		l.started.Store(true)
		go l.run()
	})
}

// Stop ends the loop and waits for it. Watches armed after Stop are never reported: stop the
// callers (relays) first.
func (l *Loop) Stop() {
	l.stopOnce.Do(func() {
		l.startOnce.Do(func() {}) // a Start after Stop does nothing
		l.stopping.Store(true)
		l.epfd.Close()
		if l.started.Load() {
			<-l.done
		}
	})
}

func (l *Loop) run() {
	defer close(l.done)
	events := make([]unix.EpollEvent, maxEvents)
	// Read waits on the netpoller whenever the callback returns false, and returns only
	// once the file is closed.
	err := l.rc.Read(func(fd uintptr) bool {
		for {
			n, err := unix.EpollWait(int(fd), events, 0)
			if err == unix.EINTR {
				continue
			}
			if err != nil {
				l.log.Error("event loop: epoll_wait failed", "error", err)
				return true
			}
			if n == 0 {
				return false // drained: wait for the set to become readable again
			}
			l.m.polls.Inc()
			for i := range events[:n] {
				id := uint64(uint32(events[i].Fd)) | uint64(uint32(events[i].Pad))<<32
				if w, ok := l.watches.Load(id); ok {
					l.m.wakeups.Inc()
					w.fn()
				}
			}
			if n < len(events) {
				return false
			}
		}
	})
	if err != nil && !l.stopping.Load() {
		l.log.Error("event loop stopped", "error", err)
	}
}

// Watches is the number of sockets registered (Watch, not yet Close), armed or not.
func (l *Loop) Watches() int { return l.watches.Size() }

// Watch is one socket registered with a Loop.
type Watch struct {
	l  *Loop
	id uint64
	rc syscall.RawConn
	fn func()

	mu    sync.Mutex // orders Arm and Close, and guards what follows
	added bool
	gone  bool
	// ctl's state: the functions it hands to Control, made once (a closure per call would
	// allocate on every Arm, that is on every burst of a flow), and what they pass on.
	onConn, onSet func(fd uintptr)
	op, fd        int
	ev            unix.EpollEvent
	err           error
}

// Watch registers c with the loop, disarmed. fn is called on the loop's goroutine once per
// Arm, when c becomes readable (bytes, FIN, reset, error); it must not block. The caller
// must Close the Watch before it closes c, or wake its own waiter when c is closed elsewhere
// (a closed descriptor leaves the epoll set without a report).
func (l *Loop) Watch(c syscall.Conn, fn func()) (*Watch, error) {
	rc, err := c.SyscallConn()
	if err != nil {
		return nil, fmt.Errorf("watch: %w", err)
	}
	w := &Watch{l: l, id: l.nextID.Add(1), rc: rc, fn: fn}
	w.ev = unix.EpollEvent{Events: armEvents, Fd: int32(uint32(w.id)), Pad: int32(uint32(w.id >> 32))}
	w.onConn, w.onSet = w.connFD, w.setFD
	l.watches.Store(w.id, w)
	return w, nil
}

// Arm asks for one report when the socket is readable; if it already is, the report comes at
// once. It fails when the connection is closed (net.ErrClosed from Control) or the Watch is.
func (w *Watch) Arm() error {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.gone {
		return errWatchClosed
	}
	op := unix.EPOLL_CTL_MOD
	if !w.added {
		op = unix.EPOLL_CTL_ADD
	}
	if err := w.ctl(op); err != nil {
		return fmt.Errorf("arm: %w", err)
	}
	w.added = true
	return nil
}

// Close removes the socket from the loop. A report the loop is delivering at that moment may
// still call fn once, after Close; none follows. It is safe to call more than once, and after
// the connection was closed.
func (w *Watch) Close() {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.gone {
		return
	}
	w.gone = true
	w.l.watches.Delete(w.id)
	if w.added {
		// A closed connection already left the set: Control then fails, which is fine.
		_ = w.ctl(unix.EPOLL_CTL_DEL)
	}
}

var errWatchClosed = errors.New("eventloop: watch closed")

// ctl runs epoll_ctl(op) for the socket on the loop's set, inside both descriptors' Control:
// neither number can be closed and reused while it runs. w.mu is held.
func (w *Watch) ctl(op int) error {
	w.op, w.err = op, nil
	if err := w.rc.Control(w.onConn); err != nil {
		return err
	}
	return w.err
}

func (w *Watch) connFD(fd uintptr) {
	w.fd = int(fd)
	if err := w.l.rc.Control(w.onSet); err != nil {
		w.err = fmt.Errorf("epoll set: %w", err)
	}
}

func (w *Watch) setFD(epfd uintptr) {
	if err := unix.EpollCtl(int(epfd), w.op, w.fd, &w.ev); err != nil {
		w.err = fmt.Errorf("epoll_ctl: %w", err)
	}
}
