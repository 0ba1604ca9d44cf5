package loopback

import (
	"testing"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/ztgo/ztgo/runtime/node"
)

// counterWith sums the series of metric name whose label has the given value.
func counterWith(t *testing.T, n *node.Node, name, label, value string) prometheus.Collector {
	t.Helper()
	mfs, err := n.Registry().Gather()
	if err != nil {
		t.Fatal(err)
	}
	var sum float64
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		for _, m := range mf.GetMetric() {
			for _, lp := range m.GetLabel() {
				if lp.GetName() == label && lp.GetValue() == value {
					sum += m.GetCounter().GetValue()
				}
			}
		}
	}
	c := prometheus.NewCounter(prometheus.CounterOpts{Name: "sum"})
	c.Add(sum)
	return c
}
