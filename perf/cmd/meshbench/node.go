//go:build linux

package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"math"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// clockTicks is USER_HZ, the unit of utime and stime in /proc/<pid>/stat (100 on every Linux
// architecture Go supports).
const clockTicks = 100

// ztgoNode is one ztgo process.
type ztgoNode struct {
	name    string
	host    string
	logPath string
	cmd     *exec.Cmd
	done    chan struct{} // closed once the process has exited
	waitErr error         // set before done is closed
	http    *http.Client
}

func (n *ztgoNode) socks5Addr() string { return hostPort(n.host, socks5Port) }
func (n *ztgoNode) adminURL() string   { return "http://" + hostPort(n.host, adminPort) }
func (n *ztgoNode) metricsURL() string {
	return "http://" + hostPort(n.host, metricsPort) + "/metrics"
}
func (n *ztgoNode) readyURL() string {
	return "http://" + hostPort(n.host, readinessPort) + "/healthz/ready"
}

func (n *ztgoNode) exited() bool {
	select {
	case <-n.done:
		return true
	default:
		return false
	}
}

// alive returns an error when the process has exited.
func (n *ztgoNode) alive() error {
	if n.exited() {
		return fmt.Errorf("ztgo node %s exited during the run (%v); log: %s", n.name, n.waitErr, n.logPath)
	}
	return nil
}

// startNode runs bin as node name with the shared mesh config and CA directory; its output goes
// to dir/<name>.log.
func startNode(bin, dir, caDir, name, host string) (*ztgoNode, error) {
	n := &ztgoNode{
		name: name, host: host, logPath: filepath.Join(dir, name+".log"),
		done: make(chan struct{}),
		http: &http.Client{Timeout: 3 * time.Second, Transport: &http.Transport{Proxy: nil, DisableKeepAlives: true}},
	}
	logf, err := os.Create(n.logPath)
	if err != nil {
		return nil, err
	}
	n.cmd = exec.Command(bin, "run",
		"--node", name,
		"--config", filepath.Join(dir, meshFile),
		"--ca-dir", caDir,
		"--socks5", hostPort(host, socks5Port),
		"--admin", hostPort(host, adminPort),
		"--metrics", hostPort(host, metricsPort),
		"--readiness", hostPort(host, readinessPort),
		"--log-level", "warn",
		"--drain-timeout", "2s",
	)
	n.cmd.Stdout, n.cmd.Stderr = logf, logf
	// Own process group (a terminal's Ctrl-C reaches only the bench, which stops the nodes), and
	// SIGTERM from the kernel should the bench die without stopping them.
	n.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGTERM}
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
			return fmt.Errorf("%s exited before it was ready (%v); log tail:\n%s", n.name, n.waitErr, n.logTail(10))
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
			return fmt.Errorf("%s not ready after %s (%s); log tail:\n%s", n.name, timeout, last, n.logTail(10))
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-n.done:
		case <-time.After(25 * time.Millisecond):
		}
	}
}

// stop sends SIGTERM and waits up to grace for the process to exit, then kills it. A nonzero
// exit after SIGTERM is an error.
func (n *ztgoNode) stop(grace time.Duration) error {
	if n == nil || n.cmd == nil || n.cmd.Process == nil {
		return nil
	}
	if n.exited() {
		return n.waitErr
	}
	n.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-n.done:
		return n.waitErr
	case <-time.After(grace):
		n.cmd.Process.Kill()
		<-n.done
		return fmt.Errorf("%s did not exit within %s of SIGTERM; killed", n.name, grace)
	}
}

// logTail returns the last lines of the node's log.
func (n *ztgoNode) logTail(lines int) string {
	all := n.logLines()
	if len(all) > lines {
		all = all[len(all)-lines:]
	}
	return "  " + strings.Join(all, "\n  ")
}

func (n *ztgoNode) logLines() []string {
	f, err := os.Open(n.logPath)
	if err != nil {
		return nil
	}
	defer f.Close()
	var all []string
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() && len(all) < 100000 {
		all = append(all, sc.Text())
	}
	return all
}

// cpuSeconds is the process's utime+stime.
func (n *ztgoNode) cpuSeconds() (float64, error) {
	c, err := procCPU(fmt.Sprint(n.cmd.Process.Pid))
	if err != nil {
		return 0, fmt.Errorf("%s cpu: %w", n.name, err)
	}
	return c, nil
}

// procCPU is utime+stime of /proc/<pid> ("self" for this process) in seconds.
func procCPU(pid string) (float64, error) {
	b, err := os.ReadFile("/proc/" + pid + "/stat")
	if err != nil {
		return 0, err
	}
	// The command name (field 2) is in parentheses and may hold spaces: fields count from the
	// last ')'. utime and stime are fields 14 and 15.
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return 0, errors.New("malformed /proc stat")
	}
	f := strings.Fields(s[i+1:]) // f[0] is field 3 (state)
	if len(f) < 13 {
		return 0, errors.New("short /proc stat")
	}
	ut, err1 := strconv.ParseUint(f[11], 10, 64)
	st, err2 := strconv.ParseUint(f[12], 10, 64)
	if err := errors.Join(err1, err2); err != nil {
		return 0, err
	}
	return float64(ut+st) / clockTicks, nil
}

// loadAvg is the first three fields of /proc/loadavg.
func loadAvg() string {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return "unknown"
	}
	f := strings.Fields(string(b))
	if len(f) < 3 {
		return "unknown"
	}
	return strings.Join(f[:3], " ")
}

// memKiB returns VmRSS and VmHWM (peak RSS) in KiB.
func (n *ztgoNode) memKiB() (rss, hwm int64, err error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", n.cmd.Process.Pid))
	if err != nil {
		return 0, 0, fmt.Errorf("%s rss: %w", n.name, err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		k, v, ok := strings.Cut(line, ":")
		if !ok || (k != "VmRSS" && k != "VmHWM") {
			continue
		}
		f := strings.Fields(v)
		if len(f) != 2 || f[1] != "kB" {
			return 0, 0, fmt.Errorf("%s rss: unexpected %q", n.name, line)
		}
		x, err := strconv.ParseInt(f[0], 10, 64)
		if err != nil {
			return 0, 0, fmt.Errorf("%s rss: %w", n.name, err)
		}
		if k == "VmRSS" {
			rss = x
		} else {
			hwm = x
		}
	}
	if rss == 0 {
		return 0, 0, fmt.Errorf("%s rss: no VmRSS in /proc status", n.name)
	}
	return rss, hwm, nil
}

// cpuProfile fetches a CPU profile of seconds from the node's admin endpoint into path.
func (n *ztgoNode) cpuProfile(ctx context.Context, seconds int, path string) error {
	url := fmt.Sprintf("%s/debug/pprof/profile?seconds=%d", n.adminURL(), seconds)
	return n.fetchProfile(ctx, url, time.Duration(seconds)*time.Second+15*time.Second, path)
}

// heapProfile fetches a heap profile from the node's admin endpoint into path, after a GC in
// the node (gc=1), so its inuse figures are the live heap.
func (n *ztgoNode) heapProfile(ctx context.Context, path string) error {
	return n.fetchProfile(ctx, n.adminURL()+"/debug/pprof/heap?gc=1", 15*time.Second, path)
}

func (n *ztgoNode) fetchProfile(ctx context.Context, url string, timeout time.Duration, path string) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return err
	}
	c := &http.Client{Transport: &http.Transport{Proxy: nil, DisableKeepAlives: true}}
	resp, err := c.Do(req)
	if err != nil {
		return fmt.Errorf("%s profile: %w", n.name, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 64<<20))
	if err != nil {
		return fmt.Errorf("%s profile: %w", n.name, err)
	}
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("%s profile: %s: %s", n.name, resp.Status, strings.TrimSpace(string(body)))
	}
	return os.WriteFile(path, body, 0o644)
}

// goMem is what a node's /metrics says about its Go runtime.
type goMem struct {
	heapInuse  float64 // go_memstats_heap_inuse_bytes
	stackInuse float64 // go_memstats_stack_inuse_bytes
	goroutines float64 // go_goroutines
}

// goMem scrapes the node's /metrics (Prometheus text format) for its Go heap, stacks and
// goroutines.
func (n *ztgoNode) goMem(ctx context.Context) (goMem, error) {
	var m goMem
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, n.metricsURL(), nil)
	if err != nil {
		return m, err
	}
	resp, err := n.http.Do(req)
	if err != nil {
		return m, fmt.Errorf("%s metrics: %w", n.name, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return m, fmt.Errorf("%s metrics: %s", n.name, resp.Status)
	}
	want := map[string]*float64{
		"go_memstats_heap_inuse_bytes":  &m.heapInuse,
		"go_memstats_stack_inuse_bytes": &m.stackInuse,
		"go_goroutines":                 &m.goroutines,
	}
	found := 0
	sc := bufio.NewScanner(io.LimitReader(resp.Body, 64<<20))
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		name, v, ok := strings.Cut(sc.Text(), " ")
		p := want[name]
		if !ok || p == nil {
			continue
		}
		x, err := strconv.ParseFloat(strings.TrimSpace(v), 64)
		if err != nil {
			return m, fmt.Errorf("%s metrics: %s: %w", n.name, name, err)
		}
		*p = x
		found++
	}
	if err := sc.Err(); err != nil {
		return m, fmt.Errorf("%s metrics: %w", n.name, err)
	}
	if found != len(want) {
		return m, fmt.Errorf("%s metrics: go_memstats_heap_inuse_bytes, go_memstats_stack_inuse_bytes or go_goroutines missing", n.name)
	}
	return m, nil
}

// files returns the node's open file descriptors and its soft RLIMIT_NOFILE.
func (n *ztgoNode) files() (open, limit int, err error) {
	open, limit, err = procFiles(fmt.Sprint(n.cmd.Process.Pid))
	if err != nil {
		return 0, 0, fmt.Errorf("%s files: %w", n.name, err)
	}
	return open, limit, nil
}

// procFiles counts the open file descriptors of /proc/<pid> ("self" for this process) and
// reads its soft "Max open files" limit.
func procFiles(pid string) (open, limit int, err error) {
	fds, err := os.ReadDir("/proc/" + pid + "/fd")
	if err != nil {
		return 0, 0, err
	}
	b, err := os.ReadFile("/proc/" + pid + "/limits")
	if err != nil {
		return 0, 0, err
	}
	for _, line := range strings.Split(string(b), "\n") {
		rest, ok := strings.CutPrefix(line, "Max open files")
		if !ok {
			continue
		}
		f := strings.Fields(rest) // soft, hard, unit
		if len(f) < 1 {
			break
		}
		if f[0] == "unlimited" {
			return len(fds), math.MaxInt, nil
		}
		limit, err = strconv.Atoi(f[0])
		if err != nil {
			return 0, 0, fmt.Errorf("/proc/%s/limits: %w", pid, err)
		}
		return len(fds), limit, nil
	}
	return 0, 0, fmt.Errorf("/proc/%s/limits: no \"Max open files\" line", pid)
}

// nodeSet is both nodes, for the figures taken over the two together.
type nodeSet []*ztgoNode

func (ns nodeSet) alive() error {
	for _, n := range ns {
		if err := n.alive(); err != nil {
			return err
		}
	}
	return nil
}

// rss returns each node's VmRSS in bytes.
func (ns nodeSet) rss() ([]int64, error) {
	out := make([]int64, len(ns))
	for i, n := range ns {
		r, _, err := n.memKiB()
		if err != nil {
			return nil, err
		}
		out[i] = r << 10
	}
	return out, nil
}

// Settling of the nodes' RSS before a memory reading.
const (
	settleStep  = 200 * time.Millisecond
	settleLimit = 5 * time.Second
	settleDelta = 0.01 // largest relative change between two samples that counts as settled
	settleCalm  = 2    // consecutive settled steps needed
)

// settledRSS samples each node's VmRSS every settleStep until no node's RSS changed by
// settleDelta or more in settleCalm consecutive steps, or settleLimit has passed (settled is
// then false), and returns the last sample.
func (ns nodeSet) settledRSS(ctx context.Context) (rss []int64, waited time.Duration, settled bool, err error) {
	t0 := time.Now()
	prev, err := ns.rss()
	if err != nil {
		return nil, 0, false, err
	}
	calm := 0
	for {
		if err := sleep(ctx, settleStep); err != nil {
			return nil, 0, false, err
		}
		cur, err := ns.rss()
		if err != nil {
			return nil, 0, false, err
		}
		still := true
		for i := range cur {
			if math.Abs(float64(cur[i]-prev[i])) >= settleDelta*float64(prev[i]) {
				still = false
			}
		}
		if still {
			calm++
		} else {
			calm = 0
		}
		waited = time.Since(t0)
		if calm >= settleCalm {
			return cur, waited, true, nil
		}
		if waited >= settleLimit {
			return cur, waited, false, nil
		}
		prev = cur
	}
}

// goMem scrapes each node's /metrics.
func (ns nodeSet) goMem(ctx context.Context) ([]goMem, error) {
	out := make([]goMem, len(ns))
	for i, n := range ns {
		m, err := n.goMem(ctx)
		if err != nil {
			return nil, err
		}
		out[i] = m
	}
	return out, nil
}

// files describes each node's open files against its limit, for error messages.
func (ns nodeSet) files() string {
	var parts []string
	for _, n := range ns {
		open, limit, err := n.files()
		if err != nil {
			parts = append(parts, err.Error())
			continue
		}
		parts = append(parts, fmt.Sprintf("%s %d open files of %d", n.name, open, limit))
	}
	return strings.Join(parts, ", ")
}

// cpu returns each node's CPU seconds.
func (ns nodeSet) cpu() ([]float64, error) {
	out := make([]float64, len(ns))
	for i, n := range ns {
		c, err := n.cpuSeconds()
		if err != nil {
			return nil, err
		}
		out[i] = c
	}
	return out, nil
}

// cpuTimes are the jiffies of all CPUs from the first line of /proc/stat.
type cpuTimes struct {
	proc    uint64 // user, nice, system: time in processes
	softirq uint64 // irq and softirq (loopback TCP receive work is mostly here)
	steal   uint64 // taken by the hypervisor for other guests
	idle    uint64 // idle and iowait
}

func (c cpuTimes) total() uint64 { return c.proc + c.softirq + c.steal + c.idle }

// machineCPU reads the machine's CPU times (/proc/stat). Guest time is already in user.
func machineCPU() (cpuTimes, error) {
	var c cpuTimes
	b, err := os.ReadFile("/proc/stat")
	if err != nil {
		return c, err
	}
	line, _, _ := strings.Cut(string(b), "\n")
	f := strings.Fields(line)
	if len(f) < 9 || f[0] != "cpu" {
		return c, fmt.Errorf("/proc/stat: unexpected first line %q", line)
	}
	for i, s := range f[1:9] { // user nice system idle iowait irq softirq steal
		v, err := strconv.ParseUint(s, 10, 64)
		if err != nil {
			return c, fmt.Errorf("/proc/stat: %w", err)
		}
		switch i {
		case 0, 1, 2:
			c.proc += v
		case 3, 4:
			c.idle += v
		case 5, 6:
			c.softirq += v
		case 7:
			c.steal += v
		}
	}
	return c, nil
}
