package redirect

import (
	"context"
	"net"
	"testing"
)

// BenchmarkNetnsDo measures entering a pod namespace and coming back: the fixed cost every
// in-pod socket pays.
func BenchmarkNetnsDo(b *testing.B) {
	requireRoot(b)
	ns := newTestNetns(b)
	b.ReportAllocs()
	for b.Loop() {
		if err := ns.Do(func() error { return nil }); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkDialInPod measures an upstream dial from inside a pod namespace (socket created in
// the namespace, connect on the netpoller) to a listener in that namespace, next to a plain
// Go dial in the process's own namespace.
func BenchmarkDialInPod(b *testing.B) {
	requireRoot(b)
	ns := newTestNetns(b)
	var inPod net.Listener
	if err := ns.Do(func() error {
		var err error
		inPod, err = net.Listen("tcp", "127.0.0.1:0")
		return err
	}); err != nil {
		b.Fatal(err)
	}
	defer inPod.Close()
	here, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	defer here.Close()
	for _, ln := range []net.Listener{inPod, here} {
		go func() {
			for {
				c, err := ln.Accept()
				if err != nil {
					return
				}
				c.Close()
			}
		}()
	}
	f, err := NewSocketFactory(ns, SocketConfig{})
	if err != nil {
		b.Fatal(err)
	}
	ctx := context.Background()
	b.Run("factory", func(b *testing.B) {
		dst := inPod.Addr().(*net.TCPAddr).AddrPort()
		b.ReportAllocs()
		for b.Loop() {
			c, err := f.Dial(ctx, dst)
			if err != nil {
				b.Fatal(err)
			}
			c.Close()
		}
	})
	b.Run("plain", func(b *testing.B) {
		dst := here.Addr().String()
		b.ReportAllocs()
		for b.Loop() {
			c, err := net.Dial("tcp", dst)
			if err != nil {
				b.Fatal(err)
			}
			c.Close()
		}
	})
}
