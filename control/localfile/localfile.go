// Package localfile is ztgo's local config source: ztunnel's LOCAL_XDS YAML (from the file named
// by LOCAL_XDS_PATH, or inline in LOCAL_XDS), parsed into a snapshot.Config and published to a
// snapshot.Store. A file that ztunnel loads, ztgo loads with the same meaning, except for the
// few cases listed under Strictness.
//
// # Schema
//
// The document is ztunnel's LocalConfig (src/xds.rs): three optional lists.
//
//	workloads:            # Workload fields (src/state/workload.rs) + services
//	- uid: cluster1//v1/Pod/default/local
//	  name: local                      # required (ztunnel defaults it to "")
//	  namespace: default               # required
//	  workloadIps: ["127.0.0.1"]       # or a hostname
//	  protocol: HBONE                  # HBONE | TCP (default TCP)
//	  services:                        # "namespace/hostname" -> {servicePort: targetPort}
//	    "default/example.com": {80: 8080}
//	  # trustDomain, serviceAccount, network, node, hostname, clusterId, workloadName,
//	  # canonicalName, canonicalRevision: strings
//	  # workloadType: deployment | cronjob | pod | job
//	  # networkMode: Standard | HostNetwork;  status: Healthy | Unhealthy
//	  # nativeTunnel: bool;  authorizationPolicies: ["ns/name", ...]
//	  # applicationTunnel: {protocol: NONE | PROXY, port: 15088}
//	  # locality: {region, zone, subzone};  capacity: 1..2^32-1 (default 1)
//	  # waypoint, networkGateway: GatewayAddress
//	services:             # Service (src/state/service.rs)
//	- name: local                      # name, namespace, hostname required
//	  namespace: default
//	  hostname: example.com
//	  vips: ["/127.10.0.1"]            # "network/IP"
//	  ports: {80: 8080}                # target 0 = the endpoint's port for that service port
//	  # cidrVips: [{network: "", cidr: 10.96.0.0/16}]
//	  # subjectAltNames: [spiffe://...];  canonical: bool;  visibility: Public | Namespace
//	  # ipFamilies: Dual | IPv4 | IPv6
//	  # loadBalancer: {routingPreferences: [Region|Zone|Subzone|Node|Cluster|Network],
//	  #                mode: Standard|Strict|Failover|Passthrough, healthPolicy: OnlyHealthy|AllowAll}
//	  # waypoint: GatewayAddress;  weightedWaypoints: [{destination: GatewayAddress, weight: 3}]
//	  # endpoints: {<workload uid>: {workloadUid, port: {80: 8080}, status}}
//	policies:             # Authorization (src/rbac.rs)
//	- name: deny-9999                  # name, namespace, scope, action required
//	  namespace: default
//	  scope: Namespace                 # Global | Namespace | WorkloadSelector
//	  action: Allow                    # Allow | Deny
//	  dryRun: false
//	  rules: [[[ {notDestinationPorts: [9999]} ]]]   # rules -> clauses -> matches
//
// A GatewayAddress is {destination, hboneMtlsPort (default 15008)}, where destination is the
// string "network/IP", or "namespace/hostname" for a service (tried in that order, as serde's
// untagged enum does), or the mapping {namespace, hostname}.
//
// A match has the lists namespaces, principals (string matches), serviceAccounts
// ([{namespace, serviceAccount}]), sourceIps, destinationIps (CIDRs "10.0.0.0/8"),
// destinationPorts, each also with a not- form (notNamespaces, ...). A string match is written
// as ztunnel's serde_yaml writes it, `!Exact s`, `!Prefix s`, `!Suffix s`, `!Presence []`, or as
// a one-key mapping `{Exact: s}`.
//
// # Strictness
//
// Parse walks the YAML node tree itself so that every error names the field path and line, and
// it reports all errors (up to MaxErrors), not just the first. Unknown fields are rejected in
// every object (ztunnel's serde rejects them in most; in locality, cidrVips entries, matches and
// service-account matches it ignores them, which would silently turn a typo into a different
// policy). Duplicate keys, port 0, malformed IPs and CIDRs, unknown enum spellings, multiple
// YAML documents and merge keys (`<<`) are errors. Fields ztunnel requires but that have an
// obvious default are optional: workloadIps, services (on a workload), vips, ports, rules,
// dryRun, hboneMtlsPort, a cidrVip's network, an endpoint's fields, and the parts of locality
// and loadBalancer. A few things ztunnel takes are refused: workloadType values other than the
// four above and capacity 0 (ztgo's snapshot cannot hold them), and empty names (a workload's or
// service's name, namespace or hostname, a service-account match's parts), which match nothing.
// YAML aliases are followed; port-map keys may be quoted ({"80": 8080}) as JSON writes them;
// integers are YAML 1.2 (decimal without a leading zero, 0x.., 0o..).
//
// # Reloading
//
// ztunnel reads the file once. A Source does too, and refuses to start if it is invalid; in file
// mode it then stats the file every poll interval (modification and change time, size, device
// and inode, so an atomic rename or a ConfigMap symlink swap is seen), reads it when the stat
// changed, and publishes a new snapshot only when the content's hash changed. A file modified
// within the last two seconds is re-hashed on every poll, because a second write in the same
// timestamp tick need not change its stat. An invalid change is logged with every error and
// counted, and the last good snapshot stays in force; the same bad content is reported once.
// Loads are counted in ztgo_config_reloads_total{result="ok"|"error"} (the initial load too)
// and ztgo_config_last_reload_success_timestamp_seconds (see NewMetrics).
package localfile

import (
	"bytes"
	"errors"
	"fmt"
	"io"

	"gopkg.in/yaml.v3"

	"github.com/ztgo/ztgo/control/snapshot"
)

// Parse decodes a local config document. The error, if any, joins one *FieldError per problem
// (see errors.As), each naming the field path and line; a YAML syntax error is yaml.v3's own,
// which names its line. Parse never panics.
func Parse(data []byte) (snapshot.Config, error) {
	root, err := parseYAML(data)
	if err != nil {
		return snapshot.Config{}, fmt.Errorf("parse local config: %w", err)
	}
	if root == nil {
		return snapshot.Config{}, nil
	}
	d := &decoder{}
	cfg := d.run(root)
	if len(d.errs) > 0 {
		return snapshot.Config{}, fmt.Errorf("parse local config: %w", errors.Join(d.errs...))
	}
	return cfg, nil
}

// Load parses a local config document and builds the snapshot it describes.
func Load(data []byte) (*snapshot.Snapshot, error) {
	cfg, err := Parse(data)
	if err != nil {
		return nil, err
	}
	s, err := snapshot.Build(cfg)
	if err != nil {
		return nil, fmt.Errorf("build snapshot: %w", err)
	}
	return s, nil
}

// run decodes root, stopping early (with the errors so far) if the decoder aborts.
func (d *decoder) run(root *yaml.Node) (cfg snapshot.Config) {
	defer func() {
		if r := recover(); r != nil {
			if _, ok := r.(abort); !ok {
				panic(r)
			}
		}
	}()
	return d.document(root)
}

// parseYAML returns the root node of the single document in data, or nil for an empty document.
func parseYAML(data []byte) (root *yaml.Node, err error) {
	defer func() {
		// yaml.v3 has panicked on malformed input before; never let a config file crash us.
		if r := recover(); r != nil {
			root, err = nil, fmt.Errorf("yaml: %v", r)
		}
	}()
	dec := yaml.NewDecoder(bytes.NewReader(data))
	var doc yaml.Node
	if err := dec.Decode(&doc); err != nil {
		if errors.Is(err, io.EOF) {
			return nil, nil
		}
		return nil, err
	}
	var next yaml.Node
	switch err := dec.Decode(&next); {
	case errors.Is(err, io.EOF):
	case err != nil:
		return nil, err
	default:
		return nil, &FieldError{Line: next.Line, Msg: "more than one YAML document (---); a local config is one document"}
	}
	if doc.Kind == yaml.DocumentNode && len(doc.Content) == 1 {
		root := doc.Content[0]
		if isNull(root) {
			return nil, nil
		}
		return root, nil
	}
	return nil, nil
}
