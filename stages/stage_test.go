package stages

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
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
	r := &recorder{done: make(chan struct{}, 100)}
	cfgs := map[ID]StageConfig{}
	for id := ID(0); id < numStages; id++ {
		cfgs[id] = StageConfig{Stage: handle(id), Workers: 1, Mailbox: mailbox}
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
