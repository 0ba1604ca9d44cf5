// Package admin serves ztgo's three HTTP endpoints, on ztunnel's ports:
//
//   - admin (localhost:15000): "/" the dashboard (per-stage latency of the last minute, throughput,
//     connections, the slowest recent flows as waterfalls, failures, the snapshot; a self-contained
//     page that polls the two JSON endpoints below), "/debug/stats" (the dashboard's numbers),
//     "/debug/flows" (recent, slowest and failed flows with per-stage timings), "/config_dump"
//     (JSON), "POST /logging?level=", "POST /quitquitquit", "/debug/pprof/*";
//   - metrics ([::]:15020): "/metrics" and "/stats/prometheus" (Prometheus text, or OpenMetrics when
//     the scraper asks for it);
//   - readiness ([::]:15021): "/healthz/ready", 200 "ready" or 500 naming what is pending.
package admin

import (
	"context"
	"embed"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"maps"
	"net"
	"net/http"
	"net/http/pprof"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/ztgo/ztgo/runtime/trace"
)

// Config wires the admin endpoints to the rest of the node.
type Config struct {
	AdminAddr, MetricsAddr, ReadinessAddr string
	// Gatherer is scraped on the metrics port.
	Gatherer prometheus.Gatherer
	// ConfigDump returns the value served as /config_dump.
	ConfigDump func() any
	Recorder   *trace.Recorder
	// Level is the log level changed by POST /logging.
	Level *slog.LevelVar
	// Quit is called by POST /quitquitquit.
	Quit   func()
	Ready  *Readiness
	Logger *slog.Logger
	// Summary, if set, returns the snapshot summary of /debug/stats and the dashboard; it is
	// called on every request, so it should be cheap. Nil leaves the summary empty.
	Summary func() SnapshotSummary
}

// Server runs the three listeners.
type Server struct {
	cfg     Config
	servers []*http.Server
	addrs   map[string]string
	wg      sync.WaitGroup

	mu      sync.Mutex
	samples []sample // the last minute of metric gathers, for rates and sparklines
}

// The dashboard: one page, its script and its style sheet, with no other asset.
//
//go:embed dashboard
var dashboardFS embed.FS

// contentSecurityPolicy keeps the dashboard to its own origin: no CDN, no inline script.
const contentSecurityPolicy = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"

// New validates cfg.
func New(cfg Config) (*Server, error) {
	if cfg.Gatherer == nil || cfg.ConfigDump == nil || cfg.Recorder == nil || cfg.Level == nil || cfg.Ready == nil {
		return nil, errors.New("admin: Gatherer, ConfigDump, Recorder, Level and Ready are required")
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	return &Server{cfg: cfg, addrs: map[string]string{}}, nil
}

// Start binds the listeners (an empty address disables that endpoint) and serves them.
func (s *Server) Start() error {
	mux := map[string]http.Handler{
		"admin":     s.adminMux(),
		"metrics":   s.metricsMux(),
		"readiness": s.readyMux(),
	}
	for _, e := range []struct{ name, addr string }{
		{"admin", s.cfg.AdminAddr}, {"metrics", s.cfg.MetricsAddr}, {"readiness", s.cfg.ReadinessAddr},
	} {
		if e.addr == "" {
			continue
		}
		ln, err := net.Listen("tcp", e.addr)
		if err != nil {
			s.Stop(context.Background())
			return fmt.Errorf("listen %s on %s: %w", e.name, e.addr, err)
		}
		s.addrs[e.name] = ln.Addr().String()
		srv := &http.Server{Handler: mux[e.name], ReadHeaderTimeout: 10 * time.Second}
		s.servers = append(s.servers, srv)
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
				s.cfg.Logger.Error("admin server stopped", "endpoint", e.name, "error", err)
			}
		}()
	}
	return nil
}

// Addr returns the bound address of "admin", "metrics" or "readiness".
func (s *Server) Addr(name string) string { return s.addrs[name] }

// Stop shuts the listeners down.
func (s *Server) Stop(ctx context.Context) {
	for _, srv := range s.servers {
		srv.Shutdown(ctx)
	}
	s.wg.Wait()
}

func (s *Server) metricsMux() http.Handler {
	h := promhttp.HandlerFor(s.cfg.Gatherer, promhttp.HandlerOpts{EnableOpenMetrics: true})
	mux := http.NewServeMux()
	mux.Handle("/metrics", h)
	mux.Handle("/stats/prometheus", h)
	return mux
}

func (s *Server) readyMux() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("/healthz/ready", func(w http.ResponseWriter, r *http.Request) {
		pending := s.cfg.Ready.Pending()
		if len(pending) == 0 {
			w.Write([]byte("ready\n"))
			return
		}
		w.WriteHeader(http.StatusInternalServerError)
		fmt.Fprintf(w, "not ready, pending: %s\n", strings.Join(pending, ", "))
	})
	return mux
}

func (s *Server) adminMux() http.Handler {
	mux := http.NewServeMux()
	static, _ := fs.Sub(dashboardFS, "dashboard")
	files := http.FileServerFS(static)
	page := func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Security-Policy", contentSecurityPolicy)
		w.Header().Set("Cache-Control", "no-cache")
		w.Header().Set("X-Content-Type-Options", "nosniff")
		files.ServeHTTP(w, r)
	}
	mux.HandleFunc("GET /{$}", page)
	mux.Handle("GET /dashboard/", http.StripPrefix("/dashboard", http.HandlerFunc(page)))
	mux.HandleFunc("GET /config_dump", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, s.cfg.ConfigDump())
	})
	mux.HandleFunc("GET /debug/flows", s.flows)
	mux.HandleFunc("GET /debug/stats", s.stats)
	mux.HandleFunc("POST /logging", s.logging)
	mux.HandleFunc("POST /quitquitquit", func(w http.ResponseWriter, r *http.Request) {
		w.Write([]byte("OK\n"))
		if s.cfg.Quit != nil {
			go s.cfg.Quit()
		}
	})
	mux.HandleFunc("/debug/pprof/", pprof.Index)
	mux.HandleFunc("/debug/pprof/cmdline", pprof.Cmdline)
	mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
	mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
	mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
	return mux
}

func writeJSON(w http.ResponseWriter, v any) {
	w.Header().Set("Content-Type", "application/json")
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	enc.Encode(v)
}

func (s *Server) logging(w http.ResponseWriter, r *http.Request) {
	lvl := r.URL.Query().Get("level")
	if lvl == "" {
		fmt.Fprintf(w, "current log level is %s\n", strings.ToLower(s.cfg.Level.Level().String()))
		return
	}
	var l slog.Level
	switch strings.ToLower(lvl) {
	case "reset":
		l = slog.LevelInfo
	case "trace":
		l = slog.LevelDebug - 4
	case "warning":
		l = slog.LevelWarn
	default:
		if err := l.UnmarshalText([]byte(lvl)); err != nil {
			http.Error(w, fmt.Sprintf("invalid level %q: want trace, debug, info, warn, error or reset", lvl), http.StatusBadRequest)
			return
		}
	}
	s.cfg.Level.Set(l)
	s.cfg.Logger.Info("log level changed", "level", l.String())
	fmt.Fprintf(w, "current log level is %s\n", strings.ToLower(l.String()))
}

// FlowJSON is one flow trace as /debug/flows serves it.
type FlowJSON struct {
	ID          uint64     `json:"id"`
	Direction   string     `json:"direction"`
	Src         string     `json:"src"`
	Dst         string     `json:"dst"`
	SrcIdentity string     `json:"srcIdentity,omitempty"`
	DstIdentity string     `json:"dstIdentity,omitempty"`
	TraceParent string     `json:"traceparent,omitempty"`
	Outcome     string     `json:"outcome"`
	Start       time.Time  `json:"start"`
	TotalUS     float64    `json:"totalMicros"`
	Stages      []SpanJSON `json:"stages"`
}

// SpanJSON is one stage of a flow: when it entered the stage's mailbox (from the flow's start),
// how long it waited there and how long the stage worked on it.
type SpanJSON struct {
	Stage    string  `json:"stage"`
	OffsetUS float64 `json:"offsetMicros"`
	WaitUS   float64 `json:"queueMicros"`
	WorkUS   float64 `json:"workMicros"`
}

// Flows converts trace records for JSON.
func Flows(recs []trace.Record) []FlowJSON {
	out := make([]FlowJSON, 0, len(recs))
	for i := range recs {
		r := &recs[i]
		fj := FlowJSON{
			ID: r.ID, Direction: r.Direction, Src: r.Src, Dst: r.Dst, SrcIdentity: r.SrcIdentity,
			DstIdentity: r.DstIdentity, TraceParent: r.TraceParent, Outcome: r.Outcome, Start: r.Begin,
			TotalUS: us(r.Total()),
		}
		for _, sp := range r.Spans() {
			if sp.End.IsZero() {
				continue
			}
			fj.Stages = append(fj.Stages, SpanJSON{Stage: sp.Stage, OffsetUS: us(sp.Queued.Sub(r.Begin)), WaitUS: us(sp.Wait()), WorkUS: us(sp.Work())})
		}
		out = append(out, fj)
	}
	return out
}

func us(d time.Duration) float64 { return float64(d.Nanoseconds()) / 1000 }

// flows serves the recent flows (?recent=N, default 100), the slowest since start, the slowest
// of the last minute and the latest failures.
func (s *Server) flows(w http.ResponseWriter, r *http.Request) {
	recent := 100
	if v := r.URL.Query().Get("recent"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 0 {
			http.Error(w, "invalid recent: want a count", http.StatusBadRequest)
			return
		}
		recent = n
	}
	w.Header().Set("Cache-Control", "no-store")
	writeJSON(w, map[string]any{
		"recent":            Flows(s.cfg.Recorder.Recent(recent)),
		"slowest":           Flows(s.cfg.Recorder.Slowest(20)),
		"slowestLastMinute": Flows(s.cfg.Recorder.SlowestWindow(20)),
		"failures":          Flows(s.cfg.Recorder.Failures(20)),
	})
}

// Readiness tracks the tasks that must finish before the node is ready.
type Readiness struct {
	mu      sync.Mutex
	pending map[string]bool
}

// NewReadiness returns a tracker with the given tasks pending.
func NewReadiness(tasks ...string) *Readiness {
	r := &Readiness{pending: map[string]bool{}}
	for _, t := range tasks {
		r.pending[t] = true
	}
	return r
}

// Done marks a task complete.
func (r *Readiness) Done(task string) {
	r.mu.Lock()
	delete(r.pending, task)
	r.mu.Unlock()
}

// Pending lists the tasks not yet done, sorted.
func (r *Readiness) Pending() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return slices.Sorted(maps.Keys(r.pending))
}
