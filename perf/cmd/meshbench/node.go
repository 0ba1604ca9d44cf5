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
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/ztgo/ztgo/e2e/nodeproc"
)

// clockTicks is USER_HZ, the unit of utime and stime in /proc/<pid>/stat (100 on every Linux
// architecture Go supports).
const clockTicks = 100

// ztgoNode is one ztgo process.
type ztgoNode struct{ *nodeproc.Node }

// alive returns an error when the process has exited.
func (n *ztgoNode) alive() error {
	if n.Exited() {
		return fmt.Errorf("ztgo node %s exited during the run (%v); log: %s", n.Name, n.Err(), n.LogPath)
	}
	return nil
}

// startNode runs bin as node name with the shared mesh config and CA directory, logging at
// warn level; its output goes to dir/<name>.log.
func startNode(bin, dir, caDir, name, host string) (*ztgoNode, error) {
	n, err := nodeproc.Start(nodeproc.Config{
		Bin: bin, Name: name, Host: host, Mesh: filepath.Join(dir, meshFile), CADir: caDir,
		LogPath: filepath.Join(dir, name+".log"), Args: []string{"--log-level", "warn"},
	})
	if err != nil {
		return nil, err
	}
	return &ztgoNode{n}, nil
}

// waitReady waits for the node to be ready; its error carries the tail of the node's log.
func (n *ztgoNode) waitReady(ctx context.Context, timeout time.Duration) error {
	if err := n.WaitReady(ctx, timeout); err != nil {
		return fmt.Errorf("%w; log tail:\n  %s", err, strings.Join(n.LogTail(10), "\n  "))
	}
	return nil
}

// logLines returns the node's log lines, at most the first 100,000.
func (n *ztgoNode) logLines() []string {
	f, err := os.Open(n.LogPath)
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
	c, err := procCPU(fmt.Sprint(n.Cmd.Process.Pid))
	if err != nil {
		return 0, fmt.Errorf("%s cpu: %w", n.Name, err)
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
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", n.Cmd.Process.Pid))
	if err != nil {
		return 0, 0, fmt.Errorf("%s rss: %w", n.Name, err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		k, v, ok := strings.Cut(line, ":")
		if !ok || (k != "VmRSS" && k != "VmHWM") {
			continue
		}
		f := strings.Fields(v)
		if len(f) != 2 || f[1] != "kB" {
			return 0, 0, fmt.Errorf("%s rss: unexpected %q", n.Name, line)
		}
		x, err := strconv.ParseInt(f[0], 10, 64)
		if err != nil {
			return 0, 0, fmt.Errorf("%s rss: %w", n.Name, err)
		}
		if k == "VmRSS" {
			rss = x
		} else {
			hwm = x
		}
	}
	if rss == 0 {
		return 0, 0, fmt.Errorf("%s rss: no VmRSS in /proc status", n.Name)
	}
	return rss, hwm, nil
}

// cpuProfile fetches a CPU profile of seconds from the node's admin endpoint into path.
func (n *ztgoNode) cpuProfile(ctx context.Context, seconds int, path string) error {
	url := fmt.Sprintf("%s/debug/pprof/profile?seconds=%d", n.AdminURL(), seconds)
	return n.fetchProfile(ctx, url, time.Duration(seconds)*time.Second+15*time.Second, path)
}

// heapProfile fetches a heap profile from the node's admin endpoint into path, after a GC in
// the node (gc=1), so its inuse figures are the live heap.
func (n *ztgoNode) heapProfile(ctx context.Context, path string) error {
	return n.fetchProfile(ctx, n.AdminURL()+"/debug/pprof/heap?gc=1", 15*time.Second, path)
}

func (n *ztgoNode) fetchProfile(ctx context.Context, url string, timeout time.Duration, path string) error {
	body, err := n.fetch(ctx, url, timeout)
	if err != nil {
		return fmt.Errorf("%s profile: %w", n.Name, err)
	}
	return os.WriteFile(path, body, 0o644)
}

// forceGC makes the node run a garbage collection, through its heap profile endpoint (gc=1),
// so that the Go heap in use it reports next is its live heap.
func (n *ztgoNode) forceGC(ctx context.Context) error {
	if _, err := n.fetch(ctx, n.AdminURL()+"/debug/pprof/heap?gc=1", 15*time.Second); err != nil {
		return fmt.Errorf("%s GC: %w", n.Name, err)
	}
	return nil
}

// fetch GETs url from the node's admin endpoint within timeout and returns the body (at most
// 64 MiB) of a 200 answer.
func (n *ztgoNode) fetch(ctx context.Context, url string, timeout time.Duration) ([]byte, error) {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return nil, err
	}
	c := &http.Client{Transport: &http.Transport{Proxy: nil, DisableKeepAlives: true}}
	resp, err := c.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 64<<20))
	if err != nil {
		return nil, err
	}
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("%s: %s", resp.Status, strings.TrimSpace(string(body)))
	}
	return body, nil
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
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, n.MetricsURL(), nil)
	if err != nil {
		return m, err
	}
	resp, err := n.HTTP.Do(req)
	if err != nil {
		return m, fmt.Errorf("%s metrics: %w", n.Name, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return m, fmt.Errorf("%s metrics: %s", n.Name, resp.Status)
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
			return m, fmt.Errorf("%s metrics: %s: %w", n.Name, name, err)
		}
		*p = x
		found++
	}
	if err := sc.Err(); err != nil {
		return m, fmt.Errorf("%s metrics: %w", n.Name, err)
	}
	if found != len(want) {
		return m, fmt.Errorf("%s metrics: go_memstats_heap_inuse_bytes, go_memstats_stack_inuse_bytes or go_goroutines missing", n.Name)
	}
	return m, nil
}

// files returns the node's open file descriptors and its soft RLIMIT_NOFILE.
func (n *ztgoNode) files() (open, limit int, err error) {
	open, limit, err = procFiles(fmt.Sprint(n.Cmd.Process.Pid))
	if err != nil {
		return 0, 0, fmt.Errorf("%s files: %w", n.Name, err)
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

// liveHeap forces two GCs in each node (the first moves sync.Pool contents to the pools'
// victim caches, the second frees them) and then reads its Go heap in use: its live heap.
func (ns nodeSet) liveHeap(ctx context.Context) ([]float64, error) {
	out := make([]float64, len(ns))
	for i, n := range ns {
		for range 2 {
			if err := n.forceGC(ctx); err != nil {
				return nil, err
			}
		}
		m, err := n.goMem(ctx)
		if err != nil {
			return nil, err
		}
		out[i] = m.heapInuse
	}
	return out, nil
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
		parts = append(parts, fmt.Sprintf("%s %d open files of %d", n.Name, open, limit))
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
