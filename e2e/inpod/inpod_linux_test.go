// Package inpod tests in-pod capture end to end, as root: a cluster of network namespaces
// (e2e/cluster), two ztgo processes built from ./cmd/ztgo, one fed pods over ZDS by `ztgo
// node-agent` and one running the agent itself, and unmodified apps in the pods.
package inpod

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/net/dns/dnsmessage"

	"github.com/ztgo/ztgo/e2e/cluster"
	"github.com/ztgo/ztgo/e2e/meshtest"
	"github.com/ztgo/ztgo/redirect"
)

const (
	readyTimeout = 20 * time.Second
	ioTimeout    = 10 * time.Second
	vip          = "198.19.0.10"
	dnsServer    = "198.18.0.53" // nothing listens there: the pods' rules send port 53 to ztgo
)

// The mesh: node-a runs client and other, node-b runs echo and db; service echo has the
// endpoints other (node-a) and echo (node-b). prod/db admits only namespace prod.
const meshYAML = `workloads:
- {uid: "Kubernetes//v1/Pod/default/client", name: client, namespace: default, serviceAccount: client,
   workloadIps: ["{{client}}"], protocol: HBONE, node: node-a, canonicalName: client, canonicalRevision: v1}
- uid: "Kubernetes//v1/Pod/default/other"
  name: other
  namespace: default
  serviceAccount: other
  workloadIps: ["{{other}}"]
  protocol: HBONE
  node: node-a
  canonicalName: echo
  services: {"default/echo.default.svc.cluster.local": {80: 8080}}
- uid: "Kubernetes//v1/Pod/default/echo"
  name: echo
  namespace: default
  serviceAccount: echo
  workloadIps: ["{{echo}}"]
  protocol: HBONE
  node: node-b
  canonicalName: echo
  services: {"default/echo.default.svc.cluster.local": {80: 8080}}
- {uid: "Kubernetes//v1/Pod/prod/db", name: db, namespace: prod, serviceAccount: db,
   workloadIps: ["{{db}}"], protocol: HBONE, node: node-b, canonicalName: db}
services:
- {name: echo, namespace: default, hostname: echo.default.svc.cluster.local, vips: ["/` + vip + `"], ports: {80: 8080}}
policies:
- name: allow-prod-only
  namespace: prod
  scope: Namespace
  action: Allow
  rules:
  - - - namespaces: [!Exact prod]
`

// env is one cluster with two ztgo nodes: node-a learns its pods over ZDS from `ztgo
// node-agent`, node-b runs the agent itself (--pods-dir).
type env struct {
	t                        testing.TB
	c                        *cluster.Cluster
	bin, dir                 string
	a, b                     *cluster.Node
	client, other, legacy    *cluster.Pod
	echo, db                 *cluster.Pod
	ext                      *cluster.External
	agentA, ztgoA, ztgoB     *cluster.Process
	httpOther, httpEcho      *server
	rawOther, rawEcho, rawDB *server
	rawExt                   *server
	upstream                 *dnsUpstream
	restarts                 int
}

var (
	buildOnce sync.Once
	builtBin  string
	buildErr  error
)

// ztgoBinary builds ./cmd/ztgo once per test binary: the nodes run the real program.
func ztgoBinary(t testing.TB) string {
	t.Helper()
	buildOnce.Do(func() {
		dir, err := os.MkdirTemp("", "ztgo-bin")
		if err != nil {
			buildErr = err
			return
		}
		builtBin = filepath.Join(dir, "ztgo")
		goBin, err := exec.LookPath("go")
		if err != nil {
			buildErr = fmt.Errorf("the go tool builds the ztgo binary: %w", err)
			return
		}
		cmd := exec.Command(goBin, "build", "-o", builtBin, "github.com/ztgo/ztgo/cmd/ztgo")
		if out, err := cmd.CombinedOutput(); err != nil {
			buildErr = fmt.Errorf("go build ./cmd/ztgo: %v\n%s", err, out)
		}
	})
	if buildErr != nil {
		t.Fatal(buildErr)
	}
	return builtBin
}

func newEnv(t testing.TB) *env {
	cluster.RequireRoot(t)
	if _, err := exec.LookPath("curl"); err != nil {
		t.Fatalf("curl is needed to play the unmodified client: %v", err)
	}
	e := &env{t: t, bin: ztgoBinary(t)}
	e.c = cluster.NewForTest(t, cluster.Config{Nodes: 2})
	// A short directory: the ZDS socket path must fit in sun_path.
	dir, err := os.MkdirTemp("", "inpod")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	e.dir = dir
	e.a, e.b = e.c.Node("node-a"), e.c.Node("node-b")
	e.client = e.addPod(e.a, "client")
	e.other = e.addPod(e.a, "other")
	e.legacy = e.addPod(e.a, "legacy") // outside the mesh: no pod file, no rules
	e.echo = e.addPod(e.b, "echo")
	e.db = e.addPod(e.b, "db")
	if e.ext, err = e.c.AddExternal("ext"); err != nil {
		t.Fatal(err)
	}

	e.httpOther = serveHTTP(t, e.other.Namespace, "other")
	e.httpEcho = serveHTTP(t, e.echo.Namespace, "echo")
	e.rawOther = serveEcho(t, e.other.Namespace)
	e.rawEcho = serveEcho(t, e.echo.Namespace)
	e.rawDB = serveEcho(t, e.db.Namespace)
	e.rawExt = serveEcho(t, e.ext.Namespace)

	mesh := strings.NewReplacer("{{client}}", e.client.IP().String(), "{{other}}", e.other.IP().String(),
		"{{echo}}", e.echo.IP().String(), "{{db}}", e.db.IP().String()).Replace(meshYAML)
	if err := os.WriteFile(filepath.Join(dir, "mesh.yaml"), []byte(mesh), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, d := range []string{"pods-a", "pods-b"} {
		if err := os.Mkdir(filepath.Join(dir, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	e.writePod("pods-a", e.client, "default", "client")
	e.writePod("pods-a", e.other, "default", "other")
	e.writePod("pods-b", e.echo, "default", "echo")
	e.writePod("pods-b", e.db, "prod", "db")
	// The client pod's resolver: any address will do, the capture rules send DNS to ztgo.
	e.resolvConf(e.client.Namespace, dnsServer)
	// node-a's resolver (what its ztgo forwards other names to) is on the external.
	e.upstream = serveDNS(t, e.ext.Namespace)
	e.resolvConf(e.a.Namespace, e.ext.IP().String())

	e.agentA = e.start(e.a, "agent-a", "node-agent", "--pods-dir", filepath.Join(dir, "pods-a"),
		"--uds", e.socket(), "--poll", "100ms")
	if _, err := e.agentA.WaitLogContains(readyTimeout, "zds server listening"); err != nil {
		t.Fatalf("node agent: %v\n%s", err, e.agentA.Tail(30))
	}
	e.ztgoA = e.startNode(e.a)
	e.ztgoB = e.startNode(e.b)
	return e
}

func (e *env) socket() string { return filepath.Join(e.dir, "zds.sock") }

func (e *env) addPod(n *cluster.Node, name string) *cluster.Pod {
	p, err := e.c.AddPod(n.Name(), name)
	if err != nil {
		e.t.Fatal(err)
	}
	return p
}

func (e *env) writePod(dir string, p *cluster.Pod, ns, sa string) {
	spec := fmt.Sprintf("uid: %s-uid\nname: %s\nnamespace: %s\nserviceAccount: %s\nnetns: %s\n", p.Name(), p.Name(), ns, sa, p.Path())
	tmp := filepath.Join(e.dir, dir, "."+p.Name()+".tmp")
	if err := os.WriteFile(tmp, []byte(spec), 0o644); err != nil {
		e.t.Fatal(err)
	}
	if err := os.Rename(tmp, filepath.Join(e.dir, dir, p.Name()+".yaml")); err != nil {
		e.t.Fatal(err)
	}
}

// resolvConf gives the pod a resolv.conf for programs run with `ip netns exec`.
func (e *env) resolvConf(ns *cluster.Namespace, nameserver string) {
	d := filepath.Join("/etc/netns", ns.NetnsName())
	if err := os.MkdirAll(d, 0o755); err != nil {
		e.t.Fatal(err)
	}
	e.t.Cleanup(func() { os.RemoveAll(d) })
	conf := "nameserver " + nameserver + "\nsearch default.svc.cluster.local svc.cluster.local cluster.local\noptions ndots:5 attempts:2 timeout:2\n"
	if err := os.WriteFile(filepath.Join(d, "resolv.conf"), []byte(conf), 0o644); err != nil {
		e.t.Fatal(err)
	}
}

func (e *env) start(n *cluster.Node, name string, args ...string) *cluster.Process {
	cmd := exec.Command("ip", append([]string{"netns", "exec", n.NetnsName(), e.bin}, args...)...)
	cmd.Env = append(os.Environ(), "LOG_FORMAT=json")
	p, err := e.c.StartProcess(name, cmd)
	if err != nil {
		e.t.Fatal(err)
	}
	return p
}

// startNode runs `ztgo run` in the node's namespace and waits until it is ready.
func (e *env) startNode(n *cluster.Node) *cluster.Process {
	args := []string{"run", "--node", n.Name(), "--config", filepath.Join(e.dir, "mesh.yaml"),
		"--ca-dir", filepath.Join(e.dir, "ca"), "--admin", "127.0.0.1:15000",
		"--metrics", "0.0.0.0:15020", "--readiness", "0.0.0.0:15021", "--drain-timeout", "1s"}
	if n == e.a {
		args = append(args, "--inpod-uds", e.socket())
	} else {
		args = append(args, "--pods-dir", filepath.Join(e.dir, "pods-b"))
	}
	e.restarts++
	p := e.start(n, fmt.Sprintf("ztgo-%s-%d", n.Name(), e.restarts), args...)
	if _, err := n.WaitHTTP("http://127.0.0.1:15021/healthz/ready", 200, readyTimeout); err != nil {
		e.t.Fatalf("%s not ready: %v\n%s", n.Name(), err, p.Tail(40))
	}
	return p
}

// accessLog waits for a "connection complete" record of p matching every field of want.
func accessLog(t testing.TB, p *cluster.Process, want map[string]string) map[string]any {
	t.Helper()
	var rec map[string]any
	_, err := p.WaitLog(ioTimeout, func(line string) bool {
		var m map[string]any
		dec := json.NewDecoder(strings.NewReader(line))
		dec.UseNumber()
		if dec.Decode(&m) != nil || m["msg"] != "connection complete" {
			return false
		}
		for k, v := range want {
			got := fmt.Sprint(m[k])
			if strings.HasSuffix(v, "*") {
				if !strings.HasPrefix(got, strings.TrimSuffix(v, "*")) {
					return false
				}
			} else if got != v {
				return false
			}
		}
		rec = m
		return true
	})
	if err != nil {
		t.Fatalf("no access log %v on %s: %v\n%s", want, p.Name(), err, p.Tail(20))
	}
	return rec
}

func spiffe(ns, sa string) string { return "spiffe://cluster.local/ns/" + ns + "/sa/" + sa }

// server is an app inside a pod or external: it records the peers it saw.
type server struct {
	ln    *net.TCPListener
	mu    sync.Mutex
	peers []netip.AddrPort
}

func (s *server) addPeer(a net.Addr) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.peers = append(s.peers, a.(*net.TCPAddr).AddrPort())
}

// Peers returns the client addresses seen so far.
func (s *server) Peers() []netip.AddrPort {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]netip.AddrPort(nil), s.peers...)
}

func serveEcho(t testing.TB, ns *cluster.Namespace) *server {
	t.Helper()
	ln, err := ns.Listen(ns.IP().String() + ":9090")
	if err != nil {
		t.Fatal(err)
	}
	s := &server{ln: ln}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.AcceptTCP()
			if err != nil {
				return
			}
			s.addPeer(c.RemoteAddr())
			go func() {
				defer c.Close()
				io.Copy(c, c)
			}()
		}
	}()
	return s
}

func serveHTTP(t testing.TB, ns *cluster.Namespace, name string) *server {
	t.Helper()
	ln, err := ns.Listen(ns.IP().String() + ":8080")
	if err != nil {
		t.Fatal(err)
	}
	s := &server{ln: ln}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		ap, _ := netip.ParseAddrPort(r.RemoteAddr)
		s.mu.Lock()
		s.peers = append(s.peers, ap)
		s.mu.Unlock()
		fmt.Fprintf(w, "pod=%s peer=%s\n", name, ap.Addr())
	}), ReadHeaderTimeout: ioTimeout}
	t.Cleanup(func() { srv.Close() })
	go srv.Serve(ln)
	return s
}

// dnsUpstream is a resolver outside the mesh: it answers every A query with externalAnswer
// and records who asked.
type dnsUpstream struct {
	mu      sync.Mutex
	askedBy []netip.Addr
}

const externalAnswer = "203.0.113.7"

func (u *dnsUpstream) sources() []netip.Addr {
	u.mu.Lock()
	defer u.mu.Unlock()
	return append([]netip.Addr(nil), u.askedBy...)
}

func serveDNS(t testing.TB, ns *cluster.Namespace) *dnsUpstream {
	t.Helper()
	var pc *net.UDPConn
	if err := ns.Netns().Do(func() error {
		var err error
		pc, err = net.ListenUDP("udp4", net.UDPAddrFromAddrPort(netip.AddrPortFrom(ns.IP(), 53)))
		return err
	}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { pc.Close() })
	u := &dnsUpstream{}
	go func() {
		buf := make([]byte, 1500)
		for {
			n, from, err := pc.ReadFromUDPAddrPort(buf)
			if err != nil {
				return
			}
			var p dnsmessage.Parser
			h, err := p.Start(buf[:n])
			if err != nil {
				continue
			}
			q, err := p.Question()
			if err != nil {
				continue
			}
			u.mu.Lock()
			u.askedBy = append(u.askedBy, from.Addr())
			u.mu.Unlock()
			b := dnsmessage.NewBuilder(nil, dnsmessage.Header{ID: h.ID, Response: true, RecursionAvailable: true})
			b.StartQuestions()
			b.Question(q)
			b.StartAnswers()
			if q.Type == dnsmessage.TypeA {
				b.AResource(dnsmessage.ResourceHeader{Name: q.Name, Class: dnsmessage.ClassINET, TTL: 30},
					dnsmessage.AResource{A: netip.MustParseAddr(externalAnswer).As4()})
			}
			resp, err := b.Finish()
			if err == nil {
				pc.WriteToUDPAddrPort(resp, from)
			}
		}
	}()
	return u
}

// dial connects from inside a pod the way its app would: a plain socket, captured by the
// pod's rules.
func dial(t testing.TB, from *cluster.Namespace, dst netip.AddrPort) *net.TCPConn {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), ioTimeout)
	defer cancel()
	c, err := from.Dial(ctx, dst)
	if err != nil {
		t.Fatalf("dial %s from %s: %v", dst, from.Name(), err)
	}
	return c
}

// roundTrip sends data and reads it back, checking every byte; the connection stays open.
func roundTrip(t testing.TB, c *net.TCPConn, data []byte) {
	t.Helper()
	c.SetDeadline(time.Now().Add(ioTimeout))
	defer c.SetDeadline(time.Time{})
	werr := make(chan error, 1)
	go func() { _, err := c.Write(data); werr <- err }()
	got := make([]byte, len(data))
	_, rerr := io.ReadFull(c, got)
	if err := <-werr; err != nil {
		t.Fatalf("round trip of %d bytes: write: %v", len(data), err)
	}
	if rerr != nil {
		t.Fatalf("round trip of %d bytes: read: %v", len(data), rerr)
	}
	if !bytes.Equal(got, data) {
		t.Fatalf("round trip of %d bytes: content differs", len(data))
	}
}

// echoOnce opens a connection, round-trips data, half-closes and waits for the server's FIN.
func echoOnce(t testing.TB, from *cluster.Namespace, dst netip.AddrPort, data []byte) {
	t.Helper()
	c := dial(t, from, dst)
	defer c.Close()
	roundTrip(t, c, data)
	c.CloseWrite()
	c.SetReadDeadline(time.Now().Add(ioTimeout))
	if n, err := io.Copy(io.Discard, c); err != nil || n != 0 {
		t.Fatalf("after half-close: %d bytes, %v", n, err)
	}
}

func lastPeer(t testing.TB, s *server) netip.AddrPort {
	t.Helper()
	p := s.Peers()
	if len(p) == 0 {
		t.Fatal("server saw no connection")
	}
	return p[len(p)-1]
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

func ap(a netip.Addr, port uint16) netip.AddrPort { return netip.AddrPortFrom(a, port) }

// TestPrivilegedInPod runs the in-pod mesh end to end: two ztgo processes capture the
// traffic of unmodified apps in pod network namespaces and carry it as mTLS HBONE.
func TestPrivilegedInPod(t *testing.T) {
	e := newEnv(t)
	client := e.client.Namespace
	data := meshtest.RandomBytes(1<<20, 7)

	t.Run("cross-node", func(t *testing.T) {
		echoOnce(t, client, ap(e.echo.IP(), 9090), data)
		if got := lastPeer(t, e.rawEcho).Addr(); got != e.client.IP() {
			t.Errorf("echo saw the client as %s, want the client pod's %s", got, e.client.IP())
		}
		accessLog(t, e.ztgoB, map[string]string{"direction": "inbound", "src.addr": e.client.IP().String() + ":*",
			"src.identity": spiffe("default", "client"), "dst.identity": spiffe("default", "echo"),
			"dst.addr": ap(e.echo.IP(), 9090).String(), "bytes_recv": fmt.Sprint(len(data))})
		accessLog(t, e.ztgoA, map[string]string{"direction": "outbound", "src.identity": spiffe("default", "client"),
			"dst.identity": spiffe("default", "echo"), "dst.hbone_addr": ap(e.echo.IP(), 9090).String()})
	})

	t.Run("same-node", func(t *testing.T) {
		echoOnce(t, client, ap(e.other.IP(), 9090), data[:64<<10])
		if got := lastPeer(t, e.rawOther).Addr(); got != e.client.IP() {
			t.Errorf("other saw the client as %s, want %s", got, e.client.IP())
		}
		accessLog(t, e.ztgoA, map[string]string{"direction": "inbound", "src.identity": spiffe("default", "client"),
			"dst.identity": spiffe("default", "other"), "src.addr": e.client.IP().String() + ":*"})
	})

	t.Run("unmodified client with DNS", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		out, err := client.Command(ctx, "getent", "ahostsv4", "echo.default.svc.cluster.local").CombinedOutput()
		if err != nil || !strings.Contains(string(out), vip) {
			t.Fatalf("getent in the client pod: %v: %s (want the VIP %s)", err, out, vip)
		}
		// curl knows nothing of the mesh: a short name, the pod's resolv.conf, port 80.
		out, err = client.Command(ctx, "curl", "-sS", "--max-time", "10", "http://echo/").CombinedOutput()
		if err != nil || !strings.HasPrefix(string(out), "pod=") || !strings.Contains(string(out), "peer="+e.client.IP().String()) {
			t.Fatalf("curl http://echo/ in the client pod: %v: %q", err, out)
		}
		accessLog(t, e.ztgoA, map[string]string{"direction": "outbound", "dst.service": "echo.default.svc.cluster.local",
			"src.identity": spiffe("default", "client")})
	})

	t.Run("DNS forwarded from inside the pod", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		out, err := client.Command(ctx, "getent", "ahostsv4", "www.example.org").CombinedOutput()
		if err != nil || !strings.Contains(string(out), externalAnswer) {
			t.Fatalf("getent www.example.org in the client pod: %v: %s (want the upstream's %s)", err, out, externalAnswer)
		}
		// The query left from the client pod (as ztunnel forwards), not from node-a.
		srcs := e.upstream.sources()
		if len(srcs) == 0 {
			t.Fatal("the upstream resolver saw no query")
		}
		for _, a := range srcs {
			if a != e.client.IP() {
				t.Errorf("upstream resolver asked by %s, want the client pod %s", a, e.client.IP())
			}
		}
	})

	t.Run("service load balancing", func(t *testing.T) {
		seen := map[string]int{}
		for i := range 24 {
			ctx, cancel := context.WithTimeout(context.Background(), ioTimeout)
			code, body, err := client.HTTPGet(ctx, "http://"+vip+"/")
			cancel()
			if err != nil || code != 200 {
				t.Fatalf("request %d to the VIP: %d %v", i, code, err)
			}
			pod, _, _ := strings.Cut(strings.TrimPrefix(string(body), "pod="), " ")
			seen[pod]++
		}
		if seen["echo"] == 0 || seen["other"] == 0 {
			t.Errorf("24 requests to the service reached %v, want both endpoints", seen)
		}
	})

	t.Run("passthrough", func(t *testing.T) {
		echoOnce(t, client, ap(e.ext.IP(), 9090), data[:4096])
		if got := lastPeer(t, e.rawExt).Addr(); got != e.client.IP() {
			t.Errorf("external saw %s, want the client pod %s", got, e.client.IP())
		}
		accessLog(t, e.ztgoA, map[string]string{"direction": "outbound", "dst.addr": ap(e.ext.IP(), 9090).String()})
	})

	t.Run("outside the mesh to a mesh pod", func(t *testing.T) {
		echoOnce(t, e.legacy.Namespace, ap(e.echo.IP(), 9090), data[:4096])
		if got := lastPeer(t, e.rawEcho).Addr(); got != e.legacy.IP() {
			t.Errorf("echo saw %s, want the non-mesh pod %s", got, e.legacy.IP())
		}
		accessLog(t, e.ztgoB, map[string]string{"direction": "inbound_plaintext", "src.addr": e.legacy.IP().String() + ":*",
			"dst.identity": spiffe("default", "echo")})
	})

	t.Run("policy deny across nodes", func(t *testing.T) {
		before := len(e.rawDB.Peers())
		c := dial(t, client, ap(e.db.IP(), 9090))
		defer c.Close()
		c.SetDeadline(time.Now().Add(ioTimeout))
		c.Write([]byte("secret"))
		n, err := io.Copy(io.Discard, c)
		if n != 0 {
			t.Errorf("denied connection got %d bytes back (%v)", n, err)
		}
		if got := len(e.rawDB.Peers()); got != before {
			t.Errorf("db accepted %d connections, want none", got-before)
		}
		_, err = e.ztgoB.WaitLog(ioTimeout, func(l string) bool {
			return strings.Contains(l, "connection failed") && strings.Contains(l, "DENY")
		})
		if err != nil {
			t.Errorf("no DENY failure on node-b: %v\n%s", err, e.ztgoB.Tail(10))
		}
	})

	t.Run("metrics name the identities", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(context.Background(), ioTimeout)
		defer cancel()
		code, body, err := e.b.HTTPGet(ctx, "http://127.0.0.1:15020/metrics")
		if err != nil || code != 200 {
			t.Fatalf("metrics: %d %v", code, err)
		}
		found := false
		for _, l := range strings.Split(string(body), "\n") {
			if strings.HasPrefix(l, "istio_tcp_connections_opened_total{") && strings.Contains(l, `reporter="destination"`) &&
				strings.Contains(l, `source_principal="`+spiffe("default", "client")+`"`) &&
				strings.Contains(l, `destination_principal="`+spiffe("default", "echo")+`"`) {
				found = true
			}
		}
		if !found {
			t.Error("node-b exports no istio_tcp_connections_opened_total for client -> echo")
		}
		if !strings.Contains(string(body), "ztgo_inpod_proxies 2") {
			t.Error("node-b does not report 2 in-pod proxies")
		}
	})

	t.Run("config dump lists the pods", func(t *testing.T) {
		// ztunnel's config_dump in shared mode: workloadState by pod uid.
		ctx, cancel := context.WithTimeout(context.Background(), ioTimeout)
		defer cancel()
		code, body, err := e.a.HTTPGet(ctx, "http://127.0.0.1:15000/config_dump")
		if err != nil || code != 200 {
			t.Fatalf("config_dump: %d %v", code, err)
		}
		var dump struct {
			WorkloadState map[string]struct {
				State    string            `json:"state"`
				Info     map[string]string `json:"info"`
				Netns    string            `json:"netns"`
				Workload string            `json:"workload"`
			} `json:"workloadState"`
		}
		if err := json.Unmarshal(body, &dump); err != nil {
			t.Fatalf("config_dump: %v", err)
		}
		if len(dump.WorkloadState) != 2 {
			t.Errorf("node-a's workloadState has %d pods, want client and other: %v", len(dump.WorkloadState), dump.WorkloadState)
		}
		for _, p := range []struct{ uid, name, workload string }{
			{"client-uid", "client", "Kubernetes//v1/Pod/default/client"},
			{"other-uid", "other", "Kubernetes//v1/Pod/default/other"},
		} {
			st, ok := dump.WorkloadState[p.uid]
			if !ok {
				t.Errorf("workloadState has no %s", p.uid)
				continue
			}
			if st.State != "Up" || st.Info["name"] != p.name || st.Info["namespace"] != "default" ||
				st.Info["serviceAccount"] != p.name || st.Workload != p.workload || st.Netns == "" {
				t.Errorf("workloadState[%s] = %+v", p.uid, st)
			}
		}
	})

	t.Run("pod add and remove keep other flows", func(t *testing.T) {
		long := dial(t, client, ap(e.echo.IP(), 9090))
		defer long.Close()
		roundTrip(t, long, []byte("before"))
		// Add a pod on node-a (through the agent and ZDS) and remove another.
		fresh := e.addPod(e.a, "fresh")
		e.writePod("pods-a", fresh, "default", "fresh")
		if _, err := e.ztgoA.WaitLogContains(ioTimeout, `"uid":"fresh-uid"`); err != nil {
			t.Fatalf("node-a never started the new pod: %v", err)
		}
		roundTrip(t, long, []byte("after add"))
		// The new pod is no workload of the mesh: its first connection waits for the control
		// plane (5 s) and is closed; the next one is refused at once, so such a pod cannot tie
		// up the capture stage.
		for i, limit := range []time.Duration{8 * time.Second, 2 * time.Second} {
			c := dial(t, fresh.Namespace, ap(e.echo.IP(), 9090))
			began := time.Now()
			c.SetReadDeadline(time.Now().Add(limit))
			n, err := c.Read(make([]byte, 1))
			if n != 0 || isTimeout(err) {
				t.Errorf("connection %d from a pod outside the mesh: %d bytes, %v after %v", i, n, err, time.Since(began))
			}
			c.Close()
			if i == 1 && time.Since(began) > time.Second {
				t.Errorf("second connection from an unknown pod took %v to refuse", time.Since(began))
			}
		}
		// Flows into the pod about to be removed end with it: an inbound plaintext one (from
		// outside the mesh, through 15006) and an HBONE one.
		doomed := dial(t, e.legacy.Namespace, ap(e.other.IP(), 9090))
		defer doomed.Close()
		roundTrip(t, doomed, []byte("doomed"))
		doomedHBONE := dial(t, client, ap(e.other.IP(), 9090))
		defer doomedHBONE.Close()
		roundTrip(t, doomedHBONE, []byte("doomed"))
		if err := os.Remove(filepath.Join(e.dir, "pods-a", "other.yaml")); err != nil {
			t.Fatal(err)
		}
		if _, err := e.ztgoA.WaitLog(ioTimeout, func(l string) bool {
			return strings.Contains(l, "pod proxy stopped") && strings.Contains(l, "other-uid")
		}); err != nil {
			t.Fatalf("node-a never stopped the removed pod: %v", err)
		}
		for _, c := range []*net.TCPConn{doomed, doomedHBONE} {
			c.SetReadDeadline(time.Now().Add(ioTimeout))
			if n, err := c.Read(make([]byte, 1)); n != 0 || isTimeout(err) {
				t.Errorf("flow %s into the removed pod still open: %d bytes, %v", c.LocalAddr(), n, err)
			}
		}
		if err := e.c.RemovePod("fresh"); err != nil {
			t.Fatal(err)
		}
		roundTrip(t, long, data[:256<<10])
		echoOnce(t, client, ap(e.echo.IP(), 9090), []byte("new connection"))
		// The removed pod is no longer captured: its rules are gone.
		drift, err := redirect.Check(e.other.Netns(), redirect.RuleConfig{})
		if err != nil || len(drift) == 0 {
			t.Errorf("removed pod's rules still installed (drift %v, %v)", drift, err)
		}
	})

	t.Run("restart", func(t *testing.T) {
		// A clean shutdown: SIGTERM drains and ztgo exits 0.
		if err := e.ztgoB.Stop(5 * time.Second); err != nil {
			t.Errorf("stop node-b: %v", err)
		}
		// Rules stay in the pods while ztgo is down.
		if drift, err := redirect.Check(e.echo.Netns(), redirect.RuleConfig{}); err != nil || len(drift) != 0 {
			t.Fatalf("echo's rules changed while ztgo was down: %v %v", drift, err)
		}
		e.ztgoB = e.startNode(e.b)
		echoOnce(t, client, ap(e.echo.IP(), 9090), data[:8192])
		// node-a again, through a ZDS reconnect to the agent.
		// A clean shutdown: SIGTERM drains and ztgo exits 0.
		if err := e.ztgoA.Stop(5 * time.Second); err != nil {
			t.Errorf("stop node-a: %v", err)
		}
		e.ztgoA = e.startNode(e.a)
		echoOnce(t, client, ap(e.echo.IP(), 9090), data[:8192])
		accessLog(t, e.ztgoA, map[string]string{"direction": "outbound", "src.identity": spiffe("default", "client")})
	})
}
