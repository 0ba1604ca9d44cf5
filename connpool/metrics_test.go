package connpool

import (
	"context"
	"net/netip"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/ztgo/ztgo/stages/hbone"
)

func TestMetrics(t *testing.T) {
	dst := server(t)
	reg := prometheus.NewRegistry()
	var dials atomic.Int32
	var fail atomic.Bool
	p := newRegisteredPool(t, &dials, &fail, reg)
	gauge := func(name string) float64 {
		t.Helper()
		mfs, err := reg.Gather()
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
	// Both dial results are exported before any dial.
	if n := testutil.CollectAndCount(reg, "ztgo_pool_dials_total"); n != 2 {
		t.Fatalf("ztgo_pool_dials_total has %d series before any dial, want 2", n)
	}

	key := NewKey("src", []string{"dst"}, dst, netip.Addr{})
	var streams []*hbone.Stream
	for range 3 {
		c, err := p.Get(context.Background(), key)
		if err != nil {
			t.Fatal(err)
		}
		s, _, err := c.OpenReserved(context.Background(), &hbone.Request{Authority: "1.2.3.4:80"})
		if err != nil {
			t.Fatal(err)
		}
		streams = append(streams, s)
	}
	if got := gauge("ztgo_pool_streams"); got != 3 {
		t.Fatalf("ztgo_pool_streams = %v, want 3", got)
	}
	if got := gauge("ztgo_pool_connections"); got != 1 {
		t.Fatalf("ztgo_pool_connections = %v, want 1", got)
	}
	for _, s := range streams {
		s.Close()
	}
	waitFor(t, func() bool { return p.Streams() == 0 })

	fail.Store(true)
	if _, err := p.Get(context.Background(), NewKey("src", nil, netip.MustParseAddrPort("127.0.0.1:1"), netip.Addr{})); err == nil {
		t.Fatal("want dial error")
	}
	want := `
# HELP ztgo_pool_dials_total HBONE connections dialled by the pool, by result.
# TYPE ztgo_pool_dials_total counter
ztgo_pool_dials_total{result="error"} 1
ztgo_pool_dials_total{result="ok"} 1
`
	if err := testutil.GatherAndCompare(reg, strings.NewReader(want), "ztgo_pool_dials_total"); err != nil {
		t.Fatal(err)
	}
}
