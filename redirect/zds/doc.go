// Package zds is ztgo's client for ZDS, the protocol over which istio-cni's node agent hands
// ztunnel the pods it must capture. It is wire-compatible with ztunnel's in-pod workload
// manager (ztunnel src/inpod/{protocol,workloadmanager,statemanager}.rs) and with the node
// agent's server (istio cni/pkg/nodeagent/ztunnelserver*.go); the messages are the
// istio.io/istio/pkg/zdsapi types (istio.workload.zds).
//
// # Wire flow
//
// The node agent listens on a unix SOCK_SEQPACKET socket (INPOD_UDS, default
// /var/run/ztunnel/ztunnel.sock) and ztgo connects. Every protobuf message is one packet,
// with no length prefix; both sides read into a 1024-byte buffer and treat MSG_TRUNC or
// MSG_CTRUNC as an error.
//
//  1. The client sends ZdsHello{version: V1}.
//  2. The agent sends its snapshot: for each pod it knows, WorkloadRequest.add carrying the
//     pod's network namespace as exactly one SCM_RIGHTS fd in the same packet, or .keep (no
//     fd) for a pod whose netns it no longer holds; then .snapshot_sent.
//  3. Then live .add and .del, one at a time.
//
// The client answers every request with WorkloadResponse{ack{error: ""}}; a non-empty error
// is a NACK. The agent waits for that answer (5 s deadline) before it sends the next
// request, so answers correlate with requests by order alone.
//
// # State
//
// The client keeps the pods it started across connections, keyed by pod UID (the
// Kubernetes pod UID, not a WDS workload uid), each with its netns identified by the
// (device, inode) of its nsfs file. On each connection:
//   - add of a UID already running with the same netns is acknowledged and changes nothing;
//     with another netns (the sandbox was recreated) the old pod is removed first.
//   - add and keep before snapshot_sent mark the UID as present in the snapshot; del before
//     snapshot_sent unmarks it and drops a pending start, but stops nothing yet.
//   - at snapshot_sent, every running pod that was not marked is removed (it was deleted
//     while ztgo was disconnected), then Handler.Snapshot reports the pods left.
//   - keep after snapshot_sent, a second snapshot_sent, and add without workload_info are
//     protocol errors: NACK "failure to process message : ...", close, reconnect.
//   - a packet that does not decode (truncated, not a WorkloadRequest, no payload, add
//     without exactly one fd, an fd on any other request) is NACKed "failure to read
//     message : ...", the connection is closed and the client reconnects.
//   - when Handler.AddPod fails the add is NACKed "failure to start proxy : ..." and the pod
//     stays pending; the client retries pending pods every RetryInterval (5 s, as ztunnel)
//     while the connection lasts. A new connection starts with nothing pending: the agent
//     resends what it still has in its snapshot.
//   - an fd that is not a network namespace (NS_GET_NSTYPE is not CLONE_NEWNET, or, where
//     that ioctl is unknown, fstatfs is not nsfs) is NACKed "failure to start proxy : ..."
//     without being kept pending: retrying cannot help.
//
// Fds are received close-on-exec (MSG_CMSG_CLOEXEC). Every fd received is closed once
// nothing needs it: at once for a rejected packet or a duplicate add; when the pod is
// removed (after DelPod returns) for a running pod; at the end of the connection for a
// pending one.
//
// # Readiness
//
// The client is ready when the current connection has processed snapshot_sent and no pod
// is pending. Ready's channel closes the first time that holds; IsReady follows it and
// turns false while disconnected, as ztunnel's "workload proxy manager" readiness task does.
//
// # Reconnecting
//
// Failed connects and failed connections are retried after 10 ms, doubling up to 15 s;
// the delay starts over after a connection that completed its snapshot.
//
// # Differences from ztunnel, on purpose
//
// ztunnel exits the process on a protocol error (keep after snapshot, second
// snapshot_sent, add without workload_info); ztgo NACKs, reconnects with backoff and keeps
// its running pods, which the next snapshot reconciles. ztunnel only logs a received fd
// that is not a netns and fails later when it enters it; ztgo NACKs the add at once, and
// unlike ztunnel's check it does not accept a /proc file (namespace files have been nsfs
// since Linux 3.19).
//
// # Metrics
//
// Named as ztunnel names them (its "workload_manager" sub-registry):
// workload_manager_active_proxy_count, workload_manager_pending_proxy_count (gauges),
// workload_manager_proxies_started_total, workload_manager_proxies_stopped_total
// (counters).
package zds
