package main

// The demo mesh. Every address is a loopback address (all of 127/8 is local on Linux), so the
// two nodes, their workloads and the apps share this machine without any setup.
const (
	nodeA = "node-a"
	nodeB = "node-b"

	// Each node's own listeners (SOCKS5, admin, metrics, readiness; e2e/nodeproc) bind its
	// host address.
	hostA = "127.0.1.1"
	hostB = "127.0.2.1"

	hbonePort = 15008

	clientIP = "127.0.1.10" // workload client (default/sleep) on node-a

	echoIP      = "127.0.2.10" // workload echo (default/echo) on node-b
	echoPort    = 8080
	echoHost    = "echo.default.svc.cluster.local"
	echoVIP     = "127.10.0.10"
	echoSvcPort = 80

	dbIP   = "127.0.2.20" // workload db (prod/db) on node-b
	dbPort = 5432

	// outside is a plain TCP server that is not in the mesh: traffic to it is passthrough.
	outsideIP   = "127.0.3.10"
	outsidePort = 7070

	clientID = "spiffe://cluster.local/ns/default/sa/sleep"
	echoID   = "spiffe://cluster.local/ns/default/sa/echo"
	dbID     = "spiffe://cluster.local/ns/prod/sa/db"

	meshFile = "mesh.yaml"
)

// meshYAML is the whole mesh in ztunnel's LOCAL_XDS format. Both nodes load this same file;
// only --node differs, and it decides which workloads are local to each node.
// demo_test.go checks that it agrees with the constants above.
const meshYAML = `# ztgo-demo mesh, ztunnel's LOCAL_XDS format. Both nodes load this file;
# --node decides which workloads are local.
workloads:
- uid: Kubernetes//v1/Pod/default/client
  name: client
  namespace: default
  serviceAccount: sleep
  workloadIps: ["127.0.1.10"]
  protocol: HBONE
  node: node-a
  canonicalName: client
  canonicalRevision: v1
- uid: Kubernetes//v1/Pod/default/echo
  name: echo
  namespace: default
  serviceAccount: echo
  workloadIps: ["127.0.2.10"]
  protocol: HBONE
  node: node-b
  canonicalName: echo
  canonicalRevision: v1
  services:
    "default/echo.default.svc.cluster.local": {80: 8080}
- uid: Kubernetes//v1/Pod/prod/db
  name: db
  namespace: prod
  serviceAccount: db
  workloadIps: ["127.0.2.20"]
  protocol: HBONE
  node: node-b
  canonicalName: db
  canonicalRevision: v1
services:
- name: echo
  namespace: default
  hostname: echo.default.svc.cluster.local
  vips: ["/127.10.0.10"]
  ports: {80: 8080}
policies:
# Workloads in namespace prod accept only identities of namespace prod: the client
# (cluster.local/ns/default/sa/sleep) is denied when it reaches db.
- name: allow-prod-only
  namespace: prod
  scope: Namespace
  action: Allow
  rules:
  - - - principals: [{Prefix: "cluster.local/ns/prod/sa/"}]
`
