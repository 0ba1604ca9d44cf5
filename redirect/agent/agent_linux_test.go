package agent

import (
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/ztgo/ztgo/redirect"
	"github.com/ztgo/ztgo/redirect/zds"
)

// recSink records the agent's calls and checks its promises: DelPod only for a started
// pod, the netns still open until DelPod returns, and the capture rules still in place
// when DelPod is called (the proxy lets go of the pod before its rules go).
type recSink struct {
	t        *testing.T
	mu       sync.Mutex
	events   []string
	running  map[string]redirect.Netns
	infos    map[string]zds.WorkloadInfo
	failures map[string]int // uid -> how many more AddPod calls fail
}

func newRecSink(t *testing.T) *recSink {
	return &recSink{t: t, running: map[string]redirect.Netns{}, infos: map[string]zds.WorkloadInfo{}, failures: map[string]int{}}
}

func (s *recSink) AddPod(ctx context.Context, uid string, info zds.WorkloadInfo, ns redirect.Netns) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, ok := s.running[uid]; ok {
		s.t.Errorf("AddPod %s: already running", uid)
	}
	if !ns.Valid() {
		s.t.Errorf("AddPod %s: netns not open", uid)
	}
	if n := s.failures[uid]; n > 0 {
		s.failures[uid] = n - 1
		s.events = append(s.events, "fail "+uid)
		return fmt.Errorf("bind 15008: address already in use")
	}
	s.running[uid] = ns
	s.infos[uid] = info
	s.events = append(s.events, "add "+uid)
	return nil
}

func (s *recSink) DelPod(uid string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	ns, ok := s.running[uid]
	switch {
	case !ok:
		s.t.Errorf("DelPod %s: not running", uid)
	case !ns.Valid():
		s.t.Errorf("DelPod %s: netns closed before DelPod returned", uid)
	default:
		drift, err := redirect.Check(ns, redirect.RuleConfig{})
		if err != nil {
			s.t.Errorf("DelPod %s: check rules: %v", uid, err)
		} else if slices.Contains(drift, "nftables: table inet "+redirect.TableName+" missing") {
			s.t.Errorf("DelPod %s: capture rules removed before DelPod", uid)
		}
	}
	delete(s.running, uid)
	s.events = append(s.events, "del "+uid)
}

func (s *recSink) take() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	e := s.events
	s.events = nil
	return e
}

// expect waits until the sink has seen exactly want since the last take.
func (s *recSink) expect(t *testing.T, want ...string) {
	t.Helper()
	var got []string
	deadline := time.Now().Add(waitFor)
	for {
		s.mu.Lock()
		got = slices.Clone(s.events)
		s.mu.Unlock()
		if len(got) >= len(want) || time.Now().After(deadline) {
			break
		}
		time.Sleep(2 * time.Millisecond)
	}
	time.Sleep(20 * time.Millisecond) // and nothing more
	if got = s.take(); !slices.Equal(got, want) {
		t.Fatalf("sink calls %q, want %q", got, want)
	}
}

func (s *recSink) info(uid string) zds.WorkloadInfo {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.infos[uid]
}

func (s *recSink) netns(uid string) redirect.Netns {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.running[uid]
}

func (s *recSink) fail(uid string, n int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.failures[uid] = n
}

func startAgent(t *testing.T, dir string, sink Sink, cfg Config) (*Agent, *prometheus.Registry) {
	t.Helper()
	reg := prometheus.NewRegistry()
	cfg.Dir, cfg.Logger, cfg.Registerer = dir, testLogger(t), reg
	if cfg.PollInterval == 0 {
		cfg.PollInterval = 5 * time.Millisecond
	}
	if cfg.RetryInterval == 0 {
		cfg.RetryInterval = 30 * time.Millisecond
	}
	if cfg.CheckInterval == 0 {
		cfg.CheckInterval = -1
	}
	a, err := New(cfg, sink)
	if err != nil {
		t.Fatal(err)
	}
	if err := a.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(a.Stop)
	select {
	case <-a.Ready():
	case <-time.After(waitFor):
		t.Fatal("agent not ready")
	}
	return a, reg
}

// expectRules checks that ns has exactly the capture rules of cfg.
func expectRules(t *testing.T, ns redirect.Netns, cfg redirect.RuleConfig) {
	t.Helper()
	drift, err := redirect.Check(ns, cfg)
	if err != nil {
		t.Fatal(err)
	}
	if len(drift) > 0 {
		t.Fatalf("rules in %s drifted: %q", ns, drift)
	}
}

// expectNoTable waits for ns's capture table to be gone: the agent removes rules after the
// sink's DelPod returns, so a test that synchronizes on the sink must wait for the removal.
func expectNoTable(t *testing.T, ns redirect.Netns) {
	t.Helper()
	eventually(t, "no table "+redirect.TableName+" in "+ns.String(), func() bool {
		drift, err := redirect.Check(ns, redirect.RuleConfig{})
		if err != nil {
			t.Fatal(err)
		}
		return slices.ContainsFunc(drift, func(d string) bool { return strings.Contains(d, redirect.TableName) })
	})
}

func status(a *Agent, uid string) (PodStatus, bool) {
	for _, p := range a.Pods() {
		if p.Spec.UID == uid {
			return p, true
		}
	}
	return PodStatus{}, false
}

func TestPrivilegedAgentLifecycle(t *testing.T) {
	requireRoot(t)
	dir, nsDir := t.TempDir(), t.TempDir()
	pathA, pathB, pathC := newPodNetns(t, nsDir, "a"), newPodNetns(t, nsDir, "b"), newPodNetns(t, nsDir, "c")
	nsA, nsB, nsC := openNetns(t, pathA), openNetns(t, pathB), openNetns(t, pathC)
	fds := openFds(t) // after the first Do, which opens the process's netns for good
	rules := redirect.RuleConfig{DisableDNS: true}

	writeAtomic(t, dir, "a.yaml", "uid: uid-a\nname: client\nnamespace: default\nserviceAccount: client\nnetns: "+pathA+"\n")
	writeAtomic(t, dir, "b.json", `{"name": "server", "namespace": "shop", "netns": "`+pathB+`"}`)
	sink := newRecSink(t)
	a, reg := startAgent(t, dir, sink, Config{Rules: rules, CheckInterval: 20 * time.Millisecond})

	// Ready means the first scan was applied: both pods are there already.
	sink.expect(t, "add shop/server", "add uid-a")
	if got, want := sink.info("uid-a"), (zds.WorkloadInfo{Name: "client", Namespace: "default", ServiceAccount: "client"}); got != want {
		t.Errorf("info uid-a = %+v, want %+v", got, want)
	}
	if got, want := sink.info("shop/server"), (zds.WorkloadInfo{Name: "server", Namespace: "shop", ServiceAccount: "default"}); got != want {
		t.Errorf("info shop/server = %+v, want %+v", got, want)
	}
	if sink.netns("uid-a").ID() != nsA.ID() || sink.netns("shop/server").ID() != nsB.ID() {
		t.Errorf("sink got netns %v and %v, want %v and %v", sink.netns("uid-a"), sink.netns("shop/server"), nsA, nsB)
	}
	expectRules(t, nsA, rules)
	expectRules(t, nsB, rules)
	st, ok := status(a, "uid-a")
	if !ok || !st.RulesInstalled || !st.Started || st.NetnsID != nsA.ID() || st.LastError != "" || st.File != filepath.Join(dir, "a.yaml") {
		t.Errorf("status uid-a = %+v", st)
	}
	if got := metric(t, reg, "ztgo_agent_pods", "state=captured"); got != 2 {
		t.Errorf("captured pods = %v", got)
	}
	if got := metric(t, reg, "ztgo_agent_rule_installs_total"); got != 2 {
		t.Errorf("installs = %v", got)
	}

	// Drift: somebody deletes the table; the check puts it back.
	if err := redirect.Remove(nsA); err != nil {
		t.Fatal(err)
	}
	eventually(t, "drift repair", func() bool { return metric(t, reg, "ztgo_agent_drift_repairs_total") == 1 })
	expectRules(t, nsA, rules)
	sink.expect(t) // the proxy was not disturbed

	// New info, same netns: the sink restarts the pod, the rules stay (not even replaced:
	// their counters keep counting).
	handles := ruleHandles(t, nsA)
	connectIn(t, nsA)
	counted := packetsCounted(t, nsA)
	if counted == 0 {
		t.Fatal("no packet counted after a connect in the pod")
	}
	writeAtomic(t, dir, "a.yaml", "uid: uid-a\nname: client\nnamespace: default\nserviceAccount: client-v2\nnetns: "+pathA+"\n")
	sink.expect(t, "del uid-a", "add uid-a")
	if got := sink.info("uid-a").ServiceAccount; got != "client-v2" {
		t.Errorf("service account after change = %q", got)
	}
	expectRules(t, nsA, rules)
	if now := ruleHandles(t, nsA); now != handles {
		t.Errorf("rules replaced by an info change:\n%s\nwas\n%s", now, handles)
	}
	if now := packetsCounted(t, nsA); now < counted {
		t.Errorf("rules replaced by an info change: %d packets counted, %d before", now, counted)
	}

	// New netns: the old one's rules go, the new one's come.
	writeAtomic(t, dir, "b.json", `{"name": "server", "namespace": "shop", "netns": "`+pathC+`"}`)
	sink.expect(t, "del shop/server", "add shop/server")
	if sink.netns("shop/server").ID() != nsC.ID() {
		t.Errorf("sink got %v after the change, want %v", sink.netns("shop/server"), nsC)
	}
	expectNoTable(t, nsB)
	expectRules(t, nsC, rules)

	// Deleted file: DelPod, rules removed.
	if err := os.Remove(filepath.Join(dir, "a.yaml")); err != nil {
		t.Fatal(err)
	}
	sink.expect(t, "del uid-a")
	expectNoTable(t, nsA)
	eventually(t, "deleted pod gone from Pods()", func() bool { _, ok := status(a, "uid-a"); return !ok })

	// Stop leaves the remaining pod as it is.
	a.Stop()
	sink.expect(t)
	expectRules(t, nsC, rules)
	if problems, err := testutil.GatherAndLint(reg); err != nil || len(problems) > 0 {
		t.Fatalf("lint: %v %v", problems, err)
	}
	if err := redirect.Remove(nsC); err != nil {
		t.Fatal(err)
	}
	if now := openFds(t); len(now) != len(fds) {
		t.Errorf("open fds: %d, want %d\nbefore: %q\nafter:  %q", len(now), len(fds), fds, now)
	}
}

// TestPrivilegedAgentRestart: a new agent on the same files takes the pods over without
// touching rules a previous agent installed.
func TestPrivilegedAgentRestart(t *testing.T) {
	requireRoot(t)
	dir, nsDir := t.TempDir(), t.TempDir()
	path := newPodNetns(t, nsDir, "a")
	ns := openNetns(t, path)
	writeAtomic(t, dir, "a.yaml", podYAML("a", "pa", path))
	first, _ := startAgent(t, dir, newRecSink(t), Config{})
	first.Stop()
	expectRules(t, ns, redirect.RuleConfig{})
	// A reinstall would replace the table and reset its counters.
	connectIn(t, ns)
	before := ruleHandles(t, ns)
	counted := packetsCounted(t, ns)

	sink := newRecSink(t)
	startAgent(t, dir, sink, Config{})
	sink.expect(t, "add a")
	if after := ruleHandles(t, ns); after != before {
		t.Fatalf("restart changed the rules:\n%s\nwant\n%s", after, before)
	}
	if now := packetsCounted(t, ns); now < counted || counted == 0 {
		t.Fatalf("restart replaced the rules: %d packets counted, %d before", now, counted)
	}
	if err := redirect.Remove(ns); err != nil {
		t.Fatal(err)
	}
}

func TestPrivilegedAgentRetry(t *testing.T) {
	requireRoot(t)
	dir, nsDir := t.TempDir(), t.TempDir()
	late := filepath.Join(nsDir, "late")
	writeAtomic(t, dir, "late.yaml", podYAML("late", "pl", late))
	pathS := newPodNetns(t, nsDir, "s")
	writeAtomic(t, dir, "s.yaml", podYAML("s", "ps", pathS))
	sink := newRecSink(t)
	sink.fail("s", 2)
	a, reg := startAgent(t, dir, sink, Config{})

	// Ready although both pods failed: the scan was applied.
	st, _ := status(a, "late")
	if st.RulesInstalled || st.Started || st.Failures == 0 || !strings.Contains(st.LastError, late) {
		t.Errorf("status of the pod without netns = %+v", st)
	}
	if got := metric(t, reg, "ztgo_agent_pods", "state=pending"); got < 1 {
		t.Errorf("pending pods = %v", got)
	}

	// The sink's failures are retried until it accepts.
	sink.expect(t, "fail s", "fail s", "add s")
	eventually(t, "pod s captured", func() bool { st, _ := status(a, "s"); return st.Started && st.LastError == "" })
	st, _ = status(a, "s")
	if st.Failures != 2 {
		t.Errorf("failures of s = %d, want 2", st.Failures)
	}
	if got := metric(t, reg, "ztgo_agent_pod_failures_total", "stage=sink"); got != 2 {
		t.Errorf("sink failures = %v", got)
	}

	// The netns appears: the pod is captured at the next retry.
	newPodNetns(t, nsDir, "late")
	sink.expect(t, "add late")
	eventually(t, "no pending pods", func() bool { return metric(t, reg, "ztgo_agent_pods", "state=pending") == 0 })
	if got := metric(t, reg, "ztgo_agent_pod_failures_total", "stage=netns"); got < 1 {
		t.Errorf("netns failures = %v", got)
	}
	expectRules(t, openNetns(t, late), redirect.RuleConfig{})
	a.Stop()
	for _, p := range []string{late, pathS} {
		if err := redirect.Remove(openNetns(t, p)); err != nil {
			t.Fatal(err)
		}
	}
}

func TestNewAgentConfig(t *testing.T) {
	sink := newRecSink(t)
	for _, tc := range []struct {
		name string
		cfg  Config
		sink Sink
	}{
		{"no sink", Config{Dir: "/x"}, nil},
		{"no dir", Config{}, sink},
		{"negative retry", Config{Dir: "/x", RetryInterval: -1}, sink},
		{"negative poll", Config{Dir: "/x", PollInterval: -1}, sink},
		{"bad mark", Config{Dir: "/x", Rules: redirect.RuleConfig{Mark: 0x1000}}, sink},
	} {
		if _, err := New(tc.cfg, tc.sink); err == nil {
			t.Errorf("%s: no error", tc.name)
		}
	}
	a, err := New(Config{Dir: filepath.Join(t.TempDir(), "missing")}, sink)
	if err != nil {
		t.Fatal(err)
	}
	if err := a.Start(context.Background()); err == nil || !strings.Contains(err.Error(), "pods dir") {
		t.Errorf("start on a missing directory: %v", err)
	}
	a.Stop()
}

func TestAgentMetricsLint(t *testing.T) {
	reg := prometheus.NewRegistry()
	if _, err := newAgentMetrics(reg); err != nil {
		t.Fatal(err)
	}
	if _, err := newServerMetrics(reg); err != nil {
		t.Fatal(err)
	}
	if problems, err := testutil.GatherAndLint(reg); err != nil || len(problems) > 0 {
		t.Fatalf("lint: %v %v", problems, err)
	}
	// A second registration fails and leaves nothing behind.
	if _, err := newAgentMetrics(reg); err == nil {
		t.Fatal("duplicate registration: no error")
	}
	// Also when only the last collector clashes: the ones registered before it are taken
	// back, and the registry holds just the clashing family.
	reg = prometheus.NewRegistry()
	reg.MustRegister(prometheus.NewCounter(prometheus.CounterOpts{Name: "ztgo_agent_pod_failures_total", Help: "x"}))
	if _, err := newAgentMetrics(reg); err == nil {
		t.Fatal("clashing registration: no error")
	}
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, mf := range mfs {
		names = append(names, mf.GetName())
	}
	if !slices.Equal(names, []string{"ztgo_agent_pod_failures_total"}) {
		t.Fatalf("after a failed registration the registry holds %q", names)
	}
}

// ruleHandles lists the handles of ztgo's table, chains and rules in ns.
func ruleHandles(t *testing.T, ns redirect.Netns) string {
	t.Helper()
	var out strings.Builder
	err := ns.Do(func() error {
		c, err := nftables.New(nftables.AsLasting())
		if err != nil {
			return err
		}
		defer c.CloseLasting()
		tables, err := c.ListTablesOfFamily(nftables.TableFamilyINet)
		if err != nil {
			return err
		}
		for _, tb := range tables {
			if tb.Name != redirect.TableName {
				continue
			}
			fmt.Fprintf(&out, "table %s\n", tb.Name)
			chains, err := c.ListChainsOfTableFamily(tb.Family)
			if err != nil {
				return err
			}
			slices.SortFunc(chains, func(x, y *nftables.Chain) int { return strings.Compare(x.Name, y.Name) })
			for _, ch := range chains {
				if ch.Table.Name != tb.Name {
					continue
				}
				rules, err := c.GetRules(tb, ch)
				if err != nil {
					return err
				}
				fmt.Fprintf(&out, "chain %s:", ch.Name)
				for _, r := range rules {
					fmt.Fprintf(&out, " %d", r.Handle)
				}
				out.WriteString("\n")
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if out.Len() == 0 {
		t.Fatalf("no table %s in %s", redirect.TableName, ns)
	}
	return out.String()
}

// connectIn tries a TCP connection inside ns to another loopback address, which the rules
// see (and count) on its way out; nothing listens, so it is refused.
func connectIn(t *testing.T, ns redirect.Netns) {
	t.Helper()
	if err := ns.Do(func() error {
		c, err := net.DialTimeout("tcp", "127.0.0.2:9", time.Second)
		if err == nil {
			c.Close()
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
}

// packetsCounted sums the packet counters of ztgo's rules in ns.
func packetsCounted(t *testing.T, ns redirect.Netns) uint64 {
	t.Helper()
	var n uint64
	err := ns.Do(func() error {
		c, err := nftables.New(nftables.AsLasting())
		if err != nil {
			return err
		}
		defer c.CloseLasting()
		chains, err := c.ListChainsOfTableFamily(nftables.TableFamilyINet)
		if err != nil {
			return err
		}
		for _, ch := range chains {
			if ch.Table.Name != redirect.TableName {
				continue
			}
			rules, err := c.GetRules(ch.Table, ch)
			if err != nil {
				return err
			}
			for _, r := range rules {
				for _, e := range r.Exprs {
					if ctr, ok := e.(*expr.Counter); ok {
						n += ctr.Packets
					}
				}
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return n
}
