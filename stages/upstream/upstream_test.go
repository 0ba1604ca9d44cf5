package upstream

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"testing"
	"time"
)

func TestDialBindsSourceOnLoopback(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	got := make(chan string, 1)
	go func() {
		c, err := ln.Accept()
		if err == nil {
			got <- c.RemoteAddr().(*net.TCPAddr).IP.String()
			c.Close()
		}
	}()
	d := New(Config{})
	// Any 127/8 address is local on Linux, so the client's address is kept without privileges.
	c, spoofed, err := d.Dial(context.Background(), netip.MustParseAddr("127.0.0.77"), netip.MustParseAddrPort(ln.Addr().String()), true)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if !spoofed || <-got != "127.0.0.77" {
		t.Fatal("server did not see the bound source address")
	}
}

func TestDialNonLocalSourceFallsBack(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		if c, err := ln.Accept(); err == nil {
			c.Close()
		}
	}()
	d := New(Config{})
	// 198.18.0.1 is not on this host and transparency is off: the dial must still work.
	c, spoofed, err := d.Dial(context.Background(), netip.MustParseAddr("198.18.0.1"), netip.MustParseAddrPort(ln.Addr().String()), true)
	if err != nil {
		t.Fatal(err)
	}
	c.Close()
	if spoofed {
		t.Fatal("reported a spoofed source that was not bound")
	}
}

func TestDialRefused(t *testing.T) {
	ln, _ := net.Listen("tcp", "127.0.0.1:0")
	addr := netip.MustParseAddrPort(ln.Addr().String())
	ln.Close()
	d := New(Config{ConnectTimeout: time.Second})
	if _, _, err := d.Dial(context.Background(), netip.Addr{}, addr, false); err == nil || errors.Is(err, ErrTimeout) {
		t.Fatalf("want connection refused, got %v", err)
	}
}
