//go:build linux

package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"time"
)

// Istio's Go HBONE pair (performance.md's "Istio's Go HBONE" peer): perf/cmd/istiohbone in
// client mode on istioClientIP, one HBONE CONNECT per accepted connection through Istio's
// dialer to perf/cmd/istiohbone in server mode (Istio's hbone.NewServer) on
// istioServerIP:istioPort over mutual TLS, which dials the same servers on serverIP.
const (
	istioClientIP = "127.40.4.1"
	istioServerIP = "127.40.4.2"
	istioPort     = 15008
	istioSrvName  = "istio-hbone-server.meshbench.test"
	// istioBuildLimit bounds `go build ./perf/cmd/istiohbone` (a cold build compiles Istio's
	// logging and its dependencies).
	istioBuildLimit = 5 * time.Minute
)

// istioPorts are the server ports the client side forwards: the throughput servers and the echo.
var istioPorts = []int{sinkPort, sourcePort, echoPort}

// buildIstioHBONE builds perf/cmd/istiohbone into dir with the go command on PATH, from the
// current directory, which must be in this module (it is when run with `go run` or make from the
// module root).
func buildIstioHBONE(ctx context.Context, dir string) (string, error) {
	gobin, err := exec.LookPath("go")
	if err != nil {
		return "", fmt.Errorf("build istiohbone: %w (or pass --istiohbone with a built binary)", err)
	}
	out := filepath.Join(dir, "istiohbone")
	ctx, cancel := context.WithTimeout(ctx, istioBuildLimit)
	defer cancel()
	cmd := exec.CommandContext(ctx, gobin, "build", "-o", out, "./perf/cmd/istiohbone")
	cmd.WaitDelay = 5 * time.Second
	if b, err := cmd.CombinedOutput(); err != nil {
		msg := strings.Join(strings.Fields(string(b)), " ")
		if len(msg) > 400 {
			msg = msg[:400] + "..."
		}
		return "", fmt.Errorf("go build ./perf/cmd/istiohbone: %w: %s (run from the module root, or pass --istiohbone)", err, msg)
	}
	return out, nil
}

// startIstio writes a CA and the two certificates under dir/istio and starts bin as the server
// and then as the client; it returns once both accept. On error, whatever started is stopped.
func startIstio(ctx context.Context, dir, bin string) (_ *peer, err error) {
	if bin == "" {
		return nil, errors.New("no istiohbone binary")
	}
	sd := filepath.Join(dir, "istio")
	if err := os.MkdirAll(sd, 0o700); err != nil {
		return nil, err
	}
	certs := mtlsCerts{caCN: "meshbench istio hbone test CA", serverName: istioSrvName, serverIP: istioServerIP,
		clientCN: "istio-hbone-client.meshbench.test"}
	if err := certs.write(sd); err != nil {
		return nil, fmt.Errorf("istio hbone certificates: %w", err)
	}
	ip := &peer{name: "istio", bin: bin, path: peerPath("istio", istioClientIP), rtt: true}
	defer func() {
		if err != nil {
			ip.stop()
		}
	}()
	srvAddr := hostPort(istioServerIP, istioPort)
	ca := filepath.Join(sd, "ca.pem")
	if err := ip.start(ctx, "server", []string{"--mode", "server", "--listen", srvAddr,
		"--cert", filepath.Join(sd, "server.pem"), "--key", filepath.Join(sd, "server.key"), "--ca", ca},
		filepath.Join(sd, "server.log"), srvAddr); err != nil {
		return nil, err
	}
	ports := make([]string, len(istioPorts))
	for i, p := range istioPorts {
		ports[i] = strconv.Itoa(p)
	}
	if err := ip.start(ctx, "client", []string{"--mode", "client", "--listen", istioClientIP, "--ports", strings.Join(ports, ","),
		"--server", srvAddr, "--server-name", istioSrvName, "--target-host", serverIP,
		"--cert", filepath.Join(sd, "client.pem"), "--key", filepath.Join(sd, "client.key"), "--ca", ca},
		filepath.Join(sd, "client.log"), hostPort(istioClientIP, istioPorts[len(istioPorts)-1])); err != nil {
		return nil, err
	}
	return ip, nil
}
