package dns

import (
	"encoding/binary"
	"io"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"golang.org/x/net/dns/dnsmessage"

	"github.com/ztgo/ztgo/control/snapshot"
)

var (
	clientIP = netip.MustParseAddr("127.81.0.10")
	otherIP  = netip.MustParseAddr("127.81.0.11") // client in namespace "other"
)

func testSnapshot(t testing.TB) *snapshot.Snapshot {
	t.Helper()
	svc := func(name, ns string, vis snapshot.Visibility, vips ...string) *snapshot.Service {
		s := &snapshot.Service{Name: name, Namespace: ns, Hostname: name + "." + ns + ".svc.cluster.local", Visibility: vis}
		for _, v := range vips {
			nw, a, _ := strings.Cut(v, "/")
			s.VIPs = append(s.VIPs, snapshot.NetworkAddress{Network: nw, Addr: netip.MustParseAddr(a)})
		}
		return s
	}
	ext := &snapshot.Service{Name: "ext", Namespace: "default", Hostname: "*.example.com",
		VIPs: []snapshot.NetworkAddress{{Addr: netip.MustParseAddr("10.9.0.1")}}}
	s, err := snapshot.Build(snapshot.Config{
		Workloads: []*snapshot.Workload{
			{Name: "client", Namespace: "default", Addresses: []netip.Addr{clientIP}, CanonicalName: "client", CanonicalRevision: "v1"},
			{Name: "other", Namespace: "other", Addresses: []netip.Addr{otherIP}},
		},
		Services: []*snapshot.Service{
			svc("echo", "default", snapshot.VisibilityPublic, "/10.0.0.1", "/10.0.0.2", "/fd00::1", "remote/10.1.0.1"),
			svc("v6only", "default", snapshot.VisibilityPublic, "/fd00::6"),
			svc("db", "other", snapshot.VisibilityPublic, "/10.0.1.1"),
			svc("private", "default", snapshot.VisibilityNamespace, "/10.0.2.1"),
			ext,
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func TestAliases(t *testing.T) {
	names := func(as []alias) []string {
		var out []string
		for _, a := range as {
			out = append(out, a.name)
		}
		return out
	}
	for _, tc := range []struct {
		name string
		want []string
	}{
		{"echo", []string{"echo", "echo.ns.svc.cluster.local"}},
		{"echo.other", []string{"echo.other", "echo.other.svc.cluster.local", "echo.other.ns.svc.cluster.local"}},
		{"echo.other.svc", []string{"echo.other.svc", "echo.other.svc.cluster.local", "echo.other.svc.svc.cluster.local"}},
		{"a.b.c.svc", []string{"a.b.c.svc", "a.b.c.svc.cluster.local"}},
		{"echo.ns.svc.cluster.local", []string{"echo.ns.svc.cluster.local", "echo", "echo.ns", "echo.ns.svc"}},
		{"foo.example.com", []string{"foo.example.com"}},
	} {
		got := names(aliases(tc.name, "ns", "cluster.local"))
		for _, w := range tc.want {
			if !slices.Contains(got, w) {
				t.Errorf("aliases(%q) = %v: missing %q", tc.name, got, w)
			}
		}
		if got[0] != tc.name {
			t.Errorf("aliases(%q)[0] = %q", tc.name, got[0])
		}
	}
}

func TestFindService(t *testing.T) {
	s := testSnapshot(t)
	for _, tc := range []struct {
		name, ns, want, stripped string
	}{
		{"echo", "default", "echo.default.svc.cluster.local", ""},
		{"echo.default", "other", "echo.default.svc.cluster.local", ""},
		{"echo.default.svc", "other", "echo.default.svc.cluster.local", ""},
		{"echo.default.svc.cluster.local", "other", "echo.default.svc.cluster.local", ""},
		{"db", "other", "db.other.svc.cluster.local", ""},
		{"db", "default", "", ""},
		// Search suffixes appended by the client's stub resolver.
		{"db.other.default.svc.cluster.local", "default", "db.other.svc.cluster.local", "db.other"},
		{"db.other.svc.cluster.local.cluster.local", "default", "db.other.svc.cluster.local", "db.other.svc.cluster.local"},
		{"private", "default", "private.default.svc.cluster.local", ""},
		{"private.default", "other", "", ""},
		{"www.example.com", "default", "*.example.com", ""},
		{"example.com", "default", "", ""},
		{"nope", "default", "", ""},
	} {
		m, ok := findService(s, tc.name, tc.ns, "cluster.local")
		got := ""
		if ok {
			got = m.svc.Hostname
		}
		if got != tc.want {
			t.Errorf("findService(%q, ns %s) = %q, want %q", tc.name, tc.ns, got, tc.want)
		}
		if ok && m.alias.stripped != tc.stripped {
			t.Errorf("findService(%q): stripped %q, want %q", tc.name, m.alias.stripped, tc.stripped)
		}
	}
}

func TestHandleAnswers(t *testing.T) {
	s := testSnapshot(t)
	srv, err := New(Config{Addr: "127.0.0.1:0", Snapshot: func() *snapshot.Snapshot { return s }, Upstreams: []string{}})
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		src   netip.Addr
		name  string
		typ   dnsmessage.Type
		rcode dnsmessage.RCode
		want  []string
	}{
		{clientIP, "echo.", dnsmessage.TypeA, dnsmessage.RCodeSuccess, []string{"10.0.0.1", "10.0.0.2"}},
		{clientIP, "ECHO.default.", dnsmessage.TypeAAAA, dnsmessage.RCodeSuccess, []string{"fd00::1"}},
		{otherIP, "echo.default.svc.cluster.local.", dnsmessage.TypeA, dnsmessage.RCodeSuccess, []string{"10.0.0.1", "10.0.0.2"}},
		{clientIP, "v6only.", dnsmessage.TypeA, dnsmessage.RCodeSuccess, nil},
		{clientIP, "db.other.default.svc.cluster.local.", dnsmessage.TypeA, dnsmessage.RCodeSuccess, []string{"cname:db.other.", "10.0.1.1"}},
		{clientIP, "x.example.com.", dnsmessage.TypeA, dnsmessage.RCodeSuccess, []string{"10.9.0.1"}},
		// Unknown names and other types go upstream; with none configured: SERVFAIL.
		{clientIP, "nope.", dnsmessage.TypeA, dnsmessage.RCodeServerFailure, nil},
		{clientIP, "echo.", dnsmessage.TypeTXT, dnsmessage.RCodeServerFailure, nil},
		{otherIP, "private.default.", dnsmessage.TypeA, dnsmessage.RCodeServerFailure, nil},
		// Unknown client: SERVFAIL.
		{netip.MustParseAddr("127.81.0.99"), "echo.default.", dnsmessage.TypeA, dnsmessage.RCodeServerFailure, nil},
	} {
		resp := srv.handle(query(t, 7, tc.name, tc.typ), tc.src, "udp", nil)
		var m dnsmessage.Message
		if err := m.Unpack(resp); err != nil {
			t.Fatalf("%s %v: unpack: %v", tc.name, tc.typ, err)
		}
		if m.ID != 7 || !m.Response || m.RCode != tc.rcode {
			t.Errorf("%s %v: id %d response %v rcode %v, want rcode %v", tc.name, tc.typ, m.ID, m.Response, m.RCode, tc.rcode)
		}
		if got := records(t, m); !slices.Equal(got, tc.want) {
			t.Errorf("%s %v: answers %v, want %v", tc.name, tc.typ, got, tc.want)
		}
	}
	// Every query counts once, answered, forwarded or refused: the client's five A queries,
	// and "other"'s two with the unknown client's one (neither has a canonical service).
	for want, l := range map[float64][2]string{5: {"client", "v1"}, 3: {"unknown", "unknown"}} {
		if v := testutil.ToFloat64(srv.m.requests.With(prometheus.Labels{"request_query_type": "a", "request_protocol": "udp",
			"source_canonical_service": l[0], "source_canonical_revision": l[1]})); v != want {
			t.Errorf("istio_dns_requests_total{a,udp,%s} = %v, want %v", l[0], v, want)
		}
	}
}

// records renders the answers, sorted after any CNAME.
func records(t *testing.T, m dnsmessage.Message) []string {
	var out, ips []string
	for _, a := range m.Answers {
		if a.Header.TTL != TTL {
			t.Errorf("TTL %d", a.Header.TTL)
		}
		switch r := a.Body.(type) {
		case *dnsmessage.AResource:
			ips = append(ips, netip.AddrFrom4(r.A).String())
		case *dnsmessage.AAAAResource:
			ips = append(ips, netip.AddrFrom16(r.AAAA).String())
		case *dnsmessage.CNAMEResource:
			out = append(out, "cname:"+r.CNAME.String())
		}
	}
	slices.Sort(ips)
	return append(out, ips...)
}

func query(t testing.TB, id uint16, name string, typ dnsmessage.Type) []byte {
	b := dnsmessage.NewBuilder(nil, dnsmessage.Header{ID: id, RecursionDesired: true})
	b.StartQuestions()
	if err := b.Question(dnsmessage.Question{Name: dnsmessage.MustNewName(name), Type: typ, Class: dnsmessage.ClassINET}); err != nil {
		t.Fatal(err)
	}
	out, err := b.Finish()
	if err != nil {
		t.Fatal(err)
	}
	return out
}

func FuzzHandle(f *testing.F) {
	s := testSnapshot(f)
	srv, err := New(Config{Addr: "127.0.0.1:0", Snapshot: func() *snapshot.Snapshot { return s }, Upstreams: []string{}})
	if err != nil {
		f.Fatal(err)
	}
	f.Add(query(f, 1, "echo.", dnsmessage.TypeA))
	f.Add(query(f, 2, "db.other.default.svc.cluster.local.", dnsmessage.TypeAAAA))
	f.Add(query(f, 3, "a.example.com.", dnsmessage.TypeA))
	f.Add([]byte{0, 1, 0, 0, 0, 1})
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, req []byte) {
		resp := srv.handle(req, clientIP, "udp", nil)
		if resp == nil {
			return
		}
		var m dnsmessage.Message
		if err := m.Unpack(resp); err != nil {
			t.Fatalf("unparsable response %x: %v", resp, err)
		}
	})
}

func TestReadResolvConf(t *testing.T) {
	p := filepath.Join(t.TempDir(), "resolv.conf")
	os.WriteFile(p, []byte("search default.svc.cluster.local\nnameserver 10.96.0.10\nnameserver fd00::a\n# x\noptions ndots:5\n"), 0o644)
	got, err := ReadResolvConf(p)
	if err != nil || !slices.Equal(got, []string{"10.96.0.10:53", "[fd00::a]:53"}) {
		t.Fatalf("ReadResolvConf = %v, %v", got, err)
	}
	if _, err := ReadResolvConf(filepath.Join(t.TempDir(), "none")); err == nil {
		t.Fatal("missing file: no error")
	}
}

// fakeUpstream answers every query with one TXT record "upstream-<proto>", over UDP and TCP.
type fakeUpstream struct {
	addr string
	pc   net.PacketConn
	ln   net.Listener
	wg   sync.WaitGroup
}

func startUpstream(t *testing.T, ip string) *fakeUpstream {
	ln, err := net.Listen("tcp", ip+":0")
	if err != nil {
		t.Fatal(err)
	}
	pc, err := net.ListenPacket("udp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	u := &fakeUpstream{addr: ln.Addr().String(), pc: pc, ln: ln}
	u.wg.Add(2)
	go func() {
		defer u.wg.Done()
		buf := make([]byte, 65535)
		for {
			n, src, err := pc.ReadFrom(buf)
			if err != nil {
				return
			}
			pc.WriteTo(upstreamAnswer(buf[:n], "udp"), src)
		}
	}()
	go func() {
		defer u.wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			var l [2]byte
			io.ReadFull(c, l[:])
			req := make([]byte, binary.BigEndian.Uint16(l[:]))
			io.ReadFull(c, req)
			resp := upstreamAnswer(req, "tcp")
			c.Write(append(binary.BigEndian.AppendUint16(nil, uint16(len(resp))), resp...))
			c.Close()
		}
	}()
	t.Cleanup(u.close)
	return u
}

func (u *fakeUpstream) close() { u.pc.Close(); u.ln.Close(); u.wg.Wait() }

func upstreamAnswer(req []byte, proto string) []byte {
	var m dnsmessage.Message
	if m.Unpack(req) != nil || len(m.Questions) != 1 {
		return nil
	}
	m.Response = true
	m.Answers = []dnsmessage.Resource{{
		Header: dnsmessage.ResourceHeader{Name: m.Questions[0].Name, Class: dnsmessage.ClassINET, TTL: 60},
		Body:   &dnsmessage.TXTResource{TXT: []string{"upstream-" + proto}},
	}}
	out, _ := m.Pack()
	return out
}

func exchangeWith(t *testing.T, proto, server string, src netip.Addr, req []byte) dnsmessage.Message {
	t.Helper()
	d := net.Dialer{Timeout: 5 * time.Second}
	if proto == "udp" {
		d.LocalAddr = net.UDPAddrFromAddrPort(netip.AddrPortFrom(src, 0))
	} else {
		d.LocalAddr = net.TCPAddrFromAddrPort(netip.AddrPortFrom(src, 0))
	}
	c, err := d.Dial(proto, server)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	var resp []byte
	if proto == "udp" {
		if _, err := c.Write(req); err != nil {
			t.Fatal(err)
		}
		buf := make([]byte, 65535)
		n, err := c.Read(buf)
		if err != nil {
			t.Fatal(err)
		}
		resp = buf[:n]
	} else {
		if _, err := c.Write(append(binary.BigEndian.AppendUint16(nil, uint16(len(req))), req...)); err != nil {
			t.Fatal(err)
		}
		var l [2]byte
		if _, err := io.ReadFull(c, l[:]); err != nil {
			t.Fatal(err)
		}
		resp = make([]byte, binary.BigEndian.Uint16(l[:]))
		if _, err := io.ReadFull(c, resp); err != nil {
			t.Fatal(err)
		}
	}
	var m dnsmessage.Message
	if err := m.Unpack(resp); err != nil {
		t.Fatal(err)
	}
	return m
}

func TestServerUDPAndTCP(t *testing.T) {
	s := testSnapshot(t)
	up := startUpstream(t, "127.81.0.53")
	reg := prometheus.NewRegistry()
	srv, err := New(Config{
		Addr: "127.81.0.1:0", Snapshot: func() *snapshot.Snapshot { return s },
		Upstreams: []string{up.addr}, UpstreamTimeout: 500 * time.Millisecond, Registerer: reg,
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := srv.Start(); err != nil {
		t.Fatal(err)
	}
	defer srv.Stop()

	for _, proto := range []string{"udp", "tcp"} {
		m := exchangeWith(t, proto, srv.Addr(), clientIP, query(t, 42, "echo.", dnsmessage.TypeA))
		if m.ID != 42 || m.RCode != dnsmessage.RCodeSuccess || !slices.Equal(records(t, m), []string{"10.0.0.1", "10.0.0.2"}) {
			t.Errorf("%s: local answer %+v", proto, m)
		}
		m = exchangeWith(t, proto, srv.Addr(), clientIP, query(t, 43, "www.google.com.", dnsmessage.TypeA))
		if m.ID != 43 || m.RCode != dnsmessage.RCodeSuccess || len(m.Answers) != 1 {
			t.Fatalf("%s: forwarded answer %+v", proto, m)
		}
		if txt := m.Answers[0].Body.(*dnsmessage.TXTResource).TXT; txt[0] != "upstream-"+proto {
			t.Errorf("%s: forwarded over %v", proto, txt)
		}
	}
	lbl := func(typ, proto string) prometheus.Labels {
		return prometheus.Labels{"request_query_type": typ, "request_protocol": proto,
			"source_canonical_service": "client", "source_canonical_revision": "v1"}
	}
	m := srv.m
	if v := testutil.ToFloat64(m.requests.With(lbl("a", "udp"))); v != 2 {
		t.Errorf("istio_dns_requests_total{a,udp} = %v, want 2", v)
	}
	if v := testutil.ToFloat64(m.upstream.With(lbl("a", "tcp"))); v != 1 {
		t.Errorf("istio_dns_upstream_requests_total{a,tcp} = %v, want 1", v)
	}

	// Upstream down: SERVFAIL, counted as a failure.
	up.close()
	for _, proto := range []string{"udp", "tcp"} {
		m := exchangeWith(t, proto, srv.Addr(), clientIP, query(t, 44, "down.example.org.", dnsmessage.TypeA))
		if m.ID != 44 || m.RCode != dnsmessage.RCodeServerFailure {
			t.Errorf("%s: upstream down: rcode %v", proto, m.RCode)
		}
	}
	if v := testutil.ToFloat64(m.failures.With(lbl("a", "udp"))); v != 1 {
		t.Errorf("istio_dns_upstream_failures_total{a,udp} = %v, want 1", v)
	}
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, mf := range mfs {
		names = append(names, mf.GetName())
	}
	want := []string{"istio_dns_requests_total", "istio_dns_upstream_failures_total",
		"istio_dns_upstream_request_duration_seconds", "istio_dns_upstream_requests_total"}
	if !slices.Equal(names, want) {
		t.Errorf("families %v, want %v", names, want)
	}
}

// TestTCPStop: Stop closes a TCP client that sends nothing, and is not blocked by a
// connection waiting for a worker.
func TestTCPStop(t *testing.T) {
	s := testSnapshot(t)
	srv, err := New(Config{Addr: "127.81.0.2:0", Snapshot: func() *snapshot.Snapshot { return s }, Upstreams: []string{}, Workers: 1})
	if err != nil {
		t.Fatal(err)
	}
	if err := srv.Start(); err != nil {
		t.Fatal(err)
	}
	c, err := net.Dial("tcp", srv.Addr())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	// A second connection waits for the single worker; it must not block Stop.
	c2, err := net.Dial("tcp", srv.Addr())
	if err != nil {
		t.Fatal(err)
	}
	defer c2.Close()
	time.Sleep(50 * time.Millisecond)
	done := make(chan struct{})
	go func() { srv.Stop(); close(done) }()
	select {
	case <-done:
	case <-time.After(3 * time.Second):
		t.Fatal("Stop blocked")
	}
	c.SetReadDeadline(time.Now().Add(2 * time.Second))
	if _, err := c.Read(make([]byte, 1)); err == nil {
		t.Fatal("connection still open after Stop")
	}
}

// TestServeListeners: listeners opened elsewhere (a pod's namespace) are served with the
// pod's address as the client, whatever the query's source; stop closes only them, and
// Stop closes what is still served.
func TestServeListeners(t *testing.T) {
	s := testSnapshot(t)
	srv, err := New(Config{Snapshot: func() *snapshot.Snapshot { return s }, Upstreams: []string{}})
	if err != nil {
		t.Fatal(err)
	}
	if err := srv.Start(); err == nil {
		t.Fatal("Start without an address succeeded")
	}
	listen := func(ip string) (*net.TCPListener, *net.UDPConn) {
		ln, err := net.ListenTCP("tcp", &net.TCPAddr{IP: net.ParseIP(ip)})
		if err != nil {
			t.Fatal(err)
		}
		pc, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.ParseIP(ip), Port: ln.Addr().(*net.TCPAddr).Port})
		if err != nil {
			t.Fatal(err)
		}
		return ln, pc
	}
	ln1, pc1 := listen("127.81.0.3")
	ln2, pc2 := listen("127.81.0.4")
	stop1, err := srv.Serve([]*net.TCPListener{ln1}, []*net.UDPConn{pc1}, func() netip.Addr { return clientIP }, nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := srv.Serve([]*net.TCPListener{ln2}, []*net.UDPConn{pc2}, nil, nil); err != nil {
		t.Fatal(err)
	}
	// The query comes from 127.81.0.9, not a workload: only the pod override makes it known.
	stranger := netip.MustParseAddr("127.81.0.9")
	for _, proto := range []string{"udp", "tcp"} {
		m := exchangeWith(t, proto, ln1.Addr().String(), stranger, query(t, 7, "echo.", dnsmessage.TypeA))
		if m.RCode != dnsmessage.RCodeSuccess || !slices.Equal(records(t, m), []string{"10.0.0.1", "10.0.0.2"}) {
			t.Errorf("%s: pod listener answer %+v", proto, m)
		}
		m = exchangeWith(t, proto, ln2.Addr().String(), stranger, query(t, 8, "echo.", dnsmessage.TypeA))
		if m.RCode != dnsmessage.RCodeServerFailure {
			t.Errorf("%s: unknown source answered %v, want SERVFAIL", proto, m.RCode)
		}
	}
	stop1()
	if _, err := net.DialTimeout("tcp", ln1.Addr().String(), time.Second); err == nil {
		t.Error("stopped listener still accepts")
	}
	m := exchangeWith(t, "tcp", ln2.Addr().String(), clientIP, query(t, 9, "echo.", dnsmessage.TypeA))
	if m.RCode != dnsmessage.RCodeSuccess {
		t.Errorf("other listener broken by stop: %v", m.RCode)
	}
	done := make(chan struct{})
	go func() { srv.Stop(); close(done) }()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("Stop hangs on served listeners")
	}
	if _, err := srv.Serve(nil, nil, nil, nil); err == nil {
		t.Error("Serve after Stop succeeded")
	}
}
