package agent

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"os"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/ztgo/ztgo/redirect"
	"github.com/ztgo/ztgo/redirect/zds"
)

// Defaults of Config.
const (
	// DefaultRetryInterval is how often a pod whose netns, rules or AddPod failed is tried
	// again (istio-cni and ztunnel retry every 5 s too).
	DefaultRetryInterval = 5 * time.Second
	// DefaultCheckInterval is how often every pod's rules are compared with the kernel's.
	DefaultCheckInterval = 30 * time.Second
)

// Sink receives the pods the agent has captured: the ZDS Server, or an in-process proxy.
// The agent calls it from one goroutine, one call at a time.
type Sink interface {
	// AddPod starts the pod's proxies. The agent keeps ns open until DelPod(uid) has returned;
	// a sink that keeps it longer must duplicate it. Agent.Stop, which leaves pods running,
	// also closes ns without DelPod: a sink that outlives the agent must hold its own copy.
	// An error makes the agent call AddPod again after the retry interval.
	AddPod(ctx context.Context, uid string, info zds.WorkloadInfo, ns redirect.Netns) error
	// DelPod stops the pod's proxies. The agent calls it only for a pod whose AddPod
	// succeeded.
	DelPod(uid string)
}

// Config configures an Agent; zero fields take the defaults.
type Config struct {
	// Dir is the pods directory: one file per pod (see ParsePodSpec).
	Dir string
	// PollInterval is the time between scans of Dir; default DefaultPollInterval.
	PollInterval time.Duration
	// RetryInterval is how often a pod that failed to start is tried again; default
	// DefaultRetryInterval.
	RetryInterval time.Duration
	// CheckInterval is how often each pod's rules are checked for drift and repaired;
	// default DefaultCheckInterval; negative disables the check.
	CheckInterval time.Duration
	// Rules are the capture rules installed in every pod.
	Rules redirect.RuleConfig
	// Logger is the agent's logger; nil discards.
	Logger *slog.Logger
	// Registerer receives the agent's metrics; nil: not registered.
	Registerer prometheus.Registerer
}

// PodStatus is what the agent knows of one pod, for observability.
type PodStatus struct {
	Spec PodSpec
	// File is the pod file that defines the pod.
	File string
	// NetnsID identifies the pod's open namespace; zero while it could not be opened.
	NetnsID redirect.NetnsID
	// RulesInstalled: the capture rules are in place (as of the last install or check).
	RulesInstalled bool
	// Started: the sink's AddPod succeeded.
	Started bool
	// Failures counts the failed attempts to start the pod (open netns, install, AddPod)
	// and to repair its rules.
	Failures int
	// LastError is the latest failure; "" once the pod is started with its rules in place.
	LastError string
}

// Agent turns pod files into captured pods: it opens each pod's network namespace,
// installs ztgo's capture rules there and hands the pod to a Sink; it undoes that when the
// file goes away, retries what fails and repairs rules that drift.
type Agent struct {
	cfg     Config
	sink    Sink
	log     *slog.Logger
	metrics *agentMetrics
	watcher *Watcher

	ready     chan struct{}
	readyOnce sync.Once
	status    atomic.Pointer[[]PodStatus]

	mu      sync.Mutex // guards started, cancel and done
	started bool
	cancel  context.CancelFunc
	done    chan struct{}

	// Owned by the run goroutine.
	pods map[string]*podState
}

// podState is one pod the agent manages.
type podState struct {
	spec      PodSpec
	file      string
	ns        redirect.Netns // valid once opened
	installed bool
	started   bool
	failures  int
	lastErr   string
	retryAt   time.Time // zero: nothing to retry
}

func (p *podState) pending() bool { return !p.installed || !p.started }

// New validates cfg; sink receives the pods.
func New(cfg Config, sink Sink) (*Agent, error) {
	if sink == nil {
		return nil, errors.New("new node agent: nil sink")
	}
	if cfg.Dir == "" {
		return nil, errors.New("new node agent: no pods directory")
	}
	if cfg.RetryInterval == 0 {
		cfg.RetryInterval = DefaultRetryInterval
	}
	if cfg.CheckInterval == 0 {
		cfg.CheckInterval = DefaultCheckInterval
	}
	if cfg.RetryInterval < 0 {
		return nil, fmt.Errorf("new node agent: negative retry interval %v", cfg.RetryInterval)
	}
	if err := cfg.Rules.Validate(); err != nil {
		return nil, fmt.Errorf("new node agent: %w", err)
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	w, err := NewWatcher(WatcherConfig{Dir: cfg.Dir, Interval: cfg.PollInterval, Logger: cfg.Logger})
	if err != nil {
		return nil, fmt.Errorf("new node agent: %w", err)
	}
	m, err := newAgentMetrics(cfg.Registerer)
	if err != nil {
		return nil, fmt.Errorf("new node agent: %w", err)
	}
	a := &Agent{
		cfg:     cfg,
		sink:    sink,
		log:     cfg.Logger,
		metrics: m,
		watcher: w,
		ready:   make(chan struct{}),
		pods:    map[string]*podState{},
	}
	a.status.Store(&[]PodStatus{})
	return a, nil
}

// Start checks that the pods directory exists and spawns the goroutines that watch it and
// apply its pods until ctx ends or Stop is called. It does not wait for the first scan:
// see Ready.
func (a *Agent) Start(ctx context.Context) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.started {
		return errors.New("start node agent: already started")
	}
	fi, err := os.Stat(a.cfg.Dir)
	if err != nil {
		return fmt.Errorf("start node agent: pods dir: %w", err)
	}
	if !fi.IsDir() {
		return fmt.Errorf("start node agent: pods dir %s is not a directory", a.cfg.Dir)
	}
	a.started = true
	ctx, a.cancel = context.WithCancel(ctx)
	a.done = make(chan struct{})
	events := make(chan []Event)
	var wg sync.WaitGroup
	wg.Go(func() {
		_ = a.watcher.Run(ctx, func(evs []Event) {
			select {
			case events <- evs:
			case <-ctx.Done():
			}
		})
	})
	wg.Go(func() { a.run(ctx, events) })
	go func() {
		wg.Wait()
		close(a.done)
	}()
	return nil
}

// Stop stops watching and waits for the goroutines. It leaves every pod as it is, rules
// installed and the sink's pods running, as istio-cni does when its agent restarts, so
// that a restarted agent picks them up without disturbing traffic; it only closes its
// netns handles. It may be called more than once, and before Start.
func (a *Agent) Stop() {
	a.mu.Lock()
	cancel, done := a.cancel, a.done
	a.mu.Unlock()
	if cancel == nil {
		return
	}
	cancel()
	<-done
}

// Ready is closed once the first scan of the pods directory has been applied: every pod
// found was tried once (started, or waiting for a retry).
func (a *Agent) Ready() <-chan struct{} { return a.ready }

// Pods returns the status of every pod, sorted by UID.
func (a *Agent) Pods() []PodStatus { return slices.Clone(*a.status.Load()) }

// run owns the pods: it applies scans, retries and checks until ctx ends.
func (a *Agent) run(ctx context.Context, events <-chan []Event) {
	defer a.closeAll()
	var checkC <-chan time.Time
	if a.cfg.CheckInterval > 0 {
		t := time.NewTicker(a.cfg.CheckInterval)
		defer t.Stop()
		checkC = t.C
	}
	retry := time.NewTimer(time.Hour)
	retry.Stop()
	defer retry.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case evs := <-events:
			a.apply(ctx, evs)
			// Pods reflects the scan before Ready closes.
			a.publish()
			a.readyOnce.Do(func() {
				a.log.Info("pods directory applied", "dir", a.cfg.Dir, "pods", len(a.pods))
				close(a.ready)
			})
		case <-retry.C:
			a.retryDue(ctx)
		case <-checkC:
			a.checkAll(ctx)
		}
		a.publish()
		if next := a.nextRetry(); !next.IsZero() {
			retry.Reset(max(time.Until(next), 0))
		} else {
			retry.Stop()
		}
	}
}

// apply handles one scan's events. A PodDeleted followed by a PodAdded of the same UID is a
// change: see replace.
func (a *Agent) apply(ctx context.Context, evs []Event) {
	added := map[string]Event{}
	for _, e := range evs {
		if e.Op == PodAdded {
			added[e.Pod.UID] = e
		}
	}
	for _, e := range evs {
		switch e.Op {
		case PodDeleted:
			if add, ok := added[e.Pod.UID]; ok {
				delete(added, e.Pod.UID)
				a.replace(ctx, add)
				continue
			}
			a.del(e.Pod.UID)
		case PodAdded:
			if _, ok := added[e.Pod.UID]; !ok {
				continue // handled as a change
			}
			if old := a.pods[e.Pod.UID]; old != nil {
				// Cannot happen: the watcher reports a delete first. Treat as a change.
				a.replace(ctx, e)
				continue
			}
			p := &podState{spec: e.Pod, file: e.File}
			a.pods[e.Pod.UID] = p
			a.log.Info("pod added", "uid", p.spec.UID, "name", p.spec.Name, "namespace", p.spec.Namespace,
				"service_account", p.spec.ServiceAccount, "netns", p.spec.Netns, "file", e.File)
			a.ensure(ctx, p)
		}
	}
}

// del forgets a pod: the sink stops it, then its rules are removed and its netns closed.
func (a *Agent) del(uid string) {
	p := a.pods[uid]
	if p == nil {
		return
	}
	delete(a.pods, uid)
	a.log.Info("pod deleted", "uid", uid, "name", p.spec.Name, "namespace", p.spec.Namespace, "file", p.file)
	if p.started {
		a.sink.DelPod(uid)
	}
	if p.ns.Valid() {
		a.removeRules(p)
		_ = p.ns.Close()
	}
}

// replace applies a changed pod file. The sink always gets DelPod and AddPod (the pod's
// identity or namespace changed). When the new path opens the same namespace, the rules
// stay in place: removing and reinstalling them would let the pod's connections bypass
// capture for a moment. Otherwise the old namespace's rules are removed.
func (a *Agent) replace(ctx context.Context, e Event) {
	uid := e.Pod.UID
	old := a.pods[uid]
	if old == nil {
		a.apply(ctx, []Event{e})
		return
	}
	a.log.Info("pod changed", "uid", uid, "name", e.Pod.Name, "namespace", e.Pod.Namespace,
		"service_account", e.Pod.ServiceAccount, "netns", e.Pod.Netns, "file", e.File)
	if old.started {
		a.sink.DelPod(uid)
	}
	p := &podState{spec: e.Pod, file: e.File}
	if ns, err := redirect.OpenNetns(e.Pod.Netns); err == nil {
		p.ns = ns
	}
	if old.ns.Valid() {
		if p.ns.Valid() && p.ns.ID() == old.ns.ID() {
			p.installed = old.installed
		} else {
			a.removeRules(old)
		}
		_ = old.ns.Close()
	}
	a.pods[uid] = p
	a.ensure(ctx, p)
}

func (a *Agent) removeRules(p *podState) {
	if err := redirect.Remove(p.ns); err != nil {
		a.metrics.ruleFailures.WithLabelValues(opRemove).Inc()
		a.log.Warn("remove capture rules failed", "uid", p.spec.UID, "netns", p.ns.String(), "error", err)
	}
}

// ensure brings a pod as far as it goes: netns open, rules installed, sink started. A
// failure is recorded and retried after RetryInterval.
func (a *Agent) ensure(ctx context.Context, p *podState) {
	p.retryAt = time.Time{}
	if !p.ns.Valid() {
		ns, err := redirect.OpenNetns(p.spec.Netns)
		if err != nil {
			a.fail(p, stageNetns, err)
			return
		}
		p.ns = ns
	}
	if !p.installed {
		if err := redirect.Install(p.ns, a.cfg.Rules); err != nil {
			a.metrics.ruleFailures.WithLabelValues(opInstall).Inc()
			a.fail(p, stageRules, err)
			return
		}
		a.metrics.ruleInstalls.Inc()
		p.installed = true
	}
	if !p.started {
		if err := a.sink.AddPod(ctx, p.spec.UID, p.spec.Info(), p.ns); err != nil {
			a.fail(p, stageSink, fmt.Errorf("add pod: %w", err))
			return
		}
		p.started = true
	}
	if p.lastErr != "" {
		a.log.Info("pod captured after earlier failures", "uid", p.spec.UID, "failures", p.failures)
	}
	p.lastErr = ""
}

// fail records a failed step and schedules a retry. The first failure, and each one with a
// new message, is logged as a warning; repeats at debug.
func (a *Agent) fail(p *podState, stage string, err error) {
	p.failures++
	a.metrics.podFailures.WithLabelValues(stage).Inc()
	msg := err.Error()
	lvl := slog.LevelWarn
	if msg == p.lastErr {
		lvl = slog.LevelDebug
	}
	p.lastErr = msg
	p.retryAt = time.Now().Add(a.cfg.RetryInterval)
	a.log.Log(context.Background(), lvl, "pod not captured; will retry", "uid", p.spec.UID, "stage", stage,
		"error", err, "failures", p.failures, "retry_in", a.cfg.RetryInterval)
}

// retryDue retries every pod whose retry time has come.
func (a *Agent) retryDue(ctx context.Context) {
	now := time.Now()
	for _, uid := range slices.Sorted(maps.Keys(a.pods)) {
		p := a.pods[uid]
		if !p.retryAt.IsZero() && !now.Before(p.retryAt) {
			a.ensure(ctx, p)
		}
	}
}

func (a *Agent) nextRetry() time.Time {
	var next time.Time
	for _, p := range a.pods {
		if !p.retryAt.IsZero() && (next.IsZero() || p.retryAt.Before(next)) {
			next = p.retryAt
		}
	}
	return next
}

// checkAll compares every installed pod's rules with the kernel and reinstalls those that
// drifted.
func (a *Agent) checkAll(ctx context.Context) {
	for _, uid := range slices.Sorted(maps.Keys(a.pods)) {
		if ctx.Err() != nil {
			return
		}
		p := a.pods[uid]
		if !p.installed {
			continue
		}
		drift, err := redirect.Check(p.ns, a.cfg.Rules)
		if err != nil {
			a.metrics.ruleFailures.WithLabelValues(opCheck).Inc()
			a.log.Warn("check capture rules failed", "uid", uid, "netns", p.ns.String(), "error", err)
			continue
		}
		if len(drift) == 0 {
			continue
		}
		a.log.Warn("capture rules drifted; reinstalling", "uid", uid, "netns", p.ns.String(), "drift", drift)
		if err := redirect.Install(p.ns, a.cfg.Rules); err != nil {
			a.metrics.ruleFailures.WithLabelValues(opInstall).Inc()
			p.installed = false
			a.fail(p, stageRules, fmt.Errorf("repair drift: %w", err))
			continue
		}
		a.metrics.ruleInstalls.Inc()
		a.metrics.driftRepairs.Inc()
	}
}

// publish stores the pods' status for Pods and updates the pod gauges.
func (a *Agent) publish() {
	st := make([]PodStatus, 0, len(a.pods))
	pending := 0
	for _, uid := range slices.Sorted(maps.Keys(a.pods)) {
		p := a.pods[uid]
		if p.pending() {
			pending++
		}
		s := PodStatus{
			Spec: p.spec, File: p.file, RulesInstalled: p.installed, Started: p.started,
			Failures: p.failures, LastError: p.lastErr,
		}
		if p.ns.Valid() {
			s.NetnsID = p.ns.ID()
		}
		st = append(st, s)
	}
	a.status.Store(&st)
	a.metrics.pods.WithLabelValues(stateCaptured).Set(float64(len(a.pods) - pending))
	a.metrics.pods.WithLabelValues(statePending).Set(float64(pending))
}

// closeAll closes every netns handle when the agent stops, leaving rules and the sink's
// pods in place.
func (a *Agent) closeAll() {
	for _, p := range a.pods {
		_ = p.ns.Close()
	}
	a.log.Info("node agent stopped; capture rules and pods left in place", "pods", len(a.pods))
}
