package zds

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"net"
	"os"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/protobuf/proto"
	"istio.io/istio/pkg/zdsapi"

	"github.com/ztgo/ztgo/redirect"
)

// Defaults, as ztunnel has them.
const (
	// DefaultSocketPath is ztunnel's INPOD_UDS default.
	DefaultSocketPath = "/var/run/ztunnel/ztunnel.sock"
	// DefaultInitialBackoff and DefaultMaxBackoff bound the reconnect delay.
	DefaultInitialBackoff = 10 * time.Millisecond
	DefaultMaxBackoff     = 15 * time.Second
	// DefaultRetryInterval is how often pods whose start failed are tried again.
	DefaultRetryInterval = 5 * time.Second

	// maxPacket is the receive buffer: a larger packet is truncated and rejected, as both
	// ends of the protocol do.
	maxPacket = 1024
	// writeTimeout bounds one send; the node agent waits 5 s for an answer.
	writeTimeout = 5 * time.Second
	// maxSocketPath is sockaddr_un's sun_path on Linux, less its NUL.
	maxSocketPath = 107
)

// Config is the ZDS client's configuration; zero fields take the defaults.
type Config struct {
	// SocketPath is the node agent's SOCK_SEQPACKET socket (INPOD_UDS).
	SocketPath string
	// InitialBackoff and MaxBackoff bound the reconnect delay, which doubles after each
	// failed connect or connection and starts over after a connection that completed its
	// snapshot.
	InitialBackoff, MaxBackoff time.Duration
	// RetryInterval is how often pods whose AddPod failed are retried while connected.
	RetryInterval time.Duration
}

// WorkloadInfo is what the node agent tells about a pod: ztgo finds the pod's WDS workload
// by these on the local node.
type WorkloadInfo struct {
	Name, Namespace, ServiceAccount string
}

// Handler starts and stops the in-pod proxies. The client calls it from one goroutine, one
// call at a time, and answers the node agent only after the call returns; the agent gives
// up waiting after 5 s, so a call should not take that long.
type Handler interface {
	// AddPod starts the proxy of pod uid inside netns. The client owns netns: it stays
	// open until DelPod(uid) has returned, or, if AddPod fails, until the client drops the
	// pod; the handler must not close it and must duplicate it (Netns.Dup) to keep it longer.
	// An error NACKs the add ("failure to start proxy") and the client retries the call
	// every RetryInterval, with the same netns, while the connection lasts. ctx ends when
	// the client stops.
	AddPod(ctx context.Context, uid string, info WorkloadInfo, netns redirect.Netns) error
	// DelPod stops the proxy of a pod for which AddPod succeeded: the node agent deleted
	// it, a snapshot left it out, its netns changed, or the client is stopping.
	DelPod(uid string)
	// Snapshot reports, after each snapshot_sent has been reconciled, the UIDs of the pods
	// now running (sorted). A handler that has proxies the client does not know of may
	// stop those not listed.
	Snapshot(active []string)
}

// Client is a ZDS client: it connects to the node agent, keeps the set of running pods in
// step with it through a Handler, and reconnects until stopped.
type Client struct {
	cfg     Config
	h       Handler
	log     *slog.Logger
	metrics *Metrics

	ready     chan struct{}
	readyOnce sync.Once
	isReady   atomic.Bool

	mu      sync.Mutex // guards started, cancel and done
	started bool
	cancel  context.CancelFunc
	done    chan struct{}

	// Owned by the run goroutine.
	pods map[string]*pod
}

// pod is a pod the client holds a netns for: running (Client.pods) or pending
// (session.pending).
type pod struct {
	info  WorkloadInfo
	netns redirect.Netns
}

// New validates cfg and returns a client driving h. log may be nil; the metrics are
// registered on reg (nil: not registered).
func New(cfg Config, h Handler, log *slog.Logger, reg prometheus.Registerer) (*Client, error) {
	if h == nil {
		return nil, errors.New("new zds client: nil handler")
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if cfg.SocketPath == "" {
		cfg.SocketPath = DefaultSocketPath
	}
	if cfg.InitialBackoff == 0 {
		cfg.InitialBackoff = DefaultInitialBackoff
	}
	if cfg.MaxBackoff == 0 {
		cfg.MaxBackoff = DefaultMaxBackoff
	}
	if cfg.RetryInterval == 0 {
		cfg.RetryInterval = DefaultRetryInterval
	}
	switch {
	case len(cfg.SocketPath) > maxSocketPath:
		return nil, fmt.Errorf("new zds client: socket path %q longer than %d bytes", cfg.SocketPath, maxSocketPath)
	case cfg.InitialBackoff < 0 || cfg.MaxBackoff < cfg.InitialBackoff:
		return nil, fmt.Errorf("new zds client: bad backoff %v..%v", cfg.InitialBackoff, cfg.MaxBackoff)
	case cfg.RetryInterval < 0:
		return nil, fmt.Errorf("new zds client: negative retry interval %v", cfg.RetryInterval)
	}
	m, err := NewMetrics(reg)
	if err != nil {
		return nil, fmt.Errorf("new zds client: %w", err)
	}
	return &Client{
		cfg:     cfg,
		h:       h,
		log:     log,
		metrics: m,
		ready:   make(chan struct{}),
		pods:    map[string]*pod{},
	}, nil
}

// Start spawns the goroutine that connects to the node agent and reconnects until ctx ends
// or Stop is called. It does not wait for the agent: see Ready.
func (c *Client) Start(ctx context.Context) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.started {
		return errors.New("start zds client: already started")
	}
	c.started = true
	ctx, c.cancel = context.WithCancel(ctx)
	c.done = make(chan struct{})
	go c.run(ctx)
	return nil
}

// Stop closes the connection, removes every running pod (DelPod, as ztunnel drains its
// proxies when it shuts down), closes every netns fd and waits for the goroutine. It may
// be called more than once, and before Start.
func (c *Client) Stop() {
	c.mu.Lock()
	cancel, done := c.cancel, c.done
	c.mu.Unlock()
	if cancel == nil {
		return
	}
	cancel()
	<-done
}

// Ready is closed the first time a connection has processed snapshot_sent with no pod
// pending: ztgo's readiness probe waits for it (ztunnel's "workload proxy manager" task).
func (c *Client) Ready() <-chan struct{} { return c.ready }

// IsReady says whether the client is ready now: connected, snapshot processed, no pod
// pending.
func (c *Client) IsReady() bool { return c.isReady.Load() }

func (c *Client) setReady(ok bool) {
	c.isReady.Store(ok)
	if ok {
		c.readyOnce.Do(func() { close(c.ready) })
	}
}

// run connects and serves until ctx ends, then removes every pod.
func (c *Client) run(ctx context.Context) {
	defer close(c.done)
	defer c.drain()
	delay := c.cfg.InitialBackoff
	var d net.Dialer
	for {
		conn, err := d.DialContext(ctx, "unixpacket", c.cfg.SocketPath)
		if err == nil {
			synced, err := c.serve(ctx, conn.(*net.UnixConn))
			c.setReady(false)
			if ctx.Err() != nil {
				return
			}
			if synced {
				delay = c.cfg.InitialBackoff
			}
			if err != nil {
				c.log.Warn("zds connection ended", "error", err, "retry_in", delay)
			} else {
				c.log.Info("zds connection closed by the node agent", "retry_in", delay)
			}
		} else {
			if ctx.Err() != nil {
				return
			}
			c.log.Warn("connect to the istio-cni node agent failed; is the node agent healthy?",
				"socket", c.cfg.SocketPath, "error", err, "retry_in", delay)
		}
		t := time.NewTimer(delay)
		select {
		case <-ctx.Done():
			t.Stop()
			return
		case <-t.C:
		}
		delay = min(2*delay, c.cfg.MaxBackoff)
	}
}

// drain removes every running pod; the run goroutine calls it last.
func (c *Client) drain() {
	for _, uid := range sortedKeys(c.pods) {
		c.delPod(uid)
	}
}

// delPod stops a running pod and closes its netns.
func (c *Client) delPod(uid string) {
	p, ok := c.pods[uid]
	if !ok {
		return
	}
	delete(c.pods, uid)
	c.h.DelPod(uid)
	p.netns.Close()
	c.metrics.stopped.Inc()
	c.metrics.active.Set(float64(len(c.pods)))
}

// protocolError is a request the client cannot make sense of; the connection is closed
// after its NACK.
type protocolError struct{ msg string }

func (e *protocolError) Error() string { return e.msg }

func protocolErrorf(format string, args ...any) error {
	return &protocolError{msg: fmt.Sprintf(format, args...)}
}

// NACK texts, as ztunnel words them.
const (
	nackRead    = "failure to read message : "
	nackProcess = "failure to process message : "
	nackStart   = "failure to start proxy : "
)

// session is the state of one connection.
type session struct {
	c    *Client
	conn *net.UnixConn
	// synced is set once snapshot_sent has been processed.
	synced bool
	// names are the UIDs added or kept before snapshot_sent.
	names map[string]struct{}
	// pending are the pods whose AddPod failed, retried at retryAt.
	pending map[string]*pod
	retryAt time.Time
}

// serve runs one connection: hello, then one answer per request until the connection
// ends, a request is a protocol error, or ctx ends. synced says whether the snapshot was
// completed.
func (c *Client) serve(ctx context.Context, conn *net.UnixConn) (synced bool, err error) {
	stop := context.AfterFunc(ctx, func() { conn.Close() })
	defer stop()
	defer conn.Close()
	s := &session{c: c, conn: conn, names: map[string]struct{}{}, pending: map[string]*pod{}}
	defer s.end()

	if err := s.send(&zdsapi.ZdsHello{Version: zdsapi.Version_V1}); err != nil {
		return false, fmt.Errorf("send hello: %w", err)
	}
	c.log.Info("connected to the istio-cni node agent", "socket", c.cfg.SocketPath)

	buf := make([]byte, maxPacket)
	oob := make([]byte, oobSize)
	for {
		if !s.retryAt.IsZero() && !time.Now().Before(s.retryAt) {
			s.retryPending(ctx)
		}
		if err := conn.SetReadDeadline(s.retryAt); err != nil {
			return s.synced, fmt.Errorf("set read deadline: %w", err)
		}
		req, err := readRequest(conn, buf, oob)
		var perr *protocolError
		switch {
		case err == nil:
		case errors.Is(err, os.ErrDeadlineExceeded):
			continue
		case errors.As(err, &perr):
			c.log.Error("zds: bad request from the node agent", "error", err)
			if serr := s.answer(nackRead + err.Error()); serr != nil {
				return s.synced, fmt.Errorf("send nack: %w", serr)
			}
			return s.synced, fmt.Errorf("read request: %w", err)
		case errors.Is(err, io.EOF):
			return s.synced, nil
		default:
			return s.synced, fmt.Errorf("read request: %w", err)
		}
		nack, err := s.handle(ctx, req)
		c.setReady(s.synced && len(s.pending) == 0)
		if serr := s.answer(nack); serr != nil {
			return s.synced, fmt.Errorf("send ack: %w", serr)
		}
		if err != nil {
			return s.synced, err
		}
	}
}

// end closes the pending pods' netns fds.
func (s *session) end() {
	for uid, p := range s.pending {
		p.netns.Close()
		delete(s.pending, uid)
	}
	s.c.metrics.pending.Set(0)
}

// answer sends WorkloadResponse{ack{error: nack}}.
func (s *session) answer(nack string) error {
	return s.send(&zdsapi.WorkloadResponse{Payload: &zdsapi.WorkloadResponse_Ack{Ack: &zdsapi.Ack{Error: nack}}})
}

func (s *session) send(m proto.Message) error {
	b, err := proto.Marshal(m)
	if err != nil {
		return err
	}
	if err := s.conn.SetWriteDeadline(time.Now().Add(writeTimeout)); err != nil {
		return err
	}
	_, err = s.conn.Write(b)
	return err
}

// handle applies one request and returns the NACK text ("" to ACK) and, for a protocol
// error, the error that ends the connection after the answer.
func (s *session) handle(ctx context.Context, req request) (string, error) {
	c := s.c
	switch req.kind {
	case kindAdd:
		return s.add(ctx, req)
	case kindKeep:
		if s.synced {
			return nackProcess + "pod keep received after snapshot", protocolErrorf("keep %s after snapshot", req.uid)
		}
		c.log.Info("zds: pod keep received; it will not be removed when the snapshot is sent", "uid", req.uid)
		s.names[req.uid] = struct{}{}
	case kindDel:
		c.log.Info("zds: pod delete received, stopping its proxy", "uid", req.uid)
		if !s.synced {
			// The pod is removed at snapshot_sent, unless added again before it.
			delete(s.names, req.uid)
			s.dropPending(req.uid, redirect.Netns{})
			return "", nil
		}
		s.dropPending(req.uid, redirect.Netns{})
		c.delPod(req.uid)
	case kindSnapshotSent:
		if s.synced {
			return nackProcess + "pod snapshot received already", protocolErrorf("duplicate snapshot_sent")
		}
		for _, uid := range sortedKeys(c.pods) {
			if _, ok := s.names[uid]; !ok {
				c.log.Info("zds: pod not in the snapshot, stopping its proxy", "uid", uid)
				c.delPod(uid)
			}
		}
		s.names = nil
		s.synced = true
		c.h.Snapshot(sortedKeys(c.pods))
		c.log.Info("zds: snapshot received", "pods", len(c.pods), "pending", len(s.pending))
	}
	return "", nil
}

func (s *session) add(ctx context.Context, req request) (string, error) {
	c := s.c
	if req.info == nil {
		closeFd(req.fd)
		return nackProcess + "workload_info is required but not present", protocolErrorf("add %s without workload_info", req.uid)
	}
	info := WorkloadInfo{Name: req.info.GetName(), Namespace: req.info.GetNamespace(), ServiceAccount: req.info.GetServiceAccount()}
	log := c.log.With("uid", req.uid, "name", info.Name, "namespace", info.Namespace)
	log.Info("zds: pod received, starting its proxy")
	if !s.synced {
		s.names[req.uid] = struct{}{}
	}
	ns, err := redirect.NetnsFromFD(req.fd)
	if err != nil {
		log.Error("zds: bad netns fd", "error", err)
		return nackStart + err.Error(), nil
	}
	if err := s.start(ctx, req.uid, info, ns); err != nil {
		log.Error("zds: failed to start proxy; will retry", "error", err, "retry_in", c.cfg.RetryInterval)
		return nackStart + err.Error(), nil
	}
	return "", nil
}

// start makes pod uid run in ns: nothing to do if it already runs there; otherwise the old
// pod is removed and AddPod called. On failure the pod is kept pending, with ns, and a
// retry is scheduled. start owns ns.
func (s *session) start(ctx context.Context, uid string, info WorkloadInfo, ns redirect.Netns) error {
	c := s.c
	if p, ok := c.pods[uid]; ok {
		if p.netns.ID() == ns.ID() {
			s.dropPending(uid, ns)
			if p.netns != ns {
				ns.Close()
			}
			return nil
		}
		// The pod's sandbox has a new netns: replace its proxy.
		c.log.Info("zds: pod netns changed, replacing its proxy", "uid", uid, "old", p.netns.ID(), "new", ns.ID())
		s.dropPending(uid, ns)
		c.delPod(uid)
	}
	if err := c.h.AddPod(ctx, uid, info, ns); err != nil {
		s.dropPending(uid, ns)
		s.pending[uid] = &pod{info: info, netns: ns}
		c.metrics.pending.Set(float64(len(s.pending)))
		if s.retryAt.IsZero() {
			s.retryAt = time.Now().Add(c.cfg.RetryInterval)
		}
		return err
	}
	s.dropPending(uid, ns)
	c.pods[uid] = &pod{info: info, netns: ns}
	c.metrics.started.Inc()
	c.metrics.active.Set(float64(len(c.pods)))
	return nil
}

// dropPending forgets a pending pod and closes its netns, unless that is keep.
func (s *session) dropPending(uid string, keep redirect.Netns) {
	p, ok := s.pending[uid]
	if !ok {
		return
	}
	delete(s.pending, uid)
	if p.netns != keep {
		p.netns.Close()
	}
	s.c.metrics.pending.Set(float64(len(s.pending)))
}

// retryPending tries every pending pod again and schedules the next retry if some still
// fail.
func (s *session) retryPending(ctx context.Context) {
	s.retryAt = time.Time{}
	pending := s.pending
	s.pending = make(map[string]*pod, len(pending))
	for _, uid := range sortedKeys(pending) {
		p := pending[uid]
		s.c.log.Info("zds: retrying pod", "uid", uid)
		if err := s.start(ctx, uid, p.info, p.netns); err != nil {
			s.c.log.Info("zds: retrying pod failed", "uid", uid, "error", err)
		}
	}
	s.c.metrics.pending.Set(float64(len(s.pending)))
	s.c.setReady(s.synced && len(s.pending) == 0)
}

func sortedKeys[V any](m map[string]V) []string { return slices.Sorted(maps.Keys(m)) }
