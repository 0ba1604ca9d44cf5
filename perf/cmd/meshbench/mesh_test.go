//go:build linux

package main

import (
	"net/netip"
	"slices"
	"testing"
	"time"

	"github.com/ztgo/ztgo/control/localfile"
	"github.com/ztgo/ztgo/control/snapshot"
	"github.com/ztgo/ztgo/stages/identity"
)

// The mesh both nodes load agrees with the addresses the paths use: the client and the server
// are HBONE workloads on their nodes, so the ztgo path is HBONE from node a to node b, and
// passthroughIP is in no workload or service, so node a routes the passthrough path as
// passthrough (plain TCP, node b takes no part), as the report says.
func TestMeshRoutes(t *testing.T) {
	snap, err := localfile.Load([]byte(meshYAML))
	if err != nil {
		t.Fatalf("meshYAML does not load: %v", err)
	}
	workload := func(ip, node string) *snapshot.Workload {
		t.Helper()
		w := snap.WorkloadByAddr("", netip.MustParseAddr(ip))
		if w == nil {
			t.Fatalf("no workload at %s", ip)
		}
		if w.Node != node || w.Protocol != snapshot.TunnelHBONE {
			t.Errorf("workload at %s: node %q protocol %v, want %s HBONE", ip, w.Node, w.Protocol, node)
		}
		return w
	}
	client := workload(clientIP, nodeA)
	workload(serverIP, nodeB)
	for _, tc := range []struct {
		ip   string
		want identity.Kind
	}{{serverIP, identity.HBONE}, {passthroughIP, identity.Passthrough}} {
		for _, port := range []int{sinkPort, sourcePort, echoPort} {
			dst := netip.AddrPortFrom(netip.MustParseAddr(tc.ip), uint16(port))
			r, err := identity.Outbound(snap, client, dst, nil)
			if err != nil || r.Kind != tc.want {
				t.Errorf("route from the client to %s: %+v, %v; want kind %v", dst, r, err, tc.want)
			}
		}
	}
	if w := snap.WorkloadByAddr("", netip.MustParseAddr(passthroughIP)); w != nil {
		t.Errorf("passthroughIP %s is workload %s's", passthroughIP, w.Name)
	}
}

// slowPoints samples a slow-reader run every slowSample for dur: written gives each path's
// count at a time.
func slowPoints(dur time.Duration, written func(at time.Duration) []int64) []slowPoint {
	var pts []slowPoint
	for at := slowSample; at <= dur; at += slowSample {
		pts = append(pts, slowPoint{at: at, written: written(at), heap: []float64{1 << 20, 1 << 20}, rss: []int64{1 << 20, 1 << 20}})
	}
	return pts
}

// The slow reader's verdicts: a flow whose server keeps writing has not stalled, one whose
// server stopped has, from the first sample after which it wrote no more than the slack; a
// node's live heap may grow by slowBound, not a byte more.
func TestSlowSummary(t *testing.T) {
	const dur = 10 * time.Second
	run := slowRun{
		paths: []string{"direct", "ztgo"},
		points: slowPoints(dur, func(at time.Duration) []int64 {
			stalled := int64(13 << 20)
			if at < 2*time.Second {
				stalled = int64(at/slowSample) << 20 // 1 MiB a sample, then nothing from 2 s on
			}
			return []int64{int64(at/slowSample) << 20, stalled} // direct: 1 MiB a sample throughout
		}),
		heap0:    []float64{1 << 20, 1 << 20},
		rss0:     []int64{1 << 20, 1 << 20},
		live0:    []float64{5 << 20, 5 << 20},
		live1:    []float64{5<<20 + slowBound, 5<<20 + slowBound},
		duration: dur,
	}
	sum := run.summarize()
	if !slices.Equal(sum.stalled, []bool{false, true}) {
		t.Errorf("stalled %v, want [false true]", sum.stalled)
	}
	if sum.stalledBy[1] != 2*time.Second || sum.stalledBy[0] != dur {
		t.Errorf("stalled by %v, want [%v 2s]", sum.stalledBy, dur)
	}
	if sum.secondHalf[1] != 0 || sum.secondHalf[0] != 10<<20 {
		t.Errorf("second half %v, want [10 MiB 0]", sum.secondHalf)
	}
	if !sum.heapBounded || sum.liveGrowth[0] != slowBound {
		t.Errorf("live heap grown by exactly the bound: bounded %v, growth %v", sum.heapBounded, sum.liveGrowth)
	}

	// Writing within the slack plus what the client read still counts as stalled; past it not.
	half := int64(slowRead)*int64(dur/2/time.Second+1) + slowStallSlack
	for _, tc := range []struct {
		grow    int64
		stalled bool
	}{{half, true}, {half + 1, false}} {
		r := run
		r.points = slowPoints(dur, func(at time.Duration) []int64 {
			w := int64(0)
			if at > dur/2 {
				w = tc.grow
			}
			return []int64{0, w}
		})
		if got := r.summarize().stalled[1]; got != tc.stalled {
			t.Errorf("%d bytes written in the second half: stalled %v, want %v", tc.grow, got, tc.stalled)
		}
	}

	run.live1 = []float64{5 << 20, 5<<20 + slowBound + 1}
	if sum := run.summarize(); sum.heapBounded {
		t.Errorf("a live heap grown by slowBound + 1 byte counts as bounded (growth %v)", sum.liveGrowth)
	}
}
