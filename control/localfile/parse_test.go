package localfile

import (
	"errors"
	"fmt"
	"net/netip"
	"reflect"
	"strings"
	"testing"

	"github.com/ztgo/ztgo/control/snapshot"
)

// fullYAML sets every field of the schema at least once.
const fullYAML = `
workloads:
- uid: cluster1//v1/Pod/ns1/web-0
  name: web-0
  namespace: ns1
  serviceAccount: web
  trustDomain: example.org
  workloadIps: ["10.0.0.1", "fd00::1"]
  protocol: HBONE
  networkMode: Standard
  network: net1
  node: node-a
  hostname: web-0.example
  clusterId: cluster1
  workloadName: web
  workloadType: deployment
  canonicalName: web
  canonicalRevision: v1
  nativeTunnel: true
  applicationTunnel: {protocol: PROXY, port: 15088}
  authorizationPolicies: [ns1/allow-web]
  status: Unhealthy
  locality: {region: r1, zone: z1, subzone: s1}
  capacity: 3
  waypoint:
    destination: net1/10.0.0.9
    hboneMtlsPort: 15009
  networkGateway:
    destination: ns1/gw.ns1.svc.cluster.local
  services:
    ns1/web.ns1.svc.cluster.local: {80: 8080, 443: 0}
- name: host-agent
  namespace: kube-system
  workloadIps: [192.168.1.10]
  networkMode: HostNetwork
  workloadType: pod
  waypoint:
    destination: {namespace: ns1, hostname: wp.ns1.svc.cluster.local}
    hboneMtlsPort: 15008
- uid: cluster1//v1/Pod/ns1/db-0
  name: db-0
  namespace: ns1
  workloadIps: [10.0.0.2]
  protocol: TCP
  status: Healthy
  workloadType: cronjob
  applicationTunnel: {protocol: NONE}
- name: batch
  namespace: ns1
  hostname: batch.example
  workloadType: job
services:
- name: web
  namespace: ns1
  hostname: web.ns1.svc.cluster.local
  vips: [/10.96.0.10, net1/fd00:96::10]
  cidrVips:
  - {network: "", cidr: 10.97.0.0/16}
  - {cidr: "fd00:97::/64"}
  ports: {80: 8080, 443: 0}
  subjectAltNames: [spiffe://example.org/ns/ns1/sa/web]
  waypoint: {destination: ns1/wp.ns1.svc.cluster.local, hboneMtlsPort: 15008}
  weightedWaypoints:
  - destination: {destination: ns1/wp.ns1.svc.cluster.local, hboneMtlsPort: 15008}
    weight: 90
  - destination: {destination: /10.0.0.8}
    weight: 10
  loadBalancer:
    routingPreferences: [Region, Zone, Subzone, Node, Cluster, Network]
    mode: Failover
    healthPolicy: AllowAll
  ipFamilies: Dual
  canonical: true
  visibility: Namespace
  endpoints:
    cluster1//v1/Pod/ns1/db-0:
      workloadUid: cluster1//v1/Pod/ns1/db-0
      port: {80: 5432}
      status: Healthy
- name: v4
  namespace: ns2
  hostname: v4.ns2
  vips: []
  ports: {}
  ipFamilies: IPv4
  loadBalancer: {mode: Strict}
- name: v6
  namespace: ns2
  hostname: v6.ns2
  ipFamilies: IPv6
  visibility: Public
  loadBalancer: {mode: Passthrough, healthPolicy: OnlyHealthy, routingPreferences: []}
- name: std
  namespace: ns2
  hostname: std.ns2
  loadBalancer: {mode: Standard}
policies:
- name: allow-web
  namespace: ns1
  scope: WorkloadSelector
  action: Allow
  dryRun: true
  rules:
  - - - namespaces: [!Exact ns1, {Prefix: team-}]
        notNamespaces: [!Suffix -test]
        principals: [!Presence [], {Presence: []}]
        notPrincipals: [{Exact: cluster.local/ns/ns1/sa/evil}]
        serviceAccounts: [{namespace: ns1, serviceAccount: client}]
        notServiceAccounts: [{namespace: ns3, serviceAccount: bad}]
        sourceIps: [10.0.0.0/8, "fd00::/8"]
        notSourceIps: [10.9.0.0/16]
        destinationIps: [10.0.0.1/32]
        notDestinationIps: [10.0.0.2/32]
        destinationPorts: [80, 443]
        notDestinationPorts: [9999]
      - destinationPorts: [8080]
    - []
  - []
- name: deny-all
  namespace: ""
  scope: Global
  action: Deny
  rules: [[[{destinationPorts: [1]}]]]
- name: ns-policy
  namespace: ns2
  scope: Namespace
  action: Allow
`

func addr(s string) netip.Addr     { return netip.MustParseAddr(s) }
func prefix(s string) netip.Prefix { return netip.MustParsePrefix(s) }

func fullConfig() snapshot.Config {
	wpHost := &snapshot.NamespacedHostname{Namespace: "ns1", Hostname: "wp.ns1.svc.cluster.local"}
	return snapshot.Config{
		Workloads: []*snapshot.Workload{
			{
				UID:                   "cluster1//v1/Pod/ns1/web-0",
				Name:                  "web-0",
				Namespace:             "ns1",
				ServiceAccount:        "web",
				TrustDomain:           "example.org",
				Addresses:             []netip.Addr{addr("10.0.0.1"), addr("fd00::1")},
				Protocol:              snapshot.TunnelHBONE,
				NetworkMode:           snapshot.NetworkStandard,
				Network:               "net1",
				Node:                  "node-a",
				Hostname:              "web-0.example",
				ClusterID:             "cluster1",
				WorkloadName:          "web",
				WorkloadType:          snapshot.WorkloadDeployment,
				CanonicalName:         "web",
				CanonicalRevision:     "v1",
				NativeTunnel:          true,
				ApplicationTunnel:     &snapshot.ApplicationTunnel{Protocol: snapshot.AppTunnelProxy, Port: 15088},
				AuthorizationPolicies: []string{"ns1/allow-web"},
				Status:                snapshot.Unhealthy,
				Locality:              snapshot.Locality{Region: "r1", Zone: "z1", Subzone: "s1"},
				Capacity:              3,
				Waypoint: &snapshot.GatewayAddress{
					Address:   &snapshot.NetworkAddress{Network: "net1", Addr: addr("10.0.0.9")},
					HBONEPort: 15009,
				},
				NetworkGateway: &snapshot.GatewayAddress{
					Hostname:  &snapshot.NamespacedHostname{Namespace: "ns1", Hostname: "gw.ns1.svc.cluster.local"},
					HBONEPort: 15008,
				},
				Services: map[string]snapshot.PortMap{"ns1/web.ns1.svc.cluster.local": {80: 8080, 443: 0}},
			},
			{
				Name:         "host-agent",
				Namespace:    "kube-system",
				Addresses:    []netip.Addr{addr("192.168.1.10")},
				NetworkMode:  snapshot.NetworkHost,
				WorkloadType: snapshot.WorkloadPod,
				Waypoint:     &snapshot.GatewayAddress{Hostname: wpHost, HBONEPort: 15008},
			},
			{
				UID:               "cluster1//v1/Pod/ns1/db-0",
				Name:              "db-0",
				Namespace:         "ns1",
				Addresses:         []netip.Addr{addr("10.0.0.2")},
				Protocol:          snapshot.TunnelNone,
				Status:            snapshot.Healthy,
				WorkloadType:      snapshot.WorkloadCronJob,
				ApplicationTunnel: &snapshot.ApplicationTunnel{Protocol: snapshot.AppTunnelNone},
				// From the web service's endpoints.
				Services: map[string]snapshot.PortMap{"ns1/web.ns1.svc.cluster.local": {80: 5432}},
			},
			{
				Name:         "batch",
				Namespace:    "ns1",
				Hostname:     "batch.example",
				WorkloadType: snapshot.WorkloadJob,
			},
		},
		Services: []*snapshot.Service{
			{
				Name:      "web",
				Namespace: "ns1",
				Hostname:  "web.ns1.svc.cluster.local",
				VIPs: []snapshot.NetworkAddress{
					{Network: "", Addr: addr("10.96.0.10")},
					{Network: "net1", Addr: addr("fd00:96::10")},
				},
				CIDRVIPs: []snapshot.NetworkPrefix{
					{Network: "", Prefix: prefix("10.97.0.0/16")},
					{Network: "", Prefix: prefix("fd00:97::/64")},
				},
				Ports:           snapshot.PortMap{80: 8080, 443: 0},
				SubjectAltNames: []string{"spiffe://example.org/ns/ns1/sa/web"},
				Waypoint:        &snapshot.GatewayAddress{Hostname: wpHost, HBONEPort: 15008},
				WeightedWaypoints: []snapshot.WeightedWaypoint{
					{Destination: snapshot.GatewayAddress{Hostname: wpHost, HBONEPort: 15008}, Weight: 90},
					{Destination: snapshot.GatewayAddress{Address: &snapshot.NetworkAddress{Addr: addr("10.0.0.8")}, HBONEPort: 15008}, Weight: 10},
				},
				LoadBalancing: &snapshot.LoadBalancing{
					RoutingPreference: []snapshot.LBScope{snapshot.ScopeRegion, snapshot.ScopeZone, snapshot.ScopeSubzone,
						snapshot.ScopeNode, snapshot.ScopeCluster, snapshot.ScopeNetwork},
					Mode:         snapshot.LBModeFailover,
					HealthPolicy: snapshot.AllowAll,
				},
				IPFamilies: snapshot.IPFamiliesDual,
				Canonical:  true,
				Visibility: snapshot.VisibilityNamespace,
			},
			{
				Name: "v4", Namespace: "ns2", Hostname: "v4.ns2",
				Ports:         snapshot.PortMap{},
				IPFamilies:    snapshot.IPv4Only,
				LoadBalancing: &snapshot.LoadBalancing{Mode: snapshot.LBModeStrict},
			},
			{
				Name: "v6", Namespace: "ns2", Hostname: "v6.ns2",
				IPFamilies:    snapshot.IPv6Only,
				Visibility:    snapshot.VisibilityPublic,
				LoadBalancing: &snapshot.LoadBalancing{Mode: snapshot.LBModePassthrough, HealthPolicy: snapshot.OnlyHealthy},
			},
			{
				Name: "std", Namespace: "ns2", Hostname: "std.ns2",
				LoadBalancing: &snapshot.LoadBalancing{Mode: snapshot.LBModeUnspecified},
			},
		},
		Policies: []*snapshot.Policy{
			{
				Name:      "allow-web",
				Namespace: "ns1",
				Scope:     snapshot.ScopeWorkloadSelector,
				Action:    snapshot.ActionAllow,
				DryRun:    true,
				Rules: []snapshot.Rule{
					{
						{
							{
								Namespaces: []snapshot.StringMatch{
									{Kind: snapshot.MatchExact, Value: "ns1"},
									{Kind: snapshot.MatchPrefix, Value: "team-"},
								},
								NotNamespaces: []snapshot.StringMatch{{Kind: snapshot.MatchSuffix, Value: "-test"}},
								Principals: []snapshot.StringMatch{
									{Kind: snapshot.MatchPresence},
									{Kind: snapshot.MatchPresence},
								},
								NotPrincipals:       []snapshot.StringMatch{{Kind: snapshot.MatchExact, Value: "cluster.local/ns/ns1/sa/evil"}},
								ServiceAccounts:     []snapshot.ServiceAccountMatch{{Namespace: "ns1", ServiceAccount: "client"}},
								NotServiceAccounts:  []snapshot.ServiceAccountMatch{{Namespace: "ns3", ServiceAccount: "bad"}},
								SourceIPs:           []netip.Prefix{prefix("10.0.0.0/8"), prefix("fd00::/8")},
								NotSourceIPs:        []netip.Prefix{prefix("10.9.0.0/16")},
								DestinationIPs:      []netip.Prefix{prefix("10.0.0.1/32")},
								NotDestinationIPs:   []netip.Prefix{prefix("10.0.0.2/32")},
								DestinationPorts:    []uint16{80, 443},
								NotDestinationPorts: []uint16{9999},
							},
							{DestinationPorts: []uint16{8080}},
						},
						{},
					},
					{},
				},
			},
			{
				Name:   "deny-all",
				Scope:  snapshot.ScopeGlobal,
				Action: snapshot.ActionDeny,
				Rules:  []snapshot.Rule{{{{DestinationPorts: []uint16{1}}}}},
			},
			{
				Name:      "ns-policy",
				Namespace: "ns2",
				Scope:     snapshot.ScopeNamespace,
				Action:    snapshot.ActionAllow,
			},
		},
	}
}

func TestParseFull(t *testing.T) {
	got, err := Parse([]byte(fullYAML))
	if err != nil {
		t.Fatalf("Parse: %v", err)
	}
	want := fullConfig()
	diffConfig(t, got, want)
	if _, err := Load([]byte(fullYAML)); err != nil {
		t.Fatalf("Load: %v", err)
	}
}

// diffConfig compares configs item by item so a failure points at the object that differs.
func diffConfig(t *testing.T, got, want snapshot.Config) {
	t.Helper()
	if len(got.Workloads) != len(want.Workloads) || len(got.Services) != len(want.Services) || len(got.Policies) != len(want.Policies) {
		t.Fatalf("got %d workloads, %d services, %d policies; want %d, %d, %d",
			len(got.Workloads), len(got.Services), len(got.Policies), len(want.Workloads), len(want.Services), len(want.Policies))
	}
	for i := range want.Workloads {
		if !reflect.DeepEqual(got.Workloads[i], want.Workloads[i]) {
			t.Errorf("workloads[%d]:\n got %+v\nwant %+v", i, *got.Workloads[i], *want.Workloads[i])
		}
	}
	for i := range want.Services {
		if !reflect.DeepEqual(got.Services[i], want.Services[i]) {
			t.Errorf("services[%d]:\n got %+v\nwant %+v", i, *got.Services[i], *want.Services[i])
		}
	}
	for i := range want.Policies {
		if !reflect.DeepEqual(got.Policies[i], want.Policies[i]) {
			t.Errorf("policies[%d]:\n got %+v\nwant %+v", i, *got.Policies[i], *want.Policies[i])
		}
	}
}

// localhostYAML has the shape of ztunnel's examples/localhost.yaml: flow lists, integer port
// keys, nested rule lists written as "- - -", VIPs on the default and a named network.
const localhostYAML = `# two local workloads, one HBONE and one plain TCP
workloads:
- uid: cluster1//v1/Pod/default/a
  name: a
  namespace: default
  serviceAccount: default
  workloadIps: ["127.0.0.1"]
  protocol: HBONE
  node: local
  network: ""
  services:
    "default/a.example":
      80: 8080
- uid: cluster1//v1/Pod/default/b
  name: b
  namespace: default
  serviceAccount: default
  workloadIps: ["127.0.0.2"]
  protocol: TCP
  node: local
  network: ""
  services:
    "default/a.example":
      80: 8080
policies:
  - action: Allow
    rules:
    - - - notDestinationPorts:
          - 9999
    name: no-9999
    namespace: default
    scope: Namespace
    dryRun: false
services:
- name: a
  namespace: default
  hostname: a.example
  vips:
    - /127.10.0.1
  ports:
    80: 8080
  subjectAltNames:
   - spiffe://cluster.local/ns/default/sa/a
  canonical: true
- name: b
  namespace: default
  hostname: b.example
  vips:
    - remote/127.10.0.2
  ports:
    80: 8080
  canonical: true
`

func TestParseZtunnelExample(t *testing.T) {
	s, err := Load([]byte(localhostYAML))
	if err != nil {
		t.Fatalf("Load: %v", err)
	}
	if n := len(s.Workloads()); n != 2 {
		t.Fatalf("workloads = %d, want 2", n)
	}
	w := s.WorkloadByAddr("", addr("127.0.0.1"))
	if w == nil || w.Name != "a" || w.Protocol != snapshot.TunnelHBONE || w.TrustDomain != snapshot.DefaultTrustDomain {
		t.Fatalf("workload at 127.0.0.1 = %+v", w)
	}
	svc := s.ServiceByVIP("remote", addr("127.10.0.2"), "default")
	if svc == nil || svc.Hostname != "b.example" {
		t.Fatalf("service at remote/127.10.0.2 = %+v", svc)
	}
	a := s.ServiceByVIP("", addr("127.10.0.1"), "default")
	if a == nil || len(s.Endpoints(a)) != 2 {
		t.Fatalf("service a = %+v with %d endpoints, want 2", a, len(s.Endpoints(a)))
	}
	p := s.PolicyByKey("default/no-9999")
	if p == nil || !reflect.DeepEqual(p.Rules, []snapshot.Rule{{{{NotDestinationPorts: []uint16{9999}}}}}) {
		t.Fatalf("policy = %+v", p)
	}
}

// serdeYAML is in the form serde_yaml 0.9 writes a LocalConfig (as ztunnel's test helpers and
// config dumps do): every defaulted field spelled out, enums as tags, empty endpoint maps.
const serdeYAML = `workloads:
- workloadIps:
  - 127.0.0.3
  protocol: TCP
  networkMode: Standard
  uid: cluster1//v1/Pod/default/src
  name: src
  namespace: default
  serviceAccount: default
  node: local
  status: Healthy
  clusterId: Kubernetes
  capacity: 1
  services:
    default/vip.default.svc.cluster.local:
      80: 8080
- workloadIps:
  - 127.0.0.4
  waypoint:
    destination: /127.0.0.10
    hboneMtlsPort: 15008
  protocol: HBONE
  networkMode: Standard
  uid: cluster1//v1/Pod/default/dst
  name: dst
  namespace: default
  status: Healthy
  clusterId: ''
  capacity: 1
  services: {}
policies:
- name: tagged
  namespace: default
  scope: Namespace
  action: Deny
  rules:
  - - - principals:
        - !Exact cluster.local/ns/default/sa/src
        notNamespaces:
        - !Presence []
  dryRun: false
services:
- name: vip
  namespace: default
  hostname: vip.default.svc.cluster.local
  vips:
  - /127.10.0.3
  ports:
    80: 8080
  endpoints: {}
  subjectAltNames: []
  canonical: false
  visibility: Public
`

func TestParseSerdeOutput(t *testing.T) {
	s, err := Load([]byte(serdeYAML))
	if err != nil {
		t.Fatalf("Load: %v", err)
	}
	dst := s.WorkloadByUID("cluster1//v1/Pod/default/dst")
	if dst == nil || dst.Waypoint == nil || dst.Waypoint.Address == nil || dst.Waypoint.Address.Addr != addr("127.0.0.10") {
		t.Fatalf("dst = %+v", dst)
	}
	if dst.ClusterID != snapshot.DefaultClusterID {
		t.Errorf("empty clusterId: got %q, want the default", dst.ClusterID)
	}
	p := s.PolicyByKey("default/tagged")
	want := snapshot.Match{
		Principals:    []snapshot.StringMatch{{Kind: snapshot.MatchExact, Value: "cluster.local/ns/default/sa/src"}},
		NotNamespaces: []snapshot.StringMatch{{Kind: snapshot.MatchPresence}},
	}
	if p == nil || !reflect.DeepEqual(p.Rules[0][0][0], want) {
		t.Fatalf("policy = %+v", p)
	}
}

func TestParseStringMatchForms(t *testing.T) {
	for _, tc := range []struct {
		yaml string
		want snapshot.StringMatch
	}{
		{`!Exact a`, snapshot.StringMatch{Kind: snapshot.MatchExact, Value: "a"}},
		{`!Prefix "a"`, snapshot.StringMatch{Kind: snapshot.MatchPrefix, Value: "a"}},
		{`!Suffix 80`, snapshot.StringMatch{Kind: snapshot.MatchSuffix, Value: "80"}},
		{`!Exact ""`, snapshot.StringMatch{Kind: snapshot.MatchExact}},
		{`!Presence []`, snapshot.StringMatch{Kind: snapshot.MatchPresence}},
		{`!Presence`, snapshot.StringMatch{Kind: snapshot.MatchPresence}},
		{`{Exact: a}`, snapshot.StringMatch{Kind: snapshot.MatchExact, Value: "a"}},
		{`{Prefix: a}`, snapshot.StringMatch{Kind: snapshot.MatchPrefix, Value: "a"}},
		{`{Suffix: a}`, snapshot.StringMatch{Kind: snapshot.MatchSuffix, Value: "a"}},
		{`{Presence: []}`, snapshot.StringMatch{Kind: snapshot.MatchPresence}},
		{`{Presence: null}`, snapshot.StringMatch{Kind: snapshot.MatchPresence}},
	} {
		doc := fmt.Sprintf("policies: [{name: p, namespace: n, scope: Global, action: Allow, rules: [[[{principals: [%s]}]]]}]", tc.yaml)
		if strings.HasPrefix(tc.yaml, "!") {
			// A tag before a flow-sequence end is fine; use block style to avoid ambiguity.
			doc = "policies:\n- name: p\n  namespace: n\n  scope: Global\n  action: Allow\n  rules:\n  - - - principals:\n        - " + tc.yaml + "\n"
		}
		cfg, err := Parse([]byte(doc))
		if err != nil {
			t.Errorf("%s: %v", tc.yaml, err)
			continue
		}
		if got := cfg.Policies[0].Rules[0][0][0].Principals; len(got) != 1 || got[0] != tc.want {
			t.Errorf("%s: got %+v, want %+v", tc.yaml, got, tc.want)
		}
	}
}

// A valid base to break in the error tests. Line numbers matter: keep it as is.
const baseWorkload = `workloads:
- name: w
  namespace: ns
  workloadIps: [10.0.0.1]
`

func TestParseErrors(t *testing.T) {
	for _, tc := range []struct {
		name string
		yaml string
		// want: "path (line N): reason" substrings, all of which must appear.
		want []string
	}{
		{"bad enum", baseWorkload + "  protocol: HBON\n",
			[]string{`workloads[0].protocol (line 5): "HBON" is not one of HBONE, TCP`}},
		{"unknown field", "services:\n- name: s\n  namespace: n\n  hostname: h\n  vip: [/1.2.3.4]\n",
			[]string{`services[0] (line 5): unknown field "vip"; did you mean "vips"?`}},
		{"unknown top-level field", "workload: []\n",
			[]string{`document (line 1): unknown field "workload"; did you mean "workloads"?`}},
		{"unknown field in locality", baseWorkload + "  locality: {region: r, zones: z}\n",
			[]string{`workloads[0].locality (line 5): unknown field "zones"; did you mean "zone"?`}},
		{"unknown field in match", "policies: [{name: p, namespace: n, scope: Global, action: Allow, rules: [[[{destinationPort: [1]}]]]}]\n",
			[]string{`policies[0].rules[0][0][0] (line 1): unknown field "destinationPort"; did you mean "destinationPorts"?`}},
		{"missing required", "workloads:\n- name: w\n  workloadIps: [10.0.0.1]\n",
			[]string{`workloads[0] (line 2): missing required field "namespace"`}},
		{"empty name", baseWorkload + "- name: ''\n  namespace: ns\n  workloadIps: [10.0.0.2]\n",
			[]string{`workloads[1].name (line 5): must not be empty`}},
		{"bad ip", "workloads:\n- name: w\n  namespace: ns\n  workloadIps: [10.0.0.300]\n",
			[]string{`workloads[0].workloadIps[0] (line 4): "10.0.0.300" is not an IP address`}},
		{"ip zone", "workloads:\n- name: w\n  namespace: ns\n  workloadIps: [\"fe80::1%eth0\"]\n",
			[]string{`workloads[0].workloadIps[0] (line 4): "fe80::1%eth0": IP zones are not allowed`}},
		{"no address", "workloads:\n- name: w\n  namespace: ns\n",
			[]string{`workloads[0] (line 2): a workload needs workloadIps or a hostname`}},
		{"vip without network", "services:\n- {name: s, namespace: n, hostname: h, vips: [1.2.3.4]}\n",
			[]string{`services[0].vips[0] (line 2): "1.2.3.4" is not network/IP (write "/1.2.3.4" for the default network)`}},
		{"vip bad ip", "services:\n- {name: s, namespace: n, hostname: h, vips: [net/abc]}\n",
			[]string{`services[0].vips[0] (line 2): "net/abc" is not network/IP`}},
		{"port zero", "services:\n- name: s\n  namespace: n\n  hostname: h\n  ports: {0: 80}\n",
			[]string{`services[0].ports[0] (line 5): "0" is not an integer from 1 to 65535`}},
		{"port too big", "services:\n- name: s\n  namespace: n\n  hostname: h\n  ports:\n    80: 65536\n",
			[]string{`services[0].ports[80] (line 6): "65536" is not an integer from 0 to 65535`}},
		{"port not int", "services:\n- name: s\n  namespace: n\n  hostname: h\n  ports:\n    80: http\n",
			[]string{`services[0].ports[80] (line 6): must be an integer, got str "http"`}},
		{"negative port", "policies: [{name: p, namespace: n, scope: Global, action: Allow, rules: [[[{destinationPorts: [-1]}]]]}]\n",
			[]string{`policies[0].rules[0][0][0].destinationPorts[0] (line 1): "-1" is not an integer from 1 to 65535`}},
		{"duplicate port key", "services:\n- name: s\n  namespace: n\n  hostname: h\n  ports:\n    80: 1\n    80: 2\n",
			[]string{`services[0].ports[80] (line 7): duplicate key "80" (first at line 6)`}},
		{"leading zero port", "services:\n- name: s\n  namespace: n\n  hostname: h\n  ports:\n    080: 1\n",
			[]string{`services[0].ports[080] (line 6): must be an integer`}},
		{"same port twice", "services:\n- name: s\n  namespace: n\n  hostname: h\n  ports:\n    80: 1\n    0x50: 2\n",
			[]string{`services[0].ports[0x50] (line 7): port 80 is listed twice`}},
		{"duplicate field", baseWorkload + "  name: again\n",
			[]string{`workloads[0].name (line 5): duplicate field "name" (first at line 2)`}},
		{"duplicate service key", baseWorkload + "  services:\n    ns/a: {80: 80}\n    ns/a: {81: 81}\n",
			[]string{`workloads[0].services["ns/a"] (line 7): duplicate key "ns/a" (first at line 6)`}},
		{"bad service key", baseWorkload + "  services:\n    a: {80: 80}\n",
			[]string{`workloads[0].services["a"] (line 6): "a" is not a service key of the form namespace/hostname`}},
		{"wrong kind list", "workloads: {name: w}\n",
			[]string{`workloads (line 1): must be a list, got a mapping`}},
		{"wrong kind mapping", "workloads: [w]\n",
			[]string{`workloads[0] (line 1): must be a mapping, got str "w"`}},
		{"wrong kind scalar", baseWorkload + "  name: [a]\n",
			[]string{`duplicate field "name"`}},
		{"wrong kind string", "workloads:\n- name: [a]\n  namespace: ns\n  workloadIps: [10.0.0.1]\n",
			[]string{`workloads[0].name (line 2): must be a string, got a list`}},
		{"bool", baseWorkload + "  nativeTunnel: yes\n",
			[]string{`workloads[0].nativeTunnel (line 5): must be true or false, got str "yes"`}},
		{"capacity zero", baseWorkload + "  capacity: 0\n",
			[]string{`workloads[0].capacity (line 5): "0" is not an integer from 1 to 4294967295`}},
		{"workload type", baseWorkload + "  workloadType: statefulset\n",
			[]string{`workloads[0].workloadType (line 5): "statefulset" is not one of deployment, cronjob, pod, job`}},
		{"gateway without destination", baseWorkload + "  waypoint: {hboneMtlsPort: 15008}\n",
			[]string{`workloads[0].waypoint (line 5): missing required field "destination"`}},
		{"gateway bad destination", baseWorkload + "  waypoint: {destination: nowhere}\n",
			[]string{`workloads[0].waypoint.destination (line 5): "nowhere" is neither network/IP nor namespace/hostname`}},
		{"gateway port zero", baseWorkload + "  waypoint: {destination: /1.2.3.4, hboneMtlsPort: 0}\n",
			[]string{`workloads[0].waypoint.hboneMtlsPort (line 5): "0" is not an integer from 1 to 65535`}},
		{"gateway unknown field", baseWorkload + "  networkGateway: {destination: /1.2.3.4, hboneSingleTlsPort: 1}\n",
			[]string{`workloads[0].networkGateway (line 5): unknown field "hboneSingleTlsPort"`}},
		{"app tunnel", baseWorkload + "  applicationTunnel: {protocol: proxy}\n",
			[]string{`workloads[0].applicationTunnel.protocol (line 5): "proxy" is not one of NONE, PROXY`}},
		{"cidr without length", "policies: [{name: p, namespace: n, scope: Global, action: Allow, rules: [[[{sourceIps: [10.0.0.1]}]]]}]\n",
			[]string{`policies[0].rules[0][0][0].sourceIps[0] (line 1): "10.0.0.1" is not a CIDR`}},
		{"bad cidr", "policies: [{name: p, namespace: n, scope: Global, action: Allow, rules: [[[{notDestinationIps: [10.0.0.0/33]}]]]}]\n",
			[]string{`policies[0].rules[0][0][0].notDestinationIps[0] (line 1): "10.0.0.0/33" is not a CIDR`}},
		{"bad cidr vip", "services:\n- name: s\n  namespace: n\n  hostname: h\n  cidrVips: [{cidr: 10.0.0.0}]\n",
			[]string{`services[0].cidrVips[0].cidr (line 5): "10.0.0.0" is not a CIDR`}},
		{"scope", "policies: [{name: p, namespace: n, scope: global, action: Allow}]\n",
			[]string{`policies[0].scope (line 1): "global" is not one of Global, Namespace, WorkloadSelector`}},
		{"action", "policies: [{name: p, namespace: n, scope: Global, action: ALLOW}]\n",
			[]string{`policies[0].action (line 1): "ALLOW" is not one of Allow, Deny`}},
		{"namespace policy without namespace", "policies: [{name: p, namespace: '', scope: Namespace, action: Allow}]\n",
			[]string{`policies[0].namespace (line 1): must not be empty for a Namespace policy`}},
		{"string match unknown tag", "policies:\n- {name: p, namespace: n, scope: Global, action: Allow, rules: [[[{principals: [!Regex a]}]]]}\n",
			[]string{`policies[0].rules[0][0][0].principals[0] (line 2): "Regex" is not one of Exact, Prefix, Suffix, Presence`}},
		{"string match plain", "policies:\n- {name: p, namespace: n, scope: Global, action: Allow, rules: [[[{principals: [a]}]]]}\n",
			[]string{`policies[0].rules[0][0][0].principals[0] (line 2): got str "a"; want !Exact`}},
		{"string match presence value", "policies:\n- {name: p, namespace: n, scope: Global, action: Allow, rules: [[[{principals: [{Presence: x}]}]]]}\n",
			[]string{`Presence takes no value`}},
		{"service account match", "policies:\n- {name: p, namespace: n, scope: Global, action: Allow, rules: [[[{serviceAccounts: [{namespace: n, name: x}]}]]]}\n",
			[]string{`policies[0].rules[0][0][0].serviceAccounts[0] (line 2): unknown field "name"`,
				`policies[0].rules[0][0][0].serviceAccounts[0] (line 2): missing required field "serviceAccount"`}},
		{"rules not nested", "policies:\n- {name: p, namespace: n, scope: Global, action: Allow, rules: [{destinationPorts: [1]}]}\n",
			[]string{`policies[0].rules[0] (line 2): must be a list, got a mapping`}},
		{"duplicate service", "services:\n- {name: a, namespace: n, hostname: h}\n- {name: b, namespace: n, hostname: h}\n",
			[]string{`services[1] (line 3): service n/h is already defined by services[0] (line 2)`}},
		{"duplicate policy", "policies:\n- {name: p, namespace: n, scope: Namespace, action: Allow}\n- {name: p, namespace: n, scope: Namespace, action: Deny}\n",
			[]string{`policies[1] (line 3): policy n/p is already defined by policies[0] (line 2)`}},
		{"duplicate uid", "workloads:\n- {uid: u, name: a, namespace: n, workloadIps: [10.0.0.1]}\n- {uid: u, name: b, namespace: n, workloadIps: [10.0.0.2]}\n",
			[]string{`workloads[1].uid (line 3): uid "u" is already used by workloads[0] (line 2)`}},
		{"endpoint without workload", "services:\n- name: s\n  namespace: n\n  hostname: h\n  endpoints:\n    nope: {workloadUid: nope, port: {80: 80}, status: Healthy}\n",
			[]string{`services[0].endpoints["nope"] (line 6): no workload in this config has uid "nope"`}},
		{"endpoint uid mismatch", "workloads:\n- {uid: u, name: a, namespace: n, workloadIps: [10.0.0.1]}\nservices:\n- name: s\n  namespace: n\n  hostname: h\n  endpoints:\n    u: {workloadUid: v}\n",
			[]string{`services[0].endpoints["u"].workloadUid (line 8): "v" does not match its key "u"`}},
		{"load balancer", "services:\n- name: s\n  namespace: n\n  hostname: h\n  loadBalancer: {mode: STRICT, routingPreferences: [region]}\n",
			[]string{`services[0].loadBalancer.mode (line 5): "STRICT" is not one of Standard, Strict, Failover, Passthrough`,
				`services[0].loadBalancer.routingPreferences[0] (line 5): "region" is not one of Region, Zone, Subzone, Node, Cluster, Network`}},
		{"ip families", "services:\n- {name: s, namespace: n, hostname: h, ipFamilies: IPV4_ONLY}\n",
			[]string{`services[0].ipFamilies (line 2): "IPV4_ONLY" is not one of Dual, IPv4, IPv6`}},
		{"visibility", "services:\n- {name: s, namespace: n, hostname: h, visibility: NAMESPACE}\n",
			[]string{`services[0].visibility (line 2): "NAMESPACE" is not one of Public, Namespace`}},
		{"weighted waypoint", "services:\n- name: s\n  namespace: n\n  hostname: h\n  weightedWaypoints: [{destination: {destination: /1.2.3.4}}]\n",
			[]string{`services[0].weightedWaypoints[0] (line 5): missing required field "weight"`}},
		{"status", baseWorkload + "  status: HEALTHY\n",
			[]string{`workloads[0].status (line 5): "HEALTHY" is not one of Healthy, Unhealthy`}},
		{"network mode", baseWorkload + "  networkMode: HOST_NETWORK\n",
			[]string{`workloads[0].networkMode (line 5): "HOST_NETWORK" is not one of Standard, HostNetwork`}},
		{"merge key", "base: &b {name: w}\n",
			[]string{`unknown field "base"`}},
		{"merge key in workload", "workloads:\n- &w {name: w, namespace: n, workloadIps: [10.0.0.1]}\n- <<: *w\n  name: v\n",
			[]string{`workloads[1] (line 3): unknown field "<<" (YAML merge keys are not supported)`}},
		{"root not a mapping", "- a\n",
			[]string{`document (line 1): must be a mapping, got a list`}},
		{"two documents", "workloads: []\n---\nservices: []\n",
			[]string{`more than one YAML document`}},
		{"syntax", "workloads: [\n",
			[]string{`parse local config: yaml: line`}},
		{"custom tag on string", baseWorkload + "  node: !Node n\n",
			[]string{`workloads[0].node (line 5): unexpected YAML tag !Node`}},
		{"non-string key", "{[a]: 1}\n",
			[]string{`document (line 1): field names must be strings, got a list`}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Parse([]byte(tc.yaml))
			if err == nil {
				t.Fatalf("Parse succeeded, want errors %q", tc.want)
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error\n%v\ndoes not contain\n%s", err, w)
				}
			}
		})
	}
}

func TestParseReportsAllErrors(t *testing.T) {
	doc := `workloads:
- name: a
  namespace: n
  workloadIps: [bad]
  protocol: UDP
services:
- name: s
  namespace: n
  hostname: h
  ports: {0: 1}
  extra: 1
`
	_, err := Parse([]byte(doc))
	var fes []*FieldError
	for _, e := range leafErrors(err) {
		var fe *FieldError
		if errors.As(e, &fe) {
			fes = append(fes, fe)
		}
	}
	want := []FieldError{
		{Path: "workloads[0].workloadIps[0]", Line: 4},
		{Path: "workloads[0].protocol", Line: 5},
		{Path: "services[0].ports[0]", Line: 10},
		{Path: "services[0]", Line: 11},
	}
	if len(fes) != len(want) {
		t.Fatalf("got %d field errors, want %d:\n%v", len(fes), len(want), err)
	}
	for i, w := range want {
		if fes[i].Path != w.Path || fes[i].Line != w.Line {
			t.Errorf("error %d at %s line %d, want %s line %d", i, fes[i].Path, fes[i].Line, w.Path, w.Line)
		}
	}
}

// leafErrors unwraps err's chain of single wraps down to the joined list.
func leafErrors(err error) []error {
	for err != nil {
		if j, ok := err.(interface{ Unwrap() []error }); ok {
			return j.Unwrap()
		}
		err = errors.Unwrap(err)
	}
	return nil
}

func TestParseErrorCap(t *testing.T) {
	var b strings.Builder
	b.WriteString("workloads:\n")
	for i := 0; i < 200; i++ {
		fmt.Fprintf(&b, "- {name: w%d, namespace: n, workloadIps: [bad]}\n", i)
	}
	_, err := Parse([]byte(b.String()))
	errs := leafErrors(err)
	if len(errs) != MaxErrors+1 {
		t.Fatalf("got %d errors, want %d", len(errs), MaxErrors+1)
	}
	if !strings.Contains(errs[MaxErrors].Error(), "too many errors") {
		t.Errorf("last error = %v", errs[MaxErrors])
	}
}

func TestParseAliasBomb(t *testing.T) {
	// Valid at every level, so the decoder has to walk it: 20^4 matches of 10 ports each.
	doc := `m: &m {destinationPorts: [1,2,3,4,5,6,7,8,9,10]}
c: &c [*m,*m,*m,*m,*m,*m,*m,*m,*m,*m,*m,*m,*m,*m,*m,*m,*m,*m,*m,*m]
r: &r [*c,*c,*c,*c,*c,*c,*c,*c,*c,*c,*c,*c,*c,*c,*c,*c,*c,*c,*c,*c]
p: &p {name: p, namespace: n, scope: Global, action: Allow, rules: [*r,*r,*r,*r,*r,*r,*r,*r,*r,*r,*r,*r,*r,*r,*r,*r,*r,*r,*r,*r]}
policies: [*p,*p,*p,*p,*p,*p,*p,*p,*p,*p,*p,*p,*p,*p,*p,*p,*p,*p,*p,*p]
`
	_, err := Parse([]byte(doc))
	if err == nil || !strings.Contains(err.Error(), "document too large") {
		t.Fatalf("err = %v", err)
	}
}

func TestParseAliases(t *testing.T) {
	doc := `services:
- name: a
  namespace: n
  hostname: a
  ports: &ports {80: 8080}
- name: b
  namespace: n
  hostname: b
  ports: *ports
`
	cfg, err := Parse([]byte(doc))
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(cfg.Services[1].Ports, snapshot.PortMap{80: 8080}) {
		t.Errorf("ports = %v", cfg.Services[1].Ports)
	}
}

func TestParseEmpty(t *testing.T) {
	for _, doc := range []string{"", "\n", "# nothing\n", "~\n", "{}\n", "workloads: []\nservices: []\npolicies: []\n", "workloads:\n"} {
		cfg, err := Parse([]byte(doc))
		if err != nil {
			t.Errorf("%q: %v", doc, err)
			continue
		}
		if len(cfg.Workloads)+len(cfg.Services)+len(cfg.Policies) != 0 {
			t.Errorf("%q: got %+v", doc, cfg)
		}
	}
}

func TestParseQuotedPortKeys(t *testing.T) {
	cfg, err := Parse([]byte(`{"services": [{"name": "s", "namespace": "n", "hostname": "h", "ports": {"80": 8080}}]}`))
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(cfg.Services[0].Ports, snapshot.PortMap{80: 8080}) {
		t.Errorf("ports = %v", cfg.Services[0].Ports)
	}
}

func TestLoadBuildError(t *testing.T) {
	// Two workloads with no explicit uid get the same default uid in Build.
	doc := "workloads:\n- {name: a, namespace: n, workloadIps: [10.0.0.1]}\n- {name: a, namespace: n, workloadIps: [10.0.0.2]}\n"
	_, err := Load([]byte(doc))
	if err == nil || !errors.Is(err, snapshot.ErrInvalid) || !strings.HasPrefix(err.Error(), "build snapshot: ") {
		t.Fatalf("err = %v", err)
	}
}
