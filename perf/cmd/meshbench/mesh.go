//go:build linux

package main

import (
	"net"
	"strconv"
)

// The bench mesh. All of 127/8 is local on Linux, so two nodes, the client workload and the
// servers share this machine without setup.
const (
	nodeA = "bench-a"
	nodeB = "bench-b"

	// Each node's own listeners (SOCKS5, admin, metrics, readiness; e2e/nodeproc) bind its
	// host address.
	hostA = "127.40.1.1"
	hostB = "127.40.2.1"

	clientIP = "127.40.1.10" // workload client (bench/client) on bench-a
	serverIP = "127.40.2.10" // workload server (bench/server) on bench-b
	// passthroughIP is outside the mesh: no workload or service in meshYAML has it, so node a
	// routes a connection to it as passthrough (plain TCP from node a, no HBONE, no node b).
	// The sink, the source and the echo also listen on it (the passthrough path).
	passthroughIP = "127.40.5.10"

	// Servers run in-process on serverIP (and some on passthroughIP).
	sinkPort   = 17001 // discards (client -> server throughput)
	sourcePort = 17002 // writes until the client half-closes (server -> client throughput)
	echoPort   = 17003 // echoes (round trip latency)
	firstPort  = 17004 // writes one byte and closes (connection rate)
	idlePort   = 17005 // echoes with a small buffer until EOF (idle connections)
	// Flood servers of the slow-reader workload, one per path: each writes as fast as it can.
	slowDirectPort = 17006
	slowZtgoPort   = 17007

	meshFile = "mesh.yaml"
)

// meshYAML is the mesh in ztunnel's LOCAL_XDS format. Both nodes load this file; --node decides
// which workload is local. No policy: every connection is allowed. Nothing in it may name
// passthroughIP.
const meshYAML = `# meshbench mesh, ztunnel's LOCAL_XDS format. Both nodes load this file.
workloads:
- uid: Kubernetes//v1/Pod/bench/client
  name: client
  namespace: bench
  serviceAccount: client
  workloadIps: ["` + clientIP + `"]
  protocol: HBONE
  node: ` + nodeA + `
  canonicalName: client
  canonicalRevision: v1
- uid: Kubernetes//v1/Pod/bench/server
  name: server
  namespace: bench
  serviceAccount: server
  workloadIps: ["` + serverIP + `"]
  protocol: HBONE
  node: ` + nodeB + `
  canonicalName: server
  canonicalRevision: v1
`

func hostPort(h string, p int) string { return net.JoinHostPort(h, strconv.Itoa(p)) }
