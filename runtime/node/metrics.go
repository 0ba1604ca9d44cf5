package node

import (
	"fmt"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/ztgo/ztgo/control/snapshot"
)

// registerSnapshotMetrics exports which mesh snapshot the proxy uses and how old it is, read
// from store when scraped (one atomic load; nothing on the publish path):
//
//	ztgo_snapshot_version                    the store's current version (0: none published yet)
//	ztgo_snapshot_built_timestamp_seconds    when that snapshot was built (0 before the first)
//
// The age of the node's view of the mesh is time() - ztgo_snapshot_built_timestamp_seconds.
// A snapshot is built, validated and published in one go, so its build time is its publish
// time to within the validation (milliseconds), whatever the source: local file, xDS, or both
// merged.
func registerSnapshotMetrics(store *snapshot.Store, reg prometheus.Registerer) error {
	version := prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name: "ztgo_snapshot_version",
		Help: "Version of the mesh snapshot the proxy uses (one more per publish; 0 before the first).",
	}, func() float64 { return float64(store.Load().Version()) })
	built := prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name: "ztgo_snapshot_built_timestamp_seconds",
		Help: "Unix time the mesh snapshot the proxy uses was built and published (0 before the first).",
	}, func() float64 {
		s := store.Load()
		if s.Version() == 0 {
			return 0
		}
		return float64(s.Built().UnixNano()) / 1e9
	})
	for _, c := range []prometheus.Collector{version, built} {
		if err := reg.Register(c); err != nil {
			return fmt.Errorf("register snapshot metrics: %w", err)
		}
	}
	return nil
}
