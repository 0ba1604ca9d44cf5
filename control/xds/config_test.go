package xds

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"google.golang.org/protobuf/types/known/structpb"

	"github.com/ztgo/ztgo/control/snapshot"
)

func TestNode(t *testing.T) {
	node, skipped := buildNode(&Config{
		InstanceIP:    "10.1.2.3",
		PodName:       "ztunnel-abcde",
		PodNamespace:  "istio-system",
		NodeName:      "node-1",
		ProxyMetadata: map[string]string{"CLUSTER_ID": "c1", "NAME": "overridden-by-proxy-metadata"},
		MetadataJSON: map[string]string{
			"LABELS":    `{"app":"ztunnel","n":2}`,
			"LIST":      `[1,"a",true,null]`,
			"BROKEN":    `{not json`,
			"NODE_NAME": `"json-wins"`,
		},
	})
	if node.GetId() != "ztunnel~10.1.2.3~ztunnel-abcde.istio-system~istio-system.svc.cluster.local" {
		t.Fatalf("id = %q", node.GetId())
	}
	if len(skipped) != 1 || !strings.Contains(skipped[0].Error(), "BROKEN") {
		t.Fatalf("skipped = %v", skipped)
	}
	got := node.GetMetadata().AsMap()
	want := map[string]any{
		"NAME":         "overridden-by-proxy-metadata", // proxy metadata overrides the built-in keys
		"NAMESPACE":    "istio-system",
		"INSTANCE_IPS": "10.1.2.3",
		"NODE_NAME":    "json-wins", // and JSON metadata overrides both
		"CLUSTER_ID":   "c1",
		"LABELS":       map[string]any{"app": "ztunnel", "n": float64(2)},
		"LIST":         []any{float64(1), "a", true, nil},
	}
	gotS, _ := structpb.NewStruct(got)
	wantS, _ := structpb.NewStruct(want)
	if gotS.String() != wantS.String() {
		t.Fatalf("metadata\n%v\nwant\n%v", got, want)
	}

	// Defaults: ztunnel's 1.1.1.1 and empty names.
	node, _ = buildNode(&Config{})
	if node.GetId() != "ztunnel~1.1.1.1~.~.svc.cluster.local" {
		t.Fatalf("default id = %q", node.GetId())
	}
	m := node.GetMetadata().GetFields()
	if m["INSTANCE_IPS"].GetStringValue() != "1.1.1.1" || len(m) != 4 {
		t.Fatalf("default metadata = %v", m)
	}
}

func TestNewValidates(t *testing.T) {
	dir := t.TempDir()
	root := filepath.Join(dir, "root.pem")
	if err := os.WriteFile(root, newTestCA(t).pem, 0o600); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name    string
		cfg     Config
		wantErr string
	}{
		{name: "https with root file", cfg: Config{Address: "https://istiod.istio-system.svc:15012", RootCA: root}},
		{name: "https with system roots", cfg: Config{Address: "https://istiod:15012", RootCA: RootSystem}},
		{name: "https with literal PEM", cfg: Config{Address: "https://istiod:15012", RootCA: string(newTestCA(t).pem)}},
		{name: "http needs no root", cfg: Config{Address: "http://127.0.0.1:15010"}},
		{name: "port defaults", cfg: Config{Address: "https://istiod", RootCA: RootSystem}},
		{name: "empty address", cfg: Config{}, wantErr: "scheme must be https or http"},
		{name: "grpc scheme", cfg: Config{Address: "grpc://istiod:15012"}, wantErr: "scheme must be https or http"},
		{name: "no scheme", cfg: Config{Address: "istiod:15012"}, wantErr: "scheme must be https or http"},
		{name: "path", cfg: Config{Address: "http://istiod:15012/x"}, wantErr: "want scheme://host:port"},
		{name: "https without root", cfg: Config{Address: "https://istiod:15012"}, wantErr: "root CA: empty"},
		{name: "missing root file", cfg: Config{Address: "https://istiod:15012", RootCA: filepath.Join(dir, "nope.pem")}, wantErr: "not an existing file, PEM, or SYSTEM"},
		{name: "bad literal PEM", cfg: Config{Address: "https://istiod:15012", RootCA: "-----BEGIN CERTIFICATE-----\nxx\n-----END CERTIFICATE-----\n"}, wantErr: "no certificate in PEM"},
		{name: "both tokens", cfg: Config{Address: "http://a:1", Token: "t", TokenFile: "/f"}, wantErr: "both Token and TokenFile"},
		{name: "token with newline", cfg: Config{Address: "http://a:1", Token: "t\n"}, wantErr: "not a valid header value"},
		{name: "bad header key", cfg: Config{Address: "http://a:1", Headers: map[string]string{"bad key": "v"}}, wantErr: "not a valid gRPC metadata key"},
		{name: "reserved header key", cfg: Config{Address: "http://a:1", Headers: map[string]string{"grpc-timeout": "1"}}, wantErr: "not a valid gRPC metadata key"},
		{name: "bad header value", cfg: Config{Address: "http://a:1", Headers: map[string]string{"k": "\x01"}}, wantErr: "not printable ASCII"},
		{name: "header twice", cfg: Config{Address: "http://a:1", Headers: map[string]string{"K": "1", "k": "2"}}, wantErr: "given twice"},
		{name: "backoff order", cfg: Config{Address: "http://a:1", InitialBackoff: 2, MaxBackoff: 1}, wantErr: "below InitialBackoff"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			c, err := New(tc.cfg, snapshot.NewStore(), nil, nil)
			if tc.wantErr == "" {
				if err != nil {
					t.Fatal(err)
				}
				if c.cfg.InitialBackoff != DefaultInitialBackoff || c.cfg.MaxBackoff != DefaultMaxBackoff || c.cfg.MaxMessageSize != DefaultMaxMessageSize {
					t.Fatalf("defaults not applied: %+v", c.cfg)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Fatalf("err = %v, want it to contain %q", err, tc.wantErr)
			}
		})
	}
	if _, err := New(Config{Address: "http://a:1"}, nil, nil, nil); err == nil {
		t.Fatal("nil store accepted")
	}
	c, err := New(Config{Address: "http://a:1"}, snapshot.NewStore(), nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Start(t.Context()); err != nil {
		t.Fatal(err)
	}
	if err := c.Start(t.Context()); err == nil {
		t.Fatal("second Start accepted")
	}
	c.Stop()
}

func TestParseAddress(t *testing.T) {
	for in, want := range map[string]target{
		"https://istiod.istio-system.svc:15012": {tls: true, hostPort: "istiod.istio-system.svc:15012", host: "istiod.istio-system.svc"},
		"https://istiod":                        {tls: true, hostPort: "istiod:443", host: "istiod"},
		"http://[::1]:15010":                    {hostPort: "[::1]:15010", host: "::1"},
		"http://127.0.0.1":                      {hostPort: "127.0.0.1:80", host: "127.0.0.1"},
	} {
		got, err := parseAddress(in)
		if err != nil || got != want {
			t.Errorf("parseAddress(%q) = %+v, %v; want %+v", in, got, err, want)
		}
	}
}
