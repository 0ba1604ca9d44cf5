package main

import (
	"bytes"
	"strings"
	"testing"

	"github.com/ztgo/ztgo/control/localfile"
)

func TestVersionAndUsage(t *testing.T) {
	var out, errb bytes.Buffer
	if code := run([]string{"version"}, &out, &errb); code != 0 || !strings.HasPrefix(out.String(), "ztgo ") {
		t.Fatalf("version: %d %q", code, out.String())
	}
	if code := run([]string{"frobnicate"}, &out, &errb); code != 2 || !strings.Contains(errb.String(), "unknown command") {
		t.Fatalf("unknown command: %d %q", code, errb.String())
	}
	errb.Reset()
	if code := run([]string{"run", "--log-format", "xml"}, &out, &errb); code != 2 || !strings.Contains(errb.String(), "want text or json") {
		t.Fatalf("bad flag: %d %q", code, errb.String())
	}
}

func TestNodeAgentFlags(t *testing.T) {
	t.Setenv("ZTGO_PODS_DIR", "")
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"--log-level", "loud"}, "ztgo node-agent: --log-level: "},
		{[]string{"--pods-dir", "/x", "--log-format", "xml"}, `ztgo node-agent: --log-format "xml": want text or json`},
		{nil, "--pods-dir is required"},
		{[]string{"--pods-dir", "/x", "--mark", "4096"}, "--mark 4096: want 0..4095"},
		{[]string{"--pods-dir", "/x", "--poll", "0s"}, "--poll and --retry must be positive"},
		{[]string{"--pods-dir", "/x", "extra"}, "unexpected arguments"},
	} {
		var out, errb bytes.Buffer
		if code := run(append([]string{"node-agent"}, tc.args...), &out, &errb); code != 2 || !strings.Contains(errb.String(), tc.want) {
			t.Errorf("node-agent %q: %d %q, want 2 and %q", tc.args, code, errb.String(), tc.want)
		}
	}
}

func TestEmbeddedDefaultConfigIsValid(t *testing.T) {
	snap, err := localfile.Load(defaultConfig)
	if err != nil {
		t.Fatal(err)
	}
	if len(snap.WorkloadsOnNode("ztgo")) != 2 || len(snap.Services()) != 1 {
		t.Fatalf("default mesh: %d local workloads, %d services", len(snap.WorkloadsOnNode("ztgo")), len(snap.Services()))
	}
}
