package loopback

import (
	"testing"

	"github.com/ztgo/ztgo/runtime/node"
)

// counterWith sums the series of metric name whose label has the given value.
func counterWith(t *testing.T, n *node.Node, name, label, value string) float64 {
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
	return sum
}

// histogramCount returns the sample count of histogram name with the given label values.
func histogramCount(t *testing.T, n *node.Node, name string, labels map[string]string) uint64 {
	t.Helper()
	mfs, err := n.Registry().Gather()
	if err != nil {
		t.Fatal(err)
	}
	var count uint64
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
	metrics:
		for _, m := range mf.GetMetric() {
			for _, lp := range m.GetLabel() {
				if want, ok := labels[lp.GetName()]; ok && lp.GetValue() != want {
					continue metrics
				}
			}
			count += m.GetHistogram().GetSampleCount()
		}
	}
	return count
}
