package redirect

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// TestPrivilegedCapture runs real traffic through the capture rules: pods A and B behind a
// node namespace, rules installed in A, ztgo's listeners opened in A by the SocketFactory,
// and applications that know nothing about ztgo.
func TestPrivilegedCapture(t *testing.T) {
	requireRoot(t)
	tp := newTopology(t)

	// The kubelet probe address is configurable; the test uses one inside 198.18.0.0/15
	// (on pod B) so that the probe bypass can be exercised without other addresses.
	probe := netip.MustParseAddr("198.18.2.127")
	cfg := RuleConfig{ProbeSNAT: probe}
	if err := Install(tp.a, cfg); err != nil {
		t.Fatalf("install in pod A: %v", err)
	}
	t.Cleanup(func() {
		if err := Remove(tp.a); err != nil {
			t.Errorf("remove: %v", err)
		}
	})
	if drift, err := Check(tp.a, cfg); err != nil || len(drift) != 0 {
		t.Fatalf("drift %q, err %v", drift, err)
	}

	f, err := NewSocketFactory(tp.a, SocketConfig{ConnectTimeout: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	ls, err := f.ListenAll()
	if err != nil {
		t.Fatalf("listeners in pod A: %v", err)
	}
	t.Cleanup(func() { ls.Close() })
	if len(ls.DNSTCP) != 2 || len(ls.DNSUDP) != 2 {
		t.Fatalf("DNS listeners: %d tcp, %d udp; want 127.0.0.1 and ::1 each", len(ls.DNSTCP), len(ls.DNSUDP))
	}

	const wait = 5 * time.Second
	const quiet = 300 * time.Millisecond

	t.Run("outbound", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		appB := listenIn(t, tp.b, "198.18.2.2:8080")
		dst := netip.AddrPortFrom(tp.ipB, 8080)

		client := dialIn(t, tp.a, "tcp", netip.Addr{}, dst)
		captured := accept(t, ls.Outbound, wait)
		orig, err := OriginalDst(captured)
		if err != nil {
			t.Fatal(err)
		}
		if orig != dst {
			t.Fatalf("original dst %s, want %s", orig, dst)
		}
		if got := remoteIP(captured); got != tp.ipA {
			t.Fatalf("captured connection from %s, want pod A %s", got, tp.ipA)
		}

		// ztgo's upstream connection from pod A carries the mark: not captured again.
		up, err := f.Dial(ctx, orig)
		if err != nil {
			t.Fatalf("upstream dial: %v", err)
		}
		defer up.Close()
		server := accept(t, appB, wait)
		if got := remoteIP(server); got != tp.ipA {
			t.Fatalf("pod B's app sees %s, want pod A %s", got, tp.ipA)
		}
		expectNoAccept(t, ls.Outbound, quiet)

		echo(server)
		relay(ctx, captured, up)
		roundTrip(t, client, client, "hello B", "hello B")

		// Control: the same dial without the mark is captured by pod A's own rules.
		unmarked, err := NewSocketFactory(tp.a, SocketConfig{NoMark: true})
		if err != nil {
			t.Fatal(err)
		}
		loop, err := unmarked.Dial(ctx, orig)
		if err != nil {
			t.Fatalf("unmarked dial: %v", err)
		}
		defer loop.Close()
		again := accept(t, ls.Outbound, wait)
		if o, _ := OriginalDst(again); o != dst {
			t.Fatalf("unmarked connection captured with original dst %s, want %s", o, dst)
		}
		expectNoAccept(t, appB, quiet)
	})

	t.Run("inbound plaintext keeps the source address", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		appA := listenIn(t, tp.a, "198.18.1.2:9090")
		dst := netip.AddrPortFrom(tp.ipA, 9090)

		client := dialIn(t, tp.b, "tcp", netip.Addr{}, dst)
		captured := accept(t, ls.InboundPlaintext, wait)
		orig, err := OriginalDst(captured)
		if err != nil {
			t.Fatal(err)
		}
		if orig != dst {
			t.Fatalf("original dst %s, want %s", orig, dst)
		}
		src := remoteIP(captured)
		if src != tp.ipB {
			t.Fatalf("captured connection from %s, want pod B %s", src, tp.ipB)
		}
		expectNoAccept(t, appA, quiet) // the app saw nothing directly

		// Deliver to the app with pod B's address as the source.
		up, err := f.DialTransparent(ctx, src, orig)
		if err != nil {
			t.Fatalf("transparent dial: %v", err)
		}
		defer up.Close()
		if got := up.LocalAddr().(*net.TCPAddr).AddrPort().Addr().Unmap(); got != tp.ipB {
			t.Fatalf("upstream bound to %s, want %s", got, tp.ipB)
		}
		server := accept(t, appA, wait)
		if got := remoteIP(server); got != tp.ipB {
			t.Fatalf("pod A's app sees %s, want pod B %s", got, tp.ipB)
		}
		expectNoAccept(t, ls.InboundPlaintext, quiet) // not captured a second time

		// Bytes flow both ways: the app's replies to pod B's address come back to ztgo's
		// transparent socket through the connmark and table 100.
		echo(server)
		relay(ctx, captured, up)
		roundTrip(t, client, client, "hello A", "hello A")
	})

	t.Run("transparent return path needs the policy routing", func(t *testing.T) {
		// Control: without "fwmark 0x111/0xfff lookup 100" the app's SYN-ACK to pod B's
		// address is routed out to the real pod B, so the spoofed connect never completes.
		appA := listenIn(t, tp.a, "198.18.1.2:9093")
		hs, err := openSession(tp.a)
		if err != nil {
			t.Fatal(err)
		}
		defer hs.close()
		if err := hs.rt.RuleDel(wantRule(unix.AF_INET)); err != nil {
			t.Fatal(err)
		}
		defer func() {
			if err := Install(tp.a, cfg); err != nil {
				t.Errorf("reinstall: %v", err)
			}
		}()
		short, err := NewSocketFactory(tp.a, SocketConfig{ConnectTimeout: time.Second})
		if err != nil {
			t.Fatal(err)
		}
		c, err := short.DialTransparent(context.Background(), tp.ipB, netip.AddrPortFrom(tp.ipA, 9093))
		if err == nil {
			c.Close()
			t.Fatal("spoofed connect completed without the policy rule")
		}
		if !errors.Is(err, ErrConnectTimeout) {
			t.Fatalf("want a connect timeout, got %v", err)
		}
		// The app did get the SYN: the forward path does not depend on the rule.
		if err := appA.SetDeadline(time.Now().Add(quiet)); err != nil {
			t.Fatal(err)
		}
		if c, err := appA.Accept(); err == nil {
			c.Close()
		}
	})

	t.Run("HBONE port is not redirected", func(t *testing.T) {
		dst := netip.AddrPortFrom(tp.ipA, PortInboundHBONE)
		client := dialIn(t, tp.b, "tcp", netip.Addr{}, dst)
		c := accept(t, ls.InboundHBONE, wait)
		orig, err := OriginalDst(c)
		if err != nil {
			t.Fatal(err)
		}
		if orig != dst {
			t.Fatalf("original dst %s, want %s", orig, dst)
		}
		expectNoAccept(t, ls.InboundPlaintext, quiet)
		client.Close()
	})

	t.Run("kubelet probe source bypasses capture", func(t *testing.T) {
		hb := nlHandle(t, tp.b)
		eth0, err := hb.LinkByName("eth0")
		if err != nil {
			t.Fatal(err)
		}
		if err := hb.AddrAdd(eth0, prefix(probe.String()+"/32")); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { hb.AddrDel(eth0, prefix(probe.String()+"/32")) })
		appA := listenIn(t, tp.a, "198.18.1.2:9091")
		client := dialIn(t, tp.b, "tcp", probe, netip.AddrPortFrom(tp.ipA, 9091))
		server := accept(t, appA, wait)
		if got := remoteIP(server); got != probe {
			t.Fatalf("app sees %s, want the probe address %s", got, probe)
		}
		expectNoAccept(t, ls.InboundPlaintext, quiet)
		echo(server)
		roundTrip(t, client, client, "probe", "probe")
	})

	t.Run("DNS over UDP lands on 15053", func(t *testing.T) {
		// 1.1.1.1 is only a destination the app believes in: the rule rewrites it inside
		// pod A before routing; the node has no route out anyway.
		resolver := netip.MustParseAddrPort("1.1.1.1:53")
		client := dialIn(t, tp.a, "udp", netip.Addr{}, resolver)
		client.SetDeadline(time.Now().Add(wait))
		if _, err := client.Write([]byte("query")); err != nil {
			t.Fatal(err)
		}
		dns := ls.DNSUDP[0] // 127.0.0.1:15053
		dns.SetDeadline(time.Now().Add(wait))
		buf := make([]byte, 64)
		n, from, err := dns.ReadFromUDPAddrPort(buf)
		if err != nil {
			t.Fatalf("DNS socket: %v", err)
		}
		if string(buf[:n]) != "query" || from.Addr().Unmap() != tp.ipA {
			t.Fatalf("DNS socket got %q from %s", buf[:n], from)
		}
		// The answer reaches the app as if from 1.1.1.1:53 (its socket is connected there).
		if _, err := dns.WriteToUDPAddrPort([]byte("answer"), from); err != nil {
			t.Fatal(err)
		}
		n, err = client.Read(buf)
		if err != nil || string(buf[:n]) != "answer" {
			t.Fatalf("client read %q, %v", buf[:n], err)
		}
	})

	t.Run("DNS over TCP lands on 15053", func(t *testing.T) {
		resolver := netip.MustParseAddrPort("1.1.1.1:53")
		client := dialIn(t, tp.a, "tcp", netip.Addr{}, resolver)
		c := accept(t, ls.DNSTCP[0], wait)
		orig, err := OriginalDst(c)
		if err != nil {
			t.Fatal(err)
		}
		if orig != resolver {
			t.Fatalf("original dst %s, want %s", orig, resolver)
		}
		expectNoAccept(t, ls.Outbound, quiet)
		echo(c)
		roundTrip(t, client, client, "dns", "dns")
	})

	t.Run("pod to its own address is not captured", func(t *testing.T) {
		appA := listenIn(t, tp.a, "198.18.1.2:9092")
		client := dialIn(t, tp.a, "tcp", netip.Addr{}, netip.AddrPortFrom(tp.ipA, 9092))
		server := accept(t, appA, wait)
		expectNoAccept(t, ls.Outbound, quiet)
		echo(server)
		roundTrip(t, client, client, "self", "self")
	})
}
