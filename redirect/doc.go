// Package redirect sets up traffic capture for Istio ambient's in-pod mode: handles on pod
// network namespaces, the sockets ztgo opens inside them, and, when ztgo runs without
// istio-cni, the capture rules and policy routing istio-cni would otherwise install.
//
// # The in-pod model
//
// In ambient mode nothing runs inside the pod, yet every TCP connection of the pod passes
// through the node's proxy. istio-cni gives the proxy a handle on the pod's network namespace
// (over ZDS, as an fd; see redirect/zds), and the proxy opens its listeners *inside* that
// namespace: a socket belongs to the namespace it was created in for its whole life, so a
// listener created there keeps accepting the pod's traffic although ztgo's goroutines run in
// the node's namespace. Rules in the pod's namespace redirect the application's traffic to
// those listeners:
//
//	15001  outbound: the app's TCP connects                       ([::], SO_MARK)
//	15006  inbound plaintext: TCP to the pod, except 15008        ([::], SO_MARK, IP_TRANSPARENT)
//	15008  inbound HBONE: mTLS + HTTP/2 CONNECT, reached directly ([::], SO_MARK, IP_TRANSPARENT)
//	15053  DNS over UDP and TCP                                   (127.0.0.1 and ::1, SO_MARK)
//
// Netns is such a handle, opened from a path (/var/run/netns/x, /proc/<pid>/ns/net) or taken
// over from a ZDS fd, validated with NS_GET_NSTYPE (nsfs on old kernels) and identified by
// its nsfs (dev, inode). Netns.Do runs a function on an OS thread locked to a fresh
// goroutine, setns'd into the pod and back to the process's namespace afterwards (about 3 µs
// in all); a thread that cannot be moved back is discarded, never reused. SocketFactory opens
// listeners inside Do; for upstream dials only socket() runs there, since options, bind and
// connect act on the socket's own namespace from any thread, so connects wait on Go's
// netpoller like any other. The results are ordinary *net.TCPConn, *net.TCPListener and
// *net.UDPConn values.
//
// # Marks and the transparent return path
//
// Every socket ztgo opens in a pod carries SO_MARK 0x539 (ztunnel's PACKET_MARK, 1337). The
// rules compare mark & 0xfff with it, so ztgo's own upstream connections are never captured
// again. Inbound delivery keeps the client's address: DialTransparent binds the client's IP
// with IP_TRANSPARENT and IP_FREEBIND and connects to the app. The app's replies go to an
// address that is not the pod's, and would leave the pod; instead:
//
//  1. ztgo's SYN loops over lo into the pod's prerouting hook still marked 0x539, and the
//     mangle-prerouting rule sets the connection's connmark to 0x111 (keeping its upper bits);
//  2. the app's replies pass mangle-output (a route chain), which copies connmark 0x111 into
//     the packet mark, and the kernel routes the packet again;
//  3. "ip rule fwmark 0x111/0xfff lookup 100" selects table 100, whose only route is
//     "local 0.0.0.0/0 dev lo" (and "local ::/0"), so the reply is delivered locally, to the
//     transparent socket.
//
// # The rules
//
// Install programs one nftables table, inet "ztgo-inpod", over netlink (google/nftables; no
// nft binary), and the policy routing above with vishvananda/netlink. The rules are
// istio-cni's nftables in-pod rules (istio/istio cni/pkg/nftables/nftables.go, the same
// matches, marks, ports and order) merged into one table with ztgo's chain names; Ruleset
// prints them as nft lists them. With the defaults:
//
//	chain nat-prerouting { type nat hook prerouting priority dstnat
//	  meta l4proto tcp ip saddr 169.254.7.127 accept            kubelet probes (SNATed on the node)
//	  ip daddr != 127.0.0.1 tcp dport != 15008
//	    meta mark & 0xfff != 0x539 redirect to :15006           inbound plaintext capture
//	chain nat-output { type nat hook output priority -100
//	  meta l4proto tcp ip daddr 169.254.7.127 accept            replies to probes
//	  oifname != "lo" meta mark & 0xfff != 0x539
//	    udp dport 53 redirect to :15053                         DNS over UDP
//	  ip daddr != 127.0.0.1 tcp dport 53
//	    meta mark & 0xfff != 0x539 redirect to :15053           DNS over TCP
//	  meta l4proto tcp meta mark & 0xfff == 0x111 accept        transparent return traffic
//	  oifname "lo" ip daddr != 127.0.0.1 accept                 the pod talking to itself
//	  meta l4proto tcp ip daddr != 127.0.0.1
//	    meta mark & 0xfff != 0x539 redirect to :15001           outbound capture
//	chain mangle-prerouting { type filter hook prerouting priority mangle
//	  meta mark & 0xfff == 0x539 ct mark set ct mark & 0xfffff000 | 0x111 (nft lists & 0xfffff111)
//	chain mangle-output { type route hook output priority mangle
//	  ct mark & 0xfff == 0x111 meta mark set ct mark
//	chain raw-prerouting / raw-output { priority raw: the DNS proxy's upstream UDP in ct zone 1
//	  udp sport 53 meta mark & 0xfff != 0x539 ct zone set 1     (prerouting)
//	  udp dport 53 meta mark & 0xfff == 0x539 ct zone set 1     (output)
//
// plus the IPv6 twin of every address rule (::1, fd16:9254:7127:1337:ffff:ffff:ffff:ffff)
// and counters and "ztgo: ..." comments on every rule. Redirect in the output hook rewrites
// the destination to 127.0.0.1 (::1), which is why the DNS sockets listen there; in
// prerouting it rewrites to the receiving interface's address, which the [::] listeners
// cover. OriginalDst recovers the address the app dialled (SO_ORIGINAL_DST, then
// IP6T_SO_ORIGINAL_DST; the local address for connections that were not NATed).
//
// Install is idempotent: if Check finds no drift it changes nothing (counters and rule
// handles survive); otherwise it replaces ztgo's table in one nftables transaction, so the
// pod is never without rules, and adds the missing routing entries. Remove deletes the table,
// the fwmark rules and the table-100 local routes of both families and succeeds when there is
// nothing to remove. Check lists the differences. None of them looks at any other nftables
// table. ztgo's rules and istio-cni's must not both be installed in one pod: each would
// capture the other's redirects; ztgo installs its own only when it runs without istio-cni.
package redirect
