package zds

import "istio.io/istio/pkg/zdsapi"

// kind is the payload of a WorkloadRequest.
type kind uint8

const (
	kindAdd kind = iota + 1
	kindKeep
	kindDel
	kindSnapshotSent
)

func (k kind) String() string {
	switch k {
	case kindAdd:
		return "add"
	case kindKeep:
		return "keep"
	case kindDel:
		return "del"
	case kindSnapshotSent:
		return "snapshot_sent"
	}
	return "unknown"
}

// request is one decoded WorkloadRequest. fd is the netns fd of an add (owned by whoever
// holds the request) and -1 otherwise.
type request struct {
	kind kind
	uid  string
	info *zdsapi.WorkloadInfo
	fd   int
}
