package node

import (
	"context"
	"io"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/ztgo/ztgo/stages"
	"github.com/ztgo/ztgo/stages/capture"
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

// A SOCKS5 flow the node refuses at establishment (it is stopping) gets one failure reply,
// not a success reply followed by a failure.
func TestRefusedSOCKSFlowGetsOneReply(t *testing.T) {
	n, err := New(Config{Name: "n", DefaultConfig: []byte("workloads: []\n")})
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.ListenTCP("tcp", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	pair := func() (*net.TCPConn, *net.TCPConn) {
		c, err := net.DialTCP("tcp", nil, ln.Addr().(*net.TCPAddr))
		if err != nil {
			t.Fatal(err)
		}
		s, err := ln.AcceptTCP()
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close(); s.Close() })
		return c, s
	}
	client, down := pair()
	_, up := pair()
	n.mu.Lock()
	n.stopping = true
	n.mu.Unlock()
	f := n.pipeline.NewFlow(stages.Outbound, n.store.Load(), stages.Capture)
	f.Down, f.Up = down, up
	n.established(f)
	client.SetReadDeadline(time.Now().Add(5 * time.Second))
	got, err := io.ReadAll(client)
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 10 || got[0] != 5 || got[1] == capture.ReplySucceeded {
		t.Fatalf("client got % x; want one SOCKS5 failure reply", got)
	}
	if f.Failure != stages.FailOverload {
		t.Fatalf("failure %v, want %v", f.Failure, stages.FailOverload)
	}
}
