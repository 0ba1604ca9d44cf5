package cluster

import (
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/ztgo/ztgo/redirect"
)

// Config describes a Cluster. The zero value is two nodes with logs in a fresh temporary
// directory.
type Config struct {
	// Nodes is the number of nodes, named node-a, node-b, ...; 0 means 2.
	Nodes int
	// RunDir is where process logs go. Empty means a new directory under os.TempDir(), which
	// Close removes unless KeepRunDir is set; a given RunDir is never removed.
	RunDir string
	// KeepRunDir keeps a temporary RunDir after Close.
	KeepRunDir bool
	// StopGrace is how long Close waits after SIGTERM before it kills a process; 0 means 5s.
	StopGrace time.Duration
	// Logger receives a line for every namespace created or removed; nil discards them.
	Logger *slog.Logger
}

const defaultStopGrace = 5 * time.Second

// Cluster is a set of nodes, pods and externals in network namespaces (see the package doc).
// Its methods are safe for concurrent use.
type Cluster struct {
	id        string
	runDir    string
	ownRunDir bool
	cfg       Config
	log       *slog.Logger
	lock      *runLock
	spawn     chan spawnRequest // served by a goroutine locked to its thread; see StartProcess
	spawnDone chan struct{}

	mu          sync.Mutex
	closed      bool
	fabric      *Namespace
	nodes       []*Node
	pods        map[string]*Pod
	externals   []*External
	names       map[string]bool // every name in use: nodes, pods, externals, fabric
	all         []*Namespace    // every namespace, in creation order
	procs       []*Process
	logFiles    map[string]bool // log file names handed out
	nextExtHost int
}

// Node is a node of the cluster: a namespace on the fabric that forwards for its pods.
type Node struct {
	*Namespace
	index   int
	podCIDR netip.Prefix
	lastPod netip.Addr // last address handed out, guarded by Cluster.mu
}

// Index is the node's position, from 0: node-a is 0.
func (n *Node) Index() int { return n.index }

// PodCIDR is the network the node's pods are addressed from.
func (n *Node) PodCIDR() netip.Prefix { return n.podCIDR }

// Pod is a pod: a namespace with one veth to its node, pod side eth0.
type Pod struct {
	*Namespace
	node     *Node
	hostLink string
}

// Node is the node the pod runs on.
func (p *Pod) Node() *Node { return p.node }

// HostLink is the name of the pod's veth in the node's namespace.
func (p *Pod) HostLink() string { return p.hostLink }

// External is a host outside the mesh, on the fabric: not a pod of any node.
type External struct {
	*Namespace
}

// PodOption adjusts AddPod.
type PodOption func(*podOptions)

type podOptions struct {
	ip netip.Addr
}

// PodIP gives the pod a chosen address, which must be in its node's PodCIDR and unused.
func PodIP(ip netip.Addr) PodOption { return func(o *podOptions) { o.ip = ip } }

// New builds the fabric and cfg.Nodes nodes. It needs root. Close removes everything it made;
// if New fails it removes what it made itself.
func New(cfg Config) (*Cluster, error) {
	if cfg.Nodes == 0 {
		cfg.Nodes = 2
	}
	if cfg.Nodes < 1 || cfg.Nodes > MaxNodes {
		return nil, fmt.Errorf("new cluster: %d nodes, want 1 to %d", cfg.Nodes, MaxNodes)
	}
	if cfg.StopGrace <= 0 {
		cfg.StopGrace = defaultStopGrace
	}
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if err := prepareNetnsDir(); err != nil {
		return nil, fmt.Errorf("new cluster: %w", err)
	}
	c := &Cluster{
		cfg:      cfg,
		pods:     map[string]*Pod{},
		names:    map[string]bool{},
		logFiles: map[string]bool{},
	}
	var err error
	for range 10 { // a leftover lock of a crashed run may hold an id
		if c.id, err = newRunID(); err != nil {
			return nil, fmt.Errorf("new cluster: %w", err)
		}
		if c.lock, err = acquireRunLock(c.id); err == nil || !errors.Is(err, fs.ErrExist) {
			break
		}
	}
	if err != nil {
		return nil, fmt.Errorf("new cluster: %w", err)
	}
	c.log = log.With("cluster", c.id)
	c.runDir = cfg.RunDir
	if c.runDir == "" {
		if c.runDir, err = os.MkdirTemp("", "ztgo-cluster-"+c.id+"-"); err != nil {
			c.lock.release()
			return nil, fmt.Errorf("new cluster: run dir: %w", err)
		}
		c.ownRunDir = true
	} else if err := os.MkdirAll(c.runDir, 0o755); err != nil {
		c.lock.release()
		return nil, fmt.Errorf("new cluster: run dir: %w", err)
	}
	c.startSpawner()
	if err := c.build(); err != nil {
		return nil, errors.Join(fmt.Errorf("new cluster %s: %w", c.id, err), c.close(false))
	}
	return c, nil
}

// NewForTest is New for a test: it skips the test without root (fails it with CI=true, see
// RequireRoot), first removes what crashed runs left behind (CleanupStale), and closes the
// cluster in t.Cleanup. When the test has failed, the run directory is kept and its path and
// the last lines of every process are logged.
func NewForTest(t testing.TB, cfg Config) *Cluster {
	t.Helper()
	RequireRoot(t)
	if removed, err := CleanupStale(); err != nil {
		t.Logf("cleanup of stale clusters: %v", err)
	} else if len(removed) > 0 {
		t.Logf("removed stale namespaces of crashed runs: %s", strings.Join(removed, " "))
	}
	c, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		failed := t.Failed()
		if err := c.close(failed || cfg.KeepRunDir); err != nil {
			t.Errorf("close cluster %s: %v", c.id, err)
		}
		if failed {
			c.logPostMortem(t)
		}
	})
	return c
}

// logPostMortem logs where the failed test's process logs are and how each process ended.
func (c *Cluster) logPostMortem(t testing.TB) {
	t.Helper()
	c.mu.Lock()
	procs := slices.Clone(c.procs)
	c.mu.Unlock()
	t.Logf("cluster %s: process logs kept in %s", c.id, c.runDir)
	for _, p := range procs {
		t.Logf("process %s (%s, %s), last lines:\n%s", p.name, exitStatus(p.Err()), p.logPath, p.Tail(40))
	}
}

// ID is the run id in every namespace name ("zt<id>-...").
func (c *Cluster) ID() string { return c.id }

// RunDir is the directory holding the process logs.
func (c *Cluster) RunDir() string { return c.runDir }

// Fabric is the namespace of the bridge joining the nodes and externals (for tcpdump).
func (c *Cluster) Fabric() *Namespace { return c.fabric }

// Nodes returns the nodes in order.
func (c *Cluster) Nodes() []*Node {
	c.mu.Lock()
	defer c.mu.Unlock()
	return slices.Clone(c.nodes)
}

// Node returns the node named name ("node-a"), or nil.
func (c *Cluster) Node(name string) *Node {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.nodeLocked(name)
}

func (c *Cluster) nodeLocked(name string) *Node {
	for _, n := range c.nodes {
		if n.name == name {
			return n
		}
	}
	return nil
}

// Pod returns the pod named name, or nil.
func (c *Cluster) Pod(name string) *Pod {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.pods[name]
}

// Pods returns the pods, sorted by name.
func (c *Cluster) Pods() []*Pod {
	c.mu.Lock()
	defer c.mu.Unlock()
	out := make([]*Pod, 0, len(c.pods))
	for _, p := range c.pods {
		out = append(out, p)
	}
	slices.SortFunc(out, func(a, b *Pod) int { return strings.Compare(a.name, b.name) })
	return out
}

// External returns the external named name, or nil.
func (c *Cluster) External(name string) *External {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, e := range c.externals {
		if e.name == name {
			return e
		}
	}
	return nil
}

// build creates the fabric and the nodes and routes between them.
func (c *Cluster) build() error {
	var err error
	if c.fabric, err = c.newNamespace(fabricName, netip.Addr{}); err != nil {
		return err
	}
	if err := withNetlink(c.fabric.ns, func(h *netlink.Handle) error {
		br := &netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: bridgeName}}
		if err := h.LinkAdd(br); err != nil {
			return fmt.Errorf("add bridge %s: %w", bridgeName, err)
		}
		if err := h.LinkSetUp(br); err != nil {
			return fmt.Errorf("set %s up: %w", bridgeName, err)
		}
		return nil
	}); err != nil {
		return fmt.Errorf("fabric: %w", err)
	}
	for i := range c.cfg.Nodes {
		ns, err := c.newNamespace(nodeName(i), nodeIP(i))
		if err != nil {
			return err
		}
		n := &Node{Namespace: ns, index: i, podCIDR: podCIDR(i)}
		c.nodes = append(c.nodes, n)
		if err := writeSysctls(ns.ns, sysctl{key: "net/ipv4/ip_forward", value: "1"}); err != nil {
			return fmt.Errorf("node %s: %w", n.name, err)
		}
		if err := c.attachToFabric(ns); err != nil {
			return fmt.Errorf("node %s: %w", n.name, err)
		}
	}
	for _, n := range c.nodes {
		var routes []*netlink.Route
		for _, o := range c.nodes {
			if o != n {
				routes = append(routes, &netlink.Route{Dst: ipNet(o.podCIDR), Gw: o.ip.AsSlice(), Src: n.ip.AsSlice()})
			}
		}
		if err := addRoutes(n.ns, podIface, routes); err != nil {
			return fmt.Errorf("node %s: %w", n.name, err)
		}
	}
	return nil
}

// checkNewLocked reports why a pod or external named name cannot be added now: the cluster
// is closed, the name is unusable, or a namespace has it already; c.mu is held.
func (c *Cluster) checkNewLocked(name string) error {
	if c.closed {
		return errors.New("cluster is closed")
	}
	if err := checkName(name); err != nil {
		return err
	}
	if c.names[name] {
		return fmt.Errorf("name %q is taken", name)
	}
	return nil
}

// newNamespace creates the named namespace of name with lo up and the base sysctls, and
// records it for Close before anything else can fail.
func (c *Cluster) newNamespace(name string, ip netip.Addr) (*Namespace, error) {
	n := &Namespace{name: name, netns: netnsName(c.id, name), ip: ip}
	if err := createNamedNetns(n.Path()); err != nil {
		return nil, err
	}
	ns, err := redirect.OpenNetns(n.Path())
	if err != nil {
		return nil, errors.Join(err, deleteNamedNetns(n.Path()))
	}
	n.ns = ns
	c.all = append(c.all, n)
	c.names[name] = true
	c.log.Debug("namespace created", "netns", n.netns, "ip", ip)
	if err := writeSysctls(ns, baseSysctls()...); err != nil {
		return nil, fmt.Errorf("%s: %w", n.netns, err)
	}
	if err := withNetlink(ns, func(h *netlink.Handle) error {
		lo, err := h.LinkByName("lo")
		if err != nil {
			return fmt.Errorf("find lo: %w", err)
		}
		if err := h.LinkSetUp(lo); err != nil {
			return fmt.Errorf("set lo up: %w", err)
		}
		return nil
	}); err != nil {
		return nil, fmt.Errorf("%s: %w", n.netns, err)
	}
	return n, nil
}

// removeNamespace deletes every link of n but lo, closes its handle and unmounts it.
func (c *Cluster) removeNamespace(n *Namespace) error {
	var errs []error
	if n.ns.Valid() {
		if err := deleteLinks(n.ns); err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", n.netns, err))
		}
		n.ns.Close()
	}
	if err := deleteNamedNetns(n.Path()); err != nil {
		errs = append(errs, err)
	}
	c.all = slices.DeleteFunc(c.all, func(o *Namespace) bool { return o == n })
	delete(c.names, n.name)
	c.log.Debug("namespace removed", "netns", n.netns)
	return errors.Join(errs...)
}

// attachToFabric wires n's eth0 to the fabric bridge with n.ip/24. The port joins the
// bridge only once both ends are operationally up: the bridge then enables it at once,
// instead of when the kernel's link watcher gets round to it (up to a second later when other
// namespaces are being torn down), which would drop the first ARP request.
func (c *Cluster) attachToFabric(n *Namespace) error {
	fabricLink := vethPrefix + n.name
	if err := addVeth(c.fabric.ns, n, fabricLink, nil); err != nil {
		return err
	}
	if err := writeSysctls(c.fabric.ns, ifaceSysctls(fabricLink)...); err != nil {
		return fmt.Errorf("fabric: %w", err)
	}
	if err := setUp(c.fabric.ns, fabricLink); err != nil {
		return fmt.Errorf("fabric: %w", err)
	}
	if err := configureIface(n.ns, podIface, netip.PrefixFrom(n.ip, fabricPrefix().Bits())); err != nil {
		return err
	}
	if err := waitOperUp(n.ns, podIface); err != nil {
		return err
	}
	if err := waitOperUp(c.fabric.ns, fabricLink); err != nil {
		return fmt.Errorf("fabric: %w", err)
	}
	if err := withNetlink(c.fabric.ns, func(h *netlink.Handle) error {
		l, err := h.LinkByName(fabricLink)
		if err != nil {
			return fmt.Errorf("find %s: %w", fabricLink, err)
		}
		br, err := h.LinkByName(bridgeName)
		if err != nil {
			return fmt.Errorf("find %s: %w", bridgeName, err)
		}
		if err := h.LinkSetMaster(l, br); err != nil {
			return fmt.Errorf("attach %s to %s: %w", fabricLink, bridgeName, err)
		}
		return nil
	}); err != nil {
		return fmt.Errorf("fabric: %w", err)
	}
	return nil
}

// setUp sets iface in ns up.
func setUp(ns redirect.Netns, iface string) error {
	return withNetlink(ns, func(h *netlink.Handle) error {
		l, err := h.LinkByName(iface)
		if err != nil {
			return fmt.Errorf("find %s: %w", iface, err)
		}
		if err := h.LinkSetUp(l); err != nil {
			return fmt.Errorf("set %s up: %w", iface, err)
		}
		return nil
	})
}

// operUpTimeout bounds the wait for a new link to become operationally up.
const operUpTimeout = 5 * time.Second

// waitOperUp waits until iface in ns is operationally up. The kernel's link watcher sets
// that, and in the same step replaces the noop qdisc that drops every packet until then; so
// a link is only ready to carry the first packet (an ARP request, a SYN) once it is up.
func waitOperUp(ns redirect.Netns, iface string) error {
	return withNetlink(ns, func(h *netlink.Handle) error {
		deadline := time.Now().Add(operUpTimeout)
		for {
			l, err := h.LinkByName(iface)
			if err != nil {
				return fmt.Errorf("find %s: %w", iface, err)
			}
			if l.Attrs().OperState == netlink.OperUp {
				return nil
			}
			if time.Now().After(deadline) {
				return fmt.Errorf("%s: not up within %v (operstate %s)", iface, operUpTimeout, l.Attrs().OperState)
			}
			time.Sleep(2 * time.Millisecond)
		}
	})
}

// addVeth creates a veth pair in host, named hostLink there, whose peer is eth0 in n. mac,
// when set, is the address of the host end.
func addVeth(host redirect.Netns, n *Namespace, hostLink string, mac net.HardwareAddr) error {
	f, err := os.Open(n.Path())
	if err != nil {
		return fmt.Errorf("open %s: %w", n.Path(), err)
	}
	defer f.Close()
	return withNetlink(host, func(h *netlink.Handle) error {
		v := &netlink.Veth{
			LinkAttrs:     netlink.LinkAttrs{Name: hostLink, HardwareAddr: mac},
			PeerName:      podIface,
			PeerNamespace: netlink.NsFd(int(f.Fd())),
		}
		if err := h.LinkAdd(v); err != nil {
			return fmt.Errorf("add veth %s <-> %s/%s: %w", hostLink, n.netns, podIface, err)
		}
		return nil
	})
}

// configureIface sets the rp_filter of iface in ns, gives it addr and sets it up.
func configureIface(ns redirect.Netns, iface string, addr netip.Prefix) error {
	if err := writeSysctls(ns, ifaceSysctls(iface)...); err != nil {
		return err
	}
	return withNetlink(ns, func(h *netlink.Handle) error {
		l, err := h.LinkByName(iface)
		if err != nil {
			return fmt.Errorf("find %s: %w", iface, err)
		}
		if err := h.AddrAdd(l, &netlink.Addr{IPNet: ipNet(addr)}); err != nil {
			return fmt.Errorf("add %s to %s: %w", addr, iface, err)
		}
		if err := h.LinkSetUp(l); err != nil {
			return fmt.Errorf("set %s up: %w", iface, err)
		}
		return nil
	})
}

// addRoutes adds routes through iface in ns.
func addRoutes(ns redirect.Netns, iface string, routes []*netlink.Route) error {
	return withNetlink(ns, func(h *netlink.Handle) error {
		l, err := h.LinkByName(iface)
		if err != nil {
			return fmt.Errorf("find %s: %w", iface, err)
		}
		for _, r := range routes {
			r.LinkIndex = l.Attrs().Index
			if err := h.RouteAdd(r); err != nil {
				return fmt.Errorf("add route %s: %w", r, err)
			}
		}
		return nil
	})
}

func ipNet(p netip.Prefix) *net.IPNet {
	return &net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}
}

// AddPod creates pod name on the node named node: a namespace, a veth to the node (eth0 in
// the pod, HostLink on the node), the pod's /32 address and its routes. The address is the
// next free one of the node's PodCIDR from .10 up, unless PodIP gives one.
func (c *Cluster) AddPod(node, name string, opts ...PodOption) (*Pod, error) {
	var o podOptions
	for _, opt := range opts {
		opt(&o)
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	p, err := c.addPodLocked(node, name, o)
	if err != nil {
		return nil, fmt.Errorf("add pod %s on %s: %w", name, node, err)
	}
	return p, nil
}

func (c *Cluster) addPodLocked(node, name string, o podOptions) (*Pod, error) {
	if err := c.checkNewLocked(name); err != nil {
		return nil, err
	}
	n := c.nodeLocked(node)
	if n == nil {
		return nil, fmt.Errorf("no node %q", node)
	}
	ip := o.ip
	inUse := func(a netip.Addr) bool {
		for _, p := range c.pods {
			if p.ip == a {
				return true
			}
		}
		return false
	}
	if ip.IsValid() {
		if err := checkPodIP(n.podCIDR, ip); err != nil {
			return nil, err
		}
		if inUse(ip) {
			return nil, fmt.Errorf("pod address %s is taken", ip)
		}
	} else {
		var err error
		if ip, err = nextPodIP(n.podCIDR, n.lastPod, inUse); err != nil {
			return nil, err
		}
		n.lastPod = ip
	}
	ns, err := c.newNamespace(name, ip)
	if err != nil {
		return nil, err
	}
	p := &Pod{Namespace: ns, node: n, hostLink: vethPrefix + name}
	if err := c.wirePod(p); err != nil {
		return nil, errors.Join(err, c.removeNamespace(ns))
	}
	c.pods[name] = p
	return p, nil
}

// wirePod connects p to its node, Calico style (see the package doc).
func (c *Cluster) wirePod(p *Pod) error {
	n := p.node
	if err := addVeth(n.ns, p.Namespace, p.hostLink, gatewayMAC()); err != nil {
		return err
	}
	if err := writeSysctls(n.ns, ifaceSysctls(p.hostLink)...); err != nil {
		return err
	}
	if err := setUp(n.ns, p.hostLink); err != nil {
		return err
	}
	if err := configureIface(p.ns, podIface, netip.PrefixFrom(p.ip, 32)); err != nil {
		return err
	}
	gw := gatewayIP()
	if err := withNetlink(p.ns, func(h *netlink.Handle) error {
		l, err := h.LinkByName(podIface)
		if err != nil {
			return fmt.Errorf("find %s: %w", podIface, err)
		}
		if err := h.NeighAdd(&netlink.Neigh{
			LinkIndex:    l.Attrs().Index,
			Family:       unix.AF_INET,
			State:        netlink.NUD_PERMANENT,
			IP:           gw.AsSlice(),
			HardwareAddr: gatewayMAC(),
		}); err != nil {
			return fmt.Errorf("add neighbour %s: %w", gw, err)
		}
		return nil
	}); err != nil {
		return err
	}
	if err := addRoutes(p.ns, podIface, []*netlink.Route{
		{Dst: ipNet(netip.PrefixFrom(gw, 32)), Scope: netlink.SCOPE_LINK},
		{Dst: ipNet(netip.PrefixFrom(netip.IPv4Unspecified(), 0)), Gw: gw.AsSlice()},
	}); err != nil {
		return err
	}
	if err := addRoutes(n.ns, p.hostLink, []*netlink.Route{
		{Dst: ipNet(netip.PrefixFrom(p.ip, 32)), Scope: netlink.SCOPE_LINK, Src: n.ip.AsSlice()},
	}); err != nil {
		return err
	}
	if err := waitOperUp(p.ns, podIface); err != nil {
		return err
	}
	return waitOperUp(n.ns, p.hostLink)
}

// RemovePod deletes pod name: its veth (and with it the node's route to it), then its
// namespace. Processes running inside it are not stopped.
func (c *Cluster) RemovePod(name string) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	p := c.pods[name]
	if p == nil {
		return fmt.Errorf("remove pod %s: no such pod", name)
	}
	delete(c.pods, name)
	var errs []error
	if err := withNetlink(p.node.ns, func(h *netlink.Handle) error {
		l, err := h.LinkByName(p.hostLink)
		if err != nil {
			return fmt.Errorf("find %s: %w", p.hostLink, err)
		}
		if err := h.LinkDel(l); err != nil {
			return fmt.Errorf("delete %s: %w", p.hostLink, err)
		}
		return nil
	}); err != nil {
		errs = append(errs, err)
	}
	if err := c.removeNamespace(p.Namespace); err != nil {
		errs = append(errs, err)
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("remove pod %s: %w", name, err)
	}
	return nil
}

// AddExternal creates a host outside the mesh: a namespace on the fabric with the next
// external address (198.18.0.100 up) and a route to every node's pods through that node.
func (c *Cluster) AddExternal(name string) (*External, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	e, err := c.addExternalLocked(name)
	if err != nil {
		return nil, fmt.Errorf("add external %s: %w", name, err)
	}
	return e, nil
}

func (c *Cluster) addExternalLocked(name string) (*External, error) {
	if err := c.checkNewLocked(name); err != nil {
		return nil, err
	}
	if c.nextExtHost >= MaxExternals {
		return nil, fmt.Errorf("more than %d externals", MaxExternals)
	}
	ns, err := c.newNamespace(name, externalIP(c.nextExtHost))
	if err != nil {
		return nil, err
	}
	c.nextExtHost++
	var routes []*netlink.Route
	for _, n := range c.nodes {
		routes = append(routes, &netlink.Route{Dst: ipNet(n.podCIDR), Gw: n.ip.AsSlice()})
	}
	if err := c.attachToFabric(ns); err != nil {
		return nil, errors.Join(err, c.removeNamespace(ns))
	}
	if err := addRoutes(ns.ns, podIface, routes); err != nil {
		return nil, errors.Join(err, c.removeNamespace(ns))
	}
	e := &External{Namespace: ns}
	c.externals = append(c.externals, e)
	return e, nil
}

// spawnRequest asks the spawner thread to start a command.
type spawnRequest struct {
	cmd   *exec.Cmd
	reply chan error
}

// startSpawner starts the goroutine that starts every process. Pdeathsig is tied to the OS
// thread that forked the child, not to the process: a child forked from an arbitrary thread
// is killed whenever the Go runtime ends that thread. This goroutine keeps its thread locked
// until Close, so processes die with the test binary (a panic, a -timeout) and not before.
func (c *Cluster) startSpawner() {
	c.spawn = make(chan spawnRequest)
	c.spawnDone = make(chan struct{})
	go func() {
		runtime.LockOSThread() // never unlocked: the thread ends with this goroutine
		defer close(c.spawnDone)
		for req := range c.spawn {
			req.reply <- req.cmd.Start()
		}
	}()
}

// StartProcess starts cmd, a long-running program such as ztgo, and returns it running. Build
// cmd with Namespace.Command to run it inside a node or pod; StartProcess sets its Stdout and
// Stderr (which must be unset) to one pipe whose lines go to memory (Process.WaitLog) and to
// <RunDir>/<name>.log (name.2.log and so on when name is reused). The process gets its own
// process group, which Process.Stop and Close signal, and SIGKILL if this program dies. Close
// stops every process still running. A cmd from Command with a context still stops when that
// context ends.
func (c *Cluster) StartProcess(name string, cmd *exec.Cmd) (*Process, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	p, err := c.startProcessLocked(name, cmd)
	if err != nil {
		return nil, fmt.Errorf("start process %s: %w", name, err)
	}
	return p, nil
}

func (c *Cluster) startProcessLocked(name string, cmd *exec.Cmd) (*Process, error) {
	switch {
	case c.closed:
		return nil, errors.New("cluster is closed")
	case name == "" || name == "." || name == ".." || strings.ContainsAny(name, `/\`):
		return nil, fmt.Errorf("name %q: not usable as a file name", name)
	case cmd.Process != nil:
		return nil, errors.New("command already started")
	case cmd.Stdout != nil || cmd.Stderr != nil:
		return nil, errors.New("command has Stdout or Stderr set; StartProcess captures them")
	}
	logName := name + ".log"
	for k := 2; c.logFiles[logName]; k++ {
		logName = fmt.Sprintf("%s.%d.log", name, k)
	}
	logPath := filepath.Join(c.runDir, logName)
	logFile, err := os.OpenFile(logPath, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o644)
	if err != nil {
		return nil, fmt.Errorf("create log: %w", err)
	}
	c.logFiles[logName] = true
	r, w, err := os.Pipe()
	if err != nil {
		logFile.Close()
		return nil, fmt.Errorf("output pipe: %w", err)
	}
	cmd.Stdout, cmd.Stderr = w, w
	if cmd.SysProcAttr == nil {
		cmd.SysProcAttr = &syscall.SysProcAttr{}
	}
	attr := cmd.SysProcAttr
	if !attr.Setsid && !attr.Setpgid {
		attr.Setpgid = true
	}
	if attr.Pdeathsig == 0 {
		attr.Pdeathsig = syscall.SIGKILL
	}
	reply := make(chan error, 1)
	c.spawn <- spawnRequest{cmd: cmd, reply: reply}
	err = <-reply
	w.Close() // the child holds its own copy
	if err != nil {
		r.Close()
		logFile.Close()
		return nil, err
	}
	p := &Process{
		name:    name,
		logPath: logPath,
		cmd:     cmd,
		log:     logFile,
		done:    make(chan struct{}),
		changed: make(chan struct{}),
	}
	if attr.Setsid || (attr.Setpgid && attr.Pgid == 0) {
		p.pgid = cmd.Process.Pid
	}
	readDone := make(chan struct{})
	go p.read(r, readDone)
	go p.wait(r, readDone)
	c.procs = append(c.procs, p)
	c.log.Debug("process started", "name", name, "pid", p.Pid(), "log", logPath, "args", cmd.Args)
	return p, nil
}

// Processes returns every process started, running or not, in start order.
func (c *Cluster) Processes() []*Process {
	c.mu.Lock()
	defer c.mu.Unlock()
	return slices.Clone(c.procs)
}

// Close stops every process still running (SIGTERM, SIGKILL after Config.StopGrace), deletes
// every link and namespace, releases the run's lock and removes a temporary RunDir unless
// Config.KeepRunDir. It is safe to call more than once; later calls do nothing.
func (c *Cluster) Close() error {
	return c.close(c.cfg.KeepRunDir)
}

func (c *Cluster) close(keepRunDir bool) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return nil
	}
	c.closed = true
	var errs []error
	var wg sync.WaitGroup
	var stopMu sync.Mutex
	for _, p := range c.procs {
		wg.Go(func() {
			p.Stop(c.cfg.StopGrace) // how it ended is the caller's business, not Close's
			var err error
			select {
			case <-p.done:
				err = p.logError()
			default:
				err = fmt.Errorf("process %s (pid %d) did not end", p.name, p.Pid())
			}
			if err != nil {
				stopMu.Lock()
				errs = append(errs, err)
				stopMu.Unlock()
			}
		})
	}
	wg.Wait()
	close(c.spawn)
	<-c.spawnDone
	// Newest first: pods and externals, then nodes, then the fabric. Each namespace's links
	// are deleted before it is unmounted, so none survives a socket or process that still
	// holds a namespace.
	for _, n := range slices.Backward(slices.Clone(c.all)) {
		if err := c.removeNamespace(n); err != nil {
			errs = append(errs, err)
		}
	}
	c.pods = map[string]*Pod{}
	if err := c.lock.release(); err != nil {
		errs = append(errs, err)
	}
	if c.ownRunDir && !keepRunDir {
		if err := os.RemoveAll(c.runDir); err != nil {
			errs = append(errs, fmt.Errorf("remove run dir: %w", err))
		}
	}
	return errors.Join(errs...)
}
