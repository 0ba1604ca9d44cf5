// Command ztgo is a per-node zero-trust L4 proxy for Istio's ambient mode, a drop-in for
// ztunnel. `ztgo run` (the default) starts a node; `ztgo version` prints the build.
//
// Every flag has a default taken from the matching ztunnel environment variable when set.
package main

import (
	"context"
	_ "embed"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/ztgo/ztgo/control/snapshot"
	"github.com/ztgo/ztgo/control/xds"
	"github.com/ztgo/ztgo/redirect"
	"github.com/ztgo/ztgo/redirect/zds"
	"github.com/ztgo/ztgo/runtime/buildinfo"
	"github.com/ztgo/ztgo/runtime/node"
	"github.com/ztgo/ztgo/tls/ca"
)

//go:embed default.yaml
var defaultConfig []byte

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

func run(args []string, stdout, stderr io.Writer) int {
	cmd := "run"
	if len(args) > 0 && !strings.HasPrefix(args[0], "-") {
		cmd, args = args[0], args[1:]
	}
	switch cmd {
	case "run", "proxy":
		return runNode(args, stderr)
	case "node-agent":
		return runNodeAgent(args, stderr)
	case "version":
		fmt.Fprintln(stdout, buildinfo.String())
		return 0
	case "help":
		fmt.Fprintln(stdout, "usage: ztgo [run|node-agent|version|help] [flags]; ztgo run -h lists the flags")
		return 0
	default:
		fmt.Fprintf(stderr, "ztgo: unknown command %q (want run, node-agent, version or help)\n", cmd)
		return 2
	}
}

func env(key, def string) string {
	if v, ok := os.LookupEnv(key); ok {
		return v
	}
	return def
}

func envDuration(key string, def time.Duration) time.Duration {
	if v, ok := os.LookupEnv(key); ok {
		if d, err := time.ParseDuration(v); err == nil {
			return d
		}
		if s, err := strconv.Atoi(v); err == nil {
			return time.Duration(s) * time.Second
		}
	}
	return def
}

func envInt(key string, def int) int {
	if v, ok := os.LookupEnv(key); ok {
		if i, err := strconv.Atoi(v); err == nil {
			return i
		}
	}
	return def
}

func envBool(key string, def bool) bool {
	if v, ok := os.LookupEnv(key); ok {
		if b, err := strconv.ParseBool(v); err == nil {
			return b
		}
	}
	return def
}

// envPrefixed collects VAR_<K>=V variables with the prefix stripped (XDS_HEADER_*, ...).
func envPrefixed(prefix string) map[string]string {
	out := map[string]string{}
	for _, kv := range os.Environ() {
		k, v, _ := strings.Cut(kv, "=")
		if name, ok := strings.CutPrefix(k, prefix); ok && name != "" {
			out[name] = v
		}
	}
	return out
}

// istiodDefault is ztunnel's default istiod address: the in-cluster service when running in
// Kubernetes, localhost otherwise.
func istiodDefault() string {
	if os.Getenv("KUBERNETES_SERVICE_HOST") != "" {
		return "https://istiod.istio-system.svc:15012"
	}
	return "https://localhost:15012"
}

// inpodDefault is ztunnel's: in-pod capture over ZDS at the default socket inside Kubernetes
// (INPOD_ENABLED, default true), off elsewhere.
func inpodDefault() string {
	if os.Getenv("KUBERNETES_SERVICE_HOST") != "" && envBool("INPOD_ENABLED", true) {
		return zds.DefaultSocketPath
	}
	return ""
}

// token maps AUTH_TOKEN as ztunnel does: a path to an existing file, else a literal token; by
// default the projected service account token, if present.
func token() (file, literal string) {
	v, ok := os.LookupEnv("AUTH_TOKEN")
	if !ok {
		const def = "./var/run/secrets/tokens/istio-token"
		if _, err := os.Stat(def); err == nil {
			return def, ""
		}
		return "", ""
	}
	if _, err := os.Stat(v); err == nil {
		return v, ""
	}
	return "", v
}

// newLogger is the process's logger from --log-level and --log-format, writing to w.
func newLogger(w io.Writer, levelText, format string) (*slog.Logger, *slog.LevelVar, error) {
	level := new(slog.LevelVar)
	if err := level.UnmarshalText([]byte(levelText)); err != nil {
		return nil, nil, fmt.Errorf("--log-level: %v", err)
	}
	opts := &slog.HandlerOptions{Level: level}
	switch format {
	case "json":
		return slog.New(slog.NewJSONHandler(w, opts)), level, nil
	case "text", "":
		return slog.New(slog.NewTextHandler(w, opts)), level, nil
	}
	return nil, nil, fmt.Errorf("--log-format %q: want text or json", format)
}

func runNode(args []string, stderr io.Writer) int {
	fs := flag.NewFlagSet("ztgo run", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var (
		cfgPath     = fs.String("config", env("LOCAL_XDS_PATH", ""), "local config YAML, ztunnel's LOCAL_XDS format (env LOCAL_XDS_PATH; LOCAL_XDS for inline YAML); default: the built-in example mesh")
		source      = fs.String("source", env("ZTGO_CONFIG_SOURCE", ""), "where the mesh comes from: local, xds (istiod), or both (istiod plus the local config on top); default: xds inside Kubernetes without a local config, else local")
		xdsAddr     = fs.String("xds-address", env("XDS_ADDRESS", istiodDefault()), "istiod xDS address (env XDS_ADDRESS)")
		caAddr      = fs.String("ca-address", env("CA_ADDRESS", ""), "istiod CA address (env CA_ADDRESS); default: istiod's when the mesh comes from xds, else the built-in CA")
		nodeName    = fs.String("node", env("NODE_NAME", "ztgo"), "this node's name: workloads with this node are local (env NODE_NAME)")
		network     = fs.String("network", env("NETWORK", ""), "this node's network (env NETWORK)")
		caDir       = fs.String("ca-dir", env("ZTGO_CA_DIR", ""), "built-in CA directory in Istio's plug-in layout (ca-cert.pem, ca-key.pem, root-cert.pem, cert-chain.pem), created if absent; empty: an in-memory CA")
		trustDomain = fs.String("trust-domain", env("TRUST_DOMAIN", "cluster.local"), "trust domain of the in-memory CA (env TRUST_DOMAIN)")
		_           = fs.String("cluster-domain", env("CLUSTER_DOMAIN", "cluster.local"), "cluster DNS domain (env CLUSTER_DOMAIN)")
		socks5      = fs.String("socks5", env("ZTGO_SOCKS5_ADDR", "127.0.0.1:15080"), "SOCKS5 outbound entry address, as ztunnel's 15080; empty disables (off by default with in-pod capture)")
		inpodUDS    = fs.String("inpod-uds", env("INPOD_UDS", inpodDefault()), "in-pod capture: the ZDS socket of istio-cni's node agent or `ztgo node-agent` (env INPOD_UDS; default "+zds.DefaultSocketPath+" inside Kubernetes)")
		podsDir     = fs.String("pods-dir", env("ZTGO_PODS_DIR", ""), "in-pod capture without istio-cni: watch this directory for pod files, install the capture rules in each pod's network namespace and proxy it (env ZTGO_PODS_DIR)")
		dnsAddr     = fs.String("dns", env("ZTGO_DNS_ADDR", ""), "DNS proxy address (UDP and TCP) answering mesh service names for local workloads, as ztunnel's 15053; empty disables")
		adminAddr   = fs.String("admin", env("ZTGO_ADMIN_ADDR", "localhost:15000"), "admin address (config_dump, flows, logging, pprof); empty disables")
		metrics     = fs.String("metrics", env("ZTGO_METRICS_ADDR", "[::]:15020"), "Prometheus metrics address; empty disables")
		readiness   = fs.String("readiness", env("ZTGO_READINESS_ADDR", "[::]:15021"), "readiness address (/healthz/ready); empty disables")
		certTTL     = fs.Duration("cert-ttl", envDuration("SECRET_TTL", 24*time.Hour), "workload certificate lifetime (env SECRET_TTL)")
		maxStreams  = fs.Int("pool-max-streams", envInt("POOL_MAX_STREAMS_PER_CONNECTION", 100), "streams per pooled HBONE connection (env POOL_MAX_STREAMS_PER_CONNECTION)")
		poolIdle    = fs.Duration("pool-idle-timeout", envDuration("POOL_UNUSED_RELEASE_TIMEOUT", 5*time.Minute), "close pooled connections unused this long (env POOL_UNUSED_RELEASE_TIMEOUT)")
		mark        = fs.Int("mark", envInt("PACKET_MARK", 0), "SO_MARK for upstream sockets, 0 for none (env PACKET_MARK)")
		origSrc     = fs.Bool("transparent", envBool("ENABLE_ORIG_SRC", false), "keep the client's source address on inbound delivery with IP_TRANSPARENT (needs CAP_NET_ADMIN) (env ENABLE_ORIG_SRC)")
		drain       = fs.Duration("drain-timeout", envDuration("CONNECTION_TERMINATION_DEADLINE", 5*time.Second), "how long shutdown waits for connections (env CONNECTION_TERMINATION_DEADLINE)")
		workers     = fs.Int("workers", envInt("ZTUNNEL_WORKER_THREADS", 32), "workers per pipeline stage")
		logLevel    = fs.String("log-level", env("LOG_LEVEL", "info"), "log level: debug, info, warn, error (env LOG_LEVEL)")
		logFormat   = fs.String("log-format", env("LOG_FORMAT", "text"), "log format: text or json (env LOG_FORMAT)")
		authzInfo   = fs.Bool("authz-info-logging", envBool("AUTHZ_POLICY_INFO_LOGGING", false), "log authorization decisions at info (env AUTHZ_POLICY_INFO_LOGGING)")
	)
	if err := fs.Parse(args); err != nil {
		return 2
	}
	log, level, err := newLogger(stderr, *logLevel, *logFormat)
	if err != nil {
		fmt.Fprintf(stderr, "ztgo: %v\n", err)
		return 2
	}
	setFlags := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { setFlags[f.Name] = true })
	// given says whether the user chose a value (flag or environment) rather than the default.
	given := func(name, envKey string) bool { return setFlags[name] || os.Getenv(envKey) != "" }
	inPod := *inpodUDS != "" || *podsDir != ""
	if *inpodUDS != "" && *podsDir != "" {
		if given("inpod-uds", "INPOD_UDS") {
			fmt.Fprintln(stderr, "ztgo: --inpod-uds and --pods-dir exclude each other")
			return 2
		}
		*inpodUDS = "" // the pods directory (flag or env) replaces the in-cluster ZDS default
	}
	if inPod && !given("socks5", "ZTGO_SOCKS5_ADDR") {
		*socks5 = "" // ztunnel enables SOCKS5 only on request; loopback mode needs it
	}
	inPodMark := uint32(redirect.PacketMark)
	if *mark != 0 {
		inPodMark = uint32(*mark)
	}
	if *maxStreams <= 0 {
		fmt.Fprintln(stderr, "ztgo: --pool-max-streams must be positive")
		return 2
	}

	src := *source
	if src == "" {
		src = node.SourceLocal
		if os.Getenv("KUBERNETES_SERVICE_HOST") != "" && *cfgPath == "" && os.Getenv("LOCAL_XDS") == "" {
			src = node.SourceXDS
		}
	}
	tokenFile, tokenLiteral := token()
	clusterID := env("CLUSTER_ID", env("ISTIO_META_CLUSTER_ID", "Kubernetes"))
	tls12 := envBool("TLS12_ENABLED", false)
	xdsCfg := xds.Config{
		Address: *xdsAddr, RootCA: env("XDS_ROOT_CA", "./var/run/secrets/istio/root-cert.pem"),
		AltHostname: os.Getenv("ALT_XDS_HOSTNAME"), AllowTLS12: tls12,
		TokenFile: tokenFile, Token: tokenLiteral, ClusterID: clusterID, Headers: envPrefixed("XDS_HEADER_"),
		InstanceIP: os.Getenv("INSTANCE_IP"), PodName: os.Getenv("POD_NAME"), PodNamespace: os.Getenv("POD_NAMESPACE"),
		NodeName: *nodeName, ProxyMetadata: envPrefixed("ISTIO_META_"), MetadataJSON: envPrefixed("ISTIO_METAJSON_"),
	}
	var istiodCA *ca.IstiodConfig
	caAddress := *caAddr
	if caAddress == "" && src != node.SourceLocal && *caDir == "" {
		caAddress = istiodDefault()
	}
	if caAddress != "" {
		istiodCA = &ca.IstiodConfig{
			Address: caAddress, RootCA: env("CA_ROOT_CA", "./var/run/secrets/istio/root-cert.pem"),
			AltHostname: os.Getenv("ALT_CA_HOSTNAME"), TokenFile: tokenFile, Token: tokenLiteral,
			ClusterID: clusterID, Headers: envPrefixed("CA_HEADER_"), TLS12: tls12,
			Dedicated: env("PROXY_MODE", "shared") == "dedicated",
		}
	}

	n, err := node.New(node.Config{
		Name: *nodeName, Network: *network, Source: src, XDS: xdsCfg, IstiodCA: istiodCA,
		ConfigPath: *cfgPath, ConfigInline: os.Getenv("LOCAL_XDS"), DefaultConfig: defaultConfig,
		CADir: *caDir, TrustDomain: *trustDomain, CertTTL: *certTTL,
		SOCKS5Addr: *socks5, DNSAddr: *dnsAddr, AdminAddr: *adminAddr, MetricsAddr: *metrics, ReadinessAddr: *readiness,
		InPodUDS: *inpodUDS, PodsDir: *podsDir, InPodMark: inPodMark,
		PoolMaxStreams: uint32(*maxStreams), PoolIdleTimeout: *poolIdle, Mark: *mark, Transparent: *origSrc,
		Workers: *workers, DrainTimeout: *drain, LogAuthzInfo: *authzInfo,
		DebugSnapshot: snapshot.DebugFromEnv(os.Getenv),
		Logger:        log, Level: level,
	})
	if err != nil {
		log.Error("ztgo cannot start", "error", err)
		return 1
	}
	if err := n.Start(context.Background()); err != nil {
		log.Error("ztgo cannot start", "error", err)
		n.Stop(context.Background())
		return 1
	}
	sigs := make(chan os.Signal, 2)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)
	select {
	case s := <-sigs:
		log.Info("shutting down", "signal", s.String())
	case <-n.Quit():
		log.Info("shutting down", "reason", "quitquitquit")
	}
	go func() {
		// A second interrupt skips the drain.
		<-sigs
		log.Warn("second signal: exiting without drain")
		os.Exit(1)
	}()
	n.Stop(context.Background())
	log.Info("ztgo stopped")
	return 0
}
