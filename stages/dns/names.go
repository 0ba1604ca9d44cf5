package dns

import (
	"math/rand/v2"
	"net/netip"
	"strings"

	"github.com/ztgo/ztgo/control/snapshot"
)

// alias is one name tried for a request: the requested name, a Kubernetes expansion of it,
// or either of those with a client search domain stripped (stripped is then the name the
// search domain was removed from, for the CNAME).
type alias struct {
	name     string
	stripped string
}

// aliases enumerates, in order and without repeats, the names a request for name (lower
// case, no trailing dot) from a client in namespace ns may mean (ztunnel's get_aliases).
func aliases(name, ns, domain string) []alias {
	var out []alias
	seen := map[string]bool{}
	add := func(a alias) {
		if a.name != "" && !seen[a.name] {
			seen[a.name] = true
			out = append(out, a)
		}
	}
	add(alias{name: name})
	nsDomain := ns + ".svc." + domain
	for _, n := range kubeFQDNs(name, nsDomain, domain) {
		add(alias{name: n})
	}
	for _, sd := range []string{nsDomain, "svc." + domain, domain} {
		base, ok := strings.CutSuffix(name, "."+sd)
		if !ok || base == "" {
			continue
		}
		add(alias{name: base, stripped: base})
		for _, n := range kubeFQDNs(base, nsDomain, domain) {
			add(alias{name: n, stripped: base})
		}
	}
	return out
}

// kubeFQDNs expands name into the Kubernetes FQDNs it may abbreviate:
// <svc> -> <svc>.<ns>.svc.<domain>; <svc>.<ns> -> <svc>.<ns>.svc.<domain> (and, for a pod
// sub-domain, <a>.<b>.<ns>.svc.<domain>); <svc>.<ns>.svc -> + .<domain>; <a>.<b>.<ns> ->
// + .svc.<domain>; <a>.<b>.<ns>.svc -> + .<domain>.
func kubeFQDNs(name, nsDomain, domain string) []string {
	labels := strings.Count(name, ".") + 1
	svc := "svc." + domain
	switch labels {
	case 1:
		return []string{name + "." + nsDomain}
	case 2:
		return []string{name + "." + svc, name + "." + nsDomain}
	case 3:
		var out []string
		if strings.HasSuffix(name, ".svc") {
			out = append(out, name+"."+domain)
		}
		return append(out, name+"."+svc)
	case 4:
		if strings.HasSuffix(name, ".svc") {
			return []string{name + "." + domain}
		}
	}
	return nil
}

// wildcards returns name then its wildcards of decreasing specificity:
// a.b.c -> a.b.c, *.b.c, *.c.
func wildcards(name string) []string {
	out := []string{name}
	for {
		i := strings.IndexByte(name, '.')
		if i < 0 {
			return out
		}
		name = name[i+1:]
		out = append(out, "*."+name)
	}
}

// match is the service a request resolved to.
type match struct {
	svc   *snapshot.Service
	name  string // the hostname that matched (may be a wildcard)
	alias alias
}

// findService looks name up for a client in ns: each alias, each with its wildcards, against
// the snapshot's services by hostname, visibility-filtered (Namespace-visible services only
// for their own namespace).
func findService(s *snapshot.Snapshot, name, ns, domain string) (match, bool) {
	for _, a := range aliases(name, ns, domain) {
		for _, w := range wildcards(a.name) {
			if svc := s.ServiceByHostname(w, ns); svc != nil {
				return match{svc: svc, name: w, alias: a}, true
			}
		}
	}
	return match{}, false
}

// addresses are the records of svc for a client on network: the VIPs on that network, or
// for a headless service (no VIPs) one address per endpoint; only IPv4 for A (v6 false) and
// IPv6 for AAAA; shuffled.
func addresses(s *snapshot.Snapshot, svc *snapshot.Service, network string, v6 bool) []netip.Addr {
	fam := func(a netip.Addr) bool { a = a.Unmap(); return a.Is6() == v6 && a.IsValid() }
	var out []netip.Addr
	if len(svc.VIPs) > 0 {
		for _, vip := range svc.VIPs {
			if vip.Network == network && fam(vip.Addr) {
				out = append(out, vip.Addr.Unmap())
			}
		}
	} else {
		for _, ep := range s.Endpoints(svc) {
			for _, a := range ep.Workload.Addresses {
				if fam(a) {
					out = append(out, a.Unmap())
					break
				}
			}
		}
	}
	rand.Shuffle(len(out), func(i, j int) { out[i], out[j] = out[j], out[i] })
	return out
}
