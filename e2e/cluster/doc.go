// Package cluster builds a multi-node Kubernetes-like network out of Linux network namespaces,
// for ztgo's end-to-end tests and demos: nodes joined by a fabric, pods wired to their node the
// way Calico wires them, and hosts outside the mesh. It needs root (see RequireRoot).
//
// # Topology
//
//	                   fabric namespace (zt<id>-fabric)
//	       ┌───────────────────── bridge br0 (no address) ─────────────────────┐
//	       │ v-node-a              v-node-b                       v-<external> │
//	       └────┬─────────────────────┬──────────────────────────────────┬─────┘
//	       eth0 │ 198.18.0.1/24  eth0 │ 198.18.0.2/24               eth0 │ 198.18.0.100/24
//	  ┌─────────┴─────────┐ ┌─────────┴─────────┐              ┌─────────┴─────────┐
//	  │ node-a            │ │ node-b            │              │ external (not in  │
//	  │ ip_forward=1      │ │ ip_forward=1      │              │ the mesh, no pod  │
//	  │ v-a1     v-a2     │ │ v-b1              │              │ of any node)      │
//	  └──┬─────────┬──────┘ └──┬────────────────┘              └───────────────────┘
//	eth0 │    eth0 │      eth0 │
//	 ┌───┴──┐  ┌───┴──┐    ┌───┴──┐
//	 │ a1   │  │ a2   │    │ b1   │   pods: 198.18.1.10/32, 198.18.1.11/32, 198.18.2.10/32
//	 └──────┘  └──────┘    └──────┘
//
// Every box is a named network namespace "zt<id>-<name>" bind-mounted at
// /var/run/netns/zt<id>-<name>, so `ip netns exec`, `ip -n` and the path work as for any
// namespace made by `ip netns add`. <id> is six random hex digits per Cluster: parallel runs
// and leftovers of crashed runs never collide. Every link is created inside these namespaces
// (a veth is created with its peer already in the other namespace); nothing is ever added to
// the namespace the program runs in.
//
// # Address plan
//
// Everything is in 198.18.0.0/15, the benchmarking range (RFC 2544), which no real network uses:
//
//	198.18.0.0/24      the fabric: node i (0-based) is 198.18.0.(i+1), externals 198.18.0.100 upwards
//	198.18.(i+1).0/24  pods of node i: node-a's pods are 198.18.1.x, node-b's 198.18.2.x; handed
//	                   out from .10 upwards unless given explicitly (PodIP)
//	198.19.0.0/16      never routed anywhere: free for the mesh's service VIPs
//	169.254.1.1        every pod's default gateway (link-local, the same in every pod)
//
// A pod's eth0 holds its address as a /32 and routes everything to 169.254.1.1, which it
// resolves with a permanent neighbour entry to ee:ee:ee:ee:ee:ee, the MAC of every node-side
// veth (Calico's scheme, without needing proxy ARP). The node routes the pod's /32 to that veth
// with its fabric address as preferred source, and every other node's pod /24 via that node's
// fabric address. An external routes every node's pod /24 via the node. So all traffic between
// pods, nodes and externals is routed at layer 3 through the nodes, with no NAT anywhere: a
// server always sees the client's real address.
//
// In every namespace: lo is up, IPv6 is disabled (disable_ipv6=1), and rp_filter is 0 on all,
// default and every interface, because the proxy spoofs client source addresses when it
// delivers inbound connections inside the destination pod. Nodes forward (ip_forward=1); pods,
// externals and the fabric do not.
//
// # Using it
//
// Tests call NewForTest, which skips without root and cleans up through t.Cleanup; programs
// call New and Close. Each Node, Pod and External is a Namespace: Listen and Dial create
// sockets inside it (they stay there for their whole life), HTTPGet and WaitHTTP talk HTTP from
// inside it (readiness, metrics, admin), and Command runs a program inside it with
// `ip netns exec`. Cluster.StartProcess runs a long-lived program such as ztgo, tees its output
// to memory and to <RunDir>/<name>.log, and lets the caller wait for a log line; Close stops
// every process (SIGTERM, then SIGKILL) and removes every link and namespace. CleanupStale
// removes what crashed runs left behind, and only that: a live Cluster holds an flock on
// /var/run/ztgo-cluster/<id>.lock, so namespaces of a run whose lock can be taken are stale.
//
// The first New of a boot makes /var/run/netns a shared mount point, as `ip netns add` does, so
// that a namespace created after a process started (with `ip netns exec`, which gives it its
// own mount namespace) still appears at its path for that process.
package cluster
