// Command ztgo-demo-netns is what `make demo-netns` runs (as root): two ztgo nodes capturing
// the traffic of pods transparently, each pod a real network namespace.
//
// It builds a small cluster out of network namespaces (e2e/cluster): nodes node-a and node-b
// on a fabric (198.18.0.0/24), pod "client" on node-a (198.18.1.10) and pod "echo" on node-b
// (198.18.2.10), each pod wired to its node like a CNI would. It writes one mesh config
// (ztunnel's LOCAL_XDS YAML: the two workloads and service echo.default.svc.cluster.local,
// VIP 198.19.0.10:80 -> 8080) and starts one ztgo per node, in the node's namespace, from the
// binary given by --ztgo. node-a learns its pods from `ztgo node-agent` over ZDS, the protocol
// istio-cni speaks; node-b runs the agent itself (--pods-dir). Either way the agent installs
// the capture rules (nftables, policy routing) in each pod and ztgo opens its listeners inside
// the pod's namespace.
//
// Then it runs plain `curl http://echo/` inside the client pod. curl knows nothing of the mesh:
// its DNS query is captured and answered by ztgo with the service VIP, its connection is
// captured by node-a, carried as HTTP/2 CONNECT over mutual TLS to node-b's 15008 inside the
// echo pod, authorized, and delivered to the HTTP server there keeping the client's address.
// It prints what the app saw and both nodes' access logs (identities, HBONE address, bytes,
// per-stage timings), and exits 0 only if the request went that way.
//
// Usage (root):
//
//	go run ./cmd/ztgo-demo-netns [--ztgo ./bin/ztgo] [--hold]
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/ztgo/ztgo/e2e/cluster"
)

const mesh = `workloads:
- {uid: "Kubernetes//v1/Pod/default/client", name: client, namespace: default, serviceAccount: client,
   workloadIps: ["%[1]s"], protocol: HBONE, node: node-a, canonicalName: client, canonicalRevision: v1}
- {uid: "Kubernetes//v1/Pod/default/echo", name: echo, namespace: default, serviceAccount: echo,
   workloadIps: ["%[2]s"], protocol: HBONE, node: node-b, canonicalName: echo, canonicalRevision: v1,
   services: {"default/echo.default.svc.cluster.local": {80: 8080}}}
services:
- {name: echo, namespace: default, hostname: echo.default.svc.cluster.local, vips: ["/198.19.0.10"], ports: {80: 8080}}
policies:
- name: allow-default-namespace
  namespace: default
  scope: Namespace
  action: Allow
  rules:
  - - - namespaces: [!Exact default]
`

func main() {
	bin := flag.String("ztgo", "./bin/ztgo", "the ztgo binary to run (make build writes ./bin/ztgo)")
	hold := flag.Bool("hold", false, "keep the cluster running until Ctrl-C, to explore it with `ip netns exec`")
	flag.Parse()
	if err := run(*bin, *hold); err != nil {
		fmt.Fprintln(os.Stderr, "ztgo-demo-netns:", err)
		os.Exit(1)
	}
}

func run(bin string, hold bool) error {
	if os.Geteuid() != 0 {
		return errors.New("needs root: it creates network namespaces, nftables rules and policy routes (try: sudo make demo-netns)")
	}
	bin, err := filepath.Abs(bin)
	if err != nil {
		return err
	}
	if _, err := os.Stat(bin); err != nil {
		return fmt.Errorf("ztgo binary: %w (run make build)", err)
	}
	if _, err := cluster.CleanupStale(); err != nil {
		fmt.Fprintln(os.Stderr, "warning: cleaning up an earlier run:", err)
	}
	c, err := cluster.New(cluster.Config{Nodes: 2})
	if err != nil {
		return err
	}
	defer c.Close()
	// Ctrl-C still cleans up.
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, os.Interrupt, syscall.SIGTERM)

	a, b := c.Node("node-a"), c.Node("node-b")
	client, err := c.AddPod(a.Name(), "client")
	if err != nil {
		return err
	}
	echo, err := c.AddPod(b.Name(), "echo")
	if err != nil {
		return err
	}
	dir := c.RunDir()
	if err := os.WriteFile(filepath.Join(dir, "mesh.yaml"), fmt.Appendf(nil, mesh, client.IP(), echo.IP()), 0o644); err != nil {
		return err
	}
	for _, p := range []struct {
		dir string
		pod *cluster.Pod
	}{{"pods-a", client}, {"pods-b", echo}} {
		if err := os.MkdirAll(filepath.Join(dir, p.dir), 0o755); err != nil {
			return err
		}
		spec := fmt.Sprintf("name: %s\nnamespace: default\nserviceAccount: %s\nnetns: %s\n", p.pod.Name(), p.pod.Name(), p.pod.Path())
		if err := os.WriteFile(filepath.Join(dir, p.dir, p.pod.Name()+".yaml"), []byte(spec), 0o644); err != nil {
			return err
		}
	}
	resolv := filepath.Join("/etc/netns", client.NetnsName())
	if err := os.MkdirAll(resolv, 0o755); err != nil {
		return err
	}
	defer os.RemoveAll(resolv)
	if err := os.WriteFile(filepath.Join(resolv, "resolv.conf"),
		[]byte("nameserver 198.18.0.53\nsearch default.svc.cluster.local svc.cluster.local cluster.local\n"), 0o644); err != nil {
		return err
	}

	// The app behind the echo workload: an HTTP server inside the echo pod.
	ln, err := echo.Listen(echo.IP().String() + ":8080")
	if err != nil {
		return err
	}
	srv := &http.Server{ReadHeaderTimeout: 5 * time.Second, Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "hello from the echo pod; I see you as %s\n", r.RemoteAddr)
	})}
	go srv.Serve(ln)
	defer srv.Close()

	fmt.Printf("cluster %s: node-a %s (pod client %s), node-b %s (pod echo %s); files in %s\n",
		c.ID(), a.IP(), client.IP(), b.IP(), echo.IP(), dir)
	start := func(n *cluster.Node, name string, args ...string) (*cluster.Process, error) {
		cmd := exec.Command("ip", append([]string{"netns", "exec", n.NetnsName(), bin}, args...)...)
		cmd.Env = append(os.Environ(), "LOG_FORMAT=json")
		return c.StartProcess(name, cmd)
	}
	sock := filepath.Join(dir, "zds.sock")
	agent, err := start(a, "node-agent-a", "node-agent", "--pods-dir", filepath.Join(dir, "pods-a"), "--uds", sock)
	if err != nil {
		return err
	}
	if _, err := agent.WaitLogContains(15*time.Second, "zds server listening"); err != nil {
		return fmt.Errorf("node agent: %w\n%s", err, agent.Tail(20))
	}
	common := []string{"run", "--config", filepath.Join(dir, "mesh.yaml"), "--ca-dir", filepath.Join(dir, "ca"),
		"--admin", "127.0.0.1:15000", "--metrics", "0.0.0.0:15020", "--readiness", "0.0.0.0:15021"}
	za, err := start(a, "ztgo-node-a", append(common, "--node", "node-a", "--inpod-uds", sock)...)
	if err != nil {
		return err
	}
	zb, err := start(b, "ztgo-node-b", append(common, "--node", "node-b", "--pods-dir", filepath.Join(dir, "pods-b"))...)
	if err != nil {
		return err
	}
	for _, n := range []struct {
		node *cluster.Node
		p    *cluster.Process
	}{{a, za}, {b, zb}} {
		if _, err := n.node.WaitHTTP("http://127.0.0.1:15021/healthz/ready", 200, 20*time.Second); err != nil {
			return fmt.Errorf("%s not ready: %w\n%s", n.node.Name(), err, n.p.Tail(20))
		}
	}
	fmt.Println("both nodes ready: node-a got its pod over ZDS from `ztgo node-agent`, node-b runs the agent itself")

	fmt.Printf("\n$ ip netns exec %s curl -sS http://echo/\n", client.NetnsName())
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	out, err := client.Command(ctx, "curl", "-sS", "--max-time", "10", "http://echo/").CombinedOutput()
	fmt.Print(indent(string(out)))
	if err != nil {
		return fmt.Errorf("curl: %w", err)
	}
	if !strings.Contains(string(out), client.IP().String()+":") {
		return fmt.Errorf("the app did not see the client's own address %s", client.IP())
	}

	recA, err := accessLog(za, "outbound")
	if err != nil {
		return err
	}
	recB, err := accessLog(zb, "inbound")
	if err != nil {
		return err
	}
	fmt.Println("\nnode-a captured it in the client pod and sent it as HBONE (mTLS HTTP/2 CONNECT):")
	printRecord(recA)
	fmt.Println("node-b received it on 15008 inside the echo pod, checked policy, and delivered it:")
	printRecord(recB)
	hbone, _ := recA["dst.addr"].(string)
	if ap, err := netip.ParseAddrPort(hbone); err != nil || ap.Port() != 15008 {
		return fmt.Errorf("node-a did not tunnel to HBONE port 15008 (dst.addr %q)", hbone)
	}
	if recB["src.identity"] != "spiffe://cluster.local/ns/default/sa/client" {
		return fmt.Errorf("node-b saw identity %v, want the client's", recB["src.identity"])
	}
	fmt.Println("ok: an unmodified client's traffic was captured and carried as mTLS HBONE")

	if hold {
		fmt.Printf("\nholding; try:\n  ip netns exec %s curl http://echo/\n  ip netns exec %s nft list table inet ztgo-inpod\n"+
			"  ip netns exec %s curl -s 127.0.0.1:15000/config_dump\nCtrl-C to clean up\n",
			client.NetnsName(), client.NetnsName(), a.NetnsName())
		<-sigs
	}
	return nil
}

// accessLog finds the first "connection complete" record of the given direction.
func accessLog(p *cluster.Process, dir string) (map[string]any, error) {
	var rec map[string]any
	_, err := p.WaitLog(10*time.Second, func(l string) bool {
		var m map[string]any
		if json.Unmarshal([]byte(l), &m) != nil || m["msg"] != "connection complete" || m["direction"] != dir {
			return false
		}
		rec = m
		return true
	})
	if err != nil {
		return nil, fmt.Errorf("no %s access log on %s: %w\n%s", dir, p.Name(), err, p.Tail(20))
	}
	return rec, nil
}

func printRecord(m map[string]any) {
	for _, k := range []string{"src.addr", "src.identity", "dst.addr", "dst.hbone_addr", "dst.service", "dst.identity",
		"bytes_sent", "bytes_recv", "stage.capture", "stage.identity", "stage.authz", "stage.hbone", "stage.upstream", "stage.first_byte"} {
		if v, ok := m[k]; ok {
			fmt.Printf("    %-16s %v\n", k, v)
		}
	}
}

func indent(s string) string {
	return "    " + strings.ReplaceAll(strings.TrimRight(s, "\n"), "\n", "\n    ") + "\n"
}
