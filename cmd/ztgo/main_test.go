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

func TestEmbeddedDefaultConfigIsValid(t *testing.T) {
	snap, err := localfile.Load(defaultConfig)
	if err != nil {
		t.Fatal(err)
	}
	if len(snap.WorkloadsOnNode("ztgo")) != 2 || len(snap.Services()) != 1 {
		t.Fatalf("default mesh: %d local workloads, %d services", len(snap.WorkloadsOnNode("ztgo")), len(snap.Services()))
	}
}
