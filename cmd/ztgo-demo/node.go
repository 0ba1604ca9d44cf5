package main

import (
	"bufio"
	"context"
	"encoding/json"
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

// ztgoNode is one ztgo process.
type ztgoNode struct {
	name    string
	host    string // address of its SOCKS5, admin, metrics and readiness listeners
	logPath string
	cmd     *exec.Cmd
	done    chan struct{} // closed once the process has exited
	waitErr error         // set before done is closed
	http    *http.Client
}

func (n *ztgoNode) socks5Addr() string { return hostPort(n.host, socks5Port) }
func (n *ztgoNode) adminURL() string   { return "http://" + hostPort(n.host, adminPort) }
func (n *ztgoNode) metricsURL() string { return "http://" + hostPort(n.host, metricsPort) + "/metrics" }
func (n *ztgoNode) readyURL() string {
	return "http://" + hostPort(n.host, readinessPort) + "/healthz/ready"
}
func hostPort(h string, p int) string { return net.JoinHostPort(h, strconv.Itoa(p)) }
func (n *ztgoNode) exited() bool {
	select {
	case <-n.done:
		return true
	default:
		return false
	}
}

// startNode runs bin as node name with the shared mesh config and CA directory; its output goes
// to dir/<name>.log.
func startNode(bin, dir, caDir, name, host string) (*ztgoNode, error) {
	n := &ztgoNode{
		name: name, host: host, logPath: dir + string(os.PathSeparator) + name + ".log",
		done: make(chan struct{}),
		// No proxy from the environment, short timeouts: these are local admin endpoints.
		http: &http.Client{Timeout: 2 * time.Second, Transport: &http.Transport{Proxy: nil, DisableKeepAlives: true}},
	}
	logf, err := os.Create(n.logPath)
	if err != nil {
		return nil, err
	}
	n.cmd = exec.Command(bin, "run",
		"--node", name,
		"--config", dir+string(os.PathSeparator)+meshFile,
		"--ca-dir", caDir,
		"--socks5", hostPort(host, socks5Port),
		"--admin", hostPort(host, adminPort),
		"--metrics", hostPort(host, metricsPort),
		"--readiness", hostPort(host, readinessPort),
		"--drain-timeout", "2s",
	)
	n.cmd.Stdout, n.cmd.Stderr = logf, logf
	n.cmd.SysProcAttr = childAttrs()
	if err := n.cmd.Start(); err != nil {
		logf.Close()
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	go func() {
		n.waitErr = n.cmd.Wait()
		logf.Close()
		close(n.done)
	}()
	return n, nil
}

// waitReady polls /healthz/ready until it answers 200, the process exits, or timeout passes.
func (n *ztgoNode) waitReady(ctx context.Context, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	last := "no answer yet"
	for {
		if n.exited() {
			return fmt.Errorf("%s exited before it was ready (%v)", n.name, n.waitErr)
		}
		resp, err := n.http.Get(n.readyURL())
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
			return fmt.Errorf("%s not ready after %s (%s)", n.name, timeout, last)
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("%s: stopped waiting for readiness: %w", n.name, ctx.Err())
		case <-n.done:
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// stop sends SIGTERM and waits up to grace for the process to exit, then kills it.
func (n *ztgoNode) stop(grace time.Duration) error {
	if n == nil || n.cmd == nil || n.cmd.Process == nil {
		return nil
	}
	if !n.exited() {
		n.cmd.Process.Signal(syscall.SIGTERM)
	}
	select {
	case <-n.done:
		return n.waitErr
	case <-time.After(grace):
		n.cmd.Process.Kill()
		<-n.done
		return fmt.Errorf("did not exit within %s of SIGTERM; killed", grace)
	}
}

// logTail returns the last lines of the node's log.
func (n *ztgoNode) logTail(lines int) []string {
	f, err := os.Open(n.logPath)
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

// flowRecord is one flow of /debug/flows (the fields the demo prints).
type flowRecord struct {
	ID          uint64      `json:"id"`
	Direction   string      `json:"direction"`
	Src         string      `json:"src"`
	Dst         string      `json:"dst"`
	SrcIdentity string      `json:"srcIdentity"`
	DstIdentity string      `json:"dstIdentity"`
	TraceParent string      `json:"traceparent"`
	Outcome     string      `json:"outcome"`
	TotalUS     float64     `json:"totalMicros"`
	Stages      []stageTime `json:"stages"`
}

type stageTime struct {
	Stage  string  `json:"stage"`
	WaitUS float64 `json:"queueMicros"`
	WorkUS float64 `json:"workMicros"`
}

// flows fetches the node's recent flows.
func (n *ztgoNode) flows() ([]flowRecord, error) {
	body, err := n.get(n.adminURL() + "/debug/flows")
	if err != nil {
		return nil, err
	}
	var doc struct {
		Recent []flowRecord `json:"recent"`
	}
	if err := json.Unmarshal(body, &doc); err != nil {
		return nil, fmt.Errorf("%s /debug/flows: %w", n.name, err)
	}
	return doc.Recent, nil
}

func (n *ztgoNode) get(url string) ([]byte, error) {
	resp, err := n.http.Get(url)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 8<<20))
	if err != nil {
		return nil, fmt.Errorf("GET %s: %w", url, err)
	}
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("GET %s: %s", url, resp.Status)
	}
	return body, nil
}
