// Package dashboard tests the admin dashboard in a real headless Chromium: two in-process ztgo
// nodes carry SOCKS5 -> HBONE traffic while the browser loads each node's admin page, and the
// test checks in the DOM that the per-stage chart shows that node's stages and that the
// waterfall shows flows. It saves a full-page screenshot: to perf/dashboard.png (the README's
// picture, taken once the chart holds most of a minute) when ZTGO_UPDATE_SCREENSHOT=1, else to
// ZTGO_SCREENSHOT_DIR or a temporary directory.
//
// It needs Chromium (Debian's chromium, /usr/bin/chromium, or the binary named by
// ZTGO_CHROMIUM); without it the test skips, except when CI=true, where it fails.
package dashboard

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"image/png"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/chromedp/chromedp"

	"github.com/ztgo/ztgo/e2e/meshtest"
	"github.com/ztgo/ztgo/runtime/node"
	"github.com/ztgo/ztgo/tls/ca"
)

// The mesh: node-a hosts the client, node-b the echo server (behind service echo) and a
// database that policy closes to namespaces other than prod. All addresses are in
// 127.70.0.0/16, apart from every other package's tests.
const (
	nodeAIP  = "127.70.1.1"
	nodeBIP  = "127.70.2.1"
	clientIP = "127.70.1.10"
	echoAddr = "127.70.2.10:8080"
	dbAddr   = "127.70.2.20:5432"
	echoVIP  = "127.70.100.1:80"
)

const meshYAML = `
workloads:
- uid: Kubernetes//v1/Pod/default/client
  name: client-7f9c
  workloadName: client
  namespace: default
  serviceAccount: client
  canonicalName: client
  workloadIps: ["127.70.1.10"]
  protocol: HBONE
  node: node-a
- uid: Kubernetes//v1/Pod/default/echo
  name: echo-5d8b
  workloadName: echo
  namespace: default
  serviceAccount: echo
  canonicalName: echo
  workloadIps: ["127.70.2.10"]
  protocol: HBONE
  node: node-b
  services:
    "default/echo.default.svc.cluster.local": {80: 8080}
- uid: Kubernetes//v1/Pod/prod/db
  name: db-0
  workloadName: db
  namespace: prod
  serviceAccount: db
  workloadIps: ["127.70.2.20"]
  protocol: HBONE
  node: node-b
services:
- name: echo
  namespace: default
  hostname: echo.default.svc.cluster.local
  vips: ["/127.70.100.1"]
  ports: {80: 8080}
policies:
- name: prod-only
  namespace: prod
  scope: Namespace
  action: Allow
  rules:
  - - - namespaces: [!Exact prod]
`

// chromium returns the browser to drive, or skips (fails under CI=true) without one.
func chromium(t *testing.T) string {
	t.Helper()
	path := os.Getenv("ZTGO_CHROMIUM")
	if path == "" {
		path = "/usr/bin/chromium"
	}
	if _, err := os.Stat(path); err != nil {
		msg := fmt.Sprintf("the dashboard test needs Chromium at %s (apt-get install chromium, or set ZTGO_CHROMIUM): %v", path, err)
		if os.Getenv("CI") == "true" {
			t.Fatal(msg)
		}
		t.Skip(msg)
	}
	return path
}

func startNode(t *testing.T, name, caDir string, cfg node.Config) *node.Node {
	t.Helper()
	cfg.Name = name
	cfg.CADir = caDir
	cfg.ConfigInline = meshYAML
	cfg.DrainTimeout = time.Second
	cfg.Logger = meshtest.Logger(t, name, slog.LevelError)
	return meshtest.StartNode(t, cfg)
}

// traffic keeps flows going through node-a's SOCKS5 entry until stop: short echo exchanges to
// the echo service (a few KiB to 64 KiB each), now and then a flow to the database that policy
// denies, and a few connections held open for the whole test. About 45 flows a second: every
// flow leaves sockets in TIME_WAIT on the client's one address, and much more (~170/s for a
// minute) fills its ephemeral port range, which shows as a slow upstream stage on node-b.
type traffic struct {
	ok, denied, failed atomic.Int64
	stop               chan struct{}
	wg                 sync.WaitGroup
	mu                 sync.Mutex
	held               []*net.TCPConn
	firstErr           error
}

func startTraffic(socks string) *traffic {
	tr := &traffic{stop: make(chan struct{})}
	src := netip.MustParseAddr(clientIP)
	for w := range 4 {
		tr.wg.Add(1)
		go func() {
			defer tr.wg.Done()
			for i := 0; ; i++ {
				select {
				case <-tr.stop:
					return
				case <-time.After(time.Duration(60+20*w) * time.Millisecond):
				}
				if i%9 == 4 {
					tr.deny(socks, src)
					continue
				}
				tr.echo(socks, src, meshtest.RandomBytes(2048+(i*7919+w*104729)%(62*1024), uint64(i)))
			}
		}()
	}
	tr.wg.Add(1)
	go func() { // connections that stay open: the open-connections figure is not zero
		defer tr.wg.Done()
		for range 3 {
			c, rep, err := meshtest.SOCKS5(socks, src, echoVIP, 10*time.Second)
			if err != nil || rep != 0 {
				tr.fail(fmt.Errorf("held connection: reply %d, %v", rep, err))
				return
			}
			tr.mu.Lock()
			tr.held = append(tr.held, c)
			tr.mu.Unlock()
		}
	}()
	return tr
}

func (tr *traffic) fail(err error) {
	tr.failed.Add(1)
	tr.mu.Lock()
	if tr.firstErr == nil {
		tr.firstErr = err
	}
	tr.mu.Unlock()
}

func (tr *traffic) echo(socks string, src netip.Addr, data []byte) {
	c, rep, err := meshtest.SOCKS5(socks, src, echoVIP, 10*time.Second)
	if err != nil || rep != 0 {
		tr.fail(fmt.Errorf("echo: socks5 reply %d, %v", rep, err))
		return
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	got, err := meshtest.RoundTrip(c, data)
	if err != nil || !bytes.Equal(got, data) {
		tr.fail(fmt.Errorf("echo of %d bytes: got %d back, %v", len(data), len(got), err))
		return
	}
	tr.ok.Add(1)
}

func (tr *traffic) deny(socks string, src netip.Addr) {
	c, rep, err := meshtest.SOCKS5(socks, src, dbAddr, 10*time.Second)
	if err != nil {
		tr.fail(fmt.Errorf("db: %v", err))
		return
	}
	if rep == 0 {
		c.Close()
		tr.fail(errors.New("db: policy did not deny the flow"))
		return
	}
	tr.denied.Add(1)
}

func (tr *traffic) close() {
	close(tr.stop)
	tr.wg.Wait()
	tr.mu.Lock()
	for _, c := range tr.held {
		c.Close()
	}
	tr.mu.Unlock()
}

// page is what the test reads from the dashboard's DOM once it has rendered.
type page struct {
	Directions   []string `json:"directions"`
	BarStages    []string `json:"barStages"`
	LegendStages []string `json:"legendStages"`
	Bars         int      `json:"bars"`
	Rows         int      `json:"rows"`
	RowStages    []string `json:"rowStages"`
	Failures     []string `json:"failures"`
	Open         string   `json:"open"`
	Workloads    string   `json:"workloads"`
	Node         string   `json:"node"`
	StatsRenders int      `json:"statsRenders"`
	RenderError  string   `json:"renderError"`
	Resources    []string `json:"resources"`
	Origin       string   `json:"origin"`
}

// readPage returns the DOM facts as soon as the chart of dir shows every stage of want in at
// least minColumns seconds, the waterfall and the failures have rows, and the page has refreshed
// at least minRenders times; until then it returns null and Poll tries again.
const readPage = `((dir, want, minRenders, minColumns) => {
  const uniq = a => [...new Set(a)];
  const block = document.querySelector('#stage-charts .chart-block[data-direction="' + dir + '"]');
  if (!block) return null;
  const barStages = uniq([...block.querySelectorAll('rect.bar[data-stage]')].map(r => r.dataset.stage));
  const legendStages = [...block.querySelectorAll('table.legend tr[data-stage]')].map(r => r.dataset.stage);
  const rows = document.querySelectorAll('#waterfall .wf-row[data-flow-id]');
  const failures = [...document.querySelectorAll('#failures-table tbody tr[data-flags]')].map(r => r.dataset.flags);
  const renders = Number(document.body.dataset.statsRenders || 0);
  if (!want.every(s => barStages.includes(s) && legendStages.includes(s)) || rows.length === 0 ||
      failures.length === 0 || renders < minRenders || block.querySelectorAll('g.col').length < minColumns) return null;
  return {
    directions: [...document.querySelectorAll('#stage-charts .chart-block')].map(b => b.dataset.direction),
    barStages, legendStages,
    bars: block.querySelectorAll('rect.bar').length,
    rows: rows.length,
    rowStages: uniq([...document.querySelectorAll('#waterfall rect[data-kind="work"]')].map(r => r.dataset.stage)),
    failures,
    open: document.querySelector('#kpi-open [data-field="value"]').textContent,
    workloads: document.querySelector('#snapshot [data-field="workloads"]').textContent,
    node: document.querySelector('#snapshot [data-field="node"]').textContent,
    statsRenders: renders,
    renderError: document.body.dataset.renderError || '',
    resources: performance.getEntriesByType('resource').map(e => e.name),
    origin: location.origin,
  };
})`

func TestDashboardInChromium(t *testing.T) {
	browser := chromium(t)
	meshtest.CheckLeaks(t)
	dir := t.TempDir()
	caDir := filepath.Join(dir, "ca")
	if _, err := ca.LoadOrCreate(caDir); err != nil {
		t.Fatal(err)
	}
	a := startNode(t, "node-a", caDir, node.Config{SOCKS5Addr: nodeAIP + ":0", AdminAddr: nodeAIP + ":0"})
	b := startNode(t, "node-b", caDir, node.Config{AdminAddr: nodeBIP + ":0"})
	meshtest.StartApp(t, echoAddr, meshtest.Echo)
	meshtest.StartApp(t, dbAddr, meshtest.Sink)
	meshtest.RequireZtgoGoroutines(t)

	tr := startTraffic(a.SOCKS5Addr())
	defer tr.close()

	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	chromeOut := &lockedWriter{w: new(bytes.Buffer)}
	allocCtx, cancelAlloc := chromedp.NewExecAllocator(ctx,
		chromedp.ExecPath(browser),
		chromedp.Headless,
		chromedp.NoSandbox,
		chromedp.DisableGPU,
		chromedp.NoFirstRun,
		chromedp.NoDefaultBrowserCheck,
		chromedp.Flag("disable-quic", true),
		chromedp.Flag("disable-background-networking", true),
		chromedp.Flag("disable-component-update", true),
		chromedp.Flag("disable-sync", true),
		chromedp.Flag("disable-extensions", true),
		chromedp.Flag("disable-dev-shm-usage", true),
		chromedp.Flag("force-color-profile", "srgb"),
		chromedp.UserDataDir(filepath.Join(dir, "chromium-profile")),
		chromedp.WindowSize(1440, 900),
		chromedp.CombinedOutput(chromeOut),
	)
	defer cancelAlloc()
	bctx, cancelBrowser := chromedp.NewContext(allocCtx)
	defer cancelBrowser()

	// Console errors and uncaught exceptions of every page fail the test.
	var consoleMu sync.Mutex
	var consoleErrs []string
	consoleDone := make(chan struct{})
	messages := chromedp.Console(bctx)
	go func() {
		defer close(consoleDone)
		for m, err := range messages {
			if err != nil {
				return
			}
			if m.IsException() || m.Type == chromedp.ConsoleError {
				consoleMu.Lock()
				consoleErrs = append(consoleErrs, fmt.Sprintf("%s (%s:%d)", m, m.URL, m.Line+1))
				consoleMu.Unlock()
			}
		}
	}()
	defer func() {
		cancelBrowser()
		<-consoleDone
		if t.Failed() {
			t.Logf("chromium output:\n%s", chromeOut.String())
		}
	}()

	update := os.Getenv("ZTGO_UPDATE_SCREENSHOT") == "1"
	for _, tc := range []struct {
		node, dir, file string
		admin           string
		want            []string
		screenshot      bool
	}{
		{node: "node-b", admin: b.AdminAddr("admin"), dir: "inbound", want: []string{"capture", "identity", "authz", "upstream"}, screenshot: true},
		{node: "node-a", admin: a.AdminAddr("admin"), dir: "outbound", want: []string{"capture", "identity", "hbone"}},
	} {
		start := time.Now()
		url := "http://" + tc.admin + "/"
		if err := chromedp.Do(bctx, chromedp.Navigate(url)); err != nil {
			t.Fatalf("%s: load %s: %v", tc.node, url, err)
		}
		// Wait for the charts, then a few more refreshes so the sparklines have a history. For
		// the README's picture, wait until the chart holds most of a minute of traffic.
		minColumns, wait := 1, 45*time.Second
		if update && tc.screenshot {
			minColumns, wait = 56, 100*time.Second
		}
		p, err := chromedp.Run(bctx, chromedp.PollFunction[*page](readPage,
			chromedp.WithPollingArgs(tc.dir, tc.want, 6, minColumns),
			chromedp.WithPollingInterval(200*time.Millisecond),
			chromedp.WithPollingTimeout(wait)))
		if err != nil || p == nil {
			snap, _ := chromedp.Run(bctx, chromedp.Evaluate[string](`document.querySelector('main').innerText`))
			t.Fatalf("%s: the dashboard did not render %s stages %v and flows: %v\npage text:\n%s", tc.node, tc.dir, tc.want, err, snap)
		}
		t.Logf("%s: rendered in %v: %+v", tc.node, time.Since(start).Round(time.Millisecond), *p)

		if !slices.Equal(p.Directions, []string{tc.dir}) {
			t.Errorf("%s: charts for directions %v, want only %s", tc.node, p.Directions, tc.dir)
		}
		if !slices.Equal(p.BarStages, tc.want) || !slices.Equal(p.LegendStages, tc.want) {
			t.Errorf("%s: chart stages %v, legend %v, want %v in pipeline order", tc.node, p.BarStages, p.LegendStages, tc.want)
		}
		if p.Bars < 2*len(tc.want) {
			t.Errorf("%s: only %d bar segments", tc.node, p.Bars)
		}
		for _, s := range p.RowStages {
			if !slices.Contains(tc.want, s) {
				t.Errorf("%s: waterfall shows stage %q, not one of %v", tc.node, s, tc.want)
			}
		}
		if len(p.RowStages) < 2 {
			t.Errorf("%s: waterfall stages %v", tc.node, p.RowStages)
		}
		if tc.node == "node-b" && !slices.Contains(p.Failures, "DENY") {
			t.Errorf("%s: failures %v do not show the denied flows (DENY)", tc.node, p.Failures)
		}
		if p.Open == "–" || p.Open == "0" {
			t.Errorf("%s: open connections %q, but connections are held open", tc.node, p.Open)
		}
		if !strings.HasPrefix(p.Workloads, "3") || p.Node != tc.node {
			t.Errorf("%s: snapshot shows node %q, workloads %q", tc.node, p.Node, p.Workloads)
		}
		if p.RenderError != "" {
			t.Errorf("%s: render error: %s", tc.node, p.RenderError)
		}
		for _, r := range p.Resources {
			if !strings.HasPrefix(r, p.Origin+"/") {
				t.Errorf("%s: the page loaded %s, outside its origin %s", tc.node, r, p.Origin)
			}
		}

		if !tc.screenshot {
			// The p99 view: the same stages, stacked by their p99.
			p99, err := chromedp.Run(bctx, chromedp.Evaluate[[]string](`(() => {
			  document.querySelector('#quantile-toggle button[data-q="p99"]').click();
			  const block = document.querySelector('#stage-charts .chart-block');
			  return [document.querySelector('#latency-sub').textContent,
			    ...new Set([...block.querySelectorAll('rect.bar[data-stage]')].map(r => r.dataset.stage))];
			})()`))
			if err != nil || len(p99) == 0 || !strings.Contains(p99[0], "p99") || !slices.Equal(p99[1:], tc.want) {
				t.Errorf("%s: p99 view: %q, %v", tc.node, p99, err)
			}
			if _, err := chromedp.Run(bctx, chromedp.Evaluate[bool](`document.querySelector('#quantile-toggle button[data-q="p50"]').click() || true`)); err != nil {
				t.Errorf("%s: back to p50: %v", tc.node, err)
			}
		}

		img, err := chromedp.Run(bctx, chromedp.FullScreenshot(100))
		if err != nil {
			t.Fatalf("%s: screenshot: %v", tc.node, err)
		}
		cfg, err := png.DecodeConfig(bytes.NewReader(img))
		if err != nil || cfg.Width < 1000 || cfg.Height < 800 {
			t.Fatalf("%s: screenshot is not a full-page PNG: %v %+v", tc.node, err, cfg)
		}
		shots := os.Getenv("ZTGO_SCREENSHOT_DIR")
		if shots == "" {
			shots = t.TempDir()
		}
		out := filepath.Join(shots, "dashboard-"+tc.node+".png")
		if update && tc.screenshot {
			out = filepath.Join("..", "..", "perf", "dashboard.png")
		}
		if err := os.WriteFile(out, img, 0o644); err != nil {
			t.Fatal(err)
		}
		t.Logf("%s: screenshot %dx%d saved to %s", tc.node, cfg.Width, cfg.Height, out)
	}

	consoleMu.Lock()
	for _, e := range consoleErrs {
		t.Errorf("browser console: %s", e)
	}
	consoleMu.Unlock()
	tr.mu.Lock()
	firstErr := tr.firstErr
	tr.mu.Unlock()
	if tr.ok.Load() == 0 || tr.denied.Load() == 0 || tr.failed.Load() > 0 {
		t.Errorf("traffic: %d echoed, %d denied, %d failed (first: %v)", tr.ok.Load(), tr.denied.Load(), tr.failed.Load(), firstErr)
	}
	t.Logf("traffic: %d echoed, %d denied while the test ran", tr.ok.Load(), tr.denied.Load())
}

// lockedWriter collects the browser's output, written from the allocator's goroutines.
type lockedWriter struct {
	mu sync.Mutex
	w  *bytes.Buffer
}

func (l *lockedWriter) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.w.String()
}

func (l *lockedWriter) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.w.Write(p)
}
