package node

import (
	"crypto/x509"
	"encoding/base64"
	"encoding/pem"
	"fmt"
	"time"

	"github.com/ztgo/ztgo/control/snapshot"
	"github.com/ztgo/ztgo/runtime/buildinfo"
)

// The config dump follows ztunnel's /config_dump shape (camelCase keys): workloads, services,
// policies, stagedServices, certificates, plus ztgo's pool and snapshot version.

type dumpWorkload struct {
	UID               string            `json:"uid"`
	Name              string            `json:"name"`
	Namespace         string            `json:"namespace"`
	WorkloadIPs       []string          `json:"workloadIps"`
	Hostname          string            `json:"hostname,omitempty"`
	Network           string            `json:"network"`
	Protocol          string            `json:"protocol"`
	TrustDomain       string            `json:"trustDomain"`
	ServiceAccount    string            `json:"serviceAccount"`
	Node              string            `json:"node"`
	CanonicalName     string            `json:"canonicalName,omitempty"`
	CanonicalRevision string            `json:"canonicalRevision,omitempty"`
	WorkloadName      string            `json:"workloadName,omitempty"`
	WorkloadType      string            `json:"workloadType"`
	Status            string            `json:"status"`
	ClusterID         string            `json:"clusterId"`
	Waypoint          string            `json:"waypoint,omitempty"`
	Services          map[string]any    `json:"services,omitempty"`
	Policies          []string          `json:"authorizationPolicies,omitempty"`
	Locality          map[string]string `json:"locality,omitempty"`
	Capacity          uint32            `json:"capacity"`
}

type dumpService struct {
	Name            string   `json:"name"`
	Namespace       string   `json:"namespace"`
	Hostname        string   `json:"hostname"`
	VIPs            []string `json:"vips"`
	Ports           any      `json:"ports"`
	SubjectAltNames []string `json:"subjectAltNames,omitempty"`
	Endpoints       []string `json:"endpoints"`
	Waypoint        string   `json:"waypoint,omitempty"`
}

type dumpPolicy struct {
	Name      string `json:"name"`
	Namespace string `json:"namespace"`
	Scope     string `json:"scope"`
	Action    string `json:"action"`
	Rules     int    `json:"rules"`
	DryRun    bool   `json:"dryRun"`
}

type dumpCertChain struct {
	PEM            string `json:"pem"`
	SerialNumber   string `json:"serialNumber"`
	ValidFrom      string `json:"validFrom"`
	ExpirationTime string `json:"expirationTime"`
}

type dumpCert struct {
	Identity  string          `json:"identity"`
	State     string          `json:"state"`
	Error     string          `json:"error,omitempty"`
	CertChain []dumpCertChain `json:"certChain"`
	RootCerts []dumpCertChain `json:"rootCerts"`
}

type dumpPoolConn struct {
	Source  string `json:"source"`
	Dst     string `json:"dst"`
	SANs    string `json:"expectedSans"`
	SrcIP   string `json:"srcIp"`
	Scope   string `json:"scope,omitempty"`
	Local   string `json:"local"`
	Streams int    `json:"activeStreams"`
}

func gw(g *snapshot.GatewayAddress) string {
	switch {
	case g == nil:
		return ""
	case g.Address != nil:
		return fmt.Sprintf("%s:%d", g.Address, g.HBONEPort)
	case g.Hostname != nil:
		return fmt.Sprintf("%s:%d", g.Hostname, g.HBONEPort)
	}
	return ""
}

func (n *Node) configDump() any {
	s := n.store.Load()
	ws := make([]dumpWorkload, 0, len(s.Workloads()))
	for _, w := range s.Workloads() {
		d := dumpWorkload{
			UID: w.UID, Name: w.Name, Namespace: w.Namespace, Hostname: w.Hostname, Network: w.Network,
			Protocol: w.Protocol.String(), TrustDomain: w.TrustDomain, ServiceAccount: w.ServiceAccount,
			Node: w.Node, CanonicalName: w.CanonicalName, CanonicalRevision: w.CanonicalRevision,
			WorkloadName: w.WorkloadName, WorkloadType: w.WorkloadType.String(), ClusterID: w.ClusterID,
			Waypoint: gw(w.Waypoint), Policies: w.AuthorizationPolicies, Capacity: w.Weight(), Status: "Healthy",
		}
		if w.Status == snapshot.Unhealthy {
			d.Status = "Unhealthy"
		}
		for _, a := range w.Addresses {
			d.WorkloadIPs = append(d.WorkloadIPs, a.String())
		}
		if len(w.Services) > 0 {
			d.Services = map[string]any{}
			for k, v := range w.Services {
				d.Services[k] = v
			}
		}
		if w.Locality != (snapshot.Locality{}) {
			d.Locality = map[string]string{"region": w.Locality.Region, "zone": w.Locality.Zone, "subzone": w.Locality.Subzone}
		}
		ws = append(ws, d)
	}
	svcs := make([]dumpService, 0, len(s.Services()))
	for _, svc := range s.Services() {
		d := dumpService{Name: svc.Name, Namespace: svc.Namespace, Hostname: svc.Hostname, Ports: svc.Ports,
			SubjectAltNames: svc.SubjectAltNames, Waypoint: gw(svc.Waypoint), Endpoints: []string{}, VIPs: []string{}}
		for _, v := range svc.VIPs {
			d.VIPs = append(d.VIPs, v.String())
		}
		for _, ep := range s.Endpoints(svc) {
			d.Endpoints = append(d.Endpoints, ep.Workload.UID)
		}
		svcs = append(svcs, d)
	}
	pols := make([]dumpPolicy, 0, len(s.Policies()))
	for _, p := range s.Policies() {
		pols = append(pols, dumpPolicy{Name: p.Name, Namespace: p.Namespace, Scope: p.Scope.String(), Action: p.Action.String(), Rules: len(p.Rules), DryRun: p.DryRun})
	}
	var certsOut []dumpCert
	for _, st := range n.certs.Snapshot() {
		c := dumpCert{Identity: st.Identity.String(), State: string(st.State), Error: st.LastError, CertChain: []dumpCertChain{}, RootCerts: []dumpCertChain{}}
		for i, p := range st.ChainPEM {
			entries := pemEntries(p)
			if i == len(st.ChainPEM)-1 && len(st.ChainPEM) > 1 {
				c.RootCerts = append(c.RootCerts, entries...)
			} else {
				c.CertChain = append(c.CertChain, entries...)
			}
		}
		certsOut = append(certsOut, c)
	}
	var pool []dumpPoolConn
	for _, st := range n.pool.Snapshot() {
		pool = append(pool, dumpPoolConn{Source: st.Key.SrcIdentity, Dst: st.Key.Dst.String(), SANs: st.Key.DstSANs,
			SrcIP: st.Key.SrcIP.String(), Scope: st.Key.Scope, Local: st.Local, Streams: st.Active})
	}
	out := map[string]any{
		"version":         buildinfo.Version,
		"node":            n.cfg.Name,
		"snapshotVersion": s.Version(),
		"snapshotBuilt":   s.Built().Format(time.RFC3339Nano),
		"workloads":       ws,
		"services":        svcs,
		"policies":        pols,
		"stagedServices":  s.StagedServices(),
		"certificates":    certsOut,
		"pool":            pool,
	}
	if n.cfg.InPod() {
		out["workloadState"] = n.podStates()
	}
	return out
}

// dumpPod is one in-pod proxy, as ztunnel's config dump lists its workload state by pod uid.
type dumpPod struct {
	State string            `json:"state"`
	Info  map[string]string `json:"info"`
	Netns string            `json:"netns"`
	Since string            `json:"since"`
	// Workload is the mesh workload the pod's flows are attributed to ("" until known).
	Workload string `json:"workload"`
}

func (n *Node) podStates() map[string]dumpPod {
	snap := n.store.Load()
	n.podMu.Lock()
	defer n.podMu.Unlock()
	out := make(map[string]dumpPod, len(n.pods))
	for uid, p := range n.pods {
		d := dumpPod{
			State: "Up", Netns: p.ns.ID().String(), Since: p.added.UTC().Format(time.RFC3339),
			Info: map[string]string{"name": p.info.Name, "namespace": p.info.Namespace, "serviceAccount": p.info.ServiceAccount},
		}
		if w := p.lookup(snap); w != nil {
			d.Workload = w.UID
		}
		out[uid] = d
	}
	return out
}

func pemEntries(p string) []dumpCertChain {
	var out []dumpCertChain
	rest := []byte(p)
	for {
		var b *pem.Block
		b, rest = pem.Decode(rest)
		if b == nil {
			return out
		}
		e := dumpCertChain{PEM: base64.StdEncoding.EncodeToString(pem.EncodeToMemory(b))}
		if c, err := x509.ParseCertificate(b.Bytes); err == nil {
			e.SerialNumber = c.SerialNumber.Text(16)
			e.ValidFrom = c.NotBefore.UTC().Format(time.RFC3339)
			e.ExpirationTime = c.NotAfter.UTC().Format(time.RFC3339)
		}
		out = append(out, e)
	}
}
