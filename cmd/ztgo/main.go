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
	"github.com/ztgo/ztgo/runtime/buildinfo"
	"github.com/ztgo/ztgo/runtime/node"
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
	case "version":
		fmt.Fprintln(stdout, buildinfo.String())
		return 0
	case "help":
		fmt.Fprintln(stdout, "usage: ztgo [run|version|help] [flags]; ztgo run -h lists the flags")
		return 0
	default:
		fmt.Fprintf(stderr, "ztgo: unknown command %q (want run, version or help)\n", cmd)
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

func runNode(args []string, stderr io.Writer) int {
	fs := flag.NewFlagSet("ztgo run", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var (
		cfgPath     = fs.String("config", env("LOCAL_XDS_PATH", ""), "local config YAML, ztunnel's LOCAL_XDS format (env LOCAL_XDS_PATH; LOCAL_XDS for inline YAML); default: the built-in example mesh")
		nodeName    = fs.String("node", env("NODE_NAME", "ztgo"), "this node's name: workloads with this node are local (env NODE_NAME)")
		network     = fs.String("network", env("NETWORK", ""), "this node's network (env NETWORK)")
		caDir       = fs.String("ca-dir", env("ZTGO_CA_DIR", ""), "built-in CA directory in Istio's plug-in layout (ca-cert.pem, ca-key.pem, root-cert.pem, cert-chain.pem), created if absent; empty: an in-memory CA")
		trustDomain = fs.String("trust-domain", env("TRUST_DOMAIN", "cluster.local"), "trust domain of the in-memory CA (env TRUST_DOMAIN)")
		_           = fs.String("cluster-domain", env("CLUSTER_DOMAIN", "cluster.local"), "cluster DNS domain (env CLUSTER_DOMAIN)")
		socks5      = fs.String("socks5", env("ZTGO_SOCKS5_ADDR", "127.0.0.1:15080"), "SOCKS5 outbound entry address, as ztunnel's 15080; empty disables")
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
	level := new(slog.LevelVar)
	if err := level.UnmarshalText([]byte(*logLevel)); err != nil {
		fmt.Fprintf(stderr, "ztgo: --log-level: %v\n", err)
		return 2
	}
	var h slog.Handler
	opts := &slog.HandlerOptions{Level: level}
	switch *logFormat {
	case "json":
		h = slog.NewJSONHandler(stderr, opts)
	case "text", "":
		h = slog.NewTextHandler(stderr, opts)
	default:
		fmt.Fprintf(stderr, "ztgo: --log-format %q: want text or json\n", *logFormat)
		return 2
	}
	log := slog.New(h)
	if *maxStreams <= 0 {
		fmt.Fprintln(stderr, "ztgo: --pool-max-streams must be positive")
		return 2
	}

	n, err := node.New(node.Config{
		Name: *nodeName, Network: *network,
		ConfigPath: *cfgPath, ConfigInline: os.Getenv("LOCAL_XDS"), DefaultConfig: defaultConfig,
		CADir: *caDir, TrustDomain: *trustDomain, CertTTL: *certTTL,
		SOCKS5Addr: *socks5, AdminAddr: *adminAddr, MetricsAddr: *metrics, ReadinessAddr: *readiness,
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
