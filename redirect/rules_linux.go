package redirect

import (
	"errors"
	"fmt"
	"net"
	"slices"

	"github.com/google/nftables"
	"github.com/google/nftables/binaryutil"
	"github.com/google/nftables/expr"
	"github.com/google/nftables/userdata"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// Install programs the capture rules for cfg in the pod namespace ns: ztgo's nftables table
// and the policy routing of the transparent return path. It is idempotent: when the kernel
// already holds exactly the desired state nothing is touched (counters keep counting);
// otherwise ztgo's table is replaced in one atomic nftables transaction (the pod is never
// without rules) and missing routing entries are added.
func Install(ns Netns, cfg RuleConfig) error {
	if err := cfg.Validate(); err != nil {
		return err
	}
	cfg = cfg.WithDefaults()
	s, err := openSession(ns)
	if err != nil {
		return err
	}
	defer s.close()
	d := build(cfg)
	drift, err := s.checkTable(d)
	if err != nil {
		return fmt.Errorf("install in %s: %w", ns, err)
	}
	if len(drift) > 0 {
		if err := s.replaceTable(d); err != nil {
			return fmt.Errorf("install in %s: %w", ns, err)
		}
	}
	if err := s.ensureRouting(cfg); err != nil {
		return fmt.Errorf("install in %s: %w", ns, err)
	}
	return nil
}

// Remove deletes everything Install created in ns: ztgo's nftables table, the fwmark policy
// rules and the local routes of table 100, for both families. What is absent is skipped,
// so Remove on a clean namespace succeeds. Other nftables tables are not touched.
func Remove(ns Netns) error {
	s, err := openSession(ns)
	if err != nil {
		return err
	}
	defer s.close()
	t := ourTable()
	// Adding before deleting makes the delete succeed whether or not the table exists.
	s.nft.AddTable(t)
	s.nft.DelTable(t)
	errs := []error{}
	if err := s.nft.Flush(); err != nil {
		errs = append(errs, fmt.Errorf("delete table inet %s: %w", TableName, err))
	}
	if err := s.removeRouting(); err != nil {
		errs = append(errs, err)
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("remove in %s: %w", ns, err)
	}
	return nil
}

// Check compares the kernel's state in ns with what Install(ns, cfg) would program and
// describes every difference, one per entry. No drift and no error means the pod is captured
// exactly as configured.
func Check(ns Netns, cfg RuleConfig) (drift []string, err error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	cfg = cfg.WithDefaults()
	s, err := openSession(ns)
	if err != nil {
		return nil, err
	}
	defer s.close()
	drift, err = s.checkTable(build(cfg))
	if err != nil {
		return nil, fmt.Errorf("check in %s: %w", ns, err)
	}
	rd, err := s.checkRouting(cfg)
	if err != nil {
		return nil, fmt.Errorf("check in %s: %w", ns, err)
	}
	return append(drift, rd...), nil
}

// session holds netlink sockets opened inside a pod namespace: every operation on them acts
// in that namespace, whatever thread runs it.
type session struct {
	nft *nftables.Conn
	rt  *netlink.Handle
}

func openSession(ns Netns) (*session, error) {
	s := &session{}
	err := ns.Do(func() error {
		var err error
		if s.nft, err = nftables.New(nftables.AsLasting()); err != nil {
			return fmt.Errorf("nftables netlink: %w", err)
		}
		if s.rt, err = netlink.NewHandle(unix.NETLINK_ROUTE); err != nil {
			return fmt.Errorf("rtnetlink: %w", err)
		}
		return nil
	})
	if err != nil {
		s.close()
		return nil, fmt.Errorf("netlink in %s: %w", ns, err)
	}
	return s, nil
}

func (s *session) close() {
	if s.nft != nil {
		s.nft.CloseLasting()
	}
	if s.rt != nil {
		s.rt.Close()
	}
}

func ourTable() *nftables.Table {
	return &nftables.Table{Name: TableName, Family: nftables.TableFamilyINet}
}

// ---- nftables ----

var (
	chainTypes = map[string]nftables.ChainType{"nat": nftables.ChainTypeNAT, "filter": nftables.ChainTypeFilter, "route": nftables.ChainTypeRoute}
	chainHooks = map[string]nftables.ChainHook{"prerouting": *nftables.ChainHookPrerouting, "output": *nftables.ChainHookOutput}
)

func (c chainSpec) nft(t *nftables.Table) *nftables.Chain {
	policy := nftables.ChainPolicyAccept
	return &nftables.Chain{
		Name:     c.name,
		Table:    t,
		Type:     chainTypes[c.typ],
		Hooknum:  nftables.ChainHookRef(chainHooks[c.hook]),
		Priority: nftables.ChainPriorityRef(nftables.ChainPriority(c.priority)),
		Policy:   &policy,
	}
}

func (s *session) replaceTable(d desired) error {
	t := ourTable()
	// One transaction: create if absent, delete, recreate with the desired content. The
	// kernel applies it atomically, so packets see either the old rules or the new ones.
	s.nft.AddTable(t)
	s.nft.DelTable(t)
	s.nft.AddTable(t)
	chains := map[string]*nftables.Chain{}
	for _, c := range d.chains {
		chains[c.name] = s.nft.AddChain(c.nft(t))
	}
	for _, r := range d.rules {
		s.nft.AddRule(&nftables.Rule{
			Table:    t,
			Chain:    chains[r.chain],
			Exprs:    ruleExprs(r),
			UserData: commentData(r),
		})
	}
	if err := s.nft.Flush(); err != nil {
		return fmt.Errorf("program table inet %s: %w", TableName, err)
	}
	return nil
}

func (s *session) checkTable(d desired) ([]string, error) {
	tables, err := s.nft.ListTablesOfFamily(nftables.TableFamilyINet)
	if err != nil {
		return nil, fmt.Errorf("list nftables tables: %w", err)
	}
	var t *nftables.Table
	for _, x := range tables {
		if x.Name == TableName {
			t = x
		}
	}
	if t == nil {
		return []string{fmt.Sprintf("nftables: table inet %s missing", TableName)}, nil
	}
	all, err := s.nft.ListChainsOfTableFamily(nftables.TableFamilyINet)
	if err != nil {
		return nil, fmt.Errorf("list nftables chains: %w", err)
	}
	have := map[string]*nftables.Chain{}
	for _, c := range all {
		if c.Table != nil && c.Table.Name == TableName {
			have[c.Name] = c
		}
	}
	var drift []string
	want := map[string]bool{}
	for _, c := range d.chains {
		want[c.name] = true
		hc := have[c.name]
		if hc == nil {
			drift = append(drift, fmt.Sprintf("nftables: chain %s missing", c.name))
			continue
		}
		if got, exp := chainSignature(hc), chainSignature(c.nft(t)); got != exp {
			drift = append(drift, fmt.Sprintf("nftables: chain %s is %q, want %q", c.name, got, exp))
		}
		rules, err := s.nft.GetRules(t, hc)
		if err != nil {
			return nil, fmt.Errorf("list rules of chain %s: %w", c.name, err)
		}
		wantRules := d.rulesOf(c.name)
		haveCanon := make([]string, len(rules))
		for i, r := range rules {
			haveCanon[i] = canonical(r.Exprs, r.UserData)
		}
		wantCanon := make([]string, len(wantRules))
		for i, r := range wantRules {
			wantCanon[i] = canonical(ruleExprs(r), commentData(r))
		}
		missing, unexpected := diffLists(wantCanon, haveCanon)
		for _, i := range missing {
			drift = append(drift, fmt.Sprintf("nftables: chain %s: missing rule: %s", c.name, wantRules[i].text()))
		}
		for _, i := range unexpected {
			drift = append(drift, fmt.Sprintf("nftables: chain %s: unexpected rule at position %d: %s", c.name, i, describeRule(rules[i])))
		}
	}
	for name := range have {
		if !want[name] {
			drift = append(drift, fmt.Sprintf("nftables: unexpected chain %s", name))
		}
	}
	return drift, nil
}

func commentData(r ruleSpec) []byte {
	return userdata.AppendString(nil, userdata.TypeComment, r.comment)
}

func chainSignature(c *nftables.Chain) string {
	hook, prio, policy := "none", "none", "accept"
	if c.Hooknum != nil {
		hook = fmt.Sprint(*c.Hooknum)
	}
	if c.Priority != nil {
		prio = fmt.Sprint(*c.Priority)
	}
	if c.Policy != nil && *c.Policy == nftables.ChainPolicyDrop {
		policy = "drop"
	}
	return fmt.Sprintf("type %s hook %s priority %s policy %s", c.Type, hook, prio, policy)
}

// canonical renders a rule so that a rule read back from the kernel and the rule Install
// would write compare equal exactly when they do the same thing. Counters' values are
// ignored; the library does not decode a ct statement's source register, so ct "set" is
// recognised by its missing destination register.
func canonical(es []expr.Any, ud []byte) string {
	s := ""
	for _, e := range es {
		switch v := e.(type) {
		case *expr.Counter:
			s += "counter;"
		case *expr.Ct:
			if v.SourceRegister || v.Register == 0 {
				s += fmt.Sprintf("ct set %d;", v.Key)
			} else {
				s += fmt.Sprintf("ct load %d reg %d dir %d;", v.Key, v.Register, v.Direction)
			}
		default:
			s += fmt.Sprintf("%T%+v;", e, e)
		}
	}
	comment, _ := userdata.GetString(ud, userdata.TypeComment)
	return s + "comment=" + comment
}

func describeRule(r *nftables.Rule) string {
	if comment, ok := userdata.GetString(r.UserData, userdata.TypeComment); ok {
		return fmt.Sprintf("[%d exprs, comment %q]", len(r.Exprs), comment)
	}
	return fmt.Sprintf("[%d exprs]", len(r.Exprs))
}

const reg1 = 1 // NFT_REG_1: the register every rule uses for its loads

func ruleExprs(r ruleSpec) []expr.Any {
	var es []expr.Any
	for _, m := range r.matches {
		es = append(es, matchExprs(m)...)
	}
	es = append(es, &expr.Counter{})
	return append(es, actionExprs(r.action)...)
}

func cmpOp(neq bool) expr.CmpOp {
	if neq {
		return expr.CmpOpNeq
	}
	return expr.CmpOpEq
}

// matchExprs follows nft's own encoding (inet family: address matches carry a meta nfproto
// check, port matches a meta l4proto check), so `nft list` shows the rules as Ruleset does.
func matchExprs(m match) []expr.Any {
	switch m := m.(type) {
	case mL4Proto:
		return []expr.Any{
			&expr.Meta{Key: expr.MetaKeyL4PROTO, Register: reg1},
			&expr.Cmp{Op: expr.CmpOpEq, Register: reg1, Data: []byte{m.proto}},
		}
	case mAddr:
		nfproto, off, data := byte(unix.NFPROTO_IPV4), uint32(16), m.addr.AsSlice()
		if m.addr.Is6() {
			nfproto, off = unix.NFPROTO_IPV6, 24
		}
		if m.src {
			off = 12
			if m.addr.Is6() {
				off = 8
			}
		}
		return []expr.Any{
			&expr.Meta{Key: expr.MetaKeyNFPROTO, Register: reg1},
			&expr.Cmp{Op: expr.CmpOpEq, Register: reg1, Data: []byte{nfproto}},
			&expr.Payload{OperationType: expr.PayloadLoad, DestRegister: reg1, Base: expr.PayloadBaseNetworkHeader, Offset: off, Len: uint32(len(data))},
			&expr.Cmp{Op: cmpOp(m.neq), Register: reg1, Data: data},
		}
	case mPort:
		off := uint32(2)
		if m.src {
			off = 0
		}
		return []expr.Any{
			&expr.Meta{Key: expr.MetaKeyL4PROTO, Register: reg1},
			&expr.Cmp{Op: expr.CmpOpEq, Register: reg1, Data: []byte{m.proto}},
			&expr.Payload{OperationType: expr.PayloadLoad, DestRegister: reg1, Base: expr.PayloadBaseTransportHeader, Offset: off, Len: 2},
			&expr.Cmp{Op: cmpOp(m.neq), Register: reg1, Data: binaryutil.BigEndian.PutUint16(m.port)},
		}
	case mOifname:
		name := make([]byte, unix.IFNAMSIZ)
		copy(name, m.name)
		return []expr.Any{
			&expr.Meta{Key: expr.MetaKeyOIFNAME, Register: reg1},
			&expr.Cmp{Op: cmpOp(m.neq), Register: reg1, Data: name},
		}
	case mMark:
		var load expr.Any = &expr.Meta{Key: expr.MetaKeyMARK, Register: reg1}
		if m.ct {
			load = &expr.Ct{Key: expr.CtKeyMARK, Register: reg1}
		}
		return []expr.Any{
			load,
			&expr.Bitwise{SourceRegister: reg1, DestRegister: reg1, Len: 4,
				Mask: binaryutil.NativeEndian.PutUint32(m.mask), Xor: binaryutil.NativeEndian.PutUint32(0)},
			&expr.Cmp{Op: cmpOp(m.neq), Register: reg1, Data: binaryutil.NativeEndian.PutUint32(m.value)},
		}
	}
	panic(fmt.Sprintf("redirect: unknown match %T", m))
}

func actionExprs(a action) []expr.Any {
	switch a := a.(type) {
	case aAccept:
		return []expr.Any{&expr.Verdict{Kind: expr.VerdictAccept}}
	case aRedirect:
		return []expr.Any{
			&expr.Immediate{Register: reg1, Data: binaryutil.BigEndian.PutUint16(a.port)},
			&expr.Redir{RegisterProtoMin: reg1, RegisterProtoMax: reg1, Flags: unix.NF_NAT_RANGE_PROTO_SPECIFIED},
		}
	case aCtMarkSet:
		return []expr.Any{
			&expr.Ct{Key: expr.CtKeyMARK, Register: reg1},
			&expr.Bitwise{SourceRegister: reg1, DestRegister: reg1, Len: 4,
				Mask: binaryutil.NativeEndian.PutUint32(a.keep), Xor: binaryutil.NativeEndian.PutUint32(a.or)},
			&expr.Ct{Key: expr.CtKeyMARK, Register: reg1, SourceRegister: true},
		}
	case aMetaMarkFromCt:
		return []expr.Any{
			&expr.Ct{Key: expr.CtKeyMARK, Register: reg1},
			&expr.Meta{Key: expr.MetaKeyMARK, Register: reg1, SourceRegister: true},
		}
	case aCtZoneSet:
		return []expr.Any{
			&expr.Immediate{Register: reg1, Data: binaryutil.NativeEndian.PutUint16(a.zone)},
			&expr.Ct{Key: expr.CtKeyZONE, Register: reg1, SourceRegister: true},
		}
	}
	panic(fmt.Sprintf("redirect: unknown action %T", a))
}

// ---- policy routing ----

// routeFamilies returns the families whose policy routing Install manages: IPv4 always,
// IPv6 unless disabled or the pod's loopback has no IPv6 (then a local ::/0 route cannot be
// added; istio-cni skips it the same way).
func (s *session) routeFamilies(cfg RuleConfig) ([]int, netlink.Link, error) {
	lo, err := s.rt.LinkByName("lo")
	if err != nil {
		return nil, nil, fmt.Errorf("find lo: %w", err)
	}
	fams := []int{unix.AF_INET}
	if cfg.DisableIPv6 {
		return fams, lo, nil
	}
	addrs, err := retryDump(func() ([]netlink.Addr, error) { return s.rt.AddrList(lo, unix.AF_INET6) })
	if err != nil && !errors.Is(err, unix.EAFNOSUPPORT) {
		return nil, nil, fmt.Errorf("list lo addresses: %w", err)
	}
	if len(addrs) > 0 {
		fams = append(fams, unix.AF_INET6)
	}
	return fams, lo, nil
}

func famName(fam int) string {
	if fam == unix.AF_INET6 {
		return "ipv6"
	}
	return "ipv4"
}

func wantRule(fam int) *netlink.Rule {
	r := netlink.NewRule()
	r.Family = fam
	r.Table = RouteTable
	r.Mark = TProxyMark
	mask := MarkMask
	r.Mask = &mask
	r.Priority = RulePriority
	return r
}

func isOurRule(r netlink.Rule) bool {
	return r.Table == RouteTable && r.Mark == TProxyMark && r.Mask != nil && *r.Mask == MarkMask &&
		r.Priority == RulePriority && !r.Invert && r.Src == nil && r.Dst == nil && r.IifName == "" && r.OifName == ""
}

func defaultDst(fam int) *net.IPNet {
	if fam == unix.AF_INET6 {
		return &net.IPNet{IP: net.IPv6zero, Mask: net.CIDRMask(0, 128)}
	}
	return &net.IPNet{IP: net.IPv4zero.To4(), Mask: net.CIDRMask(0, 32)}
}

func wantRoute(fam int, lo netlink.Link) *netlink.Route {
	r := &netlink.Route{
		Family:    fam,
		Dst:       defaultDst(fam),
		Type:      unix.RTN_LOCAL,
		Table:     RouteTable,
		LinkIndex: lo.Attrs().Index,
	}
	if fam == unix.AF_INET {
		r.Scope = netlink.SCOPE_HOST
	}
	return r
}

func isDefault(dst *net.IPNet) bool {
	if dst == nil {
		return true
	}
	ones, _ := dst.Mask.Size()
	return ones == 0 && dst.IP.IsUnspecified()
}

// isOurRoute matches "local default table 100" on any device.
func isOurRoute(r netlink.Route) bool {
	return r.Table == RouteTable && r.Type == unix.RTN_LOCAL && isDefault(r.Dst)
}

// retryDump repeats a netlink dump the kernel reported as interrupted by a concurrent change.
func retryDump[T any](f func() ([]T, error)) ([]T, error) {
	var (
		out []T
		err error
	)
	for range 5 {
		out, err = f()
		if !errors.Is(err, netlink.ErrDumpInterrupted) {
			return out, err
		}
	}
	return out, err
}

func (s *session) rules(fam int) ([]netlink.Rule, error) {
	return retryDump(func() ([]netlink.Rule, error) { return s.rt.RuleList(fam) })
}

func (s *session) tableRoutes(fam int) ([]netlink.Route, error) {
	return retryDump(func() ([]netlink.Route, error) {
		return s.rt.RouteListFiltered(fam, &netlink.Route{Table: RouteTable}, netlink.RT_FILTER_TABLE)
	})
}

// routingState is what of ours one family's policy routing holds.
type routingState struct {
	rules  []netlink.Rule  // our fwmark rules (more than one is drift)
	routes []netlink.Route // our local default routes in RouteTable (on any device)
	onLo   bool            // one of routes is on lo
}

func (s *session) routingState(fam int, lo netlink.Link) (routingState, error) {
	var st routingState
	rules, err := s.rules(fam)
	if err != nil {
		return st, fmt.Errorf("list %s rules: %w", famName(fam), err)
	}
	for _, r := range rules {
		if isOurRule(r) {
			st.rules = append(st.rules, r)
		}
	}
	routes, err := s.tableRoutes(fam)
	if err != nil {
		return st, fmt.Errorf("list %s routes: %w", famName(fam), err)
	}
	for _, r := range routes {
		if isOurRoute(r) {
			st.routes = append(st.routes, r)
			if lo != nil && r.LinkIndex == lo.Attrs().Index {
				st.onLo = true
			}
		}
	}
	return st, nil
}

func ruleText(fam int) string {
	return fmt.Sprintf("%s rule 'pref %d fwmark %#x/%#x lookup %d'", famName(fam), RulePriority, TProxyMark, MarkMask, RouteTable)
}

func routeText(fam int) string {
	return fmt.Sprintf("%s route 'local %s dev lo table %d'", famName(fam), defaultDst(fam), RouteTable)
}

func (s *session) checkRouting(cfg RuleConfig) ([]string, error) {
	fams, lo, err := s.routeFamilies(cfg)
	if err != nil {
		return nil, err
	}
	var drift []string
	for _, fam := range []int{unix.AF_INET, unix.AF_INET6} {
		st, err := s.routingState(fam, lo)
		if err != nil {
			if fam == unix.AF_INET6 && errors.Is(err, unix.EAFNOSUPPORT) {
				continue
			}
			return nil, err
		}
		if !slices.Contains(fams, fam) {
			if len(st.rules) > 0 {
				drift = append(drift, "routing: unexpected "+ruleText(fam))
			}
			if len(st.routes) > 0 {
				drift = append(drift, "routing: unexpected "+routeText(fam))
			}
			continue
		}
		switch n := len(st.rules); {
		case n == 0:
			drift = append(drift, "routing: missing "+ruleText(fam))
		case n > 1:
			drift = append(drift, fmt.Sprintf("routing: %s present %d times", ruleText(fam), n))
		}
		if !st.onLo {
			drift = append(drift, "routing: missing "+routeText(fam))
		}
		if len(st.routes) > 1 || (len(st.routes) == 1 && !st.onLo) {
			drift = append(drift, fmt.Sprintf("routing: %d local default routes in table %d, want one on lo", len(st.routes), RouteTable))
		}
	}
	return drift, nil
}

func (s *session) ensureRouting(cfg RuleConfig) error {
	fams, lo, err := s.routeFamilies(cfg)
	if err != nil {
		return err
	}
	for _, fam := range []int{unix.AF_INET, unix.AF_INET6} {
		if !slices.Contains(fams, fam) {
			if err := s.removeFamily(fam); err != nil {
				return err
			}
			continue
		}
		st, err := s.routingState(fam, lo)
		if err != nil {
			return err
		}
		for i := 1; i < len(st.rules); i++ { // duplicates: keep exactly one
			if err := s.rt.RuleDel(&st.rules[i]); err != nil && !absent(err) {
				return fmt.Errorf("delete duplicate %s: %w", ruleText(fam), err)
			}
		}
		if len(st.rules) == 0 {
			if err := s.rt.RuleAdd(wantRule(fam)); err != nil && !errors.Is(err, unix.EEXIST) {
				return fmt.Errorf("add %s: %w", ruleText(fam), err)
			}
		}
		for _, r := range st.routes {
			if r.LinkIndex != lo.Attrs().Index {
				if err := s.rt.RouteDel(&r); err != nil && !absent(err) {
					return fmt.Errorf("delete stray %s route: %w", famName(fam), err)
				}
			}
		}
		if !st.onLo {
			if err := s.rt.RouteReplace(wantRoute(fam, lo)); err != nil {
				return fmt.Errorf("add %s: %w", routeText(fam), err)
			}
		}
	}
	return nil
}

// removeFamily deletes our rules and routes of one family.
func (s *session) removeFamily(fam int) error {
	st, err := s.routingState(fam, nil)
	if err != nil {
		if errors.Is(err, unix.EAFNOSUPPORT) {
			return nil
		}
		return err
	}
	var errs []error
	for _, r := range st.rules {
		if err := s.rt.RuleDel(&r); err != nil && !absent(err) {
			errs = append(errs, fmt.Errorf("delete %s: %w", ruleText(fam), err))
		}
	}
	for _, r := range st.routes {
		if err := s.rt.RouteDel(&r); err != nil && !absent(err) {
			errs = append(errs, fmt.Errorf("delete %s: %w", routeText(fam), err))
		}
	}
	return errors.Join(errs...)
}

func (s *session) removeRouting() error {
	return errors.Join(s.removeFamily(unix.AF_INET), s.removeFamily(unix.AF_INET6))
}

// absent reports the errors netlink gives for deleting something that is not there.
func absent(err error) bool {
	return errors.Is(err, unix.ENOENT) || errors.Is(err, unix.ESRCH) || errors.Is(err, unix.EAFNOSUPPORT)
}
