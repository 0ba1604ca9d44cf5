package identity

import (
	"net/netip"
	"testing"

	"github.com/ztgo/ztgo/control/snapshot"
)

// fixture is a small mesh that test cases extend before building a snapshot. Every case gets
// fresh objects because Build fills defaults into them.
type fixture struct {
	// src is the client pod, ns/src at 10.0.0.1 and fd00::1.
	src *snapshot.Workload
	// wp is a waypoint pod, ns/wp at 10.0.0.10 with service account waypoint-sa.
	wp *snapshot.Workload
	// wpDual is a dual-stack waypoint pod, ns/wp-dual at 10.0.0.11 and fd00::11.
	wpDual *snapshot.Workload

	workloads []*snapshot.Workload
	services  []*snapshot.Service
}

func newFixture() *fixture {
	f := &fixture{
		src: &snapshot.Workload{
			Name: "src", Namespace: "ns", Node: "node-a", Protocol: snapshot.TunnelHBONE,
			Addresses: addrs("10.0.0.1", "fd00::1"),
		},
		wp: &snapshot.Workload{
			Name: "wp", Namespace: "ns", ServiceAccount: "waypoint-sa", Protocol: snapshot.TunnelHBONE,
			Addresses: addrs("10.0.0.10"),
		},
		wpDual: &snapshot.Workload{
			Name: "wp-dual", Namespace: "ns", ServiceAccount: "waypoint-sa", Protocol: snapshot.TunnelHBONE,
			Addresses: addrs("10.0.0.11", "fd00::11"),
		},
	}
	f.workloads = []*snapshot.Workload{f.src, f.wp, f.wpDual}
	return f
}

func (f *fixture) add(ws ...*snapshot.Workload) { f.workloads = append(f.workloads, ws...) }

func (f *fixture) addService(ss ...*snapshot.Service) { f.services = append(f.services, ss...) }

func (f *fixture) build(t testing.TB) *snapshot.Snapshot {
	t.Helper()
	snap, err := snapshot.Build(snapshot.Config{Workloads: f.workloads, Services: f.services})
	if err != nil {
		t.Fatalf("build snapshot: %v", err)
	}
	return snap
}

// app returns a pod default/name at ips.
func app(name string, proto snapshot.TunnelProtocol, ips ...string) *snapshot.Workload {
	return &snapshot.Workload{Name: name, Namespace: "default", Protocol: proto, Addresses: addrs(ips...)}
}

// web returns the service default/web.default.svc.cluster.local at VIP 10.96.0.1 with ports.
func web(ports snapshot.PortMap) *snapshot.Service {
	return &snapshot.Service{
		Name: "web", Namespace: "default", Hostname: "web.default.svc.cluster.local",
		VIPs:  []snapshot.NetworkAddress{{Addr: netip.MustParseAddr("10.96.0.1")}},
		Ports: ports,
	}
}

const webKey = "default/web.default.svc.cluster.local"

// endpointOf makes w an endpoint of the service key with the given port map.
func endpointOf(w *snapshot.Workload, key string, ports snapshot.PortMap) *snapshot.Workload {
	if w.Services == nil {
		w.Services = map[string]snapshot.PortMap{}
	}
	w.Services[key] = ports
	return w
}

func addrs(ss ...string) []netip.Addr {
	out := make([]netip.Addr, len(ss))
	for i, s := range ss {
		out[i] = netip.MustParseAddr(s)
	}
	return out
}

func gwAddr(ip string, port uint16) *snapshot.GatewayAddress {
	return &snapshot.GatewayAddress{Address: &snapshot.NetworkAddress{Addr: netip.MustParseAddr(ip)}, HBONEPort: port}
}

func gwHost(ns, host string, port uint16) *snapshot.GatewayAddress {
	return &snapshot.GatewayAddress{Hostname: &snapshot.NamespacedHostname{Namespace: ns, Hostname: host}, HBONEPort: port}
}

func workloadNamed(snap *snapshot.Snapshot, name string) *snapshot.Workload {
	for _, w := range snap.Workloads() {
		if w.Name == name {
			return w
		}
	}
	return nil
}
