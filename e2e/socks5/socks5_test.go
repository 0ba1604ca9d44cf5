package socks5

import (
	"context"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/ztgo/ztgo/stages/capture"
)

// TestHandshake runs the client against ztgo's own SOCKS5 server code: the server must read
// the target the client meant, and the client the reply and bound address the server sent.
func TestHandshake(t *testing.T) {
	for _, tc := range []struct {
		host  string
		port  uint16
		reply byte
		bound string
		want  capture.Target
	}{
		{"echo.default.svc.cluster.local", 80, capture.ReplySucceeded, "127.0.0.7:4242", capture.Target{Host: "echo.default.svc.cluster.local", Port: 80}},
		{"127.0.2.20", 5432, capture.ReplyNotAllowed, "127.0.0.7:4242", capture.Target{Addr: netip.MustParseAddrPort("127.0.2.20:5432")}},
		{"fd00::1", 8080, capture.ReplySucceeded, "[fd00::7]:4242", capture.Target{Addr: netip.MustParseAddrPort("[fd00::1]:8080")}},
		{"::ffff:127.0.0.1", 9, capture.ReplyConnectionRefused, "127.0.0.7:4242", capture.Target{Addr: netip.MustParseAddrPort("127.0.0.1:9")}},
	} {
		cli, srv := net.Pipe()
		got := make(chan capture.Target, 1)
		go func() {
			defer srv.Close()
			target, err := capture.Handshake(srv)
			if err != nil {
				t.Errorf("%s: server: %v", tc.host, err)
			}
			got <- target
			capture.WriteReply(srv, tc.reply, netip.MustParseAddrPort(tc.bound))
		}()
		reply, bound, err := Handshake(cli, tc.host, tc.port)
		cli.Close()
		if err != nil {
			t.Fatalf("%s: %v", tc.host, err)
		}
		if target := <-got; target != tc.want {
			t.Errorf("%s: server saw %+v, want %+v", tc.host, target, tc.want)
		}
		if reply != tc.reply || bound.String() != tc.bound {
			t.Errorf("%s: reply %d bound %s, want %d %s", tc.host, reply, bound, tc.reply, tc.bound)
		}
	}
	if _, _, err := Handshake(nil, "", 80); err == nil {
		t.Error("empty host name: no error")
	}
}

// TestDial checks what Dial returns for a success and for a refusal, against a server that
// runs ztgo's SOCKS5 server code and then echoes.
func TestDial(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				target, err := capture.Handshake(c)
				if err != nil {
					return
				}
				if target.Host == "denied" {
					capture.WriteReply(c, capture.ReplyNotAllowed, netip.AddrPort{})
					return
				}
				capture.WriteReply(c, capture.ReplySucceeded, netip.MustParseAddrPort("127.0.0.7:4242"))
				buf := make([]byte, 5)
				n, _ := c.Read(buf)
				c.Write(buf[:n])
			}()
		}
	}()
	d := &net.Dialer{Timeout: 5 * time.Second}
	res, err := Dial(context.Background(), d, ln.Addr().String(), "allowed:80", 5*time.Second)
	if err != nil || res.Reply != ReplySucceeded || res.Conn == nil {
		t.Fatalf("allowed: %+v, %v", res, err)
	}
	defer res.Conn.Close()
	if res.Local != res.Conn.LocalAddr().(*net.TCPAddr).AddrPort() || res.Bound.String() != "127.0.0.7:4242" {
		t.Errorf("allowed: local %s bound %s, want %s and 127.0.0.7:4242", res.Local, res.Bound, res.Conn.LocalAddr())
	}
	res.Conn.Write([]byte("hello"))
	buf := make([]byte, 5)
	if _, err := res.Conn.Read(buf); err != nil || string(buf) != "hello" {
		t.Errorf("after the handshake: read %q, %v; want the echo", buf, err)
	}

	res, err = Dial(context.Background(), d, ln.Addr().String(), "denied:80", 5*time.Second)
	if err != nil || res.Reply != ReplyNotAllowed || res.Conn != nil || !res.Local.IsValid() {
		t.Errorf("denied: %+v, %v; want reply 2, no connection, the local address", res, err)
	}
	if _, err := Dial(context.Background(), d, ln.Addr().String(), "no-port", 5*time.Second); err == nil {
		t.Error("target without a port: no error")
	}
}
