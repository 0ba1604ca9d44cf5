package node

import (
	"context"
	"testing"
	"time"

	"github.com/ztgo/ztgo/control/snapshot"
)

func TestSnapshotMetrics(t *testing.T) {
	n, err := New(Config{Name: "n", DefaultConfig: []byte("workloads: []\n")})
	if err != nil {
		t.Fatal(err)
	}
	gauge := func(name string) float64 {
		t.Helper()
		mfs, err := n.Registry().Gather()
		if err != nil {
			t.Fatal(err)
		}
		for _, mf := range mfs {
			if mf.GetName() == name {
				return mf.GetMetric()[0].GetGauge().GetValue()
			}
		}
		t.Fatalf("%s not exported", name)
		return 0
	}
	const version, built = "ztgo_snapshot_version", "ztgo_snapshot_built_timestamp_seconds"
	if v, ts := gauge(version), gauge(built); v != 0 || ts != 0 {
		t.Fatalf("before the first publish: version %v, timestamp %v; want 0, 0", v, ts)
	}
	before := time.Now()
	if err := n.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	defer n.Stop(context.Background())
	if v := gauge(version); v != 1 {
		t.Fatalf("version %v after loading the config, want 1", v)
	}
	first := gauge(built)
	if ts := time.Unix(0, int64(first*1e9)); ts.Before(before.Add(-time.Millisecond)) || ts.After(time.Now()) {
		t.Fatalf("snapshot timestamp %v outside the start (%v .. now)", ts, before)
	}

	time.Sleep(2 * time.Millisecond)
	s, err := snapshot.Build(snapshot.Config{})
	if err != nil {
		t.Fatal(err)
	}
	n.Store().Publish(s)
	if v := gauge(version); v != 2 {
		t.Fatalf("version %v after a second publish, want 2", v)
	}
	if ts := gauge(built); ts <= first || ts != float64(s.Built().UnixNano())/1e9 {
		t.Fatalf("timestamp %v after a second publish, want the new snapshot's build time (first was %v)", ts, first)
	}
}

// The dashboard's snapshot summary comes from the store's current snapshot; its age is the
// admin server's to compute (a node-side age went stale, or huge before the first publish).
func TestSummary(t *testing.T) {
	n, err := New(Config{Name: "n", DefaultConfig: []byte("workloads: []\n")})
	if err != nil {
		t.Fatal(err)
	}
	if s := n.summary(); s.Node != "n" || s.SnapshotVersion != 0 || s.AgeSeconds != 0 {
		t.Fatalf("before the first publish: %+v", s)
	}
	if err := n.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	defer n.Stop(context.Background())
	snap := n.Store().Load()
	if s := n.summary(); s.SnapshotVersion != 1 || !s.Built.Equal(snap.Built()) || s.Workloads != 0 || s.CertificateStates == nil {
		t.Fatalf("after loading the config: %+v", s)
	}
}
