package trace

import (
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

func rec(id uint64, d time.Duration) *Record {
	t0 := time.Unix(1000, 0)
	r := &Record{ID: id, Direction: "outbound", Begin: t0}
	r.Enter("identity", t0)
	r.StartStage(t0.Add(d / 4))
	r.Leave(t0.Add(d / 2))
	r.Enter("hbone", t0.Add(d/2))
	r.StartStage(t0.Add(d / 2))
	r.Leave(t0.Add(d))
	r.Established = t0.Add(d)
	return r
}

func TestRecorderRingsAndHistograms(t *testing.T) {
	reg := prometheus.NewRegistry()
	r, err := NewRecorder(3, reg)
	if err != nil {
		t.Fatal(err)
	}
	for i, d := range []time.Duration{5, 1, 9, 3, 7} {
		r.Finish(rec(uint64(i+1), d*time.Millisecond))
	}
	recent := r.Recent(10)
	if len(recent) != 3 || recent[0].ID != 5 || recent[1].ID != 4 || recent[2].ID != 3 {
		t.Fatalf("recent = %v", ids(recent))
	}
	slow := r.Slowest(10)
	if len(slow) != 3 || slow[0].ID != 3 || slow[1].ID != 5 || slow[2].ID != 1 {
		t.Fatalf("slowest = %v", ids(slow))
	}
	if got := testutil.CollectAndCount(reg, "ztgo_stage_duration_seconds"); got != 2 {
		t.Fatalf("histogram series = %d, want 2 (identity, hbone)", got)
	}
	sp := recent[0].Spans()
	if len(sp) != 2 || sp[0].Wait() != 7*time.Millisecond/4 || recent[0].Total() != 7*time.Millisecond {
		t.Fatalf("spans = %+v total %v", sp, recent[0].Total())
	}
}

func ids(rs []Record) []uint64 {
	var out []uint64
	for _, r := range rs {
		out = append(out, r.ID)
	}
	return out
}
