package localfile

import (
	"testing"

	"github.com/ztgo/ztgo/control/snapshot"
)

func FuzzParse(f *testing.F) {
	for _, seed := range []string{
		fullYAML, localhostYAML, serdeYAML, baseWorkload, "", "~", "{}",
		"workloads: [{name: a, namespace: b, workloadIps: [1.2.3.4], waypoint: {destination: x/y}}]",
		"policies: [{name: p, namespace: n, scope: Global, action: Allow, rules: [[[{principals: [!Presence [], {Exact: a}]}]]]}]",
		"services: [{name: s, namespace: n, hostname: h, ports: {0x50: 1}, cidrVips: [{cidr: 10.0.0.0/8}]}]",
		"a: &a [*a]",
		"workloads: [*x]",
		"---\n---\n",
		"services:\n- &s {name: s, namespace: n, hostname: h, endpoints: {u: {port: {80: 80}}}}\n- *s\n",
	} {
		f.Add([]byte(seed))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		cfg, err := Parse(data)
		if err != nil {
			if cfg.Workloads != nil || cfg.Services != nil || cfg.Policies != nil {
				t.Fatalf("Parse returned a config with an error")
			}
			return
		}
		// A config that parses must not make Build panic either.
		_, _ = snapshot.Build(cfg)
	})
}
