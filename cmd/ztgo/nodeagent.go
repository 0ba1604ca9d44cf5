package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os/signal"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/ztgo/ztgo/redirect"
	"github.com/ztgo/ztgo/redirect/agent"
	"github.com/ztgo/ztgo/redirect/zds"
)

// runNodeAgent is `ztgo node-agent`: ztgo's own node agent, in place of istio-cni. It reads
// pods from a directory of files, installs the capture rules in each pod's netns and serves
// the pods over ZDS to ztgo (or ztunnel). On SIGTERM or SIGINT it stops and leaves the rules
// and pods in place, as istio-cni does, so that a restart does not disturb traffic.
func runNodeAgent(args []string, stderr io.Writer) int {
	fs := flag.NewFlagSet("ztgo node-agent", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var (
		podsDir   = fs.String("pods-dir", env("ZTGO_PODS_DIR", ""), "directory of pod files (*.yaml, *.yml, *.json), one per pod to capture (env ZTGO_PODS_DIR); required")
		uds       = fs.String("uds", env("INPOD_UDS", zds.DefaultSocketPath), "ZDS socket to serve ztgo or ztunnel on (env INPOD_UDS)")
		metrics   = fs.String("metrics", env("ZTGO_AGENT_METRICS_ADDR", ""), "address serving Prometheus /metrics and /readyz; empty disables (env ZTGO_AGENT_METRICS_ADDR)")
		poll      = fs.Duration("poll", envDuration("ZTGO_PODS_POLL", agent.DefaultPollInterval), "how often the pods directory is scanned (env ZTGO_PODS_POLL)")
		retry     = fs.Duration("retry", envDuration("ZTGO_AGENT_RETRY", agent.DefaultRetryInterval), "how often a pod that failed to start is tried again (env ZTGO_AGENT_RETRY)")
		check     = fs.Duration("check-interval", envDuration("ZTGO_AGENT_CHECK_INTERVAL", agent.DefaultCheckInterval), "how often each pod's rules are checked and repaired; 0 disables (env ZTGO_AGENT_CHECK_INTERVAL)")
		mark      = fs.Int("mark", envInt("PACKET_MARK", int(redirect.PacketMark)), "mark of the proxy's sockets, which the rules exempt from capture; must match the proxy's; 0 is the default (env PACKET_MARK)")
		dns       = fs.Bool("dns-capture", envBool("AMBIENT_DNS_CAPTURE", true), "redirect the pods' DNS (port 53) to the proxy's DNS port (env AMBIENT_DNS_CAPTURE)")
		ipv6      = fs.Bool("ipv6", envBool("AMBIENT_IPV6", true), "install the IPv6 rules too (env AMBIENT_IPV6)")
		logLevel  = fs.String("log-level", env("LOG_LEVEL", "info"), "log level: debug, info, warn, error (env LOG_LEVEL)")
		logFormat = fs.String("log-format", env("LOG_FORMAT", "text"), "log format: text or json (env LOG_FORMAT)")
	)
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(stderr, "ztgo node-agent: unexpected arguments %q\n", fs.Args())
		return 2
	}
	log, _, err := newLogger(stderr, *logLevel, *logFormat)
	if err != nil {
		fmt.Fprintf(stderr, "ztgo node-agent: %v\n", err)
		return 2
	}
	switch {
	case *podsDir == "":
		fmt.Fprintln(stderr, "ztgo node-agent: --pods-dir is required (env ZTGO_PODS_DIR)")
		return 2
	case *mark < 0 || *mark > int(redirect.MarkMask):
		fmt.Fprintf(stderr, "ztgo node-agent: --mark %d: want 0..%d\n", *mark, redirect.MarkMask)
		return 2
	case *poll <= 0 || *retry <= 0 || *check < 0:
		fmt.Fprintln(stderr, "ztgo node-agent: --poll and --retry must be positive, --check-interval not negative")
		return 2
	}
	checkInterval := *check
	if checkInterval == 0 {
		checkInterval = -1 // agent.Config: negative disables
	}

	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	srv, err := agent.NewServer(agent.ServerConfig{
		SocketPath: *uds, Logger: log.With("component", "zds"), Registerer: reg, RetryInterval: *retry,
	})
	if err != nil {
		log.Error("node agent cannot start", "error", err)
		return 1
	}
	ag, err := agent.New(agent.Config{
		Dir: *podsDir, PollInterval: *poll, RetryInterval: *retry, CheckInterval: checkInterval,
		Rules:  redirect.RuleConfig{Mark: uint32(*mark), DisableDNS: !*dns, DisableIPv6: !*ipv6},
		Logger: log.With("component", "agent"), Registerer: reg,
	}, srv)
	if err != nil {
		log.Error("node agent cannot start", "error", err)
		return 1
	}

	ctx, cancel := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer cancel()
	var httpSrv *http.Server
	if *metrics != "" {
		ln, err := net.Listen("tcp", *metrics)
		if err != nil {
			log.Error("node agent cannot start", "error", fmt.Errorf("listen metrics: %w", err))
			return 1
		}
		mux := http.NewServeMux()
		mux.Handle("/metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{EnableOpenMetrics: true}))
		mux.HandleFunc("/readyz", func(w http.ResponseWriter, _ *http.Request) {
			select {
			case <-ag.Ready():
				fmt.Fprintln(w, "ready")
			default:
				http.Error(w, "pods directory not applied yet", http.StatusServiceUnavailable)
			}
		})
		httpSrv = &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
		go func() {
			if err := httpSrv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
				log.Error("metrics server failed", "error", err)
			}
		}()
		log.Info("metrics listening", "address", ln.Addr().String())
	}

	code := 0
	if err := ag.Start(ctx); err != nil {
		log.Error("node agent cannot start", "error", err)
		code = 1
	} else {
		// The server starts once the first scan is applied: a proxy that connected earlier
		// would get an incomplete snapshot and stop the pods missing from it.
		select {
		case <-ag.Ready():
			if err := srv.Start(ctx); err != nil {
				log.Error("node agent cannot start", "error", err)
				code = 1
				break
			}
			log.Info("node agent running", "pods_dir", *podsDir, "socket", *uds, "pods", len(ag.Pods()))
			<-ctx.Done()
		case <-ctx.Done():
		}
	}
	if code == 0 {
		log.Info("shutting down; capture rules and pods stay in place")
	}
	ag.Stop()
	srv.Stop()
	if httpSrv != nil {
		sctx, scancel := context.WithTimeout(context.Background(), 2*time.Second)
		_ = httpSrv.Shutdown(sctx)
		scancel()
	}
	log.Info("node agent stopped")
	return code
}
