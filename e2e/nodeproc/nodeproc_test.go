//go:build unix

package nodeproc

import (
	"context"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
)

// script writes a shell script that stands in for the ztgo binary.
func script(t *testing.T, body string) (bin, dir string) {
	t.Helper()
	dir = t.TempDir()
	bin = filepath.Join(dir, "ztgo")
	if err := os.WriteFile(bin, []byte("#!/bin/sh\n"+body+"\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	return bin, dir
}

// run starts a node without Start's check of its ports, which another process on this
// machine may hold: the script listens on none of them.
func run(t *testing.T, bin, dir string) *Node {
	t.Helper()
	n, err := start(Config{Bin: bin, Name: "node-x", Host: "127.0.9.1", Mesh: filepath.Join(dir, "mesh.yaml"),
		CADir: filepath.Join(dir, "ca"), LogPath: filepath.Join(dir, "node-x.log"), Args: []string{"--log-level", "warn"}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { n.Stop(time.Second) })
	return n
}

func TestExitBeforeReady(t *testing.T) {
	bin, dir := script(t, `echo "args: $*"; echo failing; exit 3`)
	n := run(t, bin, dir)
	// Exited first: another process on this machine may answer on the readiness port.
	select {
	case <-n.Done():
	case <-time.After(10 * time.Second):
		t.Fatal("the process did not exit")
	}
	err := n.WaitReady(context.Background(), 10*time.Second)
	if err == nil || !strings.Contains(err.Error(), "exited before it was ready") || !strings.Contains(err.Error(), "exit status 3") {
		t.Fatalf("WaitReady of a process that exits: %v", err)
	}
	if !n.Exited() || n.Err() == nil {
		t.Errorf("Exited %v, Err %v; want true and exit status 3", n.Exited(), n.Err())
	}
	want := []string{"args: run --node node-x --config " + filepath.Join(dir, "mesh.yaml") + " --ca-dir " + filepath.Join(dir, "ca") +
		" --socks5 127.0.9.1:15080 --admin 127.0.9.1:15000 --metrics 127.0.9.1:15020 --readiness 127.0.9.1:15021" +
		" --drain-timeout 2s --log-level warn", "failing"}
	if got := n.LogTail(2); !slices.Equal(got, want) {
		t.Errorf("log tail %q, want %q", got, want)
	}
	if got := n.LogTail(1); !slices.Equal(got, want[1:]) {
		t.Errorf("last line %q, want %q", got, want[1:])
	}
	if err := n.Stop(time.Second); err == nil {
		t.Error("Stop of a process that exited with 3: no error")
	}
}

func TestStop(t *testing.T) {
	bin, dir := script(t, `trap 'exit 0' TERM; echo up; while :; do sleep 0.05; done`)
	n := run(t, bin, dir)
	waitLog(t, n, "up")
	if err := n.Stop(5 * time.Second); err != nil || !n.Exited() {
		t.Errorf("Stop of a process that exits on SIGTERM: %v (exited %v)", err, n.Exited())
	}

	bin, dir = script(t, `trap '' TERM; echo up; while :; do sleep 0.05; done`)
	n = run(t, bin, dir)
	waitLog(t, n, "up")
	if err := n.Stop(200 * time.Millisecond); err == nil || !strings.Contains(err.Error(), "killed") {
		t.Errorf("Stop of a process ignoring SIGTERM: %v, want killed", err)
	}
	if !n.Exited() {
		t.Error("the process still runs after Stop")
	}
}

// waitLog waits until the node's log ends with line, so the script's trap is set.
func waitLog(t *testing.T, n *Node, line string) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !slices.Equal(n.LogTail(1), []string{line}) {
		if time.Now().After(deadline) {
			t.Fatalf("log never showed %q: %q", line, n.LogTail(5))
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestPortTaken: Start refuses to run a node whose port another process accepts on, instead
// of taking that process's readiness answer for the node's.
func TestPortTaken(t *testing.T) {
	bin, dir := script(t, `echo started; exit 0`)
	// If the listen fails, something else holds the port already; Start must refuse either way.
	if ln, err := net.Listen("tcp", "127.0.9.2:15021"); err == nil {
		defer ln.Close()
	}
	n, err := Start(Config{Bin: bin, Name: "node-y", Host: "127.0.9.2", Mesh: filepath.Join(dir, "mesh.yaml"),
		CADir: filepath.Join(dir, "ca"), LogPath: filepath.Join(dir, "node-y.log")})
	if err == nil {
		n.Stop(time.Second)
		t.Fatal("Start with the readiness port taken: no error")
	}
	if !strings.Contains(err.Error(), "address already in use") {
		t.Errorf("Start with the readiness port taken: %v", err)
	}
	if _, err := os.Stat(filepath.Join(dir, "node-y.log")); !os.IsNotExist(err) {
		t.Errorf("the node was started anyway (log: %v)", err)
	}
}
