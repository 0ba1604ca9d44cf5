package main

import (
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"path/filepath"
	"strconv"

	"github.com/ztgo/ztgo/e2e/nodeproc"
)

// ztgoNode is one ztgo process.
type ztgoNode struct{ *nodeproc.Node }

func hostPort(h string, p int) string { return net.JoinHostPort(h, strconv.Itoa(p)) }

// startNode runs bin as node name with the shared mesh config and CA directory; its output goes
// to dir/<name>.log.
func startNode(bin, dir, caDir, name, host string) (*ztgoNode, error) {
	n, err := nodeproc.Start(nodeproc.Config{
		Bin: bin, Name: name, Host: host, Mesh: filepath.Join(dir, meshFile), CADir: caDir,
		LogPath: filepath.Join(dir, name+".log"),
	})
	if err != nil {
		return nil, err
	}
	return &ztgoNode{n}, nil
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
	body, err := n.get(n.AdminURL() + "/debug/flows")
	if err != nil {
		return nil, err
	}
	var doc struct {
		Recent []flowRecord `json:"recent"`
	}
	if err := json.Unmarshal(body, &doc); err != nil {
		return nil, fmt.Errorf("%s /debug/flows: %w", n.Name, err)
	}
	return doc.Recent, nil
}

func (n *ztgoNode) get(url string) ([]byte, error) {
	resp, err := n.HTTP.Get(url)
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
