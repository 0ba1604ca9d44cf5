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

// peer is one of performance.md's peers that runs beside ztgo in the same run: two processes
// of its own, a server side (started first) and a client side that the bench's clients connect
// to on the same port numbers as the servers.
type peer struct {
	name  string // the path's name in the results: "stunnel", "istio"
	bin   string
	path  path
	rtt   bool // also runs the round-trip workloads
	procs []peerProc
}

type peerProc struct {
	role string
	cmd  *exec.Cmd
	done chan struct{} // closed once the process has been waited for
	log  string
}

// start runs p.bin with args as role (its output in logFile) and waits until it accepts on
// readyAddr, it exits, or readyTimeout passes.
func (p *peer) start(ctx context.Context, role string, args []string, logFile, readyAddr string) error {
	lf, err := os.Create(logFile)
	if err != nil {
		return fmt.Errorf("%s %s log: %w", p.name, role, err)
	}
	cmd := exec.Command(p.bin, args...)
	cmd.Stdout, cmd.Stderr = lf, lf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	err = cmd.Start()
	lf.Close()
	if err != nil {
		return fmt.Errorf("start %s %s: %w", p.name, role, err)
	}
	done := make(chan struct{})
	p.procs = append(p.procs, peerProc{role: role, cmd: cmd, done: done, log: logFile})
	go func() { cmd.Wait(); close(done) }()
	if err := waitListening(ctx, readyAddr, done, readyTimeout); err != nil {
		return fmt.Errorf("%s %s: %w; log: %s", p.name, role, err, tailFile(logFile))
	}
	return nil
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

// stop ends the processes (SIGTERM, then SIGKILL after a short grace) and waits for them; safe
// to call twice and on nil.
func (p *peer) stop() {
	if p == nil {
		return
	}
	for _, pr := range p.procs {
		pr.cmd.Process.Signal(syscall.SIGTERM)
	}
	deadline := time.Now().Add(2 * time.Second)
	for _, pr := range p.procs {
		select {
		case <-pr.done:
		case <-time.After(time.Until(deadline)):
			pr.cmd.Process.Kill()
			<-pr.done
		}
	}
	p.procs = nil
}

// alive returns an error when one of the processes has exited.
func (p *peer) alive() error {
	if p == nil {
		return nil
	}
	for _, pr := range p.procs {
		select {
		case <-pr.done:
			return fmt.Errorf("%s %s exited; log: %s", p.name, pr.role, tailFile(pr.log))
		default:
		}
	}
	return nil
}

// logNotes summarises what each process logged.
func (p *peer) logNotes() []string {
	var notes []string
	for _, pr := range p.procs {
		b, err := os.ReadFile(pr.log)
		if err != nil {
			notes = append(notes, fmt.Sprintf("%s %s log: %v", p.name, pr.role, err))
			continue
		}
		lines := strings.Split(strings.TrimSpace(string(b)), "\n")
		if len(lines) == 1 && lines[0] == "" {
			notes = append(notes, fmt.Sprintf("%s %s logged nothing.", p.name, pr.role))
			continue
		}
		shown := lines[:min(3, len(lines))]
		why := ""
		if pr.role == "server" {
			why = " (the readiness probe, a TCP connect and close, shows in a TLS server's log as a handshake cut short)"
		}
		notes = append(notes, fmt.Sprintf("%s %s logged %d line(s)%s; first: `%s`", p.name, pr.role, len(lines), why, strings.Join(shown, "` `")))
	}
	return notes
}

// logs is the tail of each process's log, for error messages.
func (p *peer) logs() string {
	var parts []string
	for _, pr := range p.procs {
		parts = append(parts, fmt.Sprintf("%s log: %s", pr.role, tailFile(pr.log)))
	}
	return strings.Join(parts, "; ")
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

// peerPath dials a peer's client side on ip at the server's port, from clientIP.
func peerPath(name, ip string) path {
	return path{name: name, dial: func(ctx context.Context, port int) (*net.TCPConn, error) {
		c, err := clientDialer.DialContext(ctx, "tcp", hostPort(ip, port))
		if err != nil {
			return nil, fmt.Errorf("connect to the %s client: %w", name, err)
		}
		return c.(*net.TCPConn), nil
	}}
}

// mtlsCerts names the throwaway certificates of one peer pair.
type mtlsCerts struct {
	caCN       string // the CA's common name
	serverName string // the server certificate's CN and DNS SAN
	serverIP   string // and its IP SAN
	clientCN   string
}

// write writes a throwaway ECDSA P-256 CA (ca.pem) and a server and a client certificate
// signed by it (server.pem/key, client.pem/key) into dir.
func (mc mtlsCerts) write(dir string) error {
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return fmt.Errorf("CA key: %w", err)
	}
	now := time.Now()
	caTmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: mc.caCN},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(24 * time.Hour),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		return fmt.Errorf("CA certificate: %w", err)
	}
	ca, err := x509.ParseCertificate(caDER)
	if err != nil {
		return fmt.Errorf("CA certificate: %w", err)
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
		{"server", mc.serverName, x509.ExtKeyUsageServerAuth, []string{mc.serverName}, []net.IP{net.ParseIP(mc.serverIP)}},
		{"client", mc.clientCN, x509.ExtKeyUsageClientAuth, nil, nil},
	} {
		key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			return fmt.Errorf("%s key: %w", leaf.name, err)
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
			return fmt.Errorf("%s certificate: %w", leaf.name, err)
		}
		kder, err := x509.MarshalPKCS8PrivateKey(key)
		if err != nil {
			return fmt.Errorf("%s key: %w", leaf.name, err)
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
	if err := os.WriteFile(name, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), 0o600); err != nil {
		return fmt.Errorf("write %s: %w", name, err)
	}
	return nil
}

// pids lists the processes' ids, for the log.
func (p *peer) pids() string {
	var parts []string
	for _, pr := range p.procs {
		parts = append(parts, fmt.Sprintf("%s %d", pr.role, pr.cmd.Process.Pid))
	}
	return strings.Join(parts, ", ")
}
