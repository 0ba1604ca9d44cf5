package redirect

import (
	"fmt"
	"net/netip"
	"strings"
)

// The rule model below is the single source of truth for the capture rules: the Linux code
// turns it into nftables expressions, Ruleset renders it as nft would list it, and Check
// compares the kernel's state against it.

// chainSpec is one base chain of ztgo's table.
type chainSpec struct {
	name     string
	typ      string // "nat", "filter" or "route"
	hook     string // "prerouting" or "output"
	priority int32
	prioName string // nft's symbolic name for priority
}

// The base chains, named after the iptables table whose role they play.
var (
	chainNatPrerouting    = chainSpec{"nat-prerouting", "nat", "prerouting", -100, "dstnat"}
	chainNatOutput        = chainSpec{"nat-output", "nat", "output", -100, "-100"}
	chainManglePrerouting = chainSpec{"mangle-prerouting", "filter", "prerouting", -150, "mangle"}
	chainMangleOutput     = chainSpec{"mangle-output", "route", "output", -150, "mangle"}
	chainRawPrerouting    = chainSpec{"raw-prerouting", "filter", "prerouting", -300, "raw"}
	chainRawOutput        = chainSpec{"raw-output", "filter", "output", -300, "raw"}
)

// ruleSpec is one rule: all matches must hold, then a counter, then the action.
type ruleSpec struct {
	chain   string
	matches []match
	action  action
	comment string
}

// A match is one condition of a rule.
type match interface{ text() string }

const (
	protoTCP = 6
	protoUDP = 17
)

func protoName(p uint8) string {
	switch p {
	case protoTCP:
		return "tcp"
	case protoUDP:
		return "udp"
	}
	return fmt.Sprint(p)
}

func opText(neq bool) string {
	if neq {
		return "!= "
	}
	return ""
}

// mL4Proto: meta l4proto tcp.
type mL4Proto struct{ proto uint8 }

func (m mL4Proto) text() string { return "meta l4proto " + protoName(m.proto) }

// mAddr: ip/ip6 saddr/daddr [!=] addr (a single address; it also restricts the family).
type mAddr struct {
	src  bool
	neq  bool
	addr netip.Addr
}

func (m mAddr) text() string {
	fam, dir := "ip", "daddr"
	if m.addr.Is6() {
		fam = "ip6"
	}
	if m.src {
		dir = "saddr"
	}
	return fmt.Sprintf("%s %s %s%s", fam, dir, opText(m.neq), m.addr)
}

// mPort: tcp/udp sport/dport [!=] port.
type mPort struct {
	proto uint8
	src   bool
	neq   bool
	port  uint16
}

func (m mPort) text() string {
	dir := "dport"
	if m.src {
		dir = "sport"
	}
	return fmt.Sprintf("%s %s %s%d", protoName(m.proto), dir, opText(m.neq), m.port)
}

// mOifname: oifname [!=] "lo".
type mOifname struct {
	neq  bool
	name string
}

func (m mOifname) text() string { return fmt.Sprintf("oifname %s%q", opText(m.neq), m.name) }

// mMark: meta mark & mask ==/!= value, or the same on ct mark.
type mMark struct {
	ct    bool
	mask  uint32
	neq   bool
	value uint32
}

func (m mMark) text() string {
	key := "meta mark"
	if m.ct {
		key = "ct mark"
	}
	op := "=="
	if m.neq {
		op = "!="
	}
	return fmt.Sprintf("%s & 0x%08x %s 0x%08x", key, m.mask, op, m.value)
}

// An action ends a rule.
type action interface{ text() string }

type aAccept struct{}

func (aAccept) text() string { return "accept" }

// aRedirect: redirect to :port (to the incoming interface's primary address in prerouting,
// to 127.0.0.1 / ::1 in output).
type aRedirect struct{ port uint16 }

func (a aRedirect) text() string { return fmt.Sprintf("redirect to :%d", a.port) }

// aCtMarkSet: ct mark set ct mark & keep | or.
type aCtMarkSet struct{ keep, or uint32 }

// nft lists (x & keep) | or with the or-bits folded into the mask, as it would list
// istio-cni's "ct mark set ct mark & 0xfffff000 | 0x111": the same operation.
func (a aCtMarkSet) text() string {
	return fmt.Sprintf("ct mark set ct mark & 0x%08x | 0x%08x", a.keep|a.or, a.or)
}

// aMetaMarkFromCt: meta mark set ct mark.
type aMetaMarkFromCt struct{}

func (aMetaMarkFromCt) text() string { return "meta mark set ct mark" }

// aCtZoneSet: ct zone set N (must run before conntrack, in a raw-priority chain).
type aCtZoneSet struct{ zone uint16 }

func (a aCtZoneSet) text() string { return fmt.Sprintf("ct zone set %d", a.zone) }

func (r ruleSpec) text() string {
	var b strings.Builder
	for _, m := range r.matches {
		b.WriteString(m.text())
		b.WriteByte(' ')
	}
	b.WriteString("counter ")
	b.WriteString(r.action.text())
	if r.comment != "" {
		fmt.Fprintf(&b, " comment %q", r.comment)
	}
	return b.String()
}

// desired is the complete nftables state for one configuration.
type desired struct {
	chains []chainSpec
	rules  []ruleSpec // in order; rules of one chain keep their relative order
}

func (d desired) rulesOf(chain string) []ruleSpec {
	var out []ruleSpec
	for _, r := range d.rules {
		if r.chain == chain {
			out = append(out, r)
		}
	}
	return out
}

var (
	loopback4 = netip.MustParseAddr("127.0.0.1")
	loopback6 = netip.IPv6Loopback()
)

// build returns the rules for cfg (defaults applied), following istio-cni's nftables in-pod
// rules (istio/istio cni/pkg/nftables/nftables.go AppendInpodRules) in order, with ztgo's own
// table and chain names.
func build(cfg RuleConfig) desired {
	cfg = cfg.WithDefaults()
	v6 := !cfg.DisableIPv6
	dns := !cfg.DisableDNS
	notOurs := mMark{mask: MarkMask, neq: true, value: cfg.Mark}
	ours := mMark{mask: MarkMask, value: cfg.Mark}
	p := cfg.Ports

	d := desired{chains: []chainSpec{chainNatPrerouting, chainNatOutput, chainManglePrerouting, chainMangleOutput}}
	if dns {
		d.chains = append(d.chains, chainRawPrerouting, chainRawOutput)
	}
	add := func(chain chainSpec, comment string, a action, ms ...match) {
		d.rules = append(d.rules, ruleSpec{chain: chain.name, matches: ms, action: a, comment: "ztgo: " + comment})
	}

	// Connections ztgo originates (its packets carry the mark) get connmark 0x111 when their
	// packets come back in over lo; replies then restore it (below) and are routed locally.
	add(chainManglePrerouting, "connmark ztgo's connections", aCtMarkSet{keep: ^MarkMask, or: TProxyMark}, ours)

	// Kubelet probes arrive SNATed to the probe address: never capture them.
	add(chainNatPrerouting, "kubelet probes bypass capture", aAccept{}, mL4Proto{protoTCP}, mAddr{src: true, addr: cfg.ProbeSNAT})
	if v6 {
		add(chainNatPrerouting, "kubelet probes bypass capture", aAccept{}, mL4Proto{protoTCP}, mAddr{src: true, addr: cfg.ProbeSNATv6})
	}
	add(chainNatOutput, "replies to kubelet probes", aAccept{}, mL4Proto{protoTCP}, mAddr{addr: cfg.ProbeSNAT})
	if v6 {
		add(chainNatOutput, "replies to kubelet probes", aAccept{}, mL4Proto{protoTCP}, mAddr{addr: cfg.ProbeSNATv6})
	}

	// Inbound: everything TCP not for loopback and not already HBONE goes to 15006.
	add(chainNatPrerouting, "inbound plaintext capture", aRedirect{p.InboundPlaintext},
		mAddr{neq: true, addr: loopback4}, mPort{proto: protoTCP, neq: true, port: p.InboundHBONE}, notOurs)
	if v6 {
		add(chainNatPrerouting, "inbound plaintext capture", aRedirect{p.InboundPlaintext},
			mAddr{neq: true, addr: loopback6}, mPort{proto: protoTCP, neq: true, port: p.InboundHBONE}, notOurs)
	}

	// Restore the connmark as the packet mark so policy routing sends replies to ztgo.
	add(chainMangleOutput, "restore connmark for the transparent return path", aMetaMarkFromCt{},
		mMark{ct: true, mask: MarkMask, value: TProxyMark})

	if dns {
		add(chainNatOutput, "DNS over UDP capture", aRedirect{p.DNS},
			mOifname{neq: true, name: "lo"}, notOurs, mPort{proto: protoUDP, port: 53})
		add(chainNatOutput, "DNS over TCP capture", aRedirect{p.DNS},
			mAddr{neq: true, addr: loopback4}, mPort{proto: protoTCP, port: 53}, notOurs)
		if v6 {
			add(chainNatOutput, "DNS over TCP capture", aRedirect{p.DNS},
				mAddr{neq: true, addr: loopback6}, mPort{proto: protoTCP, port: 53}, notOurs)
		}
		// Separate conntrack zone for the proxy's own upstream DNS (istio/istio#33469):
		// the proxy's and the app's UDP flows to the same resolver cannot collide.
		add(chainRawOutput, "DNS proxy upstream conntrack zone", aCtZoneSet{1},
			mPort{proto: protoUDP, port: 53}, ours)
		add(chainRawPrerouting, "DNS proxy upstream conntrack zone", aCtZoneSet{1},
			mPort{proto: protoUDP, src: true, port: 53}, notOurs)
	}

	add(chainNatOutput, "transparent return traffic", aAccept{},
		mL4Proto{protoTCP}, mMark{mask: MarkMask, value: TProxyMark})
	// The app talking to its own pod IP leaves through lo: not captured.
	add(chainNatOutput, "pod to itself", aAccept{}, mOifname{name: "lo"}, mAddr{neq: true, addr: loopback4})
	if v6 {
		add(chainNatOutput, "pod to itself", aAccept{}, mOifname{name: "lo"}, mAddr{neq: true, addr: loopback6})
	}
	add(chainNatOutput, "outbound capture", aRedirect{p.Outbound},
		mL4Proto{protoTCP}, mAddr{neq: true, addr: loopback4}, notOurs)
	if v6 {
		add(chainNatOutput, "outbound capture", aRedirect{p.Outbound},
			mL4Proto{protoTCP}, mAddr{neq: true, addr: loopback6}, notOurs)
	}
	return d
}

// Ruleset returns the nftables table Install programs for cfg, in the format of
// `nft list table inet ztgo-inpod` (counters omitted), followed by the policy routing
// as `ip rule` / `ip route` would show it. It is for logs, the admin page and docs.
func Ruleset(cfg RuleConfig) string {
	cfg = cfg.WithDefaults()
	d := build(cfg)
	var b strings.Builder
	fmt.Fprintf(&b, "table inet %s {\n", TableName)
	for i, c := range d.chains {
		if i > 0 {
			b.WriteByte('\n')
		}
		fmt.Fprintf(&b, "\tchain %s {\n\t\ttype %s hook %s priority %s; policy accept;\n", c.name, c.typ, c.hook, c.prioName)
		for _, r := range d.rulesOf(c.name) {
			fmt.Fprintf(&b, "\t\t%s\n", r.text())
		}
		b.WriteString("\t}\n")
	}
	b.WriteString("}\n")
	fmt.Fprintf(&b, "ip rule: %d: from all fwmark %#x/%#x lookup %d\n", RulePriority, TProxyMark, MarkMask, RouteTable)
	fmt.Fprintf(&b, "ip route: local 0.0.0.0/0 dev lo table %d\n", RouteTable)
	if !cfg.DisableIPv6 {
		fmt.Fprintf(&b, "ip -6 rule: %d: from all fwmark %#x/%#x lookup %d\n", RulePriority, TProxyMark, MarkMask, RouteTable)
		fmt.Fprintf(&b, "ip -6 route: local ::/0 dev lo table %d\n", RouteTable)
	}
	return b.String()
}

// diffLists returns the indexes of want and of have that are not part of a longest common
// subsequence of the two: rules to add and rules that should not be there (or are out of
// order).
func diffLists(want, have []string) (missing, unexpected []int) {
	n, m := len(want), len(have)
	lcs := make([][]int, n+1)
	for i := range lcs {
		lcs[i] = make([]int, m+1)
	}
	for i := n - 1; i >= 0; i-- {
		for j := m - 1; j >= 0; j-- {
			if want[i] == have[j] {
				lcs[i][j] = lcs[i+1][j+1] + 1
			} else {
				lcs[i][j] = max(lcs[i+1][j], lcs[i][j+1])
			}
		}
	}
	i, j := 0, 0
	for i < n && j < m {
		switch {
		case want[i] == have[j]:
			i++
			j++
		case lcs[i+1][j] >= lcs[i][j+1]:
			missing = append(missing, i)
			i++
		default:
			unexpected = append(unexpected, j)
			j++
		}
	}
	for ; i < n; i++ {
		missing = append(missing, i)
	}
	for ; j < m; j++ {
		unexpected = append(unexpected, j)
	}
	return missing, unexpected
}
