package xds

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"sync"
	"time"

	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/ztgo/ztgo/control/snapshot"
)

// The resource types ztunnel watches (src/xds/types.rs), both as wildcard subscriptions.
const (
	AddressType       = "type.googleapis.com/istio.workload.Address"
	AuthorizationType = "type.googleapis.com/istio.security.Authorization"
)

// watchedTypes is the order of the initial requests on every stream, ztunnel's order.
var watchedTypes = [...]string{AddressType, AuthorizationType}

// Defaults, ztunnel's values (src/xds/client.rs).
const (
	DefaultInitialBackoff = 10 * time.Millisecond
	DefaultMaxBackoff     = 15 * time.Second
	// DefaultMaxMessageSize bounds one response; a large mesh's first push is big.
	DefaultMaxMessageSize = 200 << 20
)

// Config is the xDS client's configuration. cmd/ztgo fills it from ztunnel's environment
// variables (named beside each field); this package reads no environment itself.
type Config struct {
	// Address is the server, "https://host:port" (XDS_ADDRESS), or "http://host:port" for a
	// plaintext server (tests, a local control plane). A missing port means 443 or 80.
	Address string
	// RootCA verifies an https server (XDS_ROOT_CA): the path of a PEM file (read again at
	// every connect, so a rotated root is used on the next reconnect), literal PEM, or
	// "SYSTEM" for the system roots. Required for https, ignored for http.
	RootCA string
	// AltHostname is a second name the server certificate may carry instead of the
	// address's host (ALT_XDS_HOSTNAME).
	AltHostname string
	// AllowTLS12 permits TLS 1.2 to the server (TLS12_ENABLED); otherwise TLS 1.3 only.
	AllowTLS12 bool

	// TokenFile is a file holding the bearer token (AUTH_TOKEN naming an existing file, or the
	// default ./var/run/secrets/tokens/istio-token). It is read at every connect, so a
	// rotated token is used on the next reconnect; an empty file fails that connect.
	TokenFile string
	// Token is a literal bearer token (AUTH_TOKEN that names no file). At most one of Token
	// and TokenFile may be set; with neither, no authorization is sent.
	Token string
	// ClusterID is sent as the clusterid header beside the token (CLUSTER_ID, or
	// ISTIO_META_CLUSTER_ID; ztunnel's default is "Kubernetes").
	ClusterID string
	// Headers are extra gRPC metadata on the stream (XDS_HEADER_<K>=V, prefix stripped).
	// Keys are lower-cased; authorization and clusterid override a header of the same name.
	Headers map[string]string

	// InstanceIP is the node's IP in the node id and INSTANCE_IPS (INSTANCE_IP; default
	// DefaultInstanceIP).
	InstanceIP string
	// PodName and PodNamespace name ztgo's own pod (POD_NAME, POD_NAMESPACE).
	PodName, PodNamespace string
	// NodeName is the Kubernetes node (NODE_NAME), which istiod uses to pick this node's
	// workloads.
	NodeName string
	// ProxyMetadata are string node metadata (ISTIO_META_<K>=V with the prefix stripped, and
	// the mesh config's proxyMetadata); CLUSTER_ID appears in the node metadata only through
	// this map (ISTIO_META_CLUSTER_ID), as in ztunnel.
	ProxyMetadata map[string]string
	// MetadataJSON are JSON node metadata (ISTIO_METAJSON_<K>=<json>, prefix stripped). A
	// value that is not JSON is logged and left out, as ztunnel does.
	MetadataJSON map[string]string

	// InitialBackoff and MaxBackoff bound the reconnect delay (defaults 10 ms and 15 s).
	InitialBackoff, MaxBackoff time.Duration
	// MaxMessageSize bounds one response (default 200 MiB).
	MaxMessageSize int
}

// Client is a delta ADS client that keeps a snapshot.Store in step with an xDS server. It
// is the store's only writer while it runs.
type Client struct {
	cfg     Config
	target  target
	root    rootSource
	node    *core.Node
	store   *snapshot.Store
	log     *slog.Logger
	metrics *Metrics
	ready   chan struct{}

	mu     sync.Mutex // guards cancel and done, which Start sets
	cancel context.CancelFunc
	done   chan struct{}

	// Owned by the stream goroutine.
	//
	// known holds, per type, the name and version of every resource this client holds as
	// the server sent it. It is sent as initial_resource_versions on reconnect so that the
	// server re-sends only what changed and removes what is gone. A resource whose latest
	// version was rejected keeps the version it had before (or is absent), so the server
	// sees a difference and sends it again: each reconnect retries a rejected resource.
	known map[string]map[string]string
	// awaiting lists the types whose first response has not been ACKed yet; Ready closes
	// when it empties.
	awaiting map[string]bool
}

// New validates cfg and returns a client that will feed store. log may be nil; the metrics
// are registered on reg (nil: not registered).
func New(cfg Config, store *snapshot.Store, log *slog.Logger, reg prometheus.Registerer) (*Client, error) {
	if store == nil {
		return nil, errors.New("new xds client: nil store")
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	t, err := parseAddress(cfg.Address)
	if err != nil {
		return nil, fmt.Errorf("new xds client: %w", err)
	}
	var root rootSource
	if t.tls {
		if root, err = parseRoot(cfg.RootCA); err != nil {
			return nil, fmt.Errorf("new xds client: %w", err)
		}
	}
	if cfg.Token != "" && cfg.TokenFile != "" {
		return nil, errors.New("new xds client: both Token and TokenFile are set")
	}
	if cfg.Token != "" && !validHeaderValue(cfg.Token) {
		return nil, errors.New("new xds client: Token is not a valid header value")
	}
	if !validHeaderValue(cfg.ClusterID) {
		return nil, fmt.Errorf("new xds client: cluster id %q is not a valid header value", cfg.ClusterID)
	}
	headers := make(map[string]string, len(cfg.Headers))
	for k, v := range cfg.Headers {
		lk := toLowerASCII(k)
		if !validHeaderKey(lk) {
			return nil, fmt.Errorf("new xds client: header %q: not a valid gRPC metadata key", k)
		}
		if !validHeaderValue(v) {
			return nil, fmt.Errorf("new xds client: header %q: value is not printable ASCII", k)
		}
		if _, dup := headers[lk]; dup {
			return nil, fmt.Errorf("new xds client: header %q is given twice (keys are case-insensitive)", k)
		}
		headers[lk] = v
	}
	cfg.Headers = headers
	cfg.ProxyMetadata = maps.Clone(cfg.ProxyMetadata)
	cfg.MetadataJSON = maps.Clone(cfg.MetadataJSON)
	if cfg.InitialBackoff <= 0 {
		cfg.InitialBackoff = DefaultInitialBackoff
	}
	if cfg.MaxBackoff <= 0 {
		cfg.MaxBackoff = DefaultMaxBackoff
	}
	if cfg.MaxBackoff < cfg.InitialBackoff {
		return nil, fmt.Errorf("new xds client: MaxBackoff %v is below InitialBackoff %v", cfg.MaxBackoff, cfg.InitialBackoff)
	}
	if cfg.MaxMessageSize <= 0 {
		cfg.MaxMessageSize = DefaultMaxMessageSize
	}
	m, err := NewMetrics(reg)
	if err != nil {
		return nil, fmt.Errorf("new xds client: %w", err)
	}
	node, skipped := buildNode(&cfg)
	for _, err := range skipped {
		log.Error("xds node metadata left out", "err", err)
	}
	c := &Client{
		cfg:      cfg,
		target:   t,
		root:     root,
		node:     node,
		store:    store,
		log:      log.With("xds", cfg.Address),
		metrics:  m,
		ready:    make(chan struct{}),
		known:    map[string]map[string]string{},
		awaiting: map[string]bool{},
	}
	for _, t := range watchedTypes {
		c.known[t] = map[string]string{}
		c.awaiting[t] = true
	}
	return c, nil
}

func toLowerASCII(s string) string {
	b := []byte(s)
	for i, c := range b {
		if c >= 'A' && c <= 'Z' {
			b[i] = c + 'a' - 'A'
		}
	}
	return string(b)
}

// Start spawns the stream goroutine, which connects, keeps the store in step and reconnects
// until ctx ends or Stop is called. It does not wait for the server: see Ready.
func (c *Client) Start(ctx context.Context) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.done != nil {
		return errors.New("start xds client: already started")
	}
	ctx, c.cancel = context.WithCancel(ctx)
	c.done = make(chan struct{})
	go c.run(ctx)
	return nil
}

// Stop ends the stream and waits for the goroutine. It may be called more than once, and
// before Start.
func (c *Client) Stop() {
	c.mu.Lock()
	cancel, done := c.cancel, c.done
	c.mu.Unlock()
	if cancel == nil {
		return
	}
	cancel()
	<-done
}

// Ready is closed once the first response of each watched type (Address and Authorization)
// has been applied and ACKed, on whichever stream; a NACKed first response does not count.
// ztunnel holds its readiness probe until then, so a node does not take traffic with an
// empty or partial view of the mesh.
func (c *Client) Ready() <-chan struct{} { return c.ready }
