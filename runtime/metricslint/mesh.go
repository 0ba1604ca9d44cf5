package metricslint

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/netip"
	"sync"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	"golang.org/x/net/dns/dnsmessage"

	"github.com/ztgo/ztgo/e2e/socks5"
	"github.com/ztgo/ztgo/runtime/node"
)

// meshYAML is the mesh of Mesh: a client and an echo server, both HBONE and both on this
// node, and a service in front of the server. %[1]d is the subnet, %[2]d the server's port.
const meshYAML = `
workloads:
- uid: Kubernetes//v1/Pod/default/client
  name: client-7d9
  workloadName: client
  namespace: default
  serviceAccount: client
  canonicalName: client
  canonicalRevision: v1
  workloadIps: ["127.80.%[1]d.10"]
  protocol: HBONE
  node: metricslint
- uid: Kubernetes//v1/Pod/default/echo
  name: echo-5c4
  workloadName: echo
  namespace: default
  serviceAccount: echo
  canonicalName: echo
  canonicalRevision: v2
  workloadIps: ["127.80.%[1]d.20"]
  protocol: HBONE
  node: metricslint
  services:
    "default/echo.default.svc.cluster.local": {80: %[2]d}
services:
- name: echo
  namespace: default
  hostname: echo.default.svc.cluster.local
  vips: ["/127.80.%[1]d.100"]
  ports: {80: %[2]d}
`

// Mesh is one running ztgo node in loopback mode with a client workload (127.80.<subnet>.10),
// an echo server workload (127.80.<subnet>.20, behind service VIP 127.80.<subnet>.100:80) and
// the echo application itself. Flows go client -> SOCKS5 -> HBONE -> the node's own inbound
// listener -> echo, so one flow is reported by both reporters (source and destination).
type Mesh struct {
	Node *node.Node

	client, server, vip netip.Addr
	echo                net.Listener
	wg                  sync.WaitGroup
}

// StartMesh starts a Mesh on 127.80.<subnet>.0/24. Tests that may run at the same time (the
// packages of one `go test` run do) must use different subnets. Cleanup stops everything.
func StartMesh(tb testing.TB, subnet int) *Mesh {
	tb.Helper()
	if subnet < 1 || subnet > 254 {
		tb.Fatalf("subnet %d: want 1..254", subnet)
	}
	ip := func(host int) netip.Addr { return netip.AddrFrom4([4]byte{127, 80, byte(subnet), byte(host)}) }
	m := &Mesh{client: ip(10), server: ip(20), vip: ip(100)}
	ln, err := net.Listen("tcp", netip.AddrPortFrom(m.server, 0).String())
	if err != nil {
		tb.Fatal(err)
	}
	m.echo = ln
	m.wg.Add(1)
	go m.serveEcho()
	tb.Cleanup(func() {
		ln.Close()
		m.wg.Wait()
	})

	port := ln.Addr().(*net.TCPAddr).Port
	n, err := node.New(node.Config{
		Name:         "metricslint",
		ConfigInline: fmt.Sprintf(meshYAML, subnet, port),
		SOCKS5Addr:   netip.AddrPortFrom(ip(1), 0).String(),
		DNSAddr:      netip.AddrPortFrom(ip(1), 0).String(),
		// Nothing listens there: a forwarded query fails at once (port unreachable).
		DNSUpstreams: []string{netip.AddrPortFrom(ip(53), 53).String()},
		DrainTimeout: time.Second,
	})
	if err != nil {
		tb.Fatal(err)
	}
	if err := n.Start(context.Background()); err != nil {
		n.Stop(context.Background())
		tb.Fatal(err)
	}
	tb.Cleanup(func() { n.Stop(context.Background()) })
	m.Node = n
	return m
}

// serveEcho echoes every connection until the client half-closes it.
func (m *Mesh) serveEcho() {
	defer m.wg.Done()
	var conns sync.WaitGroup
	defer conns.Wait()
	for {
		c, err := m.echo.Accept()
		if err != nil {
			return
		}
		conns.Add(1)
		go func() {
			defer conns.Done()
			defer c.Close()
			c.SetDeadline(time.Now().Add(30 * time.Second))
			io.Copy(c, c)
		}()
	}
}

// Echo runs one flow from the client through the service VIP to the echo server: it sends a
// message, reads it back and closes.
func (m *Mesh) Echo(tb testing.TB) {
	tb.Helper()
	c, reply, err := m.socks(netip.AddrPortFrom(m.vip, 80))
	if err != nil || reply != socks5.ReplySucceeded {
		tb.Fatalf("echo flow: %v (reply %s)", err, socks5.ReplyText(reply))
	}
	defer c.Close()
	msg := []byte("metricslint")
	if _, err := c.Write(msg); err != nil {
		tb.Fatalf("echo flow: write: %v", err)
	}
	c.CloseWrite()
	got, err := io.ReadAll(c)
	if err != nil || string(got) != string(msg) {
		tb.Fatalf("echo flow: read %q, %v; want %q", got, err, msg)
	}
}

// Refused runs one flow from the client to a port of the server where nothing listens, which
// fails (response_flags CONNECT).
func (m *Mesh) Refused(tb testing.TB) {
	tb.Helper()
	ln, err := net.Listen("tcp", netip.AddrPortFrom(m.server, 0).String())
	if err != nil {
		tb.Fatal(err)
	}
	closed := netip.MustParseAddrPort(ln.Addr().String())
	ln.Close()
	c, reply, err := m.socks(closed)
	if err != nil {
		tb.Fatalf("refused flow: %v", err)
	}
	if reply == socks5.ReplySucceeded {
		c.Close()
		tb.Fatalf("flow to %s (nothing listening) succeeded", closed)
	}
}

// DNS sends the node's DNS proxy, from the client workload, a query it answers (the echo
// service) and one it forwards to an upstream that is down (SERVFAIL), so every istio_dns_*
// family has a series.
func (m *Mesh) DNS(tb testing.TB) {
	tb.Helper()
	for i, name := range []string{"echo.default.svc.cluster.local.", "example.invalid."} {
		b := dnsmessage.NewBuilder(nil, dnsmessage.Header{ID: uint16(i + 1), RecursionDesired: true})
		b.StartQuestions()
		b.Question(dnsmessage.Question{Name: dnsmessage.MustNewName(name), Type: dnsmessage.TypeA, Class: dnsmessage.ClassINET})
		req, err := b.Finish()
		if err != nil {
			tb.Fatal(err)
		}
		d := net.Dialer{LocalAddr: net.UDPAddrFromAddrPort(netip.AddrPortFrom(m.client, 0)), Timeout: 5 * time.Second}
		c, err := d.Dial("udp", m.Node.DNSAddr())
		if err != nil {
			tb.Fatal(err)
		}
		c.SetDeadline(time.Now().Add(10 * time.Second))
		if _, err := c.Write(req); err != nil {
			c.Close()
			tb.Fatal(err)
		}
		buf := make([]byte, 1500)
		_, err = c.Read(buf)
		c.Close()
		if err != nil {
			tb.Fatalf("dns query %s: %v", name, err)
		}
	}
}

// Gather returns what the node's registry gathers now.
func (m *Mesh) Gather(tb testing.TB) []*dto.MetricFamily {
	tb.Helper()
	mfs, err := m.Node.Registry().Gather()
	if err != nil {
		tb.Fatalf("gather: %v", err)
	}
	return mfs
}

// Families starts a Mesh on 127.80.<subnet>.0/24, drives an echo flow and a refused flow, and
// returns the node's metric families once both flows have been counted by both reporters
// (the access log and the stage histograms are written when a flow ends, after the client
// sees it end). The node keeps running until the test's cleanup, so its registry can be read
// again (Mesh.Gather).
func Families(tb testing.TB, subnet int) (*Mesh, []*dto.MetricFamily) {
	tb.Helper()
	m := StartMesh(tb, subnet)
	m.Echo(tb)
	m.Refused(tb)
	m.DNS(tb)
	deadline := time.Now().Add(10 * time.Second)
	for {
		mfs := m.Gather(tb)
		if counted(mfs, "istio_tcp_connections_closed_total") && counted(mfs, "istio_tcp_connections_failed_total") {
			return m, mfs
		}
		if time.Now().After(deadline) {
			tb.Fatal("flows not counted by both reporters within 10s")
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// counted reports whether family has a series with a nonzero value for both reporters.
func counted(mfs []*dto.MetricFamily, family string) bool {
	seen := map[string]bool{}
	for _, mf := range mfs {
		if mf.GetName() != family {
			continue
		}
		for _, s := range mf.GetMetric() {
			if s.GetCounter().GetValue() == 0 {
				continue
			}
			for _, l := range s.GetLabel() {
				if l.GetName() == "reporter" {
					seen[l.GetValue()] = true
				}
			}
		}
	}
	return seen["source"] && seen["destination"]
}

// socks opens a flow from the client workload to target through the node's SOCKS5 entry. A
// reply other than "succeeded" comes back as reply with a nil connection.
func (m *Mesh) socks(target netip.AddrPort) (c *net.TCPConn, reply byte, err error) {
	d := &net.Dialer{LocalAddr: net.TCPAddrFromAddrPort(netip.AddrPortFrom(m.client, 0)), Timeout: 10 * time.Second}
	res, err := socks5.Dial(context.Background(), d, m.Node.SOCKS5Addr(), target.String(), 15*time.Second)
	return res.Conn, res.Reply, err
}
