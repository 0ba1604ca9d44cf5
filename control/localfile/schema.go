package localfile

import (
	"net/netip"
	"slices"
	"strings"

	"gopkg.in/yaml.v3"

	"github.com/ztgo/ztgo/control/snapshot"
)

// This file maps ztunnel's LocalConfig YAML onto snapshot.Config. Field names and enum
// spellings are ztunnel's serde names (see the package doc for the sources); ztgo is stricter
// than serde where serde would silently accept nonsense (unknown fields in every object,
// port 0, duplicate keys) and more lenient where ztunnel demands a field that has an obvious
// default (see the package doc).

// where remembers the path and node of a decoded object for checks that span the document.
type where struct {
	path string
	node *yaml.Node
}

// pendingEndpoint is a service's `endpoints` entry, applied to its workload once all workloads
// are known.
type pendingEndpoint struct {
	service string // "namespace/hostname"
	uid     string
	ports   snapshot.PortMap
	where
}

type document struct {
	cfg       snapshot.Config
	workloads []where
	services  []where
	policies  []where
	endpoints []pendingEndpoint
}

func (d *decoder) document(root *yaml.Node) snapshot.Config {
	var doc document
	// Items that are not mappings are reported and left out, so the cross-checks see only
	// objects.
	items := func(v *yaml.Node, p string, add func(p string, el *yaml.Node)) {
		d.list(v, p, func(p string, el *yaml.Node) {
			if el = d.resolve(el); el.Kind != yaml.MappingNode {
				d.errorf(p, el, "must be a mapping, got %s", describe(el))
				return
			}
			add(p, el)
		})
	}
	d.object(root, "", []field{
		{name: "workloads", set: func(p string, v *yaml.Node) {
			items(v, p, func(p string, el *yaml.Node) {
				doc.cfg.Workloads = append(doc.cfg.Workloads, d.workload(el, p))
				doc.workloads = append(doc.workloads, where{p, el})
			})
		}},
		{name: "policies", set: func(p string, v *yaml.Node) {
			items(v, p, func(p string, el *yaml.Node) {
				doc.cfg.Policies = append(doc.cfg.Policies, d.policy(el, p))
				doc.policies = append(doc.policies, where{p, el})
			})
		}},
		{name: "services", set: func(p string, v *yaml.Node) {
			items(v, p, func(p string, el *yaml.Node) {
				doc.cfg.Services = append(doc.cfg.Services, d.service(el, p, &doc.endpoints))
				doc.services = append(doc.services, where{p, el})
			})
		}},
	})
	d.crossCheck(&doc)
	return doc.cfg
}

// crossCheck reports, with their lines, the problems snapshot.Build would otherwise report
// without them, and attaches services' endpoints to their workloads.
func (d *decoder) crossCheck(doc *document) {
	uids := map[string]int{}
	for i, w := range doc.cfg.Workloads {
		at := doc.workloads[i]
		if len(w.Addresses) == 0 && w.Hostname == "" {
			d.errorf(at.path, at.node, "a workload needs workloadIps or a hostname")
		}
		if w.UID == "" {
			continue
		}
		if j, dup := uids[w.UID]; dup {
			d.errorf(join(at.path, "uid"), at.node, "uid %q is already used by %s (line %d)", w.UID, doc.workloads[j].path, doc.workloads[j].node.Line)
			continue
		}
		uids[w.UID] = i
	}
	svcKeys := map[string]int{}
	for i, s := range doc.cfg.Services {
		at := doc.services[i]
		k := s.Namespace + "/" + s.Hostname
		if s.Namespace == "" || s.Hostname == "" {
			continue // already reported
		}
		if j, dup := svcKeys[k]; dup {
			d.errorf(at.path, at.node, "service %s is already defined by %s (line %d)", k, doc.services[j].path, doc.services[j].node.Line)
			continue
		}
		svcKeys[k] = i
	}
	polKeys := map[string]int{}
	for i, p := range doc.cfg.Policies {
		at := doc.policies[i]
		if p.Name == "" {
			continue
		}
		if j, dup := polKeys[p.Key()]; dup {
			d.errorf(at.path, at.node, "policy %s is already defined by %s (line %d)", p.Key(), doc.policies[j].path, doc.policies[j].node.Line)
			continue
		}
		polKeys[p.Key()] = i
	}
	for _, ep := range doc.endpoints {
		i, ok := uids[ep.uid]
		if !ok {
			d.errorf(ep.path, ep.node, "no workload in this config has uid %q", ep.uid)
			continue
		}
		w := doc.cfg.Workloads[i]
		if _, declared := w.Services[ep.service]; declared {
			continue // as in ztunnel, the workload's own port list wins
		}
		if w.Services == nil {
			w.Services = map[string]snapshot.PortMap{}
		}
		w.Services[ep.service] = ep.ports
	}
}

// strField decodes a string field into dst.
func (d *decoder) strField(name string, dst *string) field {
	return field{name: name, set: func(p string, v *yaml.Node) { *dst = d.str(v, p) }}
}

// nameField decodes a required, non-empty string field into dst.
func (d *decoder) nameField(name string, dst *string) field {
	return field{name: name, required: true, set: func(p string, v *yaml.Node) {
		s, n, ok := d.text(v, p)
		if ok && s == "" {
			d.errorf(p, n, "must not be empty")
		}
		*dst = s
	}}
}

func (d *decoder) workload(n *yaml.Node, path string) *snapshot.Workload {
	w := &snapshot.Workload{}
	d.object(n, path, []field{
		{name: "workloadIps", set: func(p string, v *yaml.Node) {
			w.Addresses = nil
			d.list(v, p, func(p string, el *yaml.Node) {
				w.Addresses = append(w.Addresses, d.ip(el, p))
			})
		}},
		{name: "waypoint", set: func(p string, v *yaml.Node) { w.Waypoint = d.gateway(v, p) }},
		{name: "networkGateway", set: func(p string, v *yaml.Node) { w.NetworkGateway = d.gateway(v, p) }},
		{name: "protocol", set: func(p string, v *yaml.Node) {
			switch d.enum(v, p, "HBONE", "TCP") {
			case 0:
				w.Protocol = snapshot.TunnelHBONE
			case 1:
				w.Protocol = snapshot.TunnelNone
			}
		}},
		{name: "networkMode", set: func(p string, v *yaml.Node) {
			switch d.enum(v, p, "Standard", "HostNetwork") {
			case 0:
				w.NetworkMode = snapshot.NetworkStandard
			case 1:
				w.NetworkMode = snapshot.NetworkHost
			}
		}},
		d.strField("uid", &w.UID),
		d.nameField("name", &w.Name),
		d.nameField("namespace", &w.Namespace),
		d.strField("trustDomain", &w.TrustDomain),
		d.strField("serviceAccount", &w.ServiceAccount),
		d.strField("network", &w.Network),
		d.strField("workloadName", &w.WorkloadName),
		{name: "workloadType", set: func(p string, v *yaml.Node) { w.WorkloadType = d.workloadType(v, p) }},
		d.strField("canonicalName", &w.CanonicalName),
		d.strField("canonicalRevision", &w.CanonicalRevision),
		d.strField("hostname", &w.Hostname),
		d.strField("node", &w.Node),
		{name: "nativeTunnel", set: func(p string, v *yaml.Node) { w.NativeTunnel = d.boolean(v, p) }},
		{name: "applicationTunnel", set: func(p string, v *yaml.Node) { w.ApplicationTunnel = d.appTunnel(v, p) }},
		{name: "authorizationPolicies", set: func(p string, v *yaml.Node) { w.AuthorizationPolicies = d.strList(v, p) }},
		{name: "status", set: func(p string, v *yaml.Node) { w.Status = d.health(v, p) }},
		d.strField("clusterId", &w.ClusterID),
		{name: "locality", set: func(p string, v *yaml.Node) {
			d.object(v, p, []field{
				d.strField("region", &w.Locality.Region),
				d.strField("zone", &w.Locality.Zone),
				d.strField("subzone", &w.Locality.Subzone),
			})
		}},
		{name: "capacity", set: func(p string, v *yaml.Node) {
			// ztunnel defaults capacity to 1 and would never pick a workload of capacity 0;
			// snapshot.Workload reads 0 as "default", so 0 cannot be expressed here.
			w.Capacity = d.u32(v, p, 1)
		}},
		{name: "services", set: func(p string, v *yaml.Node) {
			w.Services = map[string]snapshot.PortMap{}
			d.mapping(v, p, quotedKey, func(p string, k, v *yaml.Node) {
				if d.serviceKey(k, p) {
					w.Services[k.Value] = d.portMap(v, p)
				}
			})
		}},
	})
	return w
}

// serviceKey checks a "namespace/hostname" key.
func (d *decoder) serviceKey(k *yaml.Node, path string) bool {
	ns, host, ok := strings.Cut(k.Value, "/")
	if !ok || ns == "" || host == "" {
		d.errorf(path, k, "%q is not a service key of the form namespace/hostname", truncate(k.Value))
		return false
	}
	return true
}

// workloadType accepts the lower-cased names of the workload API's WorkloadType enum, which is
// what ztunnel stores (it keeps the field as a free string).
func (d *decoder) workloadType(n *yaml.Node, path string) snapshot.WorkloadType {
	s, n, ok := d.text(n, path)
	if !ok {
		return snapshot.WorkloadDeployment
	}
	switch strings.ToLower(s) {
	case "", "deployment":
		return snapshot.WorkloadDeployment
	case "cronjob":
		return snapshot.WorkloadCronJob
	case "pod":
		return snapshot.WorkloadPod
	case "job":
		return snapshot.WorkloadJob
	}
	d.errorf(path, n, "%q is not one of deployment, cronjob, pod, job", truncate(s))
	return snapshot.WorkloadDeployment
}

func (d *decoder) health(n *yaml.Node, path string) snapshot.HealthStatus {
	if d.enum(n, path, "Healthy", "Unhealthy") == 1 {
		return snapshot.Unhealthy
	}
	return snapshot.Healthy
}

func (d *decoder) appTunnel(n *yaml.Node, path string) *snapshot.ApplicationTunnel {
	t := &snapshot.ApplicationTunnel{}
	d.object(n, path, []field{
		{name: "protocol", required: true, set: func(p string, v *yaml.Node) {
			if d.enum(v, p, "NONE", "PROXY") == 1 {
				t.Protocol = snapshot.AppTunnelProxy
			}
		}},
		{name: "port", set: func(p string, v *yaml.Node) { t.Port = d.port(v, p) }},
	})
	return t
}

// gateway decodes a GatewayAddress: {destination, hboneMtlsPort}.
func (d *decoder) gateway(n *yaml.Node, path string) *snapshot.GatewayAddress {
	g := &snapshot.GatewayAddress{HBONEPort: snapshot.DefaultHBONEPort}
	d.object(n, path, []field{
		{name: "destination", required: true, set: func(p string, v *yaml.Node) { d.destination(v, p, g) }},
		{name: "hboneMtlsPort", set: func(p string, v *yaml.Node) { g.HBONEPort = d.port(v, p) }},
	})
	return g
}

// destination decodes ztunnel's untagged Destination: the string "network/IP" (an address) or
// "namespace/hostname" (a service), tried in that order as serde does. The mapping form
// {namespace, hostname} is accepted too.
func (d *decoder) destination(n *yaml.Node, path string, g *snapshot.GatewayAddress) {
	n = d.resolve(n)
	if n.Kind == yaml.MappingNode {
		var h snapshot.NamespacedHostname
		d.object(n, path, []field{
			d.nameField("namespace", &h.Namespace),
			d.nameField("hostname", &h.Hostname),
		})
		g.Hostname = &h
		return
	}
	s, n, ok := d.text(n, path)
	if !ok {
		return
	}
	before, after, found := strings.Cut(s, "/")
	if !found {
		d.errorf(path, n, "%q is neither network/IP nor namespace/hostname", truncate(s))
		return
	}
	if ip, err := parseIP(after); err == nil {
		g.Address = &snapshot.NetworkAddress{Network: before, Addr: ip}
		return
	}
	if before == "" || after == "" {
		d.errorf(path, n, "%q is neither network/IP nor namespace/hostname", truncate(s))
		return
	}
	g.Hostname = &snapshot.NamespacedHostname{Namespace: before, Hostname: after}
}

// networkAddress decodes "network/IP" ("/IP" on the default network).
func (d *decoder) networkAddress(n *yaml.Node, path string) (snapshot.NetworkAddress, bool) {
	s, n, ok := d.text(n, path)
	if !ok {
		return snapshot.NetworkAddress{}, false
	}
	network, ipText, found := strings.Cut(s, "/")
	if !found {
		d.errorf(path, n, "%q is not network/IP (write \"/%s\" for the default network)", truncate(s), truncate(s))
		return snapshot.NetworkAddress{}, false
	}
	ip, err := parseIP(ipText)
	if err != nil {
		d.errorf(path, n, "%q is not network/IP: %v", truncate(s), err)
		return snapshot.NetworkAddress{}, false
	}
	return snapshot.NetworkAddress{Network: network, Addr: ip}, true
}

func (d *decoder) service(n *yaml.Node, path string, endpoints *[]pendingEndpoint) *snapshot.Service {
	s := &snapshot.Service{}
	var eps []pendingEndpoint
	d.object(n, path, []field{
		d.nameField("name", &s.Name),
		d.nameField("namespace", &s.Namespace),
		d.nameField("hostname", &s.Hostname),
		{name: "vips", set: func(p string, v *yaml.Node) {
			d.list(v, p, func(p string, el *yaml.Node) {
				if a, ok := d.networkAddress(el, p); ok {
					s.VIPs = append(s.VIPs, a)
				}
			})
		}},
		{name: "cidrVips", set: func(p string, v *yaml.Node) {
			d.list(v, p, func(p string, el *yaml.Node) {
				var c snapshot.NetworkPrefix
				d.object(el, p, []field{
					d.strField("network", &c.Network),
					{name: "cidr", required: true, set: func(p string, v *yaml.Node) {
						txt, v, ok := d.text(v, p)
						if !ok {
							return
						}
						pf, err := parsePrefix(txt)
						if err != nil {
							d.errorf(p, v, "%v", err)
						}
						c.Prefix = pf
					}},
				})
				s.CIDRVIPs = append(s.CIDRVIPs, c)
			})
		}},
		{name: "ports", set: func(p string, v *yaml.Node) { s.Ports = d.portMap(v, p) }},
		{name: "endpoints", set: func(p string, v *yaml.Node) {
			d.mapping(v, p, quotedKey, func(p string, k, v *yaml.Node) {
				ep := pendingEndpoint{uid: k.Value, ports: snapshot.PortMap{}, where: where{p, k}}
				d.object(v, p, []field{
					{name: "workloadUid", set: func(p string, v *yaml.Node) {
						uid, v, ok := d.text(v, p)
						if ok && uid != k.Value {
							d.errorf(p, v, "%q does not match its key %q", truncate(uid), truncate(k.Value))
						}
					}},
					{name: "port", set: func(p string, v *yaml.Node) { ep.ports = d.portMap(v, p) }},
					// The snapshot takes health from the workload itself; the field is
					// checked and otherwise ignored.
					{name: "status", set: func(p string, v *yaml.Node) { d.health(v, p) }},
				})
				eps = append(eps, ep)
			})
		}},
		{name: "subjectAltNames", set: func(p string, v *yaml.Node) { s.SubjectAltNames = d.strList(v, p) }},
		{name: "waypoint", set: func(p string, v *yaml.Node) { s.Waypoint = d.gateway(v, p) }},
		{name: "weightedWaypoints", set: func(p string, v *yaml.Node) {
			d.list(v, p, func(p string, el *yaml.Node) {
				var ww snapshot.WeightedWaypoint
				d.object(el, p, []field{
					{name: "destination", required: true, set: func(p string, v *yaml.Node) {
						if g := d.gateway(v, p); g != nil {
							ww.Destination = *g
						}
					}},
					{name: "weight", required: true, set: func(p string, v *yaml.Node) { ww.Weight = d.u32(v, p, 0) }},
				})
				s.WeightedWaypoints = append(s.WeightedWaypoints, ww)
			})
		}},
		{name: "loadBalancer", set: func(p string, v *yaml.Node) { s.LoadBalancing = d.loadBalancer(v, p) }},
		{name: "ipFamilies", set: func(p string, v *yaml.Node) {
			switch d.enum(v, p, "Dual", "IPv4", "IPv6") {
			case 0:
				s.IPFamilies = snapshot.IPFamiliesDual
			case 1:
				s.IPFamilies = snapshot.IPv4Only
			case 2:
				s.IPFamilies = snapshot.IPv6Only
			}
		}},
		{name: "canonical", set: func(p string, v *yaml.Node) { s.Canonical = d.boolean(v, p) }},
		{name: "visibility", set: func(p string, v *yaml.Node) {
			if d.enum(v, p, "Public", "Namespace") == 1 {
				s.Visibility = snapshot.VisibilityNamespace
			}
		}},
	})
	for i := range eps {
		eps[i].service = s.Namespace + "/" + s.Hostname
	}
	*endpoints = append(*endpoints, eps...)
	return s
}

func (d *decoder) loadBalancer(n *yaml.Node, path string) *snapshot.LoadBalancing {
	lb := &snapshot.LoadBalancing{}
	d.object(n, path, []field{
		{name: "routingPreferences", set: func(p string, v *yaml.Node) {
			scopes := []snapshot.LBScope{snapshot.ScopeRegion, snapshot.ScopeZone, snapshot.ScopeSubzone,
				snapshot.ScopeNode, snapshot.ScopeCluster, snapshot.ScopeNetwork}
			d.list(v, p, func(p string, el *yaml.Node) {
				if i := d.enum(el, p, "Region", "Zone", "Subzone", "Node", "Cluster", "Network"); i >= 0 {
					lb.RoutingPreference = append(lb.RoutingPreference, scopes[i])
				}
			})
		}},
		{name: "mode", set: func(p string, v *yaml.Node) {
			modes := []snapshot.LBMode{snapshot.LBModeUnspecified, snapshot.LBModeStrict, snapshot.LBModeFailover, snapshot.LBModePassthrough}
			if i := d.enum(v, p, "Standard", "Strict", "Failover", "Passthrough"); i >= 0 {
				lb.Mode = modes[i]
			}
		}},
		{name: "healthPolicy", set: func(p string, v *yaml.Node) {
			if d.enum(v, p, "OnlyHealthy", "AllowAll") == 1 {
				lb.HealthPolicy = snapshot.AllowAll
			}
		}},
	})
	return lb
}

func (d *decoder) policy(n *yaml.Node, path string) *snapshot.Policy {
	pol := &snapshot.Policy{}
	var nsPath string
	var nsNode *yaml.Node
	d.object(n, path, []field{
		d.nameField("name", &pol.Name),
		{name: "namespace", required: true, set: func(p string, v *yaml.Node) {
			nsPath, nsNode = p, d.resolve(v)
			pol.Namespace = d.str(v, p)
		}},
		{name: "scope", required: true, set: func(p string, v *yaml.Node) {
			scopes := []snapshot.PolicyScope{snapshot.ScopeGlobal, snapshot.ScopeNamespace, snapshot.ScopeWorkloadSelector}
			if i := d.enum(v, p, "Global", "Namespace", "WorkloadSelector"); i >= 0 {
				pol.Scope = scopes[i]
			}
		}},
		{name: "action", required: true, set: func(p string, v *yaml.Node) {
			if d.enum(v, p, "Allow", "Deny") == 1 {
				pol.Action = snapshot.ActionDeny
			}
		}},
		{name: "dryRun", set: func(p string, v *yaml.Node) { pol.DryRun = d.boolean(v, p) }},
		{name: "rules", set: func(p string, v *yaml.Node) {
			pol.Rules = []snapshot.Rule{}
			d.list(v, p, func(p string, el *yaml.Node) {
				rule := snapshot.Rule{}
				d.list(el, p, func(p string, el *yaml.Node) {
					clause := snapshot.Clause{}
					d.list(el, p, func(p string, el *yaml.Node) {
						clause = append(clause, d.match(el, p))
					})
					rule = append(rule, clause)
				})
				pol.Rules = append(pol.Rules, rule)
			})
		}},
	})
	if nsNode != nil && pol.Namespace == "" && pol.Scope != snapshot.ScopeGlobal {
		d.errorf(nsPath, nsNode, "must not be empty for a %s policy", pol.Scope)
	}
	return pol
}

func (d *decoder) match(n *yaml.Node, path string) snapshot.Match {
	var m snapshot.Match
	strMatches := func(dst *[]snapshot.StringMatch) func(string, *yaml.Node) {
		return func(p string, v *yaml.Node) {
			d.list(v, p, func(p string, el *yaml.Node) {
				if sm, ok := d.stringMatch(el, p); ok {
					*dst = append(*dst, sm)
				}
			})
		}
	}
	saMatches := func(dst *[]snapshot.ServiceAccountMatch) func(string, *yaml.Node) {
		return func(p string, v *yaml.Node) {
			d.list(v, p, func(p string, el *yaml.Node) {
				var sa snapshot.ServiceAccountMatch
				d.object(el, p, []field{
					d.nameField("namespace", &sa.Namespace),
					d.nameField("serviceAccount", &sa.ServiceAccount),
				})
				*dst = append(*dst, sa)
			})
		}
	}
	cidrs := func(dst *[]netip.Prefix) func(string, *yaml.Node) {
		return func(p string, v *yaml.Node) { *dst = d.prefixList(v, p) }
	}
	ports := func(dst *[]uint16) func(string, *yaml.Node) {
		return func(p string, v *yaml.Node) {
			d.list(v, p, func(p string, el *yaml.Node) { *dst = append(*dst, d.port(el, p)) })
		}
	}
	d.object(n, path, []field{
		{name: "namespaces", set: strMatches(&m.Namespaces)},
		{name: "notNamespaces", set: strMatches(&m.NotNamespaces)},
		{name: "serviceAccounts", set: saMatches(&m.ServiceAccounts)},
		{name: "notServiceAccounts", set: saMatches(&m.NotServiceAccounts)},
		{name: "principals", set: strMatches(&m.Principals)},
		{name: "notPrincipals", set: strMatches(&m.NotPrincipals)},
		{name: "sourceIps", set: cidrs(&m.SourceIPs)},
		{name: "notSourceIps", set: cidrs(&m.NotSourceIPs)},
		{name: "destinationIps", set: cidrs(&m.DestinationIPs)},
		{name: "notDestinationIps", set: cidrs(&m.NotDestinationIPs)},
		{name: "destinationPorts", set: ports(&m.DestinationPorts)},
		{name: "notDestinationPorts", set: ports(&m.NotDestinationPorts)},
	})
	return m
}

// stringMatch decodes ztunnel's StringMatch enum. serde_yaml 0.9 (what ztunnel uses) writes and
// reads it as a YAML tag: `!Exact value`, `!Prefix value`, `!Suffix value`, `!Presence []`.
// The single-key mapping form `{Exact: value}` is accepted too.
func (d *decoder) stringMatch(n *yaml.Node, path string) (snapshot.StringMatch, bool) {
	n = d.resolve(n)
	stringMatchKinds := []string{"Exact", "Prefix", "Suffix", "Presence"}
	kinds := []snapshot.StringMatchKind{snapshot.MatchExact, snapshot.MatchPrefix, snapshot.MatchSuffix, snapshot.MatchPresence}
	const want = "want !Exact <s>, !Prefix <s>, !Suffix <s> or !Presence [] (or {Exact: <s>} etc.)"
	variant := func(name string, at *yaml.Node) int {
		i := slices.Index(stringMatchKinds, name)
		if i < 0 {
			d.errorf(path, at, "%q is not one of %s", truncate(name), strings.Join(stringMatchKinds, ", "))
		}
		return i
	}
	value := func(i int, v *yaml.Node, tagged bool) (snapshot.StringMatch, bool) {
		sm := snapshot.StringMatch{Kind: kinds[i]}
		if kinds[i] == snapshot.MatchPresence {
			// Presence() is an empty tuple variant: [] (or nothing at all).
			if (v.Kind == yaml.SequenceNode && len(v.Content) == 0) || isNull(v) ||
				(v.Kind == yaml.ScalarNode && tagged && v.Value == "") {
				return sm, true
			}
			d.errorf(path, v, "Presence takes no value (write !Presence []), got %s", describe(v))
			return sm, false
		}
		if v.Kind != yaml.ScalarNode || (isNull(v) && !tagged) {
			d.errorf(path, v, "%s needs a string, got %s", stringMatchKinds[i], describe(v))
			return sm, false
		}
		sm.Value = v.Value
		return sm, true
	}
	if t := customTag(n); t != "" {
		i := variant(strings.TrimPrefix(t, "!"), n)
		if i < 0 {
			return snapshot.StringMatch{}, false
		}
		return value(i, n, true)
	}
	if n.Kind == yaml.MappingNode && len(n.Content) == 2 {
		k, v := d.resolve(n.Content[0]), d.resolve(n.Content[1])
		if k.Kind != yaml.ScalarNode {
			d.errorf(path, k, "%s", want)
			return snapshot.StringMatch{}, false
		}
		i := variant(k.Value, k)
		if i < 0 {
			return snapshot.StringMatch{}, false
		}
		return value(i, v, false)
	}
	d.errorf(path, n, "got %s; %s", describe(n), want)
	return snapshot.StringMatch{}, false
}
