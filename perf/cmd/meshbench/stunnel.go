//go:build linux

package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
)

// The stunnel pair (performance.md's "stunnel pair" peer): the client connects to the client
// stunnel on stunnelClientIP, which speaks TLS 1.3 with a client certificate to the server
// stunnel on stunnelServerIP, which verifies it against the same throwaway CA (mutual TLS) and
// connects to the same servers on serverIP. One service per server port, on the same port
// numbers.
const (
	stunnelClientIP = "127.40.3.1"
	stunnelServerIP = "127.40.3.2"
	stunnelSrvName  = "stunnel-server.meshbench.test"
)

// stunnelPorts are the server ports the pair forwards: the throughput servers and the echo
// for the path check.
var stunnelPorts = []struct {
	name string
	port int
}{{"sink", sinkPort}, {"source", sourcePort}, {"echo", echoPort}}

// findStunnel returns the stunnel binary on PATH (Debian's stunnel4 installs both names).
func findStunnel() (string, error) {
	for _, n := range []string{"stunnel4", "stunnel"} {
		if p, err := exec.LookPath(n); err == nil {
			return p, nil
		}
	}
	return "", errors.New("neither stunnel4 nor stunnel is on PATH (Debian: apt-get install stunnel4)")
}

// startStunnel writes a CA, the two certificates and the two configs under dir/stunnel and
// starts both processes; it returns once both accept. On error, whatever started is stopped.
func startStunnel(ctx context.Context, dir string) (_ *peer, err error) {
	bin, err := findStunnel()
	if err != nil {
		return nil, err
	}
	sd := filepath.Join(dir, "stunnel")
	if err := os.MkdirAll(sd, 0o700); err != nil {
		return nil, err
	}
	certs := mtlsCerts{caCN: "meshbench stunnel test CA", serverName: stunnelSrvName, serverIP: stunnelServerIP,
		clientCN: "stunnel-client.meshbench.test"}
	if err := certs.write(sd); err != nil {
		return nil, fmt.Errorf("stunnel certificates: %w", err)
	}
	common := "foreground = yes\npid =\ndebug = warning\nsslVersionMin = TLSv1.3\nCAfile = " + filepath.Join(sd, "ca.pem") +
		"\nverifyChain = yes\n"
	var srvConf, cliConf strings.Builder
	srvConf.WriteString("; meshbench stunnel server (mTLS: the client certificate must chain to ca.pem)\n" + common +
		"cert = " + filepath.Join(sd, "server.pem") + "\nkey = " + filepath.Join(sd, "server.key") + "\n")
	cliConf.WriteString("; meshbench stunnel client\n" + common + "client = yes\ncheckHost = " + stunnelSrvName +
		"\ncert = " + filepath.Join(sd, "client.pem") + "\nkey = " + filepath.Join(sd, "client.key") + "\n")
	for _, s := range stunnelPorts {
		fmt.Fprintf(&srvConf, "\n[%s]\naccept = %s\nconnect = %s\n", s.name, hostPort(stunnelServerIP, s.port), hostPort(serverIP, s.port))
		fmt.Fprintf(&cliConf, "\n[%s]\naccept = %s\nconnect = %s\n", s.name, hostPort(stunnelClientIP, s.port), hostPort(stunnelServerIP, s.port))
	}
	st := &peer{name: "stunnel", bin: bin, path: peerPath("stunnel", stunnelClientIP)}
	defer func() {
		if err != nil {
			st.stop()
		}
	}()
	for _, c := range []struct {
		role, conf, ip string
	}{{"server", srvConf.String(), stunnelServerIP}, {"client", cliConf.String(), stunnelClientIP}} {
		confFile := filepath.Join(sd, c.role+".conf")
		if err := os.WriteFile(confFile, []byte(c.conf), 0o600); err != nil {
			return nil, err
		}
		ready := hostPort(c.ip, stunnelPorts[len(stunnelPorts)-1].port)
		if err := st.start(ctx, c.role, []string{confFile}, filepath.Join(sd, c.role+".log"), ready); err != nil {
			return nil, err
		}
	}
	return st, nil
}
