package cluster

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os/exec"
	"syscall"
	"time"

	"github.com/ztgo/ztgo/redirect"
)

// Namespace is one named network namespace of a Cluster: a node, a pod, an external host, or
// the fabric. Its methods create sockets and run programs inside it.
type Namespace struct {
	name  string // the cluster's name for it: "node-a", "a1"
	netns string // the namespace's name: "zt<id>-node-a"
	ip    netip.Addr
	ns    redirect.Netns
}

// Name is the name the Cluster knows it by ("node-a", or the name given to AddPod).
func (n *Namespace) Name() string { return n.name }

// NetnsName is the network namespace's name, for `ip netns exec` and `ip -n`.
func (n *Namespace) NetnsName() string { return n.netns }

// Path is the namespace's bind mount, /var/run/netns/<NetnsName>.
func (n *Namespace) Path() string { return netnsDir + "/" + n.netns }

// IP is the namespace's address on its eth0: a node's or external's fabric address, a pod's
// address. The fabric namespace has none.
func (n *Namespace) IP() netip.Addr { return n.ip }

// Netns is an open handle to the namespace, valid until the Cluster removes it. Sockets
// created inside it with Netns.Do stay in the namespace for their whole life.
func (n *Namespace) Netns() redirect.Netns { return n.ns }

func (n *Namespace) String() string { return n.netns }

// Listen opens a TCP listener inside the namespace on addr ("ip:port", ":port").
func (n *Namespace) Listen(addr string) (*net.TCPListener, error) {
	var ln net.Listener
	if err := n.ns.Do(func() error {
		var err error
		ln, err = net.Listen("tcp4", addr)
		return err
	}); err != nil {
		return nil, fmt.Errorf("listen %s in %s: %w", addr, n.netns, err)
	}
	return ln.(*net.TCPListener), nil
}

// Dial connects to dst from inside the namespace the way an unmodified application does: a
// plain socket with no mark and no bound source, so the capture rules of a pod apply to it.
func (n *Namespace) Dial(ctx context.Context, dst netip.AddrPort) (*net.TCPConn, error) {
	c, err := n.dial(ctx, "tcp4", dst.String())
	if err != nil {
		return nil, err
	}
	return c.(*net.TCPConn), nil
}

// dial connects to addr, which must be an IP literal with a port: a host name would be
// resolved by goroutines outside the namespace.
func (n *Namespace) dial(ctx context.Context, network, addr string) (net.Conn, error) {
	if _, err := netip.ParseAddrPort(addr); err != nil {
		return nil, fmt.Errorf("dial %s from %s: want an IP address and port: %w", addr, n.netns, err)
	}
	var c net.Conn
	if err := n.ns.Do(func() error {
		var d net.Dialer
		var err error
		c, err = d.DialContext(ctx, network, addr)
		return err
	}); err != nil {
		return nil, fmt.Errorf("dial %s from %s: %w", addr, n.netns, err)
	}
	return c, nil
}

// commandWaitDelay bounds how long a Command's Wait waits for its output after the process
// ended or was asked to stop.
const commandWaitDelay = 5 * time.Second

// Command returns a command that runs name with args inside the namespace, through
// `ip netns exec` (which execs the program, so the command's process is the program itself,
// in a mount namespace of its own with the namespace's /sys). When ctx ends, the program gets
// SIGTERM, and is killed if it has not exited commandWaitDelay later.
func (n *Namespace) Command(ctx context.Context, name string, args ...string) *exec.Cmd {
	cmd := exec.CommandContext(ctx, "ip", append([]string{"netns", "exec", n.netns, name}, args...)...)
	cmd.Cancel = func() error { return cmd.Process.Signal(syscall.SIGTERM) }
	cmd.WaitDelay = commandWaitDelay
	return cmd
}

// maxHTTPBody bounds what HTTPGet reads; metrics pages are far smaller.
const maxHTTPBody = 64 << 20

// HTTPGet fetches url from inside the namespace with one fresh connection and returns the
// status code and body. The URL's host must be an IP address (127.0.0.1:15000 for the admin
// port of a process running in the namespace).
func (n *Namespace) HTTPGet(ctx context.Context, url string) (int, []byte, error) {
	tr := &http.Transport{
		DialContext:       n.dial,
		DisableKeepAlives: true,
		Proxy:             nil, // never a proxy from the environment
	}
	defer tr.CloseIdleConnections()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return 0, nil, fmt.Errorf("GET %s from %s: %w", url, n.netns, err)
	}
	resp, err := (&http.Client{Transport: tr}).Do(req)
	if err != nil {
		return 0, nil, fmt.Errorf("GET %s from %s: %w", url, n.netns, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, maxHTTPBody))
	if err != nil {
		return resp.StatusCode, body, fmt.Errorf("GET %s from %s: read body: %w", url, n.netns, err)
	}
	return resp.StatusCode, body, nil
}

// WaitHTTP polls url from inside the namespace until it answers with status want, and returns
// that answer's body. It gives up after timeout with the last status or error seen, which
// makes it the readiness check for a process: WaitHTTP("http://127.0.0.1:15021/healthz/ready",
// 200, 10*time.Second).
func (n *Namespace) WaitHTTP(url string, want int, timeout time.Duration) ([]byte, error) {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	var last string
	for {
		attempt, cancelAttempt := context.WithTimeout(ctx, time.Second)
		status, body, err := n.HTTPGet(attempt, url)
		cancelAttempt()
		switch {
		case err != nil && ctx.Err() != nil && last != "":
			// Cut short by the overall timeout: the previous answer says more.
		case err != nil:
			last = err.Error()
		case status == want:
			return body, nil
		default:
			last = fmt.Sprintf("status %d: %.200s", status, body)
		}
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("wait for %s from %s to answer %d: none within %v; last: %s", url, n.netns, want, timeout, last)
		case <-tick.C:
		}
	}
}
