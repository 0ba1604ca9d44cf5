package main

import (
	"bytes"
	"os"
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

// TestInPodSource: inside Kubernetes, in-pod capture over ZDS is the default; a pods directory,
// given by flag or by environment, replaces that default, and conflicts only with a ZDS socket
// the user chose.
func TestInPodSource(t *testing.T) {
	t.Setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
	t.Setenv("INPOD_ENABLED", "true")
	for _, tc := range []struct {
		name         string
		env          map[string]string
		args         []string
		wantConflict bool
	}{
		{"pods dir flag", nil, []string{"--pods-dir", "/pods"}, false},
		{"pods dir env", map[string]string{"ZTGO_PODS_DIR": "/pods"}, nil, false},
		{"uds flag and pods dir", nil, []string{"--inpod-uds", "/z.sock", "--pods-dir", "/pods"}, true},
		{"uds env and pods dir env", map[string]string{"INPOD_UDS": "/z.sock", "ZTGO_PODS_DIR": "/pods"}, nil, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			for _, k := range []string{"INPOD_UDS", "ZTGO_PODS_DIR"} {
				t.Setenv(k, "") // restored after the test
				if v, ok := tc.env[k]; ok {
					t.Setenv(k, v)
				} else {
					os.Unsetenv(k)
				}
			}
			// An invalid flag checked after the in-pod flags ends the run before anything starts.
			args := append([]string{"run", "--pool-max-streams", "0"}, tc.args...)
			var out, errb bytes.Buffer
			code := run(args, &out, &errb)
			conflict := strings.Contains(errb.String(), "exclude each other")
			if code != 2 || conflict != tc.wantConflict || (!conflict && !strings.Contains(errb.String(), "--pool-max-streams")) {
				t.Fatalf("%q: %d %q, want conflict %v", args, code, errb.String(), tc.wantConflict)
			}
		})
	}
}
