package localfile

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/ztgo/ztgo/control/snapshot"
)

const testPoll = 20 * time.Millisecond

// configWith returns a valid config with one workload named name.
func configWith(name string) string {
	return fmt.Sprintf("workloads:\n- {uid: %s, name: %s, namespace: ns, workloadIps: [10.0.0.1]}\n", name, name)
}

type harness struct {
	t       *testing.T
	path    string
	store   *snapshot.Store
	src     *Source
	reg     *prometheus.Registry
	metrics *Metrics
	checks  chan struct{}
	updates <-chan struct{}
}

func newHarness(t *testing.T, initial string) *harness {
	t.Helper()
	h := &harness{t: t, path: filepath.Join(t.TempDir(), "config.yaml"), store: snapshot.NewStore(),
		reg: prometheus.NewRegistry(), checks: make(chan struct{}, 1)}
	h.write(initial)
	m, err := NewMetrics(h.reg)
	if err != nil {
		t.Fatal(err)
	}
	h.metrics = m
	h.src, err = NewFile(h.path, h.store, nil, WithPollInterval(testPoll), WithMetrics(m))
	if err != nil {
		t.Fatal(err)
	}
	h.src.afterCheck = func() {
		select {
		case h.checks <- struct{}{}:
		default:
		}
	}
	var cancel func()
	h.updates, cancel = h.store.Subscribe()
	t.Cleanup(cancel)
	return h
}

// write replaces the file atomically, as editors and kubelet do.
func (h *harness) write(content string) {
	h.t.Helper()
	tmp := h.path + ".tmp"
	if err := os.WriteFile(tmp, []byte(content), 0o644); err != nil {
		h.t.Fatal(err)
	}
	if err := os.Rename(tmp, h.path); err != nil {
		h.t.Fatal(err)
	}
}

func (h *harness) start() {
	h.t.Helper()
	if err := h.src.Start(context.Background()); err != nil {
		h.t.Fatalf("Start: %v", err)
	}
	h.t.Cleanup(h.src.Stop)
	h.waitUpdate()
}

func (h *harness) waitUpdate() {
	h.t.Helper()
	select {
	case <-h.updates:
	case <-time.After(5 * time.Second):
		h.t.Fatal("no snapshot published")
	}
}

// waitChecks waits for n polls to complete.
func (h *harness) waitChecks(n int) {
	h.t.Helper()
	for range n {
		select {
		case <-h.checks:
		case <-time.After(5 * time.Second):
			h.t.Fatal("watcher is not polling")
		}
	}
}

// waitFor polls until cond holds.
func (h *harness) waitFor(what string, cond func() bool) {
	h.t.Helper()
	deadline := time.After(5 * time.Second)
	for !cond() {
		select {
		case <-h.checks:
		case <-deadline:
			h.t.Fatalf("timed out waiting for %s", what)
		}
	}
}

func (h *harness) workloadName() string {
	ws := h.store.Load().Workloads()
	if len(ws) != 1 {
		return fmt.Sprintf("<%d workloads>", len(ws))
	}
	return ws[0].Name
}

func (h *harness) reloads(result string) float64 {
	switch result {
	case "ok":
		return testutil.ToFloat64(h.metrics.reloadsOK)
	default:
		return testutil.ToFloat64(h.metrics.reloadsError)
	}
}

func TestFileSourceReloadsOnChange(t *testing.T) {
	h := newHarness(t, configWith("first"))
	h.start()
	if got := h.workloadName(); got != "first" {
		t.Fatalf("initial workload = %s", got)
	}
	v1 := h.store.Load().Version()

	h.write(configWith("second"))
	h.waitUpdate()
	if got := h.workloadName(); got != "second" {
		t.Fatalf("after change workload = %s", got)
	}
	if h.store.Load().Version() <= v1 {
		t.Errorf("version did not advance")
	}
	if ok := h.reloads("ok"); ok != 2 {
		t.Errorf("reloads ok = %v, want 2", ok)
	}
	if ts := testutil.ToFloat64(h.metrics.lastSuccess); ts < float64(time.Now().Add(-time.Minute).Unix()) {
		t.Errorf("last success timestamp = %v", ts)
	}
}

func TestFileSourceInPlaceWrite(t *testing.T) {
	h := newHarness(t, configWith("first"))
	h.start()
	// Same size, written in place: only the content (and mtime) differ.
	if err := os.WriteFile(h.path, []byte(configWith("secnd")), 0o644); err != nil {
		t.Fatal(err)
	}
	h.waitUpdate()
	if got := h.workloadName(); got != "secnd" {
		t.Fatalf("workload = %s", got)
	}
}

func TestFileSourceInvalidReloadKeepsLastGood(t *testing.T) {
	h := newHarness(t, configWith("good"))
	h.start()
	v := h.store.Load().Version()

	h.write("workloads:\n- {name: bad, namespace: ns, workloadIps: [10.0.0.1], protocol: UDP}\n")
	h.waitFor("an error reload", func() bool { return h.reloads("error") == 1 })
	if got := h.workloadName(); got != "good" || h.store.Load().Version() != v {
		t.Fatalf("after invalid reload: workload %s version %d, want good %d", got, h.store.Load().Version(), v)
	}
	// The same bad content is not reported again on every poll.
	h.waitChecks(3)
	if e := h.reloads("error"); e != 1 {
		t.Errorf("reloads error = %v, want 1", e)
	}

	h.write(configWith("fixed"))
	h.waitUpdate()
	if got := h.workloadName(); got != "fixed" {
		t.Fatalf("after fix workload = %s", got)
	}
}

func TestFileSourceRevertToGoodDoesNotRepublish(t *testing.T) {
	h := newHarness(t, configWith("good"))
	h.start()
	v := h.store.Load().Version()
	h.write("workloads: nope\n")
	h.waitFor("an error reload", func() bool { return h.reloads("error") == 1 })
	h.write(configWith("good"))
	h.waitChecks(3)
	if got := h.store.Load().Version(); got != v {
		t.Errorf("version %d, want %d (no new publish for the content in force)", got, v)
	}
}

func TestFileSourceNoOpWriteDoesNotPublish(t *testing.T) {
	h := newHarness(t, configWith("same"))
	h.start()
	v := h.store.Load().Version()
	h.write(configWith("same")) // new inode and mtime, same bytes
	h.waitChecks(3)
	if got := h.store.Load().Version(); got != v {
		t.Errorf("version %d, want %d", got, v)
	}
	if ok := h.reloads("ok"); ok != 1 {
		t.Errorf("reloads ok = %v, want 1", ok)
	}
}

func TestFileSourceFileRemovedAndRestored(t *testing.T) {
	h := newHarness(t, configWith("first"))
	h.start()
	if err := os.Remove(h.path); err != nil {
		t.Fatal(err)
	}
	h.waitFor("an error for the missing file", func() bool { return h.reloads("error") == 1 })
	h.waitChecks(3)
	if e := h.reloads("error"); e != 1 {
		t.Errorf("missing file counted %v times, want once", e)
	}
	if got := h.workloadName(); got != "first" {
		t.Fatalf("workload = %s", got)
	}
	h.write(configWith("second"))
	h.waitUpdate()
	if got := h.workloadName(); got != "second" {
		t.Fatalf("workload = %s", got)
	}
}

// TestFileSourceSymlinkSwap updates the file the way kubelet updates a mounted ConfigMap: the
// path is a symlink to a directory symlink that is swapped atomically.
func TestFileSourceSymlinkSwap(t *testing.T) {
	dir := t.TempDir()
	for _, d := range []string{"v1", "v2"} {
		if err := os.Mkdir(filepath.Join(dir, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.WriteFile(filepath.Join(dir, "v1", "config.yaml"), []byte(configWith("one")), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "v2", "config.yaml"), []byte(configWith("two")), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink("v1", filepath.Join(dir, "..data")); err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, "config.yaml")
	if err := os.Symlink("..data/config.yaml", path); err != nil {
		t.Fatal(err)
	}
	store := snapshot.NewStore()
	updates, cancel := store.Subscribe()
	defer cancel()
	src, err := NewFile(path, store, nil, WithPollInterval(testPoll))
	if err != nil {
		t.Fatal(err)
	}
	if err := src.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	defer src.Stop()
	<-updates
	if err := os.Symlink("v2", filepath.Join(dir, "..data_tmp")); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(filepath.Join(dir, "..data_tmp"), filepath.Join(dir, "..data")); err != nil {
		t.Fatal(err)
	}
	select {
	case <-updates:
	case <-time.After(5 * time.Second):
		t.Fatal("no reload after the symlink swap")
	}
	if ws := store.Load().Workloads(); len(ws) != 1 || ws[0].Name != "two" {
		t.Fatalf("workloads = %v", ws)
	}
}

func TestFileSourceStartFailsOnInvalidConfig(t *testing.T) {
	h := newHarness(t, "workloads:\n- {name: w, namespace: ns, workloadIps: [10.0.0.1], protocol: HBON}\n")
	err := h.src.Start(context.Background())
	if err == nil {
		h.src.Stop()
		t.Fatal("Start succeeded with an invalid config")
	}
	for _, want := range []string{h.path, `workloads[0].protocol (line 2): "HBON" is not one of HBONE, TCP`} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not mention %q", err, want)
		}
	}
	if e := h.reloads("error"); e != 1 {
		t.Errorf("reloads error = %v, want 1", e)
	}
	if v := h.store.Load().Version(); v != 0 {
		t.Errorf("store version = %d, want nothing published", v)
	}
	h.src.Stop() // no watcher: returns at once
}

func TestFileSourceStartFailsOnMissingFile(t *testing.T) {
	src, err := NewFile(filepath.Join(t.TempDir(), "absent.yaml"), snapshot.NewStore(), nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := src.Start(context.Background()); err == nil || !strings.Contains(err.Error(), "absent.yaml") {
		t.Fatalf("Start: %v", err)
	}
}

func TestFileSourceStopsWithContext(t *testing.T) {
	h := newHarness(t, configWith("first"))
	ctx, cancel := context.WithCancel(context.Background())
	if err := h.src.Start(ctx); err != nil {
		t.Fatal(err)
	}
	cancel()
	select {
	case <-h.src.done:
	case <-time.After(5 * time.Second):
		t.Fatal("watcher did not stop with its context")
	}
	h.src.Stop()
	h.src.Stop()
	if err := h.src.Start(context.Background()); err == nil {
		t.Error("second Start succeeded")
	}
}

func TestInlineSource(t *testing.T) {
	store := snapshot.NewStore()
	reg := prometheus.NewRegistry()
	m, err := NewMetrics(reg)
	if err != nil {
		t.Fatal(err)
	}
	src, err := NewInline(localhostYAML, store, nil, WithMetrics(m))
	if err != nil {
		t.Fatal(err)
	}
	if err := src.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	defer src.Stop()
	if n := len(store.Load().Workloads()); n != 2 {
		t.Fatalf("workloads = %d", n)
	}
	if ok := testutil.ToFloat64(m.reloadsOK); ok != 1 {
		t.Errorf("reloads ok = %v", ok)
	}

	bad, err := NewInline("services: [{name: s}]", snapshot.NewStore(), nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := bad.Start(context.Background()); err == nil || !strings.Contains(err.Error(), "LOCAL_XDS") ||
		!strings.Contains(err.Error(), `services[0] (line 1): missing required field "namespace"`) {
		t.Fatalf("Start: %v", err)
	}
}

func TestNewValidates(t *testing.T) {
	store := snapshot.NewStore()
	if _, err := NewFile("", store, nil); err == nil {
		t.Error("empty path accepted")
	}
	if _, err := NewFile("x", nil, nil); err == nil {
		t.Error("nil store accepted")
	}
	if _, err := NewFile("x", store, nil, WithPollInterval(0)); err == nil {
		t.Error("zero poll interval accepted")
	}
	if _, err := NewInline("", nil, nil); err == nil {
		t.Error("nil store accepted")
	}
}

func TestMetricsRegistration(t *testing.T) {
	reg := prometheus.NewRegistry()
	if _, err := NewMetrics(reg); err != nil {
		t.Fatal(err)
	}
	if _, err := NewMetrics(reg); err == nil {
		t.Fatal("registering twice succeeded")
	}
	n, err := testutil.GatherAndCount(reg, "ztgo_config_reloads_total", "ztgo_config_last_reload_success_timestamp_seconds")
	if err != nil {
		t.Fatal(err)
	}
	if n != 3 { // two result labels and the gauge
		t.Errorf("got %d series, want 3", n)
	}
}
