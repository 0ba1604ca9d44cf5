package agent

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"maps"
	"net"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/sys/unix"
	"google.golang.org/protobuf/proto"
	"istio.io/istio/pkg/zdsapi"

	"github.com/ztgo/ztgo/redirect"
	"github.com/ztgo/ztgo/redirect/zds"
)

const (
	// ackTimeout bounds one request: its send and the wait for its answer, and the wait for
	// the hello (istio-cni's readWriteDeadline).
	ackTimeout = 5 * time.Second
	// maxPacket is the receive buffer; a larger packet is truncated and rejected, as both
	// ends of the protocol do.
	maxPacket = 1024
	// maxSocketPath is sockaddr_un's sun_path on Linux, less its NUL.
	maxSocketPath = 107
	// socketMode: only the owner (root, normally) may connect; a client gets every pod's
	// network namespace.
	socketMode = 0o600
)

// ServerConfig configures a Server; zero fields take the defaults.
type ServerConfig struct {
	// SocketPath is where the server listens (INPOD_UDS); default zds.DefaultSocketPath.
	SocketPath string
	// Logger is the server's logger; nil discards.
	Logger *slog.Logger
	// Registerer receives the server's metrics; nil: not registered.
	Registerer prometheus.Registerer
	// RetryInterval is how long the server waits before it sends a NACKed add again;
	// default DefaultRetryInterval.
	RetryInterval time.Duration
}

// Server is the node agent's end of ZDS: it holds the pods the Agent gives it (it is the
// Agent's Sink) and hands them, with their network namespaces, to the ZDS clients that
// connect: ztgo's redirect/zds.Client, or ztunnel. See the package documentation for its
// semantics.
type Server struct {
	cfg     ServerConfig
	log     *slog.Logger
	metrics *serverMetrics

	mu      sync.Mutex // guards everything below
	pods    map[string]*serverPod
	conns   []*serverConn // in the order they connected: the last is the newest
	nextID  uint64
	started bool
	stopped bool
	ln      *net.UnixListener
	cancel  context.CancelFunc
	wg      sync.WaitGroup
	// held counts, per pod, the connections that were sent an add (counted as it is sent)
	// and no del yet; changed is closed (and replaced) whenever a count drops. DelPod waits
	// on them.
	held    map[string]int
	changed chan struct{}
}

// serverPod is a pod the server holds: fd is its own duplicate of the pod's netns.
type serverPod struct {
	info zds.WorkloadInfo
	id   redirect.NetnsID
	fd   int
}

// NewServer validates cfg; Start listens.
func NewServer(cfg ServerConfig) (*Server, error) {
	if cfg.SocketPath == "" {
		cfg.SocketPath = zds.DefaultSocketPath
	}
	if len(cfg.SocketPath) > maxSocketPath {
		return nil, fmt.Errorf("new zds server: socket path %q longer than %d bytes", cfg.SocketPath, maxSocketPath)
	}
	if cfg.RetryInterval == 0 {
		cfg.RetryInterval = DefaultRetryInterval
	}
	if cfg.RetryInterval < 0 {
		return nil, fmt.Errorf("new zds server: negative retry interval %v", cfg.RetryInterval)
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	m, err := newServerMetrics(cfg.Registerer)
	if err != nil {
		return nil, fmt.Errorf("new zds server: %w", err)
	}
	return &Server{cfg: cfg, log: cfg.Logger, metrics: m, pods: map[string]*serverPod{},
		held: map[string]int{}, changed: make(chan struct{})}, nil
}

// Start listens on the socket, replacing a stale socket file left by an earlier run, and
// spawns the goroutine that accepts clients until ctx ends or Stop is called. Start it once
// the Agent is Ready: a client that connects earlier gets an incomplete snapshot and stops
// the proxies of the pods missing from it.
func (s *Server) Start(ctx context.Context) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	switch {
	case s.stopped:
		return errors.New("start zds server: stopped")
	case s.started:
		return errors.New("start zds server: already started")
	}
	path := s.cfg.SocketPath
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return fmt.Errorf("start zds server: %w", err)
	}
	if fi, err := os.Lstat(path); err == nil {
		if fi.Mode().Type() != fs.ModeSocket {
			return fmt.Errorf("start zds server: %s exists and is not a socket", path)
		}
		if err := os.Remove(path); err != nil {
			return fmt.Errorf("start zds server: remove stale socket: %w", err)
		}
	}
	ln, err := net.ListenUnix("unixpacket", &net.UnixAddr{Name: path, Net: "unixpacket"})
	if err != nil {
		return fmt.Errorf("start zds server: %w", err)
	}
	if err := os.Chmod(path, socketMode); err != nil {
		ln.Close()
		return fmt.Errorf("start zds server: %w", err)
	}
	s.started = true
	s.ln = ln
	ctx, s.cancel = context.WithCancel(ctx)
	s.wg.Go(func() { s.accept(ctx) })
	// Closing the listener ends accept; closing the connections ends their goroutines.
	s.wg.Go(func() {
		<-ctx.Done()
		ln.Close()
		s.closeConns()
	})
	s.log.Info("zds server listening", "socket", path)
	return nil
}

// Stop closes the socket (removing its file) and every connection, waits for the
// goroutines and closes the server's netns fds. The clients keep their pods: ztgo and
// ztunnel reconnect, and reconcile with the snapshot of the next server. AddPod fails
// afterwards. Stop may be called more than once, and before Start.
func (s *Server) Stop() {
	s.mu.Lock()
	s.stopped = true
	cancel := s.cancel
	s.mu.Unlock()
	if cancel != nil {
		cancel()
	}
	s.wg.Wait()
	s.mu.Lock()
	defer s.mu.Unlock()
	for uid, p := range s.pods {
		_ = unix.Close(p.fd)
		delete(s.pods, uid)
	}
}

func (s *Server) closeConns() {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, c := range s.conns {
		c.conn.Close()
	}
}

// AddPod records the pod with a duplicate of its netns fd, for the snapshot of every
// future connection, and queues an add to the newest connected client. It does not wait
// for the client: it returns nil once the pod is recorded, whether or not a client is
// connected (a ztgo that connects later gets the pod in its snapshot) and whatever the
// client answers (a NACKed add is logged, counted and sent again after RetryInterval, and
// the client retries on its own). It fails only if ns cannot be duplicated or the server
// has stopped. Adding a UID the server holds replaces it.
func (s *Server) AddPod(ctx context.Context, uid string, info zds.WorkloadInfo, ns redirect.Netns) error {
	if uid == "" {
		return errors.New("zds add pod: empty uid")
	}
	fd, err := ns.DupFd()
	if err != nil {
		return fmt.Errorf("zds add pod %s: %w", uid, err)
	}
	s.mu.Lock()
	if s.stopped {
		s.mu.Unlock()
		_ = unix.Close(fd)
		return fmt.Errorf("zds add pod %s: server stopped", uid)
	}
	old := s.pods[uid]
	s.pods[uid] = &serverPod{info: info, id: ns.ID(), fd: fd}
	s.notifyLocked()
	s.mu.Unlock()
	if old != nil {
		_ = unix.Close(old.fd)
	}
	return nil
}

// DelPod forgets the pod and queues a del to every connected client that was sent it.
//
// It returns once every connected client has acknowledged the delete (or dropped, or
// delWait has passed), as istio-cni's node agent waits for ztunnel: the agent removes the
// pod's capture rules next, and a proxy still serving the pod then would see its
// connections' NAT vanish under them (a FIN or RST it sends after that never reaches a
// client that came in through 15006).
func (s *Server) DelPod(uid string) {
	s.mu.Lock()
	p := s.pods[uid]
	delete(s.pods, uid)
	s.notifyLocked()
	s.mu.Unlock()
	if p != nil {
		_ = unix.Close(p.fd)
	}
	deadline := time.NewTimer(delWait)
	defer deadline.Stop()
	for {
		s.mu.Lock()
		n, ch := s.held[uid], s.changed
		s.mu.Unlock()
		if n == 0 {
			return
		}
		select {
		case <-ch:
		case <-deadline.C:
			s.log.Warn("zds clients did not confirm a pod delete in time", "uid", uid, "clients", n, "waited", delWait)
			return
		}
	}
}

// delWait bounds how long DelPod waits for the clients' acks (the ZDS answer deadline).
const delWait = 5 * time.Second

// release records that a connection no longer has pod uid (dupFd counted it) and wakes
// DelPod.
func (s *Server) release(uid string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.held[uid]--; s.held[uid] <= 0 {
		delete(s.held, uid)
	}
	close(s.changed)
	s.changed = make(chan struct{})
}

// notifyLocked wakes every connection to reconcile.
func (s *Server) notifyLocked() {
	for _, c := range s.conns {
		select {
		case c.notify <- struct{}{}:
		default:
		}
	}
}

// desired returns a copy of the pods (without their fds) and whether c is the newest
// connection, the one adds go to.
func (s *Server) desired(c *serverConn) (map[string]podKey, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	d := make(map[string]podKey, len(s.pods))
	for uid, p := range s.pods {
		d[uid] = podKey{info: p.info, id: p.id}
	}
	return d, len(s.conns) > 0 && s.conns[len(s.conns)-1] == c
}

// dupFd returns a duplicate of the fd of pod uid if the server still holds it as want; the
// caller closes it. Duplicating under the lock keeps DelPod from closing the fd, and the
// number from being reused, while a connection sends it. With hold, the connection counts
// as holding the pod from then on (see DelPod), in the same critical section: a DelPod
// either finds the count or removed the pod before the add could be sent.
func (s *Server) dupFd(uid string, want podKey, hold bool) (int, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	p := s.pods[uid]
	if p == nil || (podKey{info: p.info, id: p.id}) != want {
		return -1, false
	}
	fd, err := unix.FcntlInt(uintptr(p.fd), unix.F_DUPFD_CLOEXEC, 0)
	if err != nil {
		s.log.Error("zds: dup netns fd failed", "uid", uid, "error", err)
		return -1, false
	}
	if hold {
		s.held[uid]++
	}
	return fd, true
}

func (s *Server) accept(ctx context.Context) {
	for {
		uc, err := s.ln.AcceptUnix()
		if err != nil {
			if errors.Is(err, net.ErrClosed) || ctx.Err() != nil {
				return
			}
			s.log.Error("zds: accept failed", "error", err)
			// Out of fds, for instance: do not spin.
			select {
			case <-ctx.Done():
				return
			case <-time.After(100 * time.Millisecond):
			}
			continue
		}
		s.mu.Lock()
		if ctx.Err() != nil {
			s.mu.Unlock()
			uc.Close()
			return
		}
		s.nextID++
		c := &serverConn{
			s:      s,
			id:     s.nextID,
			conn:   uc,
			notify: make(chan struct{}, 1),
			resps:  make(chan readResult),
			closed: make(chan struct{}),
			sent:   map[string]sentPod{},
		}
		c.log = s.log.With("conn", c.id)
		s.conns = append(s.conns, c)
		n := len(s.conns)
		s.metrics.conns.Set(float64(n)) // under the lock, so that sets land in order
		s.mu.Unlock()
		c.log.Info("zds client connected", "connections", n)
		s.wg.Go(func() { c.serve(ctx) })
	}
}

// dropConn forgets a connection and wakes the others: if it was the newest, the next
// newest now receives adds.
func (s *Server) dropConn(c *serverConn) {
	for uid := range c.sent {
		s.release(uid)
	}
	s.mu.Lock()
	s.conns = slices.DeleteFunc(s.conns, func(x *serverConn) bool { return x == c })
	s.metrics.conns.Set(float64(len(s.conns)))
	s.notifyLocked()
	s.mu.Unlock()
}

// podKey is what a client was told about a pod.
type podKey struct {
	info zds.WorkloadInfo
	id   redirect.NetnsID
}

// sentPod is a pod a client was sent an add for.
type sentPod struct {
	podKey
	// acked: the client ACKed the add. Otherwise it NACKed, and the add is sent again at
	// retryAt (while this connection is the newest).
	acked   bool
	retryAt time.Time
}

type readResult struct {
	resp *zdsapi.WorkloadResponse
	err  error
}

// serverConn is one client connection. One goroutine (serve) sends requests and waits for
// each answer, so answers correlate with requests by order alone; another (read) reads
// every packet, so a client that closes the connection is noticed at once, even when idle.
type serverConn struct {
	s      *Server
	id     uint64
	conn   *net.UnixConn
	log    *slog.Logger
	notify chan struct{}   // wakes serve to reconcile
	resps  chan readResult // from read
	closed chan struct{}   // closed when serve returns

	// Owned by serve.
	sent map[string]sentPod
}

func (c *serverConn) serve(ctx context.Context) {
	var readerDone sync.WaitGroup
	defer func() {
		c.conn.Close()
		close(c.closed)
		readerDone.Wait()
		c.s.dropConn(c)
	}()
	v, err := c.readHello()
	if err != nil {
		c.log.Warn("zds client dropped before the snapshot", "error", err)
		return
	}
	c.log.Info("zds hello received", "version", v.String())
	readerDone.Go(c.read)
	err = c.run(ctx)
	switch {
	case ctx.Err() != nil:
	case err != nil:
		c.log.Warn("zds client connection ended", "error", err)
	default:
		c.log.Info("zds client disconnected")
	}
}

// readHello reads the client's first packet: ZdsHello with version V1 (a later version is
// accepted and spoken to as V1).
func (c *serverConn) readHello() (zdsapi.Version, error) {
	if err := c.conn.SetReadDeadline(time.Now().Add(ackTimeout)); err != nil {
		return 0, fmt.Errorf("read hello: %w", err)
	}
	b, err := c.readPacket(make([]byte, maxPacket), make([]byte, unix.CmsgSpace(4*4)))
	if err != nil {
		return 0, fmt.Errorf("read hello: %w", err)
	}
	if err := c.conn.SetReadDeadline(time.Time{}); err != nil {
		return 0, fmt.Errorf("read hello: %w", err)
	}
	var h zdsapi.ZdsHello
	if err := proto.Unmarshal(b, &h); err != nil {
		return 0, fmt.Errorf("decode hello: %w", err)
	}
	switch v := h.GetVersion(); {
	case v == zdsapi.Version_NOT_USED:
		return 0, errors.New("hello without a version")
	case v > zdsapi.Version_V1:
		c.log.Warn("zds client speaks a newer version; answering as V1", "version", v.String())
	}
	return h.GetVersion(), nil
}

// readPacket reads one packet with the protocol's rules: 1024 bytes at most, no
// truncation, no fds (any received are closed).
func (c *serverConn) readPacket(buf, oob []byte) ([]byte, error) {
	n, oobn, flags, _, err := c.conn.ReadMsgUnix(buf, oob)
	nfds := closeRights(oob[:max(min(oobn, len(oob)), 0)])
	switch {
	case err != nil:
		return nil, err
	case flags&unix.MSG_TRUNC != 0:
		return nil, errors.New("truncated message")
	case flags&unix.MSG_CTRUNC != 0:
		return nil, errors.New("truncated control message")
	case nfds > 0:
		return nil, fmt.Errorf("client sent %d fds", nfds)
	}
	return buf[:n], nil
}

// closeRights closes every fd in SCM_RIGHTS messages of oob and returns how many there were.
func closeRights(oob []byte) int {
	if len(oob) == 0 {
		return 0
	}
	msgs, err := unix.ParseSocketControlMessage(oob)
	if err != nil {
		return 0
	}
	n := 0
	for _, m := range msgs {
		fds, err := unix.ParseUnixRights(&m)
		if err != nil {
			continue
		}
		for _, fd := range fds {
			_ = unix.Close(fd)
		}
		n += len(fds)
	}
	return n
}

// read passes every packet to serve until the connection fails or closes.
func (c *serverConn) read() {
	buf := make([]byte, maxPacket)
	oob := make([]byte, unix.CmsgSpace(4*4))
	for {
		var r readResult
		b, err := c.readPacket(buf, oob)
		if err == nil {
			var resp zdsapi.WorkloadResponse
			if err = proto.Unmarshal(b, &resp); err == nil && resp.GetAck() == nil {
				err = errors.New("WorkloadResponse without ack")
			}
			r.resp = &resp
		}
		r.err = err
		select {
		case c.resps <- r:
		case <-c.closed:
			return
		}
		if err != nil {
			return
		}
	}
}

// run sends the snapshot, then keeps the client in step with the server's pods until the
// connection ends. It returns nil when the client closed the connection.
func (c *serverConn) run(ctx context.Context) error {
	if err := c.snapshot(); err != nil {
		return err
	}
	for {
		if err := c.reconcile(); err != nil {
			return err
		}
		var retry *time.Timer
		var retryC <-chan time.Time
		if next := c.nextRetry(); !next.IsZero() {
			retry = time.NewTimer(max(time.Until(next), 0))
			retryC = retry.C
		}
		var r readResult
		var got bool
		select {
		case <-ctx.Done():
		case <-c.notify:
		case <-retryC:
		case r = <-c.resps:
			got = true
		}
		if retry != nil {
			retry.Stop()
		}
		switch {
		case ctx.Err() != nil:
			return nil
		case !got:
		case errors.Is(r.err, io.EOF):
			return nil
		case r.err != nil:
			return fmt.Errorf("read: %w", r.err)
		default:
			return errors.New("unsolicited message from the client")
		}
	}
}

// snapshot sends an add for every pod, sorted by UID, then snapshot_sent.
func (c *serverConn) snapshot() error {
	d, _ := c.s.desired(c)
	for _, uid := range slices.Sorted(maps.Keys(d)) {
		if err := c.add(uid, d[uid]); err != nil {
			return err
		}
	}
	nack, err := c.request("snapshot_sent", &zdsapi.WorkloadRequest{
		Payload: &zdsapi.WorkloadRequest_SnapshotSent{SnapshotSent: &zdsapi.SnapshotSent{}},
	}, -1)
	if err != nil {
		return err
	}
	if nack != "" {
		c.log.Error("zds client NACKed snapshot_sent", "error", nack)
	}
	c.log.Info("zds snapshot sent", "pods", len(d))
	return nil
}

// reconcile sends what the client is missing: a del for every pod it was sent that the
// server no longer holds as sent, and, on the newest connection, an add for every pod not
// sent yet, changed since, or NACKed and due for a retry. A changed pod gets a del, then
// an add, so that the client applies new workload info even when the netns is the same.
func (c *serverConn) reconcile() error {
	d, newest := c.s.desired(c)
	for _, uid := range slices.Sorted(maps.Keys(c.sent)) {
		if want, ok := d[uid]; ok && want == c.sent[uid].podKey {
			continue
		}
		if err := c.del(uid); err != nil {
			return err
		}
	}
	if !newest {
		return nil
	}
	now := time.Now()
	for _, uid := range slices.Sorted(maps.Keys(d)) {
		if sp, ok := c.sent[uid]; ok && (sp.acked || now.Before(sp.retryAt)) {
			continue
		}
		if err := c.add(uid, d[uid]); err != nil {
			return err
		}
	}
	return nil
}

func (c *serverConn) nextRetry() time.Time {
	var next time.Time
	for _, sp := range c.sent {
		if !sp.acked && (next.IsZero() || sp.retryAt.Before(next)) {
			next = sp.retryAt
		}
	}
	return next
}

// add sends WorkloadRequest.add for uid with its netns fd. A NACK is logged and the add
// scheduled for a retry; only a transport failure is returned.
func (c *serverConn) add(uid string, k podKey) error {
	// The client may start the pod as soon as the add is sent, so the connection holds the
	// pod from the send on, not from the answer: a DelPod meanwhile waits for the del.
	_, had := c.sent[uid]
	fd, ok := c.s.dupFd(uid, k, !had)
	if !ok {
		return nil // deleted or changed meanwhile; the next reconcile sees it
	}
	defer unix.Close(fd)
	if !had {
		c.sent[uid] = sentPod{podKey: k} // if the request fails, dropConn releases the hold
	}
	log := c.log.With("uid", uid, "name", k.info.Name, "namespace", k.info.Namespace,
		"service_account", k.info.ServiceAccount, "netns", k.id.String())
	nack, err := c.request("add", &zdsapi.WorkloadRequest{Payload: &zdsapi.WorkloadRequest_Add{Add: &zdsapi.AddWorkload{
		Uid: uid,
		WorkloadInfo: &zdsapi.WorkloadInfo{
			Name: k.info.Name, Namespace: k.info.Namespace, ServiceAccount: k.info.ServiceAccount,
		},
	}}}, fd)
	if err != nil {
		return err
	}
	if nack != "" {
		c.sent[uid] = sentPod{podKey: k, retryAt: time.Now().Add(c.s.cfg.RetryInterval)}
		log.Error("zds client NACKed pod add; will send it again", "error", nack, "retry_in", c.s.cfg.RetryInterval)
		return nil
	}
	c.sent[uid] = sentPod{podKey: k, acked: true}
	log.Info("zds pod sent")
	return nil
}

func (c *serverConn) del(uid string) error {
	nack, err := c.request("del", &zdsapi.WorkloadRequest{Payload: &zdsapi.WorkloadRequest_Del{Del: &zdsapi.DelWorkload{Uid: uid}}}, -1)
	if err != nil {
		return err
	}
	if _, had := c.sent[uid]; had {
		delete(c.sent, uid)
		c.s.release(uid)
	}
	if nack != "" {
		c.log.Error("zds client NACKed pod delete", "uid", uid, "error", nack)
	} else {
		c.log.Info("zds pod delete sent", "uid", uid)
	}
	return nil
}

// request sends one request, with fd as SCM_RIGHTS if fd >= 0, and waits for its answer.
// It returns the NACK text ("" for an ACK); an error means the connection is unusable:
// the send failed, the answer did not come within ackTimeout (a late answer would be
// taken for the next request's), or it was not a WorkloadResponse with an ack.
func (c *serverConn) request(typ string, req *zdsapi.WorkloadRequest, fd int) (string, error) {
	nack, err := c.exchange(req, fd)
	result := resultAck
	switch {
	case err != nil:
		result = resultError
		err = fmt.Errorf("%s: %w", typ, err)
	case nack != "":
		result = resultNack
	}
	c.s.metrics.messages.WithLabelValues(typ, result).Inc()
	return nack, err
}

func (c *serverConn) exchange(req *zdsapi.WorkloadRequest, fd int) (string, error) {
	b, err := proto.Marshal(req)
	if err != nil {
		return "", fmt.Errorf("encode: %w", err)
	}
	var oob []byte
	if fd >= 0 {
		oob = unix.UnixRights(fd)
	}
	deadline := time.Now().Add(ackTimeout)
	if err := c.conn.SetWriteDeadline(deadline); err != nil {
		return "", fmt.Errorf("send: %w", err)
	}
	if _, _, err := c.conn.WriteMsgUnix(b, oob, nil); err != nil {
		return "", fmt.Errorf("send: %w", err)
	}
	t := time.NewTimer(time.Until(deadline))
	defer t.Stop()
	select {
	case r := <-c.resps:
		if r.err != nil {
			return "", fmt.Errorf("read answer: %w", r.err)
		}
		return r.resp.GetAck().GetError(), nil
	case <-t.C:
		return "", fmt.Errorf("no answer within %v", ackTimeout)
	}
}
