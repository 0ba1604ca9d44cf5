package admin

import (
	"context"
	"io"
	"log/slog"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/ztgo/ztgo/runtime/trace"
)

func start(t *testing.T, quit func()) (*Server, *Readiness, *slog.LevelVar) {
	t.Helper()
	reg := prometheus.NewRegistry()
	c := prometheus.NewCounter(prometheus.CounterOpts{Name: "istio_tcp_connections_opened_total", Help: "x"})
	reg.MustRegister(c)
	c.Inc()
	rec, _ := trace.NewRecorder(8, nil)
	r := &trace.Record{Timeline: trace.Timeline{ID: 7, Direction: "outbound", Begin: time.Now()}}
	r.Enter("identity", r.Begin)
	r.StartStage(r.Begin)
	r.Leave(r.Begin.Add(time.Millisecond))
	r.Outcome = "established"
	rec.Finish(r)
	ready := NewReadiness("config", "certificates")
	level := new(slog.LevelVar)
	s, err := New(Config{
		AdminAddr: "127.0.0.1:0", MetricsAddr: "127.0.0.1:0", ReadinessAddr: "127.0.0.1:0",
		Gatherer: reg, ConfigDump: func() any { return map[string]any{"workloads": []string{"w1"}} },
		Recorder: rec, Level: level, Quit: quit, Ready: ready,
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Stop(context.Background()) })
	return s, ready, level
}

func get(t *testing.T, url string, hdr ...string) (int, string, http.Header) {
	t.Helper()
	req, _ := http.NewRequest("GET", url, nil)
	for i := 0; i+1 < len(hdr); i += 2 {
		req.Header.Set(hdr[i], hdr[i+1])
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b), resp.Header
}

func TestReadiness(t *testing.T) {
	s, ready, _ := start(t, nil)
	url := "http://" + s.Addr("readiness") + "/healthz/ready"
	code, body, _ := get(t, url)
	if code != 500 || body != "not ready, pending: certificates, config\n" {
		t.Fatalf("got %d %q", code, body)
	}
	ready.Done("config")
	ready.Done("certificates")
	if code, body, _ := get(t, url); code != 200 || body != "ready\n" {
		t.Fatalf("got %d %q", code, body)
	}
}

func TestMetricsFormats(t *testing.T) {
	s, _, _ := start(t, nil)
	for _, path := range []string{"/metrics", "/stats/prometheus"} {
		code, body, hdr := get(t, "http://"+s.Addr("metrics")+path)
		if code != 200 || !strings.Contains(body, "istio_tcp_connections_opened_total 1") || !strings.HasPrefix(hdr.Get("Content-Type"), "text/plain") {
			t.Fatalf("%s: %d %q %q", path, code, hdr.Get("Content-Type"), body)
		}
	}
	_, body, hdr := get(t, "http://"+s.Addr("metrics")+"/metrics", "Accept", "application/openmetrics-text; version=1.0.0")
	if !strings.HasPrefix(hdr.Get("Content-Type"), "application/openmetrics-text") || !strings.Contains(body, "# EOF") {
		t.Fatalf("openmetrics not served: %q", hdr.Get("Content-Type"))
	}
}

func TestAdminEndpoints(t *testing.T) {
	quit := make(chan struct{})
	s, _, level := start(t, func() { close(quit) })
	base := "http://" + s.Addr("admin")
	if code, body, _ := get(t, base+"/config_dump"); code != 200 || !strings.Contains(body, `"w1"`) {
		t.Fatalf("config_dump %d %q", code, body)
	}
	if code, body, _ := get(t, base+"/debug/flows"); code != 200 || !strings.Contains(body, `"id": 7`) || !strings.Contains(body, `"stage": "identity"`) {
		t.Fatalf("flows %d %q", code, body)
	}
	// The dashboard renders in the browser (e2e/dashboard tests it in Chromium): "/" is its page.
	if code, body, _ := get(t, base+"/"); code != 200 || !strings.Contains(body, `id="stage-charts"`) {
		t.Fatalf("index %d %q", code, body)
	}
	if code, _, _ := get(t, base+"/debug/pprof/"); code != 200 {
		t.Fatalf("pprof %d", code)
	}
	post := func(path string) (int, string) {
		resp, err := http.Post(base+path, "", nil)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	if code, _ := post("/logging?level=debug"); code != 200 || level.Level() != slog.LevelDebug {
		t.Fatalf("logging: %d level %v", code, level.Level())
	}
	if code, body := post("/logging?level=loud"); code != 400 || !strings.Contains(body, "invalid level") {
		t.Fatalf("bad level: %d %q", code, body)
	}
	if code, _ := post("/logging?level=reset"); code != 200 || level.Level() != slog.LevelInfo {
		t.Fatal("reset did not restore info")
	}
	post("/quitquitquit")
	select {
	case <-quit:
	case <-time.After(2 * time.Second):
		t.Fatal("quitquitquit did not call Quit")
	}
}
