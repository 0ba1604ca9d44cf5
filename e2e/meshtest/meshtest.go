// Package meshtest holds helpers for ztgo's end-to-end tests: in-process nodes stopped with
// the test and logging into its log, workload certificates from ztgo's CA and an mTLS client
// config that checks the peer's SPIFFE identity, a SOCKS5 client that binds a workload's source
// address (over e2e/socks5), TCP applications standing in for workloads, a check that no
// goroutine of ztgo's packages outlives a test, and small waiting and payload helpers.
//
// It imports "testing" and is imported only by test files (e2e/...), never by ztgo's binaries.
package meshtest

import (
	"encoding/binary"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"testing"
	"time"
)

// WaitFor polls cond every 10ms and fails the test if it is still false after d.
func WaitFor(t testing.TB, d time.Duration, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("condition not met in %v", d)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// RandomBytes returns n pseudo-random bytes, the same for the same seed.
func RandomBytes(n int, seed uint64) []byte {
	var s [32]byte
	binary.LittleEndian.PutUint64(s[:], seed)
	b := make([]byte, n)
	rand.NewChaCha8(s).Read(b) // never fails
	return b
}

// RoundTrip writes data on c and half-closes it while reading what comes back until EOF,
// and returns that. The caller sets any deadline on c.
func RoundTrip(c *net.TCPConn, data []byte) ([]byte, error) {
	werr := make(chan error, 1)
	go func() {
		_, err := c.Write(data)
		if err == nil {
			err = c.CloseWrite() // the peer sees EOF; the reverse direction stays open
		}
		werr <- err
	}()
	got, rerr := io.ReadAll(c)
	if err := <-werr; err != nil {
		return got, fmt.Errorf("write: %w", err)
	}
	if rerr != nil {
		return got, fmt.Errorf("read after %d bytes: %w", len(got), rerr)
	}
	return got, nil
}
