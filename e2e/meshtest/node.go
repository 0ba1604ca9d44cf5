package meshtest

import (
	"context"
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/ztgo/ztgo/runtime/node"
)

// stopTimeout bounds the stop of a node started by StartNode.
const stopTimeout = 10 * time.Second

// Logger returns a logger of records at level and above that writes each one to the test's
// log, prefixed with [name].
func Logger(t testing.TB, name string, level slog.Level) *slog.Logger {
	return slog.New(slog.NewTextHandler(testWriter{t, name}, &slog.HandlerOptions{Level: level}))
}

type testWriter struct {
	t    testing.TB
	name string
}

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Logf("[%s] %s", w.name, strings.TrimSpace(string(p)))
	return len(p), nil
}

// StartNode creates and starts a ztgo node in this process from cfg, and stops it when the
// test ends; a failed stop fails the test.
func StartNode(t testing.TB, cfg node.Config) *node.Node {
	t.Helper()
	n, err := node.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := n.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), stopTimeout)
		defer cancel()
		if err := n.Stop(ctx); err != nil {
			t.Errorf("stop node %s: %v", cfg.Name, err)
		}
	})
	return n
}
