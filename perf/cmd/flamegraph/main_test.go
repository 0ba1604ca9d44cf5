package main

import (
	"bytes"
	"encoding/xml"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestRun(t *testing.T) {
	dir := t.TempDir()
	out := filepath.Join(dir, "flame.svg")
	folded := filepath.Join(dir, "folded.txt")
	prof := "../../profiles/throughput-node-a.pprof"
	if err := run([]string{"--title", "node a & <b>", "-o", out, "--folded", folded, prof}); err != nil {
		t.Fatal(err)
	}
	svg, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	d := xml.NewDecoder(bytes.NewReader(svg))
	for {
		if _, err := d.Token(); err == io.EOF {
			break
		} else if err != nil {
			t.Fatalf("%s is not well-formed: %v", out, err)
		}
	}
	for _, want := range []string{"node a &amp; &lt;b&gt;", "crypto/tls.(*Conn).Write", "<script"} {
		if !bytes.Contains(svg, []byte(want)) {
			t.Errorf("svg has no %q", want)
		}
	}
	txt, err := os.ReadFile(folded)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Contains(txt, []byte(";internal/runtime/syscall/linux.Syscall6 ")) {
		t.Errorf("folded stacks have no Syscall6 leaf:\n%.500s", txt)
	}

	if err := run([]string{"--static", "-o", out, prof}); err != nil {
		t.Fatal(err)
	}
	if svg, _ := os.ReadFile(out); bytes.Contains(svg, []byte("<script")) || !bytes.Contains(svg, []byte(prof)) {
		t.Error("--static svg has a script, or the default title is not the file name")
	}
}

func TestRunErrors(t *testing.T) {
	dir := t.TempDir()
	notProfile := filepath.Join(dir, "notes.txt")
	if err := os.WriteFile(notProfile, []byte("not a profile\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	empty := filepath.Join(dir, "empty.pprof")
	if err := os.WriteFile(empty, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	missing := filepath.Join(dir, "missing.pprof")
	tests := []struct {
		name string
		args []string
		want []string // all in the error
	}{
		{"missing file", []string{missing}, []string{missing, "no such file"}},
		{"not a profile", []string{notProfile}, []string{notProfile, "unrecognized profile format"}},
		{"empty file", []string{empty}, []string{empty, "empty input"}},
		{"no file", nil, []string{"exactly one profile"}},
		{"two files", []string{empty, missing}, []string{"exactly one profile"}},
		{"bad width", []string{"--width", "10", empty}, []string{"--width 10"}},
		{"bad min width", []string{"--min-width", "0", empty}, []string{"--min-width 0"}},
		{"unwritable output", []string{"-o", filepath.Join(dir, "no", "such", "dir.svg"), "../../profiles/throughput-node-a.pprof"},
			[]string{"write svg", "no such file"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := run(append([]string{}, tt.args...))
			if err == nil {
				t.Fatal("no error")
			}
			for _, w := range tt.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not say %q", err, w)
				}
			}
		})
	}
}
