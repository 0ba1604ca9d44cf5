package loopback

import (
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/ztgo/ztgo/e2e/meshtest"
	"github.com/ztgo/ztgo/runtime/node"
	"github.com/ztgo/ztgo/tls/ca"
)

// The mesh every test runs: node-a hosts the client, node-b the servers. All addresses are in
// 127.20.0.0/16 so this package never collides with other packages' tests.
const (
	clientIP   = "127.20.1.10"
	client2IP  = "127.20.1.11"
	serverIP   = "127.20.2.10"
	dbIP       = "127.20.2.20"
	plainIP    = "127.20.2.30" // a TCP (non-HBONE) mesh workload
	waypointIP = "127.20.2.40" // the waypoint of service echo-wp
	echoWpVIP  = "127.20.100.2"
	externalIP = "127.20.3.10" // not in the mesh
	echoVIP    = "127.20.100.1"
)

const meshYAML = `
workloads:
- uid: Kubernetes//v1/Pod/default/client
  name: client
  namespace: default
  serviceAccount: client
  workloadIps: ["127.20.1.10"]
  protocol: HBONE
  node: node-a
- uid: Kubernetes//v1/Pod/default/client2
  name: client2
  namespace: default
  serviceAccount: client2
  workloadIps: ["127.20.1.11"]
  protocol: HBONE
  node: node-a
- uid: Kubernetes//v1/Pod/default/server
  name: server
  namespace: default
  serviceAccount: server
  workloadIps: ["127.20.2.10"]
  protocol: HBONE
  node: node-b
  canonicalName: server
  services:
    "default/echo.default.svc.cluster.local": {80: 8080}
    "default/echo-wp.default.svc.cluster.local": {8081: 8080}
- uid: Kubernetes//v1/Pod/prod/db
  name: db
  namespace: prod
  serviceAccount: db
  workloadIps: ["127.20.2.20"]
  protocol: HBONE
  node: node-b
- uid: Kubernetes//v1/Pod/default/plain
  name: plain
  namespace: default
  workloadIps: ["127.20.2.30"]
  protocol: TCP
  node: node-b
- uid: Kubernetes//v1/Pod/default/waypoint
  name: waypoint
  namespace: default
  serviceAccount: waypoint
  workloadIps: ["127.20.2.40"]
  protocol: HBONE
  node: node-b
services:
- name: echo
  namespace: default
  hostname: echo.default.svc.cluster.local
  vips: ["/127.20.100.1"]
  ports: {80: 8080}
- name: echo-wp
  namespace: default
  hostname: echo-wp.default.svc.cluster.local
  vips: ["/127.20.100.2"]
  ports: {8081: 8080}
  waypoint: {destination: "/127.20.2.40", hboneMtlsPort: 15008}
policies:
- name: prod-only
  namespace: prod
  scope: Namespace
  action: Allow
  rules:
  - - - namespaces: [!Exact prod]
%s
`

// mesh is two ztgo nodes sharing one CA directory.
type mesh struct {
	t       *testing.T
	caDir   string
	cfgPath string // node-b's config file (node-b enforces inbound policy)
	a, b    *node.Node
}

func newMesh(t *testing.T, extraPolicies string, mutate func(*node.Config)) *mesh {
	t.Helper()
	meshtest.CheckLeaks(t)
	dir := t.TempDir()
	m := &mesh{t: t, caDir: filepath.Join(dir, "ca"), cfgPath: filepath.Join(dir, "mesh-b.yaml")}
	cfg := fmt.Sprintf(meshYAML, extraPolicies)
	if err := os.WriteFile(m.cfgPath, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	// Create the CA once so both nodes load the same one.
	if _, err := ca.LoadOrCreate(m.caDir); err != nil {
		t.Fatal(err)
	}
	m.a = m.start("node-a", node.Config{ConfigInline: cfg, SOCKS5Addr: "127.20.1.1:0"}, mutate)
	m.b = m.start("node-b", node.Config{ConfigPath: m.cfgPath, ConfigPollInterval: 20 * time.Millisecond}, mutate)
	meshtest.RequireZtgoGoroutines(t)
	return m
}

func (m *mesh) start(name string, cfg node.Config, mutate func(*node.Config)) *node.Node {
	m.t.Helper()
	cfg.Name = name
	cfg.CADir = m.caDir
	cfg.Logger = meshtest.Logger(m.t, name, slog.LevelWarn)
	cfg.DrainTimeout = time.Second
	cfg.DebugSnapshot = true // every test also checks that no published snapshot is mutated
	if mutate != nil {
		mutate(&cfg)
	}
	return meshtest.StartNode(m.t, cfg)
}

// setConfigB rewrites node-b's config file with extra policies and waits for it to apply.
func (m *mesh) setConfigB(extraPolicies string) {
	m.t.Helper()
	before := m.b.Store().Load().Version()
	if err := os.WriteFile(m.cfgPath, []byte(fmt.Sprintf(meshYAML, extraPolicies)), 0o600); err != nil {
		m.t.Fatal(err)
	}
	meshtest.WaitFor(m.t, 5*time.Second, func() bool { return m.b.Store().Load().Version() > before })
}

// socks opens a flow through node-a's SOCKS5 entry from srcIP to target ("host:port") and
// returns the connection and the SOCKS5 reply code.
func (m *mesh) socks(srcIP, target string) (*net.TCPConn, byte, error) {
	return meshtest.SOCKS5(m.a.SOCKS5Addr(), netip.MustParseAddr(srcIP), target, 15*time.Second)
}
