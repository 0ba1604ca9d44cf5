// Package stages is the contract of ztgo's connection pipeline: the Flow that moves from stage
// to stage, the Stage interface, and the Pipeline that runs each stage as an actor.
//
// # Order
//
// Outbound (SOCKS5 today, 15001 capture later):
//
//	capture  -> identity -> hbone     (mesh destination: CONNECT on a pooled mTLS connection)
//	                     -> upstream  (plain TCP: passthrough or a non-HBONE workload)
//
// Inbound HBONE (each CONNECT stream of a 15008 connection):
//
//	capture  -> identity (authority -> local workload) -> authz -> upstream (dial the app, 200)
//
// A stage may change the rest of the plan (identity picks hbone or upstream). Once the last
// stage is done the flow is established and the relay owns both ends.
//
// # Actors
//
// Each stage owns a bounded mailbox and a fixed set of workers. Submitting to a full mailbox
// blocks the submitter (accept slows down) and counts a backpressure event; TrySubmit fails
// instead, for callers that must not block (an HTTP/2 read loop answers 503). Each hop is timed
// into the flow's trace record: queued, started, done.
//
// # Ownership
//
// A stage that returns Stop has finished the flow: it recorded Failure and Err. The pipeline
// then calls the flow's Finish hook, which closes both ends. A stage never closes Down or Up
// itself on Stop; on Next it hands them on untouched. Stages do not read or write stream bytes,
// except the capture stage's SOCKS5 handshake and the hbone stage's framing.
package stages

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/ztgo/ztgo/control/snapshot"
	"github.com/ztgo/ztgo/runtime/trace"
	"github.com/ztgo/ztgo/stages/authz"
	"github.com/ztgo/ztgo/stages/hbone"
	"github.com/ztgo/ztgo/stages/identity"
	"github.com/ztgo/ztgo/tls/spiffe"
)

// Direction of a flow, as ztunnel reports it.
type Direction uint8

const (
	Outbound Direction = iota
	Inbound
	InboundPlain
)

func (d Direction) String() string {
	switch d {
	case Inbound:
		return "inbound"
	case InboundPlain:
		return "inbound_plaintext"
	default:
		return "outbound"
	}
}

// Reporter is the Istio metric reporter label for the direction.
func (d Direction) Reporter() string {
	if d == Outbound {
		return "source"
	}
	return "destination"
}

// Failure is why a flow failed. Its String is the response_flags label of Istio's metrics.
type Failure uint8

const (
	FailNone Failure = iota
	FailDeny
	FailConnect
	FailTLS
	FailH2Handshake
	FailNetworkPolicy
	FailIdentity
	FailCertRevoked
	FailBadRequest
	FailOverload
)

var failureNames = [...]string{"-", "DENY", "CONNECT", "TLS_FAILURE", "H2_HANDSHAKE_FAILURE", "NETWORK_POLICY", "IDENTITY_ERROR", "CERT_REVOKED", "BAD_REQUEST", "OVERLOAD"}

func (f Failure) String() string {
	if int(f) < len(failureNames) {
		return failureNames[f]
	}
	return "UNKNOWN"
}

// ID names a stage.
type ID uint8

const (
	Capture ID = iota
	Identity
	Authz
	HBONE
	Upstream
	numStages
)

var stageNames = [numStages]string{"capture", "identity", "authz", "hbone", "upstream"}

func (id ID) String() string { return stageNames[id] }

// Pod is the in-pod proxy a captured flow entered through: the pod whose network namespace
// holds the listener. It names the flow's local workload and opens the flow's upstream sockets
// inside that namespace, so the pod's capture rules see them as ztgo's own (marked).
type Pod interface {
	// Workload returns the pod's workload and the snapshot it was found in. As ztunnel, it
	// waits a short while (5 s) for a pod that the control plane has not announced yet.
	Workload(ctx context.Context, snap *snapshot.Snapshot) (*snapshot.Workload, *snapshot.Snapshot, error)
	// Dial connects to dst from inside the pod; the kernel picks the source address.
	Dial(ctx context.Context, dst netip.AddrPort) (*net.TCPConn, error)
	// DialTransparent connects to dst from inside the pod with src as the source address
	// (inbound delivery keeps the client's address).
	DialTransparent(ctx context.Context, src netip.Addr, dst netip.AddrPort) (*net.TCPConn, error)
	// OriginalDst is where a captured connection was headed before the redirect.
	OriginalDst(c *net.TCPConn) (netip.AddrPort, error)
	// Scope names the pod's proxy in pooled connection keys (connpool.Key.Scope): HBONE
	// connections of the pod are dialled inside its namespace and shared with no other pod.
	Scope() string
}

// HalfCloser is a byte stream whose write side can be closed on its own (TCP, HBONE stream).
type HalfCloser interface {
	io.ReadWriteCloser
	CloseWrite() error
}

// Flow is one proxied connection on its way through the stages. It is owned by exactly one
// goroutine at a time: the stage worker that holds it, then the relay.
type Flow struct {
	ID  uint64
	Dir Direction
	// Snap is the snapshot loaded once when the flow was created; every decision uses it.
	Snap *snapshot.Snapshot

	// Src is the client's address; Dst the original destination (outbound) or the CONNECT
	// target (inbound).
	Src netip.AddrPort
	Dst netip.AddrPort
	// Local is the address the flow arrived on (a workload's HBONE address, inbound).
	Local netip.AddrPort

	SrcWorkload *snapshot.Workload
	SrcIdentity spiffe.ID
	DstWorkload *snapshot.Workload
	DstService  *snapshot.Service
	DstIdentity spiffe.ID

	Route    identity.Route
	Decision authz.Decision

	// Down is the client side: the app's TCP connection (outbound, plaintext) or the CONNECT
	// stream (inbound HBONE, then DownStream is set too).
	Down       HalfCloser
	DownStream *hbone.Stream
	// Up is the server side, set by the last stage.
	Up HalfCloser
	// Pod is set for flows captured in a pod's network namespace (15001, 15006, 15008 there);
	// nil for flows that entered through SOCKS5 or a node-namespace listener.
	Pod Pod

	// UpAddr is the address Up is connected to; HBONEAddr the CONNECT target, if any.
	UpAddr    netip.AddrPort
	HBONEAddr netip.AddrPort

	// TraceParent is the CONNECT's traceparent (inbound) or the one sent (outbound).
	TraceParent string

	Failure Failure
	Err     error

	Trace trace.Timeline

	plan        [numStages]ID
	nplan, step int

	// BytesSent counts bytes towards the server (Down -> Up); BytesRecv the other way.
	BytesSent, BytesRecv atomic.Int64
	// FirstByte is how long after establishment the first byte came back from the server
	// (HBONE flows; zero if none came or it was not measured).
	FirstByte time.Duration

	abortMu sync.Mutex
	aborted bool
	abortFn func()
}

// Abort closes the flow from outside its stages and relay (a policy change, a removed pod,
// shutdown): once the relay runs, through its abort (which closes both ends and wakes the
// relay's parked directions); before that, by closing Down, so that the relay, or the stage
// holding the flow, fails on it. It is safe from any goroutine, at any time.
func (f *Flow) Abort() {
	f.abortMu.Lock()
	f.aborted = true
	fn := f.abortFn
	f.abortMu.Unlock()
	if fn != nil {
		fn()
		return
	}
	if f.Down != nil {
		f.Down.Close()
	}
}

// SetAbort installs the relay's abort for Abort. It returns false, installing nothing, when
// the flow was aborted already: the caller then aborts the relay itself.
func (f *Flow) SetAbort(fn func()) bool {
	f.abortMu.Lock()
	defer f.abortMu.Unlock()
	if f.aborted {
		return false
	}
	f.abortFn = fn
	return true
}

// SetPlan sets the stages the flow will go through, starting now.
func (f *Flow) SetPlan(ids ...ID) {
	f.nplan = copy(f.plan[:], ids)
	f.step = 0
}

// ReplaceRest replaces the stages after the current one.
func (f *Flow) ReplaceRest(ids ...ID) {
	f.nplan = f.step + 1 + copy(f.plan[f.step+1:], ids)
}

// Fail records why the flow failed; the stage then returns Stop.
func (f *Flow) Fail(kind Failure, err error) Verdict {
	f.Failure, f.Err = kind, err
	return Stop
}

// Verdict is what a stage decided for a flow.
type Verdict uint8

const (
	// Next hands the flow to the next stage of its plan (or to the relay after the last).
	Next Verdict = iota
	// Stop ends the flow: the stage recorded why with Fail.
	Stop
)

// Stage is one step of the pipeline. Handle may block (dials, handshakes): it runs on the
// stage's workers, never on an event loop.
type Stage interface {
	Handle(ctx context.Context, f *Flow) Verdict
}

// StageFunc adapts a function to Stage.
type StageFunc func(ctx context.Context, f *Flow) Verdict

func (fn StageFunc) Handle(ctx context.Context, f *Flow) Verdict { return fn(ctx, f) }

// StageConfig sets a stage's actor: its handler, workers and mailbox size.
type StageConfig struct {
	Stage   Stage
	Workers int
	Mailbox int
	// Inline fuses the stage into the one before it in a plan: it runs on that stage's worker
	// right after it, without a mailbox hop (the hop is a channel send and a goroutine wake-up,
	// more than a cheap stage's own work). Only for stages that never block. The stage keeps
	// its actor for plans that start with it, and the trace records it as its own stage, with
	// no time queued.
	Inline bool
}

// Hooks are what the pipeline calls when a flow leaves it.
type Hooks struct {
	// Established is called (on the last stage's worker) with a flow whose Up is set; it must
	// hand the flow to the relay and return quickly.
	Established func(f *Flow)
	// Failed is called with a flow a stage stopped; it must close the flow's ends.
	Failed func(f *Flow)
}

// Pipeline runs the stages as actors.
type Pipeline struct {
	// stopMu orders submissions against Stop: Submit and TrySubmit hold it shared across
	// their check and send, Stop takes it exclusively to set stopped, so no flow can land in
	// a mailbox after Stop drained it.
	stopMu  sync.RWMutex
	stopped atomic.Bool
	actors  [numStages]*actor
	hooks   Hooks
	nextID  atomic.Uint64
	m       *pipelineMetrics
	wg      sync.WaitGroup
	cancel  context.CancelFunc
}

type actor struct {
	id      ID
	stage   Stage
	inline  bool
	workers int
	mailbox chan *Flow
	// The stage's counters, resolved once so a full mailbox never hashes labels.
	backpressure, rejected prometheus.Counter
}

type pipelineMetrics struct {
	depth        *mailboxDepth
	backpressure *prometheus.CounterVec
	rejected     *prometheus.CounterVec
}

// mailboxDepth exports ztgo_stage_mailbox_depth by reading each mailbox's length when scraped:
// the workers write nothing per flow, and the value is never stale.
type mailboxDepth struct {
	desc   *prometheus.Desc
	actors *[numStages]*actor
}

func (d *mailboxDepth) Describe(ch chan<- *prometheus.Desc) { ch <- d.desc }

func (d *mailboxDepth) Collect(ch chan<- prometheus.Metric) {
	for _, a := range d.actors {
		ch <- prometheus.MustNewConstMetric(d.desc, prometheus.GaugeValue, float64(len(a.mailbox)), a.id.String())
	}
}

// Errors of Submit and TrySubmit.
var (
	// ErrOverloaded: the first stage's mailbox is full (TrySubmit).
	ErrOverloaded = errors.New("stages: mailbox full")
	// ErrStopped: the pipeline is stopping and takes no new flows.
	ErrStopped = errors.New("stages: pipeline stopped")
)

// NewPipeline builds the actors; Start runs them. Every stage ID must be configured.
func NewPipeline(cfgs map[ID]StageConfig, hooks Hooks, reg prometheus.Registerer) (*Pipeline, error) {
	if hooks.Established == nil || hooks.Failed == nil {
		return nil, errors.New("stages: both hooks are required")
	}
	p := &Pipeline{hooks: hooks}
	p.m = &pipelineMetrics{
		depth: &mailboxDepth{
			desc:   prometheus.NewDesc("ztgo_stage_mailbox_depth", "Flows waiting in each stage's mailbox.", []string{"stage"}, nil),
			actors: &p.actors,
		},
		backpressure: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "ztgo_stage_backpressure_total", Help: "Submissions that found a stage's mailbox full and had to wait.",
		}, []string{"stage"}),
		rejected: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "ztgo_stage_rejected_total", Help: "Flows refused because a stage's mailbox was full (callers that cannot wait).",
		}, []string{"stage"}),
	}
	for id := ID(0); id < numStages; id++ {
		c, ok := cfgs[id]
		if !ok || c.Stage == nil {
			return nil, fmt.Errorf("stages: stage %s not configured", id)
		}
		if c.Workers <= 0 {
			c.Workers = 16
		}
		if c.Mailbox <= 0 {
			c.Mailbox = 1024
		}
		p.actors[id] = &actor{
			id: id, stage: c.Stage, inline: c.Inline, workers: c.Workers, mailbox: make(chan *Flow, c.Mailbox),
			backpressure: p.m.backpressure.WithLabelValues(id.String()),
			rejected:     p.m.rejected.WithLabelValues(id.String()),
		}
	}
	if reg != nil {
		for _, c := range []prometheus.Collector{p.m.depth, p.m.backpressure, p.m.rejected} {
			if err := reg.Register(c); err != nil {
				return nil, fmt.Errorf("register pipeline metrics: %w", err)
			}
		}
	}
	return p, nil
}

// Start runs every stage's workers until Stop.
func (p *Pipeline) Start() {
	ctx, cancel := context.WithCancel(context.Background())
	p.cancel = cancel
	for _, a := range p.actors {
		for i := 0; i < a.workers; i++ {
			p.wg.Add(1)
			go p.work(ctx, a)
		}
	}
}

// Stop ends the workers after the flows they hold; flows still queued are failed.
func (p *Pipeline) Stop() {
	p.stopMu.Lock()
	p.stopped.Store(true)
	p.stopMu.Unlock()
	if p.cancel == nil {
		return
	}
	p.cancel()
	p.wg.Wait()
	for _, a := range p.actors {
		for {
			select {
			case f := <-a.mailbox:
				f.Fail(FailOverload, errors.New("proxy shutting down"))
				p.hooks.Failed(f)
				continue
			default:
			}
			break
		}
	}
}

// NewFlow returns a flow with a fresh id and the given plan, bound to snap.
func (p *Pipeline) NewFlow(dir Direction, snap *snapshot.Snapshot, plan ...ID) *Flow {
	f := &Flow{ID: p.nextID.Add(1), Dir: dir, Snap: snap}
	f.SetPlan(plan...)
	f.Trace.ID = f.ID
	f.Trace.Direction = dir.String()
	f.Trace.Begin = time.Now()
	return f
}

// Submit queues f for the first stage of its plan, waiting while the mailbox is full.
func (p *Pipeline) Submit(ctx context.Context, f *Flow) error {
	p.stopMu.RLock()
	defer p.stopMu.RUnlock()
	if p.stopped.Load() {
		return ErrStopped
	}
	a := p.actors[f.plan[f.step]]
	f.Trace.Enter(a.id.String(), time.Now())
	select {
	case a.mailbox <- f:
		return nil
	default:
	}
	a.backpressure.Inc()
	select {
	case a.mailbox <- f:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// TrySubmit queues f without waiting; it fails with ErrOverloaded when the mailbox is full.
func (p *Pipeline) TrySubmit(f *Flow) error {
	p.stopMu.RLock()
	defer p.stopMu.RUnlock()
	if p.stopped.Load() {
		return ErrStopped
	}
	a := p.actors[f.plan[f.step]]
	f.Trace.Enter(a.id.String(), time.Now())
	select {
	case a.mailbox <- f:
		return nil
	default:
		a.rejected.Inc()
		return ErrOverloaded
	}
}

func (p *Pipeline) work(ctx context.Context, a *actor) {
	defer p.wg.Done()
	for {
		var f *Flow
		select {
		case <-ctx.Done():
			return
		case f = <-a.mailbox:
		}
		f.Trace.StartStage(time.Now())
		v := a.stage.Handle(ctx, f)
		now := time.Now()
		f.Trace.Leave(now)
		// Inline stages run here, one after the other, as long as the flow goes on.
		for v == Next {
			f.step++
			if f.step >= f.nplan || !p.actors[f.plan[f.step]].inline {
				break
			}
			in := p.actors[f.plan[f.step]]
			f.Trace.Enter(in.id.String(), now)
			f.Trace.StartStage(now)
			v = in.stage.Handle(ctx, f)
			now = time.Now()
			f.Trace.Leave(now)
		}
		if v == Stop {
			f.Trace.Outcome = f.Failure.String()
			p.hooks.Failed(f)
			continue
		}
		if f.step >= f.nplan {
			f.Trace.Established = now
			f.Trace.Outcome = "established"
			p.hooks.Established(f)
			continue
		}
		next := p.actors[f.plan[f.step]]
		f.Trace.Enter(next.id.String(), now)
		select {
		case next.mailbox <- f:
		default:
			next.backpressure.Inc()
			select {
			case next.mailbox <- f:
			case <-ctx.Done():
				f.Fail(FailOverload, errors.New("proxy shutting down"))
				p.hooks.Failed(f)
				return
			}
		}
	}
}
