package stages

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net/netip"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/ztgo/ztgo/control/snapshot"
	"github.com/ztgo/ztgo/stages/hbone"
	"github.com/ztgo/ztgo/stages/upstream"
)

// recorder builds a pipeline whose stages append their id to the flow's path.
type recorder struct {
	mu          sync.Mutex
	established []*Flow
	failed      []*Flow
	done        chan struct{}
}

func newTestPipeline(t *testing.T, handle func(id ID) Stage, mailbox int, reg prometheus.Registerer) (*Pipeline, *recorder) {
	t.Helper()
	return newInlinePipeline(t, handle, mailbox, reg, nil)
}

// newInlinePipeline is newTestPipeline with the stages for which inline says so inline.
func newInlinePipeline(t *testing.T, handle func(id ID) Stage, mailbox int, reg prometheus.Registerer, inline func(ID) bool) (*Pipeline, *recorder) {
	t.Helper()
	r := &recorder{done: make(chan struct{}, 100)}
	cfgs := map[ID]StageConfig{}
	for id := ID(0); id < numStages; id++ {
		cfgs[id] = StageConfig{Stage: handle(id), Workers: 1, Mailbox: mailbox, Inline: inline != nil && inline(id)}
	}
	p, err := NewPipeline(cfgs, Hooks{
		Established: func(f *Flow) {
			r.mu.Lock()
			r.established = append(r.established, f)
			r.mu.Unlock()
			r.done <- struct{}{}
		},
		Failed: func(f *Flow) { r.mu.Lock(); r.failed = append(r.failed, f); r.mu.Unlock(); r.done <- struct{}{} },
	}, reg)
	if err != nil {
		t.Fatal(err)
	}
	p.Start()
	t.Cleanup(p.Stop)
	return p, r
}

func empty(t *testing.T) *snapshot.Snapshot {
	s, err := snapshot.Build(snapshot.Config{})
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func TestPlanOrderAndReplaceRest(t *testing.T) {
	var mu sync.Mutex
	var path []ID
	p, r := newTestPipeline(t, func(id ID) Stage {
		return StageFunc(func(ctx context.Context, f *Flow) Verdict {
			mu.Lock()
			path = append(path, id)
			mu.Unlock()
			if id == Identity {
				f.ReplaceRest(HBONE)
			}
			return Next
		})
	}, 8, nil)
	f := p.NewFlow(Outbound, empty(t), Capture, Identity, Upstream)
	if err := p.Submit(context.Background(), f); err != nil {
		t.Fatal(err)
	}
	<-r.done
	if len(r.established) != 1 || len(path) != 3 || path[0] != Capture || path[1] != Identity || path[2] != HBONE {
		t.Fatalf("path = %v, established %d", path, len(r.established))
	}
	spans := f.Trace.Spans()
	if len(spans) != 3 || spans[2].Stage != "hbone" || spans[2].End.IsZero() || f.Trace.Outcome != "established" {
		t.Fatalf("trace = %+v outcome %q", spans, f.Trace.Outcome)
	}
}

func TestStopGoesToFailedHook(t *testing.T) {
	p, r := newTestPipeline(t, func(id ID) Stage {
		return StageFunc(func(ctx context.Context, f *Flow) Verdict {
			if id == Identity {
				return f.Fail(FailDeny, errors.New("no"))
			}
			return Next
		})
	}, 8, nil)
	f := p.NewFlow(Inbound, empty(t), Capture, Identity, Authz, Upstream)
	p.Submit(context.Background(), f)
	<-r.done
	if len(r.failed) != 1 || f.Failure != FailDeny || f.Trace.Outcome != "DENY" || len(f.Trace.Spans()) != 2 {
		t.Fatalf("failed=%d failure=%v outcome=%q spans=%d", len(r.failed), f.Failure, f.Trace.Outcome, len(f.Trace.Spans()))
	}
}

func TestBackpressureAndTrySubmit(t *testing.T) {
	reg := prometheus.NewRegistry()
	release := make(chan struct{})
	p, r := newTestPipeline(t, func(id ID) Stage {
		return StageFunc(func(ctx context.Context, f *Flow) Verdict {
			if id == Capture {
				<-release
			}
			return Next
		})
	}, 1, reg)
	snap := empty(t)
	// One flow held by the worker, one in the mailbox: the mailbox is now full.
	p.Submit(context.Background(), p.NewFlow(Outbound, snap, Capture))
	p.Submit(context.Background(), p.NewFlow(Outbound, snap, Capture))
	deadline := time.Now().Add(2 * time.Second)
	for {
		if err := p.TrySubmit(p.NewFlow(Outbound, snap, Capture)); errors.Is(err, ErrOverloaded) {
			break
		} else if err == nil {
			// The worker had not picked the first flow yet; drain one and retry.
			if time.Now().After(deadline) {
				t.Fatal("mailbox never filled")
			}
			continue
		}
	}
	blocked := make(chan error, 1)
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	go func() { blocked <- p.Submit(ctx, p.NewFlow(Outbound, snap, Capture)) }()
	if err := <-blocked; !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Submit on a full mailbox returned %v, want to block until the deadline", err)
	}
	if got := testutil.ToFloat64(p.m.backpressure.WithLabelValues("capture")); got < 1 {
		t.Fatalf("backpressure counter = %v", got)
	}
	if got := testutil.ToFloat64(p.m.rejected.WithLabelValues("capture")); got < 1 {
		t.Fatalf("rejected counter = %v", got)
	}
	// The mailbox depth is read when scraped: the full capture mailbox holds one flow.
	want := `
# HELP ztgo_stage_mailbox_depth Flows waiting in each stage's mailbox.
# TYPE ztgo_stage_mailbox_depth gauge
ztgo_stage_mailbox_depth{stage="authz"} 0
ztgo_stage_mailbox_depth{stage="capture"} 1
ztgo_stage_mailbox_depth{stage="hbone"} 0
ztgo_stage_mailbox_depth{stage="identity"} 0
ztgo_stage_mailbox_depth{stage="upstream"} 0
`
	if err := testutil.GatherAndCompare(reg, strings.NewReader(want), "ztgo_stage_mailbox_depth"); err != nil {
		t.Fatal(err)
	}
	close(release)
	for i := 0; i < 2; i++ {
		<-r.done
	}
}

// After Stop the pipeline takes no flow: an accept loop learns it from the error and ends,
// and no flow lands in a mailbox nobody drains.
func TestSubmitAfterStop(t *testing.T) {
	p, _ := newTestPipeline(t, func(ID) Stage {
		return StageFunc(func(context.Context, *Flow) Verdict { return Next })
	}, 8, nil)
	p.Stop()
	snap := empty(t)
	if err := p.Submit(context.Background(), p.NewFlow(Outbound, snap, Capture)); !errors.Is(err, ErrStopped) {
		t.Errorf("Submit after Stop = %v, want ErrStopped", err)
	}
	if err := p.TrySubmit(p.NewFlow(Inbound, snap, Capture)); !errors.Is(err, ErrStopped) {
		t.Errorf("TrySubmit after Stop = %v, want ErrStopped", err)
	}
	for _, a := range p.actors {
		if n := len(a.mailbox); n != 0 {
			t.Errorf("%s mailbox holds %d flows after Stop", a.id, n)
		}
	}
}

func TestClassify(t *testing.T) {
	for _, tc := range []struct {
		err  error
		want Failure
	}{
		{&Error{Kind: FailTLS, Err: errors.New("x")}, FailTLS},
		{errors.New("other"), FailConnect},
		{fmt.Errorf("wrapped: %w", &hbone.StatusError{Status: 401}), FailDeny},
		{&hbone.StatusError{Status: 503}, FailConnect},
		{fmt.Errorf("dial: %w", upstream.ErrTimeout), FailNetworkPolicy},
		{&tls.CertificateVerificationError{Err: errors.New("bad")}, FailTLS},
	} {
		if got := Classify(tc.err); got != tc.want {
			t.Errorf("Classify(%v) = %v, want %v", tc.err, got, tc.want)
		}
	}
	if FailNone.String() != "-" || FailDeny.String() != "DENY" || FailNetworkPolicy.String() != "NETWORK_POLICY" {
		t.Fatal("response flag names changed")
	}
}

// TestInlineStages: inline stages run on the worker of the stage before them (one goroutine
// for capture, identity and authz), are traced as their own stages with no time queued, and
// a flow that starts with an inline stage still goes through its mailbox; a failure in an
// inline stage goes to the Failed hook.
func TestInlineStages(t *testing.T) {
	var mu sync.Mutex
	gids := map[ID]uint64{}
	handle := func(id ID) Stage {
		return StageFunc(func(ctx context.Context, f *Flow) Verdict {
			mu.Lock()
			gids[id] = goid()
			mu.Unlock()
			if id == Authz && f.Dst.Port() == 1 {
				return f.Fail(FailDeny, errors.New("no"))
			}
			return Next
		})
	}
	p, r := newInlinePipeline(t, handle, 8, nil, func(id ID) bool { return id == Identity || id == Authz })

	f := p.NewFlow(Inbound, empty(t), Capture, Identity, Authz, Upstream)
	p.Submit(context.Background(), f)
	<-r.done
	if len(r.established) != 1 {
		t.Fatalf("established %d, failed %d", len(r.established), len(r.failed))
	}
	mu.Lock()
	if gids[Identity] != gids[Capture] || gids[Authz] != gids[Capture] || gids[Upstream] == gids[Capture] {
		t.Errorf("goroutines by stage %v: identity and authz must run on capture's worker, upstream on its own", gids)
	}
	mu.Unlock()
	spans := f.Trace.Spans()
	if len(spans) != 4 || spans[1].Stage != "identity" || spans[2].Stage != "authz" {
		t.Fatalf("spans %+v", spans)
	}
	for _, s := range spans[1:3] {
		if s.Wait() != 0 || s.End.IsZero() {
			t.Errorf("inline stage %s: wait %v, end %v", s.Stage, s.Wait(), s.End)
		}
	}

	// A plan that starts with an inline stage goes through its mailbox and worker.
	f2 := p.NewFlow(Outbound, empty(t), Identity, Upstream)
	p.Submit(context.Background(), f2)
	<-r.done
	if len(r.established) != 2 || len(f2.Trace.Spans()) != 2 {
		t.Fatalf("flow starting inline: established %d, spans %d", len(r.established), len(f2.Trace.Spans()))
	}

	// A failure in an inline stage.
	f3 := p.NewFlow(Inbound, empty(t), Capture, Identity, Authz, Upstream)
	f3.Dst = netip.MustParseAddrPort("10.0.0.1:1")
	p.Submit(context.Background(), f3)
	<-r.done
	if len(r.failed) != 1 || f3.Trace.Outcome != "DENY" || len(f3.Trace.Spans()) != 3 {
		t.Fatalf("failed %d outcome %q spans %d", len(r.failed), f3.Trace.Outcome, len(f3.Trace.Spans()))
	}
}

// goid is the current goroutine's id, from its stack header (tests only).
func goid() uint64 {
	var buf [64]byte
	n := runtime.Stack(buf[:], false)
	var id uint64
	fmt.Sscanf(strings.TrimPrefix(string(buf[:n]), "goroutine "), "%d", &id)
	return id
}

// BenchmarkPipelineFlow is one inbound flow through four no-op stages, with identity and authz
// as their own actors (two more hand-offs) or inline on capture's worker.
func BenchmarkPipelineFlow(b *testing.B) {
	for _, inline := range []bool{false, true} {
		b.Run(fmt.Sprintf("inline=%v", inline), func(b *testing.B) {
			done := make(chan struct{}, 1)
			cfgs := map[ID]StageConfig{}
			for id := ID(0); id < numStages; id++ {
				cfgs[id] = StageConfig{
					Stage:   StageFunc(func(context.Context, *Flow) Verdict { return Next }),
					Workers: 2, Mailbox: 64, Inline: inline && (id == Identity || id == Authz),
				}
			}
			p, err := NewPipeline(cfgs, Hooks{
				Established: func(*Flow) { done <- struct{}{} },
				Failed:      func(*Flow) { done <- struct{}{} },
			}, nil)
			if err != nil {
				b.Fatal(err)
			}
			p.Start()
			defer p.Stop()
			snap, err := snapshot.Build(snapshot.Config{})
			if err != nil {
				b.Fatal(err)
			}
			b.ResetTimer()
			for range b.N {
				f := p.NewFlow(Inbound, snap, Capture, Identity, Authz, Upstream)
				if err := p.Submit(context.Background(), f); err != nil {
					b.Fatal(err)
				}
				<-done
			}
		})
	}
}
