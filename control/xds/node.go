package xds

import (
	"encoding/json"
	"fmt"
	"maps"
	"slices"

	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	"google.golang.org/protobuf/types/known/structpb"
)

// DefaultInstanceIP is the node IP ztunnel reports when INSTANCE_IP is unset.
const DefaultInstanceIP = "1.1.1.1"

// buildNode returns the xDS node in ztunnel's shape (xds/client.rs Config::node):
//
//	id: ztunnel~<ip>~<pod>.<ns>~<ns>.svc.cluster.local
//	metadata: NAME, NAMESPACE, INSTANCE_IPS, NODE_NAME (strings), then the proxy metadata
//	(strings, overriding), then the ISTIO_METAJSON_ values (parsed JSON, overriding).
//
// istiod keys its view of the proxy on these: it finds the node's workloads by NODE_NAME and
// the proxy's own pod by NAME/NAMESPACE. A JSON value that does not parse is skipped, as
// ztunnel skips it, and reported in skipped.
func buildNode(cfg *Config) (node *core.Node, skipped []error) {
	ip := cfg.InstanceIP
	if ip == "" {
		ip = DefaultInstanceIP
	}
	fields := map[string]*structpb.Value{
		"NAME":         structpb.NewStringValue(cfg.PodName),
		"NAMESPACE":    structpb.NewStringValue(cfg.PodNamespace),
		"INSTANCE_IPS": structpb.NewStringValue(ip),
		"NODE_NAME":    structpb.NewStringValue(cfg.NodeName),
	}
	for k, v := range cfg.ProxyMetadata {
		fields[k] = structpb.NewStringValue(v)
	}
	// Sorted so that skipped errors come out in a stable order.
	for _, k := range slices.Sorted(maps.Keys(cfg.MetadataJSON)) {
		v, err := jsonValue(cfg.MetadataJSON[k])
		if err != nil {
			skipped = append(skipped, fmt.Errorf("node metadata %s: %w", k, err))
			continue
		}
		fields[k] = v
	}
	return &core.Node{
		Id:       fmt.Sprintf("ztunnel~%s~%s.%s~%s.svc.cluster.local", ip, cfg.PodName, cfg.PodNamespace, cfg.PodNamespace),
		Metadata: &structpb.Struct{Fields: fields},
	}, skipped
}

// jsonValue parses one JSON document into a protobuf Value. Numbers become doubles, as
// ztunnel's serde_json-to-prost conversion makes them.
func jsonValue(text string) (*structpb.Value, error) {
	var v any
	if err := json.Unmarshal([]byte(text), &v); err != nil {
		return nil, fmt.Errorf("parse JSON: %w", err)
	}
	pv, err := structpb.NewValue(v)
	if err != nil {
		return nil, fmt.Errorf("convert JSON: %w", err)
	}
	return pv, nil
}
