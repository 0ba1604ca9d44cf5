//go:build linux

package main

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"
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

// stunnelPair is the two running stunnel processes.
type stunnelPair struct {
	bin   string
	procs []*exec.Cmd
	done  []chan struct{} // closed once each process has been waited for
	logs  []string
}

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
func startStunnel(ctx context.Context, dir string) (_ *stunnelPair, err error) {
	bin, err := findStunnel()
	if err != nil {
		return nil, err
	}
	sd := filepath.Join(dir, "stunnel")
	if err := os.MkdirAll(sd, 0o700); err != nil {
		return nil, err
	}
	if err := writeStunnelCerts(sd); err != nil {
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
	st := &stunnelPair{bin: bin}
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
		logFile := filepath.Join(sd, c.role+".log")
		lf, err := os.Create(logFile)
		if err != nil {
			return nil, err
		}
		cmd := exec.Command(bin, confFile)
		cmd.Stdout, cmd.Stderr = lf, lf
		cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
		err = cmd.Start()
		lf.Close()
		if err != nil {
			return nil, fmt.Errorf("start stunnel %s: %w", c.role, err)
		}
		done := make(chan struct{})
		st.procs = append(st.procs, cmd)
		st.done = append(st.done, done)
		st.logs = append(st.logs, logFile)
		go func() { cmd.Wait(); close(done) }()
		if err := waitListening(ctx, hostPort(c.ip, stunnelPorts[len(stunnelPorts)-1].port), done, readyTimeout); err != nil {
			return nil, fmt.Errorf("stunnel %s: %w; log: %s", c.role, err, tailFile(logFile))
		}
	}
	return st, nil
}

// waitListening polls addr until it accepts, the process exits, or limit passes.
func waitListening(ctx context.Context, addr string, exited <-chan struct{}, limit time.Duration) error {
	deadline := time.Now().Add(limit)
	for {
		c, err := net.DialTimeout("tcp", addr, time.Second)
		if err == nil {
			c.Close()
			return nil
		}
		select {
		case <-exited:
			return fmt.Errorf("exited before listening on %s", addr)
		case <-ctx.Done():
			return context.Cause(ctx)
		case <-time.After(20 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("not listening on %s after %s: %v", addr, limit, err)
		}
	}
}

// stop kills both processes (SIGTERM, then SIGKILL after a short grace) and waits for them;
// safe to call twice.
func (st *stunnelPair) stop() {
	if st == nil {
		return
	}
	for _, cmd := range st.procs {
		cmd.Process.Signal(syscall.SIGTERM)
	}
	deadline := time.Now().Add(2 * time.Second)
	for i, cmd := range st.procs {
		select {
		case <-st.done[i]:
		case <-time.After(time.Until(deadline)):
			cmd.Process.Kill()
			<-st.done[i]
		}
	}
	st.procs, st.done = nil, nil
}

// alive returns an error when either stunnel process has exited.
func (st *stunnelPair) alive() error {
	if st == nil {
		return nil
	}
	for i := range st.procs {
		select {
		case <-st.done[i]:
			return fmt.Errorf("stunnel %s exited; log: %s", []string{"server", "client"}[i], tailFile(st.logs[i]))
		default:
		}
	}
	return nil
}

func tailFile(name string) string {
	b, err := os.ReadFile(name)
	if err != nil {
		return err.Error()
	}
	s := strings.TrimSpace(string(b))
	if len(s) > 600 {
		s = "..." + s[len(s)-600:]
	}
	if s == "" {
		return "(empty)"
	}
	return strings.ReplaceAll(s, "\n", " | ")
}

// stunnelPath dials the client stunnel's service for port from clientIP.
func stunnelPath() path {
	return path{name: "stunnel", dial: func(ctx context.Context, port int) (*net.TCPConn, error) {
		c, err := clientDialer.DialContext(ctx, "tcp", hostPort(stunnelClientIP, port))
		if err != nil {
			return nil, fmt.Errorf("connect to stunnel client: %w", err)
		}
		return c.(*net.TCPConn), nil
	}}
}

// writeStunnelCerts writes a throwaway ECDSA P-256 CA (ca.pem) and a server and a client
// certificate signed by it (server.pem/key, client.pem/key) into dir.
func writeStunnelCerts(dir string) error {
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return err
	}
	now := time.Now()
	caTmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "meshbench stunnel test CA"},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(24 * time.Hour),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		return err
	}
	ca, err := x509.ParseCertificate(caDER)
	if err != nil {
		return err
	}
	if err := writePEM(filepath.Join(dir, "ca.pem"), "CERTIFICATE", caDER); err != nil {
		return err
	}
	for i, leaf := range []struct {
		name string
		cn   string
		eku  x509.ExtKeyUsage
		dns  []string
		ips  []net.IP
	}{
		{"server", stunnelSrvName, x509.ExtKeyUsageServerAuth, []string{stunnelSrvName}, []net.IP{net.ParseIP(stunnelServerIP)}},
		{"client", "stunnel-client.meshbench.test", x509.ExtKeyUsageClientAuth, nil, nil},
	} {
		key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			return err
		}
		tmpl := &x509.Certificate{
			SerialNumber: big.NewInt(int64(i + 2)),
			Subject:      pkix.Name{CommonName: leaf.cn},
			NotBefore:    now.Add(-time.Hour),
			NotAfter:     now.Add(24 * time.Hour),
			KeyUsage:     x509.KeyUsageDigitalSignature,
			ExtKeyUsage:  []x509.ExtKeyUsage{leaf.eku},
			DNSNames:     leaf.dns,
			IPAddresses:  leaf.ips,
		}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, &key.PublicKey, caKey)
		if err != nil {
			return err
		}
		kder, err := x509.MarshalPKCS8PrivateKey(key)
		if err != nil {
			return err
		}
		if err := writePEM(filepath.Join(dir, leaf.name+".pem"), "CERTIFICATE", der); err != nil {
			return err
		}
		if err := writePEM(filepath.Join(dir, leaf.name+".key"), "PRIVATE KEY", kder); err != nil {
			return err
		}
	}
	return nil
}

func writePEM(name, typ string, der []byte) error {
	return os.WriteFile(name, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), 0o600)
}
