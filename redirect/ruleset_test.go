package redirect

import (
	"net/netip"
	"slices"
	"strings"
	"testing"
)

func TestRuleConfigValidate(t *testing.T) {
	for _, tc := range []struct {
		name string
		cfg  RuleConfig
		ok   bool
	}{
		{"zero value is istio-cni's default", RuleConfig{}, true},
		{"custom mark inside the mask", RuleConfig{Mark: 0x7ff}, true},
		{"mark outside the mask", RuleConfig{Mark: 0x1539}, false},
		{"mark equal to the transparent-return mark", RuleConfig{Mark: TProxyMark}, false},
		{"duplicate ports", RuleConfig{Ports: Ports{Outbound: 15006}}, false},
		{"IPv6 probe address as IPv4", RuleConfig{ProbeSNAT: netip.MustParseAddr("::1")}, false},
		{"IPv4 probe address as IPv6", RuleConfig{ProbeSNATv6: netip.MustParseAddr("10.0.0.1")}, false},
		{"mapped IPv4 as IPv6 probe address", RuleConfig{ProbeSNATv6: netip.MustParseAddr("::ffff:10.0.0.1")}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.cfg.Validate()
			if (err == nil) != tc.ok {
				t.Fatalf("Validate() = %v, want ok=%v", err, tc.ok)
			}
		})
	}
}

func TestRuleConfigDefaults(t *testing.T) {
	c := RuleConfig{}.WithDefaults()
	want := Ports{Outbound: 15001, InboundPlaintext: 15006, InboundHBONE: 15008, DNS: 15053}
	if c.Ports != want || c.Mark != 0x539 || c.ProbeSNAT != DefaultProbeSNAT || c.ProbeSNATv6 != DefaultProbeSNATv6 {
		t.Fatalf("defaults: %+v", c)
	}
	s := SocketConfig{}.withDefaults()
	if s.Mark != 0x539 || s.Ports != want || s.ConnectTimeout.Seconds() != 10 || s.KeepaliveCount != 9 {
		t.Fatalf("socket defaults: %+v", s)
	}
	if s := (SocketConfig{NoMark: true, Mark: 7}).withDefaults(); s.Mark != 0 {
		t.Fatalf("NoMark left mark %#x", s.Mark)
	}
}

// TestRulesetMatchesIstioCNI pins the rules to istio-cni's nftables in-pod rules
// (istio/istio cni/pkg/nftables/nftables.go, testdata/default.golden): same matches, marks,
// ports and order inside each chain; only table and chain names are ztgo's own.
func TestRulesetMatchesIstioCNI(t *testing.T) {
	got := Ruleset(RuleConfig{})
	for _, want := range []string{
		"table inet ztgo-inpod {",
		"type nat hook prerouting priority dstnat; policy accept;",
		"type nat hook output priority -100; policy accept;",
		"type filter hook prerouting priority mangle; policy accept;",
		"type route hook output priority mangle; policy accept;",
		"type filter hook prerouting priority raw; policy accept;",
		"type filter hook output priority raw; policy accept;",
		"meta l4proto tcp ip saddr 169.254.7.127 counter accept",
		"meta l4proto tcp ip daddr 169.254.7.127 counter accept",
		"ip daddr != 127.0.0.1 tcp dport != 15008 meta mark & 0x00000fff != 0x00000539 counter redirect to :15006",
		`oifname != "lo" meta mark & 0x00000fff != 0x00000539 udp dport 53 counter redirect to :15053`,
		"ip daddr != 127.0.0.1 tcp dport 53 meta mark & 0x00000fff != 0x00000539 counter redirect to :15053",
		"meta l4proto tcp meta mark & 0x00000fff == 0x00000111 counter accept",
		`oifname "lo" ip daddr != 127.0.0.1 counter accept`,
		"meta l4proto tcp ip daddr != 127.0.0.1 meta mark & 0x00000fff != 0x00000539 counter redirect to :15001",
		"meta l4proto tcp ip6 daddr != ::1 meta mark & 0x00000fff != 0x00000539 counter redirect to :15001",
		"meta mark & 0x00000fff == 0x00000539 counter ct mark set ct mark & 0xfffff111 | 0x00000111",
		"ct mark & 0x00000fff == 0x00000111 counter meta mark set ct mark",
		"udp dport 53 meta mark & 0x00000fff == 0x00000539 counter ct zone set 1",
		"udp sport 53 meta mark & 0x00000fff != 0x00000539 counter ct zone set 1",
		"ip rule: 32764: from all fwmark 0x111/0xfff lookup 100",
		"ip route: local 0.0.0.0/0 dev lo table 100",
		"ip -6 route: local ::/0 dev lo table 100",
	} {
		if !strings.Contains(got, want) {
			t.Errorf("ruleset lacks %q", want)
		}
	}
	if t.Failed() {
		t.Logf("ruleset:\n%s", got)
	}

	// Order inside nat-output follows istio-cni: probe replies, DNS, transparent return,
	// pod-to-itself, then the catch-all outbound redirect last.
	var order []string
	for _, r := range build(RuleConfig{}).rulesOf(chainNatOutput.name) {
		if len(order) == 0 || order[len(order)-1] != r.comment {
			order = append(order, r.comment)
		}
	}
	wantOrder := []string{"ztgo: replies to kubelet probes", "ztgo: DNS over UDP capture", "ztgo: DNS over TCP capture",
		"ztgo: transparent return traffic", "ztgo: pod to itself", "ztgo: outbound capture"}
	if !slices.Equal(order, wantOrder) {
		t.Fatalf("nat-output order %q, want %q", order, wantOrder)
	}
}

func TestBuildVariants(t *testing.T) {
	for _, tc := range []struct {
		cfg            RuleConfig
		chains, rules  int
		forbidInOutput []string
	}{
		{RuleConfig{}, 6, 18, nil},
		{RuleConfig{DisableDNS: true}, 4, 13, []string{":15053", "ct zone"}},
		{RuleConfig{DisableIPv6: true}, 6, 12, []string{"ip6 ", "fd16:"}},
		{RuleConfig{DisableDNS: true, DisableIPv6: true}, 4, 8, []string{":15053", "ip6 "}},
	} {
		d := build(tc.cfg)
		if len(d.chains) != tc.chains || len(d.rules) != tc.rules {
			t.Errorf("%+v: %d chains, %d rules; want %d, %d", tc.cfg, len(d.chains), len(d.rules), tc.chains, tc.rules)
		}
		text := Ruleset(tc.cfg)
		for _, f := range tc.forbidInOutput {
			if strings.Contains(text, f) {
				t.Errorf("%+v: ruleset contains %q", tc.cfg, f)
			}
		}
	}
	custom := Ruleset(RuleConfig{Mark: 0x7, Ports: Ports{Outbound: 20001}, ProbeSNAT: netip.MustParseAddr("10.1.2.3")})
	for _, want := range []string{"!= 0x00000007", "redirect to :20001", "ip saddr 10.1.2.3"} {
		if !strings.Contains(custom, want) {
			t.Errorf("custom ruleset lacks %q", want)
		}
	}
}

func TestDiffLists(t *testing.T) {
	for _, tc := range []struct {
		want, have          string
		missing, unexpected []int
	}{
		{"abc", "abc", nil, nil},
		{"abc", "ac", []int{1}, nil},
		{"abc", "abxc", nil, []int{2}},
		{"abc", "", []int{0, 1, 2}, nil},
		{"", "ab", nil, []int{0, 1}},
		{"abc", "acb", []int{1}, []int{2}},
	} {
		m, u := diffLists(strings.Split(tc.want, ""), strings.Split(tc.have, ""))
		if tc.want == "" {
			m, u = diffLists(nil, strings.Split(tc.have, ""))
		}
		if tc.have == "" {
			m, u = diffLists(strings.Split(tc.want, ""), nil)
		}
		if !slices.Equal(m, tc.missing) || !slices.Equal(u, tc.unexpected) {
			t.Errorf("diff(%q, %q) = %v, %v; want %v, %v", tc.want, tc.have, m, u, tc.missing, tc.unexpected)
		}
	}
}
