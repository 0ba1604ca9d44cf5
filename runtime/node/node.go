// Package node wires one ztgo node: the snapshot source, the CA and certificates, the stage
// pipeline, the connection pool, the relay, the listeners and the admin endpoints. It holds no
// proxy logic of its own: it connects the packages that do, in the order they must start and
// stop.
//
// Loopback mode: with no kernel capture, outbound traffic enters through the SOCKS5 listener
// (the SOCKS client's source address names the source workload), and every local HBONE
// workload gets an inbound HBONE listener on <workload IP>:15008. Listeners follow the
// snapshot: a workload added to or removed from this node opens or closes its listener.
package node

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/puzpuzpuz/xsync/v3"

	"github.com/ztgo/ztgo/connpool"
	"github.com/ztgo/ztgo/control/localfile"
	"github.com/ztgo/ztgo/control/snapshot"
	"github.com/ztgo/ztgo/control/xds"
	"github.com/ztgo/ztgo/redirect"
	"github.com/ztgo/ztgo/redirect/agent"
	"github.com/ztgo/ztgo/redirect/zds"
	"github.com/ztgo/ztgo/runtime/admin"
	"github.com/ztgo/ztgo/runtime/buildinfo"
	"github.com/ztgo/ztgo/runtime/eventloop"
	"github.com/ztgo/ztgo/runtime/relay"
	"github.com/ztgo/ztgo/runtime/telemetry"
	"github.com/ztgo/ztgo/runtime/trace"
	"github.com/ztgo/ztgo/stages"
	"github.com/ztgo/ztgo/stages/authz"
	"github.com/ztgo/ztgo/stages/capture"
	"github.com/ztgo/ztgo/stages/dns"
	"github.com/ztgo/ztgo/stages/hbone"
	"github.com/ztgo/ztgo/stages/upstream"
	"github.com/ztgo/ztgo/tls/ca"
	"github.com/ztgo/ztgo/tls/certs"
	"github.com/ztgo/ztgo/tls/spiffe"
)

// Config is everything a node needs; cmd/ztgo fills it from flags and environment.
type Config struct {
	// Name is this node (NODE_NAME): workloads whose node matches are local.
	Name string
	// Network is this node's network (NETWORK).
	Network string
	// Source picks where the mesh comes from: SourceLocal (the default), SourceXDS, or
	// SourceBoth (istiod, with the local config as a static overlay on top).
	Source string
	// XDS configures the istiod client for SourceXDS and SourceBoth.
	XDS xds.Config
	// ConfigPath (LOCAL_XDS_PATH) or ConfigInline (LOCAL_XDS) give the mesh; with neither,
	// DefaultConfig is used.
	ConfigPath, ConfigInline string
	DefaultConfig            []byte
	ConfigPollInterval       time.Duration
	// IstiodCA, when set, gets certificates from istiod's CA (CA_ADDRESS); otherwise the
	// built-in CA signs them.
	IstiodCA *ca.IstiodConfig
	// CADir is the built-in CA's plug-in directory; empty means an in-memory CA.
	CADir string
	// TrustDomain of the in-memory CA (TRUST_DOMAIN).
	TrustDomain string
	CertTTL     time.Duration

	SOCKS5Addr, AdminAddr, MetricsAddr, ReadinessAddr string
	// DNSAddr, when set, serves the DNS proxy there (UDP and TCP) for the local workloads.
	DNSAddr string
	// DNSUpstreams are the resolvers the DNS proxy forwards to ("host:port"); nil reads
	// /etc/resolv.conf.
	DNSUpstreams []string
	// HBONEPort is where inbound HBONE listens on each local workload address (15008).
	HBONEPort uint16

	// In-pod capture. With InPodUDS (ztunnel's INPOD_UDS) the node takes pods from a ZDS
	// node agent (istio-cni, or `ztgo node-agent`); with PodsDir it runs the node agent
	// itself: it watches the directory for pod files, installs the capture rules in each
	// pod's network namespace and starts the pod's proxy. Either one replaces the loopback
	// listeners on workload addresses; the SOCKS5 listener stays as configured.
	InPodUDS string
	PodsDir  string
	// PodPollInterval is how often PodsDir is scanned (0: the agent's default).
	PodPollInterval time.Duration
	// InPodMark is SO_MARK on every socket opened in a pod (PACKET_MARK; default 1337).
	InPodMark uint32

	PoolMaxStreams  uint32
	PoolIdleTimeout time.Duration
	Mark            int
	Transparent     bool
	Workers         int
	// DrainTimeout bounds graceful shutdown (CONNECTION_TERMINATION_DEADLINE).
	DrainTimeout time.Duration
	LogAuthzInfo bool
	// DebugSnapshot checks on every publish that no published snapshot was mutated
	// (ZTGO_DEBUG_SNAPSHOT=1); it walks whole snapshots, so it is for tests and debugging.
	DebugSnapshot bool

	Logger *slog.Logger
	Level  *slog.LevelVar
	// Registry collects every metric; nil creates one.
	Registry *prometheus.Registry
}

// Mesh sources.
const (
	SourceLocal = "local"
	SourceXDS   = "xds"
	SourceBoth  = "both"
)

// Node is one running ztgo node.
type Node struct {
	cfg   Config
	log   *slog.Logger
	reg   *prometheus.Registry
	store *snapshot.Store

	source *localfile.Source // nil with SourceXDS
	xds    *xds.Client       // nil with SourceLocal
	// With SourceBoth the two sources write their own stores and merge publishes into store.
	xdsStore, fileStore *snapshot.Store
	mergeMu             sync.Mutex
	signer              ca.Signer
	istiod              *ca.Istiod
	certs               *certs.Manager
	pool                *connpool.Pool
	dialer              *upstream.Dialer
	tracker             *authz.Tracker
	pipeline            *stages.Pipeline
	relay               *relay.Relay
	loop                *eventloop.Loop // nil where epoll is missing: relays keep a goroutine per idle socket
	bufs                *hbone.Buffers  // receive and write buffers shared by every HBONE connection
	rec                 *trace.Recorder
	tel                 *telemetry.Telemetry
	admin               *admin.Server
	ready               *admin.Readiness
	dns                 *dns.Server  // nil without DNSAddr and in-pod capture
	zds                 *zds.Client  // nil unless InPodUDS
	agent               *agent.Agent // nil unless PodsDir

	serverTLS *tls.Config
	handshake chan struct{} // bounds concurrent inbound TLS handshakes
	prefetch  chan struct{} // wakes the certificate prefetcher

	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup
	quit   chan struct{}
	stop   sync.Once

	mu          sync.Mutex
	stopping    bool // set once by Stop: no listener opens and no relay starts after it
	socksLn     net.Listener
	inbound     map[netip.Addr]net.Listener
	serverConns map[*hbone.Conn]*pod // the pod whose 15008 accepted it; nil in loopback mode
	flows       *xsync.MapOf[uint64, *stages.Flow]
	relays      sync.WaitGroup

	// In-pod proxies by pod uid and by pool scope.
	podMu      sync.Mutex
	pods       map[string]*pod
	podScopes  *xsync.MapOf[string, *pod] // read lock-free by dialHBONE
	podsActive prometheus.Gauge
}

// InPod reports whether the node captures traffic inside pod network namespaces.
func (c Config) InPod() bool { return c.InPodUDS != "" || c.PodsDir != "" }

// New validates cfg and builds the node's parts; nothing listens until Start.
func New(cfg Config) (*Node, error) {
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.Level == nil {
		cfg.Level = new(slog.LevelVar)
	}
	if cfg.Registry == nil {
		cfg.Registry = prometheus.NewRegistry()
	}
	if cfg.HBONEPort == 0 {
		cfg.HBONEPort = snapshot.DefaultHBONEPort
	}
	if cfg.Workers <= 0 {
		cfg.Workers = 32
	}
	if cfg.DrainTimeout <= 0 {
		cfg.DrainTimeout = 5 * time.Second
	}
	if cfg.TrustDomain == "" {
		cfg.TrustDomain = snapshot.DefaultTrustDomain
	}
	if cfg.PoolMaxStreams == 0 {
		cfg.PoolMaxStreams = hbone.ClientMaxStreams
	}
	n := &Node{
		cfg: cfg, log: cfg.Logger, reg: cfg.Registry,
		store:       snapshot.NewStore(),
		handshake:   make(chan struct{}, 256),
		prefetch:    make(chan struct{}, 1),
		quit:        make(chan struct{}),
		inbound:     map[netip.Addr]net.Listener{},
		serverConns: map[*hbone.Conn]*pod{},
		pods:        map[string]*pod{},
		podScopes:   xsync.NewMapOf[string, *pod](),
		flows:       xsync.NewMapOf[uint64, *stages.Flow](),
		bufs:        hbone.NewBuffers(),
	}
	tasks := []string{"state manager", "certificates", "proxy"}
	if cfg.InPodUDS != "" && cfg.PodsDir != "" {
		return nil, errors.New("in-pod capture: set either a ZDS socket or a pods directory, not both")
	}
	if cfg.InPod() {
		tasks = append(tasks, "workload proxy manager")
	}
	n.ready = admin.NewReadiness(tasks...)
	n.store.VerifyImmutable = cfg.DebugSnapshot
	n.store.Logger = cfg.Logger
	reg := cfg.Registry
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	build := prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "istio_build", Help: "Istio component build info"}, []string{"component", "tag"})
	build.WithLabelValues("ztunnel", buildinfo.Version).Set(1)
	reg.MustRegister(build)
	loop, err := eventloop.New(cfg.Logger, reg)
	if err != nil {
		cfg.Logger.Warn("no event loop: every established flow keeps a goroutine per direction", "error", err)
		loop = nil
	}
	n.loop = loop
	n.relay = relay.New(0, loop)
	reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name: "ztgo_relay_buffers_in_use", Help: "Copy buffers held by flows (bytes in flight; idle flows hold none).",
	}, func() float64 { return float64(n.relay.BuffersInUse()) }))
	reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name: "ztgo_relay_directions_running",
		Help: "Flow directions on a goroutine: moving bytes or waiting for their far side (idle ones are parked on the event loop).",
	}, func() float64 { return float64(n.relay.Running()) }))
	if err := registerSnapshotMetrics(n.store, reg); err != nil {
		return nil, err
	}

	cm, err := localfile.NewMetrics(reg)
	if err != nil {
		return nil, err
	}
	opts := []localfile.Option{localfile.WithMetrics(cm)}
	if cfg.ConfigPollInterval > 0 {
		opts = append(opts, localfile.WithPollInterval(cfg.ConfigPollInterval))
	}
	switch cfg.Source {
	case "", SourceLocal, SourceXDS, SourceBoth:
	default:
		return nil, fmt.Errorf("config source %q: want %s, %s or %s", cfg.Source, SourceLocal, SourceXDS, SourceBoth)
	}
	fileStore, xdsStore := n.store, n.store
	if cfg.Source == SourceBoth {
		n.fileStore, n.xdsStore = snapshot.NewStore(), snapshot.NewStore()
		fileStore, xdsStore = n.fileStore, n.xdsStore
	}
	if cfg.Source != SourceXDS {
		switch {
		case cfg.ConfigPath != "":
			n.source, err = localfile.NewFile(cfg.ConfigPath, fileStore, cfg.Logger, opts...)
		case cfg.ConfigInline != "":
			n.source, err = localfile.NewInline(cfg.ConfigInline, fileStore, cfg.Logger, opts...)
		default:
			n.source, err = localfile.NewInline(string(cfg.DefaultConfig), fileStore, cfg.Logger, opts...)
		}
		if err != nil {
			return nil, fmt.Errorf("config source: %w", err)
		}
	}
	if cfg.Source == SourceXDS || cfg.Source == SourceBoth {
		if n.xds, err = xds.New(cfg.XDS, xdsStore, cfg.Logger.With("scope", "xds"), reg); err != nil {
			return nil, fmt.Errorf("xds client: %w", err)
		}
	}
	switch {
	case cfg.IstiodCA != nil:
		icfg := *cfg.IstiodCA
		if icfg.Logger == nil {
			icfg.Logger = cfg.Logger.With("scope", "ca")
		}
		if n.istiod, err = ca.NewIstiod(icfg); err != nil {
			return nil, fmt.Errorf("istiod CA client: %w", err)
		}
		n.signer = n.istiod
	case cfg.CADir != "":
		if n.signer, err = ca.LoadOrCreate(cfg.CADir); err != nil {
			return nil, fmt.Errorf("built-in CA: %w", err)
		}
	default:
		if n.signer, err = ca.NewEphemeral(cfg.TrustDomain); err != nil {
			return nil, fmt.Errorf("built-in CA: %w", err)
		}
	}
	n.certs, err = certs.New(certs.Config{Signer: n.signer, TTL: cfg.CertTTL, Logger: cfg.Logger, Registerer: reg})
	if err != nil {
		return nil, fmt.Errorf("certificates: %w", err)
	}
	n.dialer = upstream.New(upstream.Config{Mark: cfg.Mark, Transparent: cfg.Transparent})
	n.pool, err = connpool.New(connpool.Config{Dial: n.dialHBONE, IdleTimeout: cfg.PoolIdleTimeout, Logger: cfg.Logger, Registerer: reg})
	if err != nil {
		return nil, err
	}
	n.tracker = authz.NewTracker(cfg.Logger)
	if n.rec, err = trace.NewRecorder(512, reg); err != nil {
		return nil, fmt.Errorf("trace recorder: %w", err)
	}
	m, err := telemetry.NewMetrics(reg)
	if err != nil {
		return nil, err
	}
	n.tel = telemetry.New(m, cfg.Logger.With("scope", "access"))
	h := &stages.Handlers{
		Node: cfg.Name, Network: cfg.Network, Pool: n.pool, Dialer: n.dialer, Tracker: n.tracker,
		Log: cfg.Logger, LogAuthzInfo: cfg.LogAuthzInfo, SOCKS5: cfg.SOCKS5Addr != "",
	}
	n.pipeline, err = stages.NewPipeline(h.Stages(cfg.Workers, 1024), stages.Hooks{Established: n.established, Failed: n.failed}, reg)
	if err != nil {
		return nil, err
	}
	n.podsActive = prometheus.NewGauge(prometheus.GaugeOpts{
		Name: "ztgo_inpod_proxies", Help: "In-pod proxies running (pods whose traffic this node captures).",
	})
	reg.MustRegister(n.podsActive)
	if cfg.DNSAddr != "" || cfg.InPod() {
		n.dns, err = dns.New(dns.Config{
			Addr: cfg.DNSAddr, Snapshot: n.store.Load, Network: cfg.Network, Upstreams: cfg.DNSUpstreams,
			Workers: cfg.Workers, Logger: cfg.Logger.With("scope", "dns"), Registerer: reg,
		})
		if err != nil {
			return nil, err
		}
	}
	if cfg.InPodUDS != "" {
		zc, err := zds.New(zds.Config{SocketPath: cfg.InPodUDS}, zdsHandler{Node: n}, cfg.Logger.With("scope", "zds"), reg)
		if err != nil {
			return nil, err
		}
		n.zds = zc
	}
	if cfg.PodsDir != "" {
		n.agent, err = agent.New(agent.Config{
			Dir: cfg.PodsDir, PollInterval: cfg.PodPollInterval,
			Rules:  redirect.RuleConfig{Mark: cfg.InPodMark, DisableDNS: false},
			Logger: cfg.Logger.With("scope", "agent"), Registerer: reg,
		}, n)
		if err != nil {
			return nil, fmt.Errorf("node agent: %w", err)
		}
	}
	n.serverTLS = n.certs.ServerConfig(n.serverIdentity)
	n.admin, err = admin.New(admin.Config{
		AdminAddr: cfg.AdminAddr, MetricsAddr: cfg.MetricsAddr, ReadinessAddr: cfg.ReadinessAddr,
		Gatherer: reg, ConfigDump: n.configDump, Recorder: n.rec, Level: cfg.Level,
		Quit: n.requestQuit, Ready: n.ready, Logger: cfg.Logger, Summary: n.summary,
	})
	if err != nil {
		return nil, err
	}
	return n, nil
}

// Store is the node's snapshot store.
func (n *Node) Store() *snapshot.Store { return n.store }

// Registry is the node's metrics registry.
func (n *Node) Registry() *prometheus.Registry { return n.reg }

// Pool is the node's HBONE connection pool.
func (n *Node) Pool() *connpool.Pool { return n.pool }

// Recorder holds the node's flow traces.
func (n *Node) Recorder() *trace.Recorder { return n.rec }

// SOCKS5Addr is the bound SOCKS5 address (useful with port 0).
func (n *Node) SOCKS5Addr() string {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.socksLn == nil {
		return ""
	}
	return n.socksLn.Addr().String()
}

// DNSAddr is the bound DNS proxy address (UDP and TCP), or "" without one.
func (n *Node) DNSAddr() string {
	if n.dns == nil {
		return ""
	}
	return n.dns.Addr()
}

// AdminAddr returns the bound address of "admin", "metrics" or "readiness".
func (n *Node) AdminAddr(name string) string { return n.admin.Addr(name) }

// Quit is closed when shutdown was requested through the admin endpoint.
func (n *Node) Quit() <-chan struct{} { return n.quit }

func (n *Node) requestQuit() {
	n.stop.Do(func() { close(n.quit) })
}

// Start loads the config (failing on an invalid one), issues nothing yet, and opens every
// listener.
func (n *Node) Start(ctx context.Context) error {
	n.ctx, n.cancel = context.WithCancel(context.Background())
	if n.loop != nil {
		n.loop.Start()
	}
	if n.source != nil {
		if err := n.source.Start(n.ctx); err != nil {
			return fmt.Errorf("load config: %w", err)
		}
	}
	if n.xds != nil {
		if err := n.xds.Start(n.ctx); err != nil {
			return fmt.Errorf("start xds: %w", err)
		}
		n.wg.Add(1)
		go func() {
			defer n.wg.Done()
			select {
			case <-n.xds.Ready():
				if n.xdsStore != nil {
					// SourceBoth: flows see the merged view, so readiness waits until that view
					// holds istiod's first state (the watcher may not have merged it yet).
					n.mergeSources()
				}
				n.ready.Done("state manager")
			case <-n.ctx.Done():
			}
		}()
	}
	if n.xdsStore != nil {
		// Subscribe before the first merge: a publish in between would otherwise be missed.
		chX, cancelX := n.xdsStore.Subscribe()
		chF, cancelF := n.fileStore.Subscribe()
		n.mergeSources()
		n.wg.Add(1)
		go n.watchSources(chX, chF, func() { cancelX(); cancelF() })
	}
	if n.xds == nil {
		n.ready.Done("state manager")
	}
	if err := n.certs.Start(n.ctx); err != nil {
		return fmt.Errorf("start certificates: %w", err)
	}
	n.pool.Start()
	n.pipeline.Start()
	n.wg.Add(1)
	go func() { defer n.wg.Done(); n.tracker.Run(n.ctx, n.store) }()

	if err := n.admin.Start(); err != nil {
		return err
	}
	if n.cfg.SOCKS5Addr != "" {
		ln, err := net.Listen("tcp", n.cfg.SOCKS5Addr)
		if err != nil {
			return fmt.Errorf("listen socks5 on %s: %w", n.cfg.SOCKS5Addr, err)
		}
		n.mu.Lock()
		n.socksLn = ln
		n.mu.Unlock()
		n.wg.Add(1)
		go n.acceptSOCKS(ln)
	}
	if n.dns != nil && n.cfg.DNSAddr != "" {
		if err := n.dns.Start(); err != nil {
			return err
		}
	}
	// Subscribe before the first look at the store, so no publish falls in between.
	snapCh, snapCancel := n.store.Subscribe()
	n.reconcileInbound()
	n.wg.Add(1)
	go n.watchSnapshots(snapCh, snapCancel)
	n.wg.Add(1)
	go n.prefetchLoop()
	if err := n.startPodSource(); err != nil {
		return err
	}
	n.ready.Done("proxy")
	n.log.Info("ztgo node started", "node", n.cfg.Name, "version", buildinfo.Version,
		"socks5", n.SOCKS5Addr(), "admin", n.admin.Addr("admin"), "metrics", n.admin.Addr("metrics"),
		"workloads", len(n.store.Load().WorkloadsOnNode(n.cfg.Name)))
	return nil
}

// localWorkloads are the HBONE workloads this node serves inbound.
func (n *Node) localWorkloads(s *snapshot.Snapshot) []*snapshot.Workload {
	var out []*snapshot.Workload
	for _, w := range s.WorkloadsOnNode(n.cfg.Name) {
		if w.Protocol == snapshot.TunnelHBONE {
			out = append(out, w)
		}
	}
	return out
}

func (n *Node) watchSnapshots(ch <-chan struct{}, cancel func()) {
	defer n.wg.Done()
	defer cancel()
	for {
		select {
		case <-n.ctx.Done():
			return
		case <-ch:
			n.reconcileInbound()
			n.forgetUnusedCerts()
			select {
			case n.prefetch <- struct{}{}:
			default:
			}
		}
	}
}

// reconcileInbound opens a listener on <ip>:15008 for every local HBONE workload address and
// closes the listeners of addresses that are gone.
func (n *Node) reconcileInbound() {
	if n.cfg.InPod() {
		return // each pod's proxy listens inside the pod
	}
	want := map[netip.Addr]bool{}
	for _, w := range n.localWorkloads(n.store.Load()) {
		for _, a := range w.Addresses {
			want[a.Unmap()] = true
		}
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	for ip, ln := range n.inbound {
		if !want[ip] {
			ln.Close()
			delete(n.inbound, ip)
			n.log.Info("inbound HBONE listener closed", "addr", ln.Addr().String())
		}
	}
	if n.stopping || n.ctx.Err() != nil {
		return
	}
	for ip := range want {
		if _, ok := n.inbound[ip]; ok {
			continue
		}
		addr := netip.AddrPortFrom(ip, n.cfg.HBONEPort)
		ln, err := net.Listen("tcp", addr.String())
		if err != nil {
			n.log.Error("cannot listen for inbound HBONE", "addr", addr.String(), "error", err)
			continue
		}
		n.inbound[ip] = ln
		n.log.Info("inbound HBONE listener open", "addr", addr.String())
		n.wg.Add(1)
		go n.acceptInbound(ln)
	}
}

// prefetchLoop asks for the certificates of local HBONE workloads whenever the mesh changes,
// so the first connection of a workload does not wait for a signing. "certificates" becomes
// ready after the first round that ran once the mesh was loaded.
func (n *Node) prefetchLoop() {
	defer n.wg.Done()
	first := true
	for {
		if n.store.Load().Version() > 0 {
			for _, w := range n.localWorkloads(n.store.Load()) {
				ctx, cancel := context.WithTimeout(n.ctx, 30*time.Second)
				if _, err := n.certs.Get(ctx, w.Identity()); err != nil && n.ctx.Err() == nil {
					n.log.Warn("certificate prefetch failed", "identity", w.Identity().String(), "error", err)
				}
				cancel()
			}
			if first {
				n.ready.Done("certificates")
				first = false
			}
		}
		select {
		case <-n.ctx.Done():
			return
		case <-n.prefetch:
		}
	}
}

// forgetUnusedCerts drops certificates of identities no local workload has any more.
func (n *Node) forgetUnusedCerts() {
	used := map[spiffe.ID]bool{}
	for _, w := range n.store.Load().WorkloadsOnNode(n.cfg.Name) {
		used[w.Identity()] = true
	}
	for _, st := range n.certs.Snapshot() {
		if !used[st.Identity] {
			n.certs.Forget(st.Identity)
		}
	}
}

// serverIdentity picks the certificate for an inbound connection: the workload that owns the
// address the client connected to.
func (n *Node) serverIdentity(local netip.Addr) (spiffe.ID, error) {
	w := n.store.Load().WorkloadByAddr(n.cfg.Network, local)
	if w == nil || w.Node != n.cfg.Name {
		return spiffe.ID{}, fmt.Errorf("no local workload at %s", local)
	}
	return w.Identity(), nil
}

// dialHBONE opens a pooled connection: TCP from the source workload's address, mTLS as the
// source identity expecting one of the key's SANs, then the HTTP/2 preface.
func (n *Node) dialHBONE(ctx context.Context, key connpool.Key) (*hbone.Conn, error) {
	src, err := spiffe.Parse(key.SrcIdentity)
	if err != nil {
		return nil, &stages.Error{Kind: stages.FailIdentity, Err: err}
	}
	tcfg, err := n.certs.ClientConfig(ctx, src, key.SANs())
	if err != nil {
		return nil, &stages.Error{Kind: stages.FailIdentity, Err: fmt.Errorf("client certificate for %s: %w", src, err)}
	}
	var nc net.Conn
	if key.Scope != "" {
		// An in-pod proxy's connection: dialled inside the pod, from the pod's address.
		p, _ := n.podScopes.Load(key.Scope)
		if p == nil {
			return nil, &stages.Error{Kind: stages.FailConnect, Err: fmt.Errorf("%s is gone", key.Scope)}
		}
		nc, err = p.Dial(ctx, key.Dst)
	} else {
		nc, _, err = n.dialer.Dial(ctx, key.SrcIP, key.Dst, true)
	}
	if err != nil {
		kind := stages.FailConnect
		if errors.Is(err, upstream.ErrTimeout) {
			kind = stages.FailNetworkPolicy
			err = fmt.Errorf("%w (maybe a NetworkPolicy is blocking HBONE port %d)", err, key.Dst.Port())
		}
		return nil, &stages.Error{Kind: kind, Err: err}
	}
	tc := tls.Client(nc, tcfg)
	hctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if err := tc.HandshakeContext(hctx); err != nil {
		nc.Close()
		return nil, &stages.Error{Kind: stages.FailTLS, Err: fmt.Errorf("tls handshake with %s: %w", key.Dst, err)}
	}
	set := hbone.ClientSettings()
	set.MaxConcurrentStreams = n.cfg.PoolMaxStreams
	c, err := hbone.NewClientConn(tc, hbone.Config{Settings: set, Logger: n.log, Buffers: n.bufs})
	if err != nil {
		return nil, &stages.Error{Kind: stages.FailH2Handshake, Err: err}
	}
	if key.Scope != "" {
		if p, _ := n.podScopes.Load(key.Scope); p == nil {
			// The pod was removed while this was dialling: its pool entries are gone.
			c.Close()
			return nil, &stages.Error{Kind: stages.FailConnect, Err: fmt.Errorf("%s is gone", key.Scope)}
		}
	}
	return c, nil
}

// acceptSOCKS serves the SOCKS5 entry: each connection is an outbound flow whose capture
// stage speaks SOCKS5.
func (n *Node) acceptSOCKS(ln net.Listener) {
	defer n.wg.Done()
	n.acceptFlows(n.ctx, n.log, ln, stages.Outbound, nil)
}

func (n *Node) acceptInbound(ln net.Listener) {
	defer n.wg.Done()
	n.acceptHBONE(n.ctx, ln, nil)
}

// acceptHBONE serves an inbound HBONE listener, the node's on a workload address (p nil) or a
// pod's 15008, until it closes or ctx ends. Handshakes run on their own goroutines, at most
// cap(handshake) at once.
func (n *Node) acceptHBONE(ctx context.Context, ln net.Listener, p *pod) {
	var delay time.Duration
	for {
		c, err := ln.Accept()
		if err != nil {
			if acceptRetry(ctx, n.log, ln, err, &delay) {
				continue
			}
			return
		}
		delay = 0
		select {
		case n.handshake <- struct{}{}:
		case <-ctx.Done():
			c.Close()
			return
		}
		n.wg.Add(1)
		go func() {
			defer n.wg.Done()
			defer func() { <-n.handshake }()
			n.serveInbound(c, p)
		}()
	}
}

// serveInbound completes the mTLS handshake and the HTTP/2 preface of one inbound connection;
// its streams then arrive on the connection's read loop. p is the pod whose 15008 accepted
// it, nil for the node's own listeners.
func (n *Node) serveInbound(nc net.Conn, p *pod) {
	tc := tls.Server(nc, n.serverTLS)
	ctx, cancel := context.WithTimeout(n.ctx, 10*time.Second)
	err := tc.HandshakeContext(ctx)
	cancel()
	if err != nil {
		n.log.Debug("inbound tls handshake failed", "peer", nc.RemoteAddr().String(), "error", err)
		nc.Close()
		return
	}
	peer, err := certs.PeerIdentity(tc.ConnectionState())
	if err != nil {
		n.log.Debug("inbound peer has no identity", "peer", nc.RemoteAddr().String(), "error", err)
		tc.Close()
		return
	}
	local, remote := addrPort(nc.LocalAddr()), addrPort(nc.RemoteAddr())
	conn, err := hbone.ServeConn(tc, hbone.Config{
		Logger:  n.log,
		Buffers: n.bufs,
		Handler: func(s *hbone.Stream) { n.inboundStream(s, local, remote, peer, p) },
	})
	if err != nil {
		n.log.Debug("inbound http2 preface failed", "peer", remote.String(), "error", err)
		return
	}
	n.mu.Lock()
	if p != nil && p.isClosedLocked() {
		// The pod went away during the handshake.
		n.mu.Unlock()
		conn.Close()
		return
	}
	n.serverConns[conn] = p
	n.mu.Unlock()
	n.wg.Add(1)
	go func() {
		defer n.wg.Done()
		select {
		case <-conn.Done():
		case <-n.ctx.Done():
			conn.Close()
		}
		n.mu.Lock()
		delete(n.serverConns, conn)
		n.mu.Unlock()
	}()
}

// inboundStream runs on an HTTP/2 read loop: it must not block.
func (n *Node) inboundStream(s *hbone.Stream, local, remote netip.AddrPort, peer spiffe.ID, p *pod) {
	snap := n.store.Load()
	f := n.pipeline.NewFlow(stages.Inbound, snap, stages.Capture, stages.Identity, stages.Authz, stages.Upstream)
	if p != nil {
		f.Pod = p
	}
	f.Down, f.DownStream = s, s
	f.Src, f.Local, f.SrcIdentity = remote, local, peer
	req := s.Request()
	f.TraceParent = req.Get(hbone.HeaderTraceParent)
	if w := snap.WorkloadByAddr(n.cfg.Network, remote.Addr()); w != nil && w.Identity() == peer {
		f.SrcWorkload = w
	}
	if err := n.pipeline.TrySubmit(f); err != nil {
		f.Fail(stages.FailOverload, err)
		go func() {
			s.Respond(503, nil)
			n.failed(f)
		}()
	}
}

func (n *Node) established(f *stages.Flow) {
	p, _ := f.Pod.(*pod)
	n.mu.Lock()
	refused := true
	switch {
	case n.stopping:
		f.Fail(stages.FailOverload, errors.New("proxy shutting down"))
	case p != nil && p.isClosedLocked():
		f.Fail(stages.FailConnect, errors.New("pod removed"))
	default:
		refused = false
	}
	if refused {
		n.mu.Unlock()
		n.failed(f) // no SOCKS5 success reply went out yet: failed answers the client
		return
	}
	if p != nil {
		p.relays.Add(1) // under mu, like closed: a removal waits for exactly these
	}
	// Add under mu: Stop sets stopping under mu before it waits, so no Add can follow the Wait.
	n.relays.Add(1)
	// Stored under mu too: a pod's removal marks it closed under mu and then closes the
	// flows it finds, so a flow of the pod is either refused above or found.
	n.flows.Store(f.ID, f)
	n.mu.Unlock()
	if f.Dir == stages.Outbound && f.Pod == nil {
		var bound netip.AddrPort
		if c, ok := f.Up.(net.Conn); ok {
			bound = addrPort(c.LocalAddr())
		}
		if err := capture.WriteReply(f.Down, capture.ReplySucceeded, bound); err != nil {
			n.release(f, p)
			f.Fail(stages.FailConnect, fmt.Errorf("socks5 reply: %w", err))
			n.failed(f)
			return
		}
	}
	// The stage trace is complete once the flow is established: record it now, so the live
	// view and the stage histograms do not wait for long-lived connections to close.
	n.record(f)
	n.tel.Opened(f)
	rf := n.relay.Start(f.Down, f.Up, &f.BytesSent, &f.BytesRecv, func() {
		f.FirstByte = time.Since(f.Trace.Established)
		n.rec.ObserveFirstByte(f.Dir.String(), f.FirstByte)
	}, func(res relay.Result) {
		n.tracker.Remove(f.ID)
		n.tel.Closed(f, res.Err)
		n.release(f, p)
	})
	if !f.SetAbort(rf.Abort) {
		rf.Abort()
	}
}

// release undoes established's registration of f (of pod p, or nil) once its sockets are let
// go of.
func (n *Node) release(f *stages.Flow, p *pod) {
	n.flows.Delete(f.ID)
	if p != nil {
		p.relays.Done()
	}
	n.relays.Done()
}

func (n *Node) failed(f *stages.Flow) {
	switch {
	case f.Dir == stages.Outbound && f.Pod == nil && f.Down != nil:
		if f.Failure != stages.FailBadRequest {
			capture.WriteReply(f.Down, socksReply(f.Failure), netip.AddrPort{})
		}
	case f.DownStream != nil:
		// Stages answer before they fail; this covers flows failed by the pipeline itself.
		f.DownStream.Respond(503, nil)
	}
	if f.Down != nil {
		f.Down.Close()
	}
	if f.Up != nil {
		f.Up.Close()
	}
	n.tracker.Remove(f.ID)
	n.record(f)
	n.tel.Failed(f)
}

func socksReply(kind stages.Failure) byte {
	switch kind {
	case stages.FailDeny, stages.FailIdentity:
		return capture.ReplyNotAllowed
	case stages.FailNetworkPolicy:
		return capture.ReplyHostUnreachable
	case stages.FailConnect:
		return capture.ReplyConnectionRefused
	default:
		return capture.ReplyGeneralFailure
	}
}

// record hands f's stage timeline and endpoints to the recorder, which keeps its own copy.
func (n *Node) record(f *stages.Flow) {
	rec := trace.Record{
		Timeline:    f.Trace,
		Src:         f.Src.String(),
		Dst:         f.Dst.String(),
		SrcIdentity: f.SrcIdentity.String(),
		DstIdentity: f.DstIdentity.String(),
		TraceParent: f.TraceParent,
	}
	n.rec.Finish(&rec)
}

// Stop drains the node: listeners close, HBONE connections get GOAWAY, flows get DrainTimeout
// to finish and are then closed, and every goroutine is waited for.
func (n *Node) Stop(ctx context.Context) error {
	if n.cancel == nil {
		if n.loop != nil {
			n.loop.Stop()
		}
		return nil
	}
	n.mu.Lock()
	if n.stopping {
		n.mu.Unlock()
		return nil
	}
	n.stopping = true
	if n.socksLn != nil {
		n.socksLn.Close()
	}
	if n.dns != nil {
		defer n.dns.Stop()
	}
	for ip, ln := range n.inbound {
		ln.Close()
		delete(n.inbound, ip)
	}
	conns := make([]*hbone.Conn, 0, len(n.serverConns))
	for c := range n.serverConns {
		conns = append(conns, c)
	}
	n.mu.Unlock()
	// Pods' listeners stop accepting now; their flows drain with everyone else's.
	n.podMu.Lock()
	for _, p := range n.pods {
		p.lns.Close()
	}
	n.podMu.Unlock()

	dctx, cancel := context.WithTimeout(ctx, n.cfg.DrainTimeout)
	defer cancel()
	// GOAWAY first: peers stop sending new streams while existing ones finish.
	var dw sync.WaitGroup
	for _, c := range conns {
		dw.Add(1)
		go func() { defer dw.Done(); c.Shutdown(dctx) }()
	}
	// No flow enters the pipeline any more; flows in its stages finish or fail now, so no
	// relay can start after the wait below begins.
	n.pipeline.Stop()
	done := make(chan struct{})
	go func() { n.relays.Wait(); close(done) }()
	select {
	case <-done:
	case <-dctx.Done():
		n.flows.Range(func(_ uint64, f *stages.Flow) bool {
			f.Abort()
			return true
		})
		<-done
	}
	dw.Wait()
	// The pod sources stop before the pods go: neither may start a proxy after this.
	if n.zds != nil {
		n.zds.Stop()
	}
	if n.agent != nil {
		n.agent.Stop()
	}
	n.removeAllPods()
	n.cancel()
	n.pool.Close()
	n.wg.Wait()
	if n.loop != nil {
		n.loop.Stop() // after the relays: none is parked on it any more
	}
	n.certs.Stop()
	if n.source != nil {
		n.source.Stop()
	}
	if n.xds != nil {
		n.xds.Stop()
	}
	if n.istiod != nil {
		n.istiod.Close()
	}
	n.admin.Stop(ctx)
	return nil
}

// startPodSource starts the ZDS client or the built-in node agent; "workload proxy manager"
// becomes ready when the source has delivered its first complete set of pods.
func (n *Node) startPodSource() error {
	var ready <-chan struct{}
	switch {
	case n.zds != nil:
		if err := n.zds.Start(n.ctx); err != nil {
			return err
		}
		ready = n.zds.Ready()
	case n.agent != nil:
		if err := n.agent.Start(n.ctx); err != nil {
			return fmt.Errorf("start node agent: %w", err)
		}
		ready = n.agent.Ready()
	default:
		return nil
	}
	n.wg.Add(1)
	go func() {
		defer n.wg.Done()
		select {
		case <-ready:
			n.ready.Done("workload proxy manager")
		case <-n.ctx.Done():
		}
	}()
	return nil
}

// watchSources republishes the merged view whenever either source of SourceBoth changes.
func (n *Node) watchSources(chX, chF <-chan struct{}, cancel func()) {
	defer n.wg.Done()
	defer cancel()
	for {
		select {
		case <-n.ctx.Done():
			return
		case <-chX:
		case <-chF:
		}
		n.mergeSources()
	}
}

// mergeSources publishes istiod's view with the local config applied on top: a local
// workload, service or policy replaces istiod's of the same key.
func (n *Node) mergeSources() {
	// Serialised: two merges interleaving could publish an older view after a newer one.
	n.mergeMu.Lock()
	defer n.mergeMu.Unlock()
	base, over := n.xdsStore.Load(), n.fileStore.Load()
	merged, errs := base.Apply(snapshot.Delta{Workloads: over.Workloads(), Services: over.Services(), Policies: over.Policies()})
	for _, e := range errs {
		n.log.Warn("local overlay resource rejected", "error", e.Error())
	}
	n.store.Publish(merged) // Apply always returns a new snapshot, never base itself
}

func addrPort(a net.Addr) netip.AddrPort {
	if ta, ok := a.(*net.TCPAddr); ok {
		ap := ta.AddrPort()
		return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
	}
	ap, _ := netip.ParseAddrPort(a.String())
	return ap
}

// summary describes the current snapshot for the dashboard cheaply: counts come from the
// snapshot's indexes, not from walking it.
func (n *Node) summary() admin.SnapshotSummary {
	s := n.store.Load()
	w, svc, p := s.Counts()
	sum := admin.SnapshotSummary{
		Node: n.cfg.Name, Version: buildinfo.Version, SnapshotVersion: s.Version(), Built: s.Built(),
		Workloads: w, Services: svc, Policies: p,
		LocalWorkloads: len(s.WorkloadsOnNode(n.cfg.Name)), CertificateStates: map[string]int{},
	}
	for _, st := range n.certs.Snapshot() {
		sum.Certificates++
		sum.CertificateStates[string(st.State)]++
	}
	return sum
}
