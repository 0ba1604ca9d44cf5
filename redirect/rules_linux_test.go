package redirect

import (
	"fmt"
	"os"
	"slices"
	"strings"
	"testing"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	"github.com/google/nftables/userdata"
	"golang.org/x/sys/unix"
)

// kernelState lists, through the nftables and rtnetlink libraries, everything in ns that
// belongs to ztgo (plus the names of all inet tables), one line per object. Rule lines carry
// their kernel handle, so an unchanged listing also proves nothing was rewritten.
func kernelState(t *testing.T, ns Netns) []string {
	t.Helper()
	s, err := openSession(ns)
	if err != nil {
		t.Fatal(err)
	}
	defer s.close()
	var out []string
	tables, err := s.nft.ListTablesOfFamily(nftables.TableFamilyINet)
	if err != nil {
		t.Fatal(err)
	}
	for _, tb := range tables {
		out = append(out, "table inet "+tb.Name)
	}
	chains, err := s.nft.ListChainsOfTableFamily(nftables.TableFamilyINet)
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range chains {
		if c.Table.Name != TableName {
			continue
		}
		out = append(out, fmt.Sprintf("chain %s: %s", c.Name, chainSignature(c)))
		rules, err := s.nft.GetRules(c.Table, c)
		if err != nil {
			t.Fatal(err)
		}
		for _, r := range rules {
			out = append(out, fmt.Sprintf("  rule %s handle %d: %s", c.Name, r.Handle, canonical(r.Exprs, r.UserData)))
		}
	}
	for _, fam := range []int{unix.AF_INET, unix.AF_INET6} {
		st, err := s.routingState(fam, nil)
		if err != nil {
			t.Fatal(err)
		}
		for _, r := range st.rules {
			out = append(out, fmt.Sprintf("%s rule pref %d fwmark %#x/%#x lookup %d", famName(fam), r.Priority, r.Mark, *r.Mask, r.Table))
		}
		for _, r := range st.routes {
			out = append(out, fmt.Sprintf("%s route type %d %s dev %d table %d", famName(fam), r.Type, r.Dst, r.LinkIndex, r.Table))
		}
	}
	return out
}

// addForeignTable creates a table ztgo must never touch.
func addForeignTable(t *testing.T, ns Netns) {
	t.Helper()
	s, err := openSession(ns)
	if err != nil {
		t.Fatal(err)
	}
	defer s.close()
	tb := s.nft.AddTable(&nftables.Table{Name: "someone-else", Family: nftables.TableFamilyINet})
	s.nft.AddChain(&nftables.Chain{Name: "output", Table: tb, Type: nftables.ChainTypeFilter,
		Hooknum: nftables.ChainHookOutput, Priority: nftables.ChainPriorityFilter})
	if err := s.nft.Flush(); err != nil {
		t.Fatalf("foreign table: %v", err)
	}
}

func openFds(t *testing.T) []string {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, e := range ents {
		target, _ := os.Readlink("/proc/self/fd/" + e.Name())
		out = append(out, e.Name()+" -> "+target)
	}
	return out
}

func TestPrivilegedRulesLifecycle(t *testing.T) {
	requireRoot(t)
	ns := newTestNetns(t)
	t.Cleanup(func() {
		if err := Remove(ns); err != nil {
			t.Errorf("cleanup remove: %v", err)
		}
	})
	addForeignTable(t, ns)
	cfg := RuleConfig{}
	fds := openFds(t)

	drift, err := Check(ns, cfg)
	if err != nil {
		t.Fatal(err)
	}
	if len(drift) == 0 {
		t.Fatal("Check on a clean namespace reported no drift")
	}

	if err := Install(ns, cfg); err != nil {
		t.Fatalf("install: %v", err)
	}
	if drift, err := Check(ns, cfg); err != nil || len(drift) != 0 {
		t.Fatalf("after install: drift %q, err %v", drift, err)
	}
	state := kernelState(t, ns)
	t.Logf("kernel state after install:\n%s", strings.Join(state, "\n"))
	t.Logf("ruleset:\n%s", Ruleset(cfg))

	// The listing has our table, the foreign one, six base chains and every desired rule in
	// order; and the policy routing of both families.
	d := build(cfg)
	if !slices.Contains(state, "table inet "+TableName) || !slices.Contains(state, "table inet someone-else") {
		t.Fatalf("tables missing from %q", state)
	}
	for _, c := range d.chains {
		want := fmt.Sprintf("chain %s: %s", c.name, chainSignature(c.nft(ourTable())))
		if !slices.Contains(state, want) {
			t.Errorf("missing %q", want)
		}
		var have []string
		for _, l := range state {
			if strings.HasPrefix(l, "  rule "+c.name+" ") {
				have = append(have, l[strings.Index(l, ": ")+2:])
			}
		}
		var wantRules []string
		for _, r := range d.rulesOf(c.name) {
			wantRules = append(wantRules, canonical(ruleExprs(r), commentData(r)))
		}
		if !slices.Equal(have, wantRules) {
			t.Errorf("chain %s rules:\n have %q\n want %q", c.name, have, wantRules)
		}
	}
	if len(d.chains) != 6 || len(d.rules) != 18 {
		t.Errorf("default config: %d chains, %d rules; want 6 and 18", len(d.chains), len(d.rules))
	}
	for _, want := range []string{
		"ipv4 rule pref 32764 fwmark 0x111/0xfff lookup 100",
		"ipv6 rule pref 32764 fwmark 0x111/0xfff lookup 100",
	} {
		if !slices.Contains(state, want) {
			t.Errorf("missing %q", want)
		}
	}
	routes := 0
	for _, l := range state {
		if strings.Contains(l, " route type 2 ") && strings.HasSuffix(l, "table 100") {
			routes++
		}
	}
	if routes != 2 {
		t.Errorf("want local default routes for ipv4 and ipv6 in table 100, state %q", state)
	}

	// Idempotent: a second Install changes nothing, not even rule handles.
	if err := Install(ns, cfg); err != nil {
		t.Fatalf("second install: %v", err)
	}
	if again := kernelState(t, ns); !slices.Equal(again, state) {
		t.Fatalf("second install changed the state:\n before %q\n after  %q", state, again)
	}

	// Drift: delete the outbound capture rule and the ipv4 policy rule; add a foreign rule to
	// one of our chains. Check names each; Install repairs all.
	breakThings(t, ns)
	drift, err = Check(ns, cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("drift after tampering: %q", drift)
	for _, want := range []string{"outbound capture", "missing ipv4 rule", "unexpected rule"} {
		if !slices.ContainsFunc(drift, func(s string) bool { return strings.Contains(s, want) }) {
			t.Errorf("drift %q does not mention %q", drift, want)
		}
	}
	if err := Install(ns, cfg); err != nil {
		t.Fatalf("repair install: %v", err)
	}
	if drift, err := Check(ns, cfg); err != nil || len(drift) != 0 {
		t.Fatalf("after repair: drift %q, err %v", drift, err)
	}

	// Another configuration: no DNS capture, no IPv6. Install converges to it.
	small := RuleConfig{DisableDNS: true, DisableIPv6: true}
	if drift, _ := Check(ns, small); len(drift) == 0 {
		t.Fatal("default rules reported as matching the DNS-less, IPv4-only config")
	}
	if err := Install(ns, small); err != nil {
		t.Fatal(err)
	}
	if drift, err := Check(ns, small); err != nil || len(drift) != 0 {
		t.Fatalf("small config: drift %q, err %v", drift, err)
	}
	for _, l := range kernelState(t, ns) {
		if strings.HasPrefix(l, "ipv6 ") || strings.Contains(l, "chain raw-") || strings.Contains(l, "DNS") {
			t.Errorf("small config left %q", l)
		}
	}

	// Remove leaves nothing of ours, keeps the foreign table, and is repeatable.
	if err := Remove(ns); err != nil {
		t.Fatalf("remove: %v", err)
	}
	if st := kernelState(t, ns); !slices.Equal(st, []string{"table inet someone-else"}) {
		t.Fatalf("after remove: %q", st)
	}
	if err := Remove(ns); err != nil {
		t.Fatalf("second remove: %v", err)
	}
	if drift, _ := Check(ns, cfg); len(drift) < 3 {
		t.Fatalf("after remove, drift %q should name the table, rule and route", drift)
	}
	if after := openFds(t); len(after) != len(fds) {
		t.Errorf("fd leak: open before %q, after %q", fds, after)
	}
}

func breakThings(t *testing.T, ns Netns) {
	t.Helper()
	s, err := openSession(ns)
	if err != nil {
		t.Fatal(err)
	}
	defer s.close()
	tb := ourTable()
	out := chainNatOutput.nft(tb)
	rules, err := s.nft.GetRules(tb, out)
	if err != nil {
		t.Fatal(err)
	}
	deleted := false
	for _, r := range rules {
		if c, _ := userdata.GetString(r.UserData, userdata.TypeComment); c == "ztgo: outbound capture" {
			if err := s.nft.DelRule(r); err != nil {
				t.Fatal(err)
			}
			deleted = true
			break
		}
	}
	if !deleted {
		t.Fatal("outbound capture rule not found")
	}
	s.nft.AddRule(&nftables.Rule{Table: tb, Chain: chainManglePrerouting.nft(tb), Exprs: []expr.Any{&expr.Verdict{Kind: expr.VerdictAccept}}})
	if err := s.nft.Flush(); err != nil {
		t.Fatal(err)
	}
	if err := s.rt.RuleDel(wantRule(unix.AF_INET)); err != nil {
		t.Fatal(err)
	}
}

func TestPrivilegedRulesRejectBadConfig(t *testing.T) {
	requireRoot(t)
	ns := newTestNetns(t)
	if err := Install(ns, RuleConfig{Mark: 0x1000}); err == nil {
		t.Fatal("mark outside the mask accepted")
	}
	if st := kernelState(t, ns); len(st) != 0 {
		t.Fatalf("a rejected install left %q", st)
	}
}
