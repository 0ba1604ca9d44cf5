package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net/netip"
	"strings"
	"time"

	"github.com/ztgo/ztgo/e2e/socks5"
)

const (
	opTimeout = 5 * time.Second // every dial, handshake and exchange
	blobSize  = 1 << 20
)

// flowResult is what the client, the apps and the two nodes saw of one demo flow.
type flowResult struct {
	n      int
	target string // what the client asked SOCKS5 for
	what   string // e.g. "by service name"
	expect string // "allowed", "denied" or "passthrough"

	local        netip.AddrPort // the client's socket: node-a records it as the flow's src
	reply        byte
	replied      bool
	sent, recv   int64 // bytes written and read by the client after the SOCKS5 exchange
	greetingPeer string
	msgEchoed    bool
	sum          string // hex SHA-256 of what the client sent
	appSum       string // of what the app received
	echoSum      string // of what came back (after the greeting)
	eof          bool   // the half-close came back as EOF
	app          *connRecord
	appConns     int64 // connections the destination app accepted (deny: must stay 0)

	onA, onB *flowRecord // the flow in node-a's and node-b's /debug/flows

	failures []string
}

func (r *flowResult) fail(format string, args ...any) {
	r.failures = append(r.failures, fmt.Sprintf(format, args...))
}

func (r *flowResult) ok() bool { return len(r.failures) == 0 }

// echoFlow asks for target through socks, exchanges a line and then, with blob set, 1 MiB,
// half-closes and expects the app to do the same. It checks what the client can check; the
// app's view is filled in by the caller.
func echoFlow(ctx context.Context, r *flowResult, socks string, host string, port uint16, payload []byte) {
	sc, err := socksDial(ctx, socks, netip.MustParseAddr(clientIP), host, port, opTimeout)
	r.local = sc.Local
	if err != nil {
		r.fail("%v", err)
		return
	}
	r.reply, r.replied = sc.Reply, true
	if sc.Reply != 0 {
		r.fail("SOCKS5 reply %d (%s), want 0", sc.Reply, socks5.ReplyText(sc.Reply))
		return
	}
	c := sc.Conn
	defer c.Close()
	defer context.AfterFunc(ctx, func() { c.Close() })() // an interrupt ends the exchange at once
	c.SetDeadline(time.Now().Add(2 * opTimeout))
	br := bufio.NewReader(c)
	line, err := br.ReadString('\n')
	r.recv += int64(len(line))
	if err != nil {
		r.fail("read the app's greeting: %v", err)
		return
	}
	if _, peer, ok := strings.Cut(strings.TrimSpace(line), "you are "); ok {
		r.greetingPeer = peer
	}

	msg := []byte("hello from client through ztgo\n")
	sent := sha256.New()
	back := sha256.New()
	n, err := c.Write(msg)
	r.sent += int64(n)
	sent.Write(msg[:n])
	if err != nil {
		r.fail("write: %v", err)
		return
	}
	echo := make([]byte, len(msg))
	n, err = io.ReadFull(br, echo)
	r.recv += int64(n)
	back.Write(echo[:n])
	if err != nil {
		r.fail("read the echo: %v", err)
		return
	}
	r.msgEchoed = bytes.Equal(echo, msg)
	if !r.msgEchoed {
		r.fail("echo differs: sent %q, got %q", msg, echo)
	}

	// The payload goes out while the echo comes back, then the write side is closed; the app
	// closes its side when it has echoed everything.
	sent.Write(payload)
	werr := make(chan error, 1)
	go func() {
		n, err := c.Write(payload)
		r.sent += int64(n)
		if err == nil {
			err = c.CloseWrite()
		}
		werr <- err
	}()
	got, rerr := io.Copy(back, br)
	r.recv += got
	if err := <-werr; err != nil {
		r.fail("write %d bytes: %v", len(payload), err)
	}
	switch {
	case rerr != nil && isTimeout(rerr):
		r.fail("no EOF from the app within %s of the client's half-close (%d of %d bytes back)", 2*opTimeout, got, len(payload))
	case rerr != nil:
		r.fail("read the echo: %v", rerr)
	default:
		r.eof = true
	}
	r.sum = hex.EncodeToString(sent.Sum(nil))
	r.echoSum = hex.EncodeToString(back.Sum(nil))
	if got != int64(len(payload)) {
		r.fail("echoed %d of %d bytes", got, len(payload))
	} else if r.echoSum != r.sum {
		r.fail("SHA-256 of the echo %.12s differs from what was sent %.12s", r.echoSum, r.sum)
	}
}

// checkApp waits for the app's record of the connection and compares it with the client's.
func checkApp(r *flowResult, a *echoApp) {
	rec, ok := a.next(opTimeout)
	if !ok {
		r.fail("app %s recorded no finished connection", a.name)
		return
	}
	r.app = &rec
	r.appSum = hex.EncodeToString(rec.InSum[:])
	if rec.Err != nil {
		r.fail("app %s: %v", a.name, rec.Err)
	}
	if r.sum != "" && r.appSum != r.sum {
		r.fail("SHA-256 of what app %s received %.12s differs from what was sent %.12s (%d of %d bytes)", a.name, r.appSum, r.sum, rec.In, r.sent)
	}
	peer, err := netip.ParseAddrPort(rec.Peer)
	if err != nil || peer.Addr().String() != clientIP {
		r.fail("app %s saw the client as %s, want %s", a.name, rec.Peer, clientIP)
	}
}

// denyFlow asks for target and expects SOCKS5 reply 2 (not allowed).
func denyFlow(ctx context.Context, r *flowResult, socks string, host string, port uint16) {
	sc, err := socksDial(ctx, socks, netip.MustParseAddr(clientIP), host, port, opTimeout)
	r.local = sc.Local
	if err != nil {
		r.fail("%v", err)
		return
	}
	r.reply, r.replied = sc.Reply, true
	if sc.Reply == 0 {
		sc.Conn.Close()
	}
	if sc.Reply != 2 {
		r.fail("SOCKS5 reply %d (%s), want 2 (%s)", sc.Reply, socks5.ReplyText(sc.Reply), socks5.ReplyText(2))
	}
}

// randomBytes returns n pseudo-random bytes.
func randomBytes(n int) []byte {
	b := make([]byte, n)
	rng := rand.NewChaCha8([32]byte{'z', 't', 'g', 'o'})
	rng.Read(b)
	return b
}

// collectFlows polls both nodes' /debug/flows until every flow has its records (a flow is
// recorded when it ends) or timeout passes.
func collectFlows(a, b *ztgoNode, results []*flowResult, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		fa, errA := a.flows()
		fb, errB := b.flows()
		missing := matchFlows(fa, fb, results)
		if missing == 0 {
			return nil
		}
		if time.Now().After(deadline) {
			if err := errors.Join(errA, errB); err != nil {
				return err
			}
			return fmt.Errorf("%d flow records missing from /debug/flows after %s", missing, timeout)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// matchFlows finds each result's records: on node-a the outbound flow whose src is the client's
// socket, on node-b the inbound flow carrying the same traceparent (passthrough flows never
// reach node-b). It returns how many expected records are still missing.
func matchFlows(onA, onB []flowRecord, results []*flowResult) int {
	missing := 0
	for _, r := range results {
		r.onA, r.onB = nil, nil
		for i := range onA {
			if onA[i].Direction == "outbound" && r.local.IsValid() && onA[i].Src == r.local.String() {
				r.onA = &onA[i]
				break
			}
		}
		if r.onA == nil {
			missing++
		}
		if r.expect == "passthrough" {
			continue
		}
		if r.onA != nil && r.onA.TraceParent != "" {
			for i := range onB {
				if onB[i].Direction == "inbound" && onB[i].TraceParent == r.onA.TraceParent {
					r.onB = &onB[i]
					break
				}
			}
		}
		if r.onB == nil {
			missing++
		}
	}
	return missing
}
