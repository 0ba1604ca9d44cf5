package node

import (
	"context"
	"strings"
	"testing"
)

func TestInvalidConfigRefusesToStart(t *testing.T) {
	n, err := New(Config{Name: "n", ConfigInline: "workloads:\n- name: x\n  namespace: default\n  workloadIps: [\"127.50.0.1\"]\n  protocol: HBONE\n  color: blue\n"})
	if err != nil {
		t.Fatal(err)
	}
	err = n.Start(context.Background())
	defer n.Stop(context.Background())
	if err == nil || !strings.Contains(err.Error(), "workloads[0]") || !strings.Contains(err.Error(), `unknown field "color"`) {
		t.Fatalf("Start error = %v; want the bad field named", err)
	}
}

func TestDefaultConfigNeedsNoFlags(t *testing.T) {
	// The embedded default is cmd/ztgo's business; here: an empty mesh starts and stops cleanly.
	n, err := New(Config{Name: "n", DefaultConfig: []byte("workloads: []\n"), SOCKS5Addr: "127.50.0.1:0"})
	if err != nil {
		t.Fatal(err)
	}
	if err := n.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	if n.SOCKS5Addr() == "" {
		t.Fatal("socks5 not listening")
	}
	if err := n.Stop(context.Background()); err != nil {
		t.Fatal(err)
	}
}
