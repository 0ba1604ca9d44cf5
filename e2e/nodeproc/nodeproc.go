// Package nodeproc runs ztgo nodes as child processes of one program on one machine: the
// harness that ztgo-demo and meshbench share. Each node runs `ztgo run` with the mesh config
// and CA directory of the run and binds its own listeners (SOCKS5, admin, metrics, readiness)
// on a host address of its own, a loopback address: all of 127/8 is local on Linux. Start runs
// a node, WaitReady polls its readiness endpoint, Stop sends SIGTERM.
package nodeproc

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// The ports of a node's own listeners, on its host address.
const (
	SOCKS5Port    = 15080
	AdminPort     = 15000
	MetricsPort   = 15020
	ReadinessPort = 15021
)

// Config says how to run one node.
type Config struct {
	Bin     string // the ztgo binary
	Name    string // --node: which workloads of the mesh config are local
	Host    string // the address its SOCKS5, admin, metrics and readiness listeners bind
	Mesh    string // --config: the mesh config file, ztunnel's LOCAL_XDS YAML
	CADir   string // --ca-dir
	LogPath string // where its stdout and stderr go
	Args    []string
}

// Node is one running ztgo process.
type Node struct {
	Name, Host, LogPath string
	Cmd                 *exec.Cmd
	// HTTP talks to the node's admin, metrics and readiness endpoints: no proxy from the
	// environment, short timeouts.
	HTTP *http.Client

	done chan struct{} // closed once the process has exited
	err  error         // how it exited; set before done is closed
}

// Start runs cfg.Bin as node cfg.Name, draining for at most 2s when stopped, with cfg.Args
// appended to its command line. It fails when another process listens on one of the node's
// ports already (a wildcard listener covers the host address too): that process would answer
// WaitReady for the node while the node itself fails to bind.
func Start(cfg Config) (*Node, error) {
	for _, p := range []int{SOCKS5Port, AdminPort, MetricsPort, ReadinessPort} {
		addr := hostPort(cfg.Host, p)
		if c, err := net.DialTimeout("tcp", addr, time.Second); err == nil {
			c.Close()
			return nil, fmt.Errorf("start %s: %s: address already in use: another process accepts connections there", cfg.Name, addr)
		}
	}
	return start(cfg)
}

func start(cfg Config) (*Node, error) {
	n := &Node{
		Name: cfg.Name, Host: cfg.Host, LogPath: cfg.LogPath,
		HTTP: &http.Client{Timeout: 3 * time.Second, Transport: &http.Transport{Proxy: nil, DisableKeepAlives: true}},
		done: make(chan struct{}),
	}
	logf, err := os.Create(cfg.LogPath)
	if err != nil {
		return nil, err
	}
	args := []string{"run",
		"--node", cfg.Name,
		"--config", cfg.Mesh,
		"--ca-dir", cfg.CADir,
		"--socks5", hostPort(cfg.Host, SOCKS5Port),
		"--admin", hostPort(cfg.Host, AdminPort),
		"--metrics", hostPort(cfg.Host, MetricsPort),
		"--readiness", hostPort(cfg.Host, ReadinessPort),
		"--drain-timeout", "2s",
	}
	n.Cmd = exec.Command(cfg.Bin, append(args, cfg.Args...)...)
	n.Cmd.Stdout, n.Cmd.Stderr = logf, logf
	n.Cmd.SysProcAttr = childAttrs()
	if err := n.Cmd.Start(); err != nil {
		logf.Close()
		return nil, fmt.Errorf("start %s: %w", cfg.Name, err)
	}
	go func() {
		n.err = n.Cmd.Wait()
		logf.Close()
		close(n.done)
	}()
	return n, nil
}

func hostPort(h string, p int) string { return net.JoinHostPort(h, strconv.Itoa(p)) }

// SOCKS5Addr is the address of the node's SOCKS5 entry.
func (n *Node) SOCKS5Addr() string { return hostPort(n.Host, SOCKS5Port) }

// AdminURL is the base URL of its admin endpoint (no trailing slash).
func (n *Node) AdminURL() string { return "http://" + hostPort(n.Host, AdminPort) }

// MetricsURL is the URL of its Prometheus metrics.
func (n *Node) MetricsURL() string { return "http://" + hostPort(n.Host, MetricsPort) + "/metrics" }

// ReadyURL is the URL of its readiness check.
func (n *Node) ReadyURL() string {
	return "http://" + hostPort(n.Host, ReadinessPort) + "/healthz/ready"
}

// Done is closed once the process has exited.
func (n *Node) Done() <-chan struct{} { return n.done }

// Exited reports whether the process has exited.
func (n *Node) Exited() bool {
	select {
	case <-n.done:
		return true
	default:
		return false
	}
}

// Err is how the process exited (nil for status 0) once Done is closed; nil before.
func (n *Node) Err() error {
	if !n.Exited() {
		return nil
	}
	return n.err
}

// WaitReady polls the readiness endpoint until it answers 200, the process exits, ctx ends or
// timeout passes.
func (n *Node) WaitReady(ctx context.Context, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	last := "no answer yet"
	for {
		if n.Exited() {
			return fmt.Errorf("%s exited before it was ready (%v)", n.Name, n.err)
		}
		resp, err := n.HTTP.Get(n.ReadyURL())
		if err == nil {
			body, _ := io.ReadAll(io.LimitReader(resp.Body, 1024))
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
			last = fmt.Sprintf("%s: %s", resp.Status, strings.TrimSpace(string(body)))
		} else {
			last = err.Error()
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s not ready after %s (%s)", n.Name, timeout, last)
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("%s: stopped waiting for readiness: %w", n.Name, ctx.Err())
		case <-n.done:
		case <-time.After(25 * time.Millisecond):
		}
	}
}

// Stop sends SIGTERM, unless the process has exited already, and waits up to grace for it to
// exit, then kills it. It returns how the process exited: an error for a nonzero exit, or for
// a process that had to be killed.
func (n *Node) Stop(grace time.Duration) error {
	if n == nil || n.Cmd == nil || n.Cmd.Process == nil {
		return nil
	}
	if !n.Exited() {
		n.Cmd.Process.Signal(syscall.SIGTERM)
	}
	select {
	case <-n.done:
		return n.err
	case <-time.After(grace):
		n.Cmd.Process.Kill()
		<-n.done
		return fmt.Errorf("did not exit within %s of SIGTERM; killed", grace)
	}
}

// LogTail returns the last lines of the node's log.
func (n *Node) LogTail(lines int) []string {
	f, err := os.Open(n.LogPath)
	if err != nil {
		return nil
	}
	defer f.Close()
	var all []string
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		all = append(all, sc.Text())
		if len(all) > lines {
			all = all[1:]
		}
	}
	return all
}
