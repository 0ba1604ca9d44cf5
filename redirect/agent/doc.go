// Package agent is ztgo's standalone node agent: the part of istio-cni a node needs so that
// ztgo (or ztunnel) can capture pods without istio-cni. It reads the pods to capture from a
// directory of files, installs ztgo's capture rules in each pod's network namespace
// (redirect.Install), and serves the pods over ZDS, the protocol istio-cni's node agent
// speaks to ztunnel (see redirect/zds for the client side).
//
//	pods dir --Watcher--> Agent --(open netns, install rules)--> Sink
//	                                                              |
//	                                     Server (a Sink) --ZDS--> ztgo / ztunnel
//
// # Pod files
//
// The pods directory holds one file per pod, named *.yaml, *.yml or *.json; other names
// and hidden files (a leading dot: editors' temporaries, Kubernetes volume internals) are
// ignored, and symbolic links are followed, so a ConfigMap volume works. A file is one
// YAML (or JSON) mapping:
//
//	uid: 3f1c...                   # optional; default "<namespace>/<name>"; at most 256 bytes, no spaces
//	name: client                   # required; DNS-1123 subdomain (a pod name)
//	namespace: default             # required; DNS-1123 label
//	serviceAccount: client         # optional; default "default"
//	netns: /var/run/netns/pod-a1   # required; absolute: a netns bind mount or /proc/<pid>/ns/net
//
// Parsing is strict: an unknown or repeated field, a non-scalar value or a second
// document is an error naming the field (ParsePodSpec). The UID is the key on the ZDS wire,
// where istio-cni puts the Kubernetes pod UID; name, namespace and service account are what
// ztgo finds the pod's workload by. The limits keep the largest add below ZDS's 1024-byte
// packet.
//
// The Watcher polls the directory (every 500 ms by default; no inotify, so it works on any
// file system and with any writer). Tools should write a file elsewhere and rename it into
// place, but a half-written file is tolerated: a file that cannot be read or parsed is
// logged once per content, with its path and the reason, and ignored until it changes; if
// an earlier version was valid, that pod stays as it was. A file whose UID another file
// already defines is rejected, with a log naming both, until the other file goes away. A
// changed file (another netns, name, namespace or service account) is reported as a
// delete of the old pod followed by an add of the new one; a removed file as a delete. An
// unreadable directory changes nothing.
//
// # The agent loop
//
// One goroutine owns the pods. For an added pod it opens the netns (redirect.OpenNetns),
// installs the rules (redirect.Install: idempotent, so rules a previous agent installed
// are kept as they are, counters and all) and calls Sink.AddPod. A failed step is logged,
// counted and retried every RetryInterval (5 s) from where it failed. For a deleted pod it
// calls Sink.DelPod (if AddPod had succeeded), removes the rules (redirect.Remove), and
// closes the netns. A changed pod gets DelPod and AddPod; its rules are removed only if
// the new path is another namespace, since removing and reinstalling them would let the
// pod's connections bypass capture for a moment. Every CheckInterval (30 s) each pod's
// rules are compared with the kernel's (redirect.Check); drift is logged line by line and
// repaired by reinstalling. Ready closes once the first scan has been applied.
//
// Stop leaves everything in place, as istio-cni does when its agent restarts: the rules
// stay installed and the sink's pods keep running, so a restarted agent, which finds the
// same files, reinstalls nothing and disturbs no traffic. Only deleting a pod's file
// removes its rules. A pod whose netns is gone for good (the pod died) keeps its
// namespace alive through the agent's handle until its file is removed: whoever writes the
// files must remove them.
//
// # The ZDS server
//
// Server is the node agent's side of ZDS, wire-compatible with istio-cni's ztunnelserver
// (istio/istio cni/pkg/nodeagent/ztunnelserver.go), and is a Sink. It listens on a unix
// SOCK_SEQPACKET socket (INPOD_UDS, default /var/run/ztunnel/ztunnel.sock; a stale socket
// file is replaced; mode 0600, since a client receives every pod's namespace). Per
// connection:
//
//  1. it reads ZdsHello (5 s deadline); a hello without a version ends the connection,
//     a newer version is answered as V1;
//  2. it sends the snapshot: WorkloadRequest.add for each pod it holds, sorted by UID, with
//     the pod's netns as exactly one SCM_RIGHTS fd in the same packet, waiting for each
//     WorkloadResponse ack; then snapshot_sent;
//  3. then it keeps the client in step: an add for each new or changed pod goes to the
//     newest connection only, a del for each removed pod to every connection that was
//     sent it. A changed pod is sent as del, then add, so a client applies new workload
//     info even when the namespace is the same.
//
// Every request waits for its answer for 5 s; reads use a 1024-byte buffer, and a
// truncated packet, an fd from the client, a packet that is not a WorkloadResponse with an
// ack, or a message nobody asked for ends the connection. A NACKed add is logged, counted
// and sent again after RetryInterval (the client retries on its own too); other NACKs are
// logged. A connection that ends is dropped without touching the others; if it was the
// newest, the next newest receives the adds it missed.
//
// AddPod records the pod with the server's own duplicate of its netns fd and returns nil
// without waiting for any client: a client that is not connected yet gets the pod in its
// snapshot. It fails only when the netns cannot be duplicated or the server has stopped.
// DelPod forgets the pod and waits (up to 5 s) until every client that had it, or was
// being sent it, acknowledged the del, as istio-cni waits for ztunnel, so the agent
// removes the pod's rules only after the proxy let go of the pod's connections. Start the
// server once the Agent is Ready: a client that connects before the first scan is applied
// gets an incomplete snapshot and stops the pods missing from it. Stop closes the socket
// and the connections; clients keep their pods and reconcile with the next server's
// snapshot.
//
// # Differences from istio-cni, on purpose
//
//   - Pods come from files, not from the Kubernetes API and CNI plugin calls; there is no
//     pod informer, no CNI plugin and no node-level iptables (host probe SNAT). Pods never
//     go to "keep": the agent holds every pod's netns while its file exists.
//   - The rules are ztgo's nftables table (redirect.Install), not istio-cni's iptables or
//     nftables rules; they must not be mixed in one pod.
//   - Rules are checked for drift and repaired; istio-cni installs them once.
//   - istio-cni's PodAdded waits for the newest ztunnel's answer and fails without a
//     connection; AddPod here queues and returns (see above), and a NACKed add is resent.
//   - istio-cni keeps a connection whose answer timed out, so a late answer can be taken
//     for the next request's; here the connection is closed and the client reconnects.
//   - istio-cni notices a closed connection by a short read every keepalive interval;
//     here a reader goroutine notices it at once.
//   - A del goes to the connections that were sent the pod, not to all of them.
//
// # Metrics
//
// Agent: ztgo_agent_pods{state="captured"|"pending"}, ztgo_agent_rule_installs_total,
// ztgo_agent_rule_failures_total{op="install"|"remove"|"check"},
// ztgo_agent_drift_repairs_total, ztgo_agent_pod_failures_total{stage="netns"|"rules"|"sink"}.
// Server: ztgo_agent_zds_connections, ztgo_agent_zds_messages_total{type, result}.
package agent
