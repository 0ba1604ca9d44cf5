package cluster

import (
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"net"
	"net/netip"
	"regexp"
)

// Limits of the address plan (see the package doc).
const (
	// MaxNodes is the most nodes a Cluster can have: they are named node-a to node-z.
	MaxNodes = 26
	// MaxExternals is the most externals: 198.18.0.100 to 198.18.0.199.
	MaxExternals = 100
	// MaxNameLen is the longest name of a pod or external. With the "v-" prefix of the veth on
	// the node or fabric side it stays within Linux's 15-byte interface names.
	MaxNameLen = 12

	firstPodHost      = 10  // auto-assigned pod addresses start at .10
	firstExternalHost = 100 // externals start at 198.18.0.100
	fabricName        = "fabric"
	bridgeName        = "br0"
	podIface          = "eth0" // a pod's, node's or external's link, as in Kubernetes
	vethPrefix        = "v-"   // node- or fabric-side end of a veth pair
	idLen             = 6      // hex digits of a run id
	netnsDir          = "/var/run/netns"
	lockDir           = "/var/run/ztgo-cluster"
)

// gatewayIP is every pod's default gateway; gatewayMAC is the MAC of every node-side veth.
func gatewayIP() netip.Addr { return netip.AddrFrom4([4]byte{169, 254, 1, 1}) }

func gatewayMAC() net.HardwareAddr { return net.HardwareAddr{0xee, 0xee, 0xee, 0xee, 0xee, 0xee} }

// fabricPrefix is the network of the fabric bridge.
func fabricPrefix() netip.Prefix {
	return netip.PrefixFrom(netip.AddrFrom4([4]byte{198, 18, 0, 0}), 24)
}

// nodeName is the name of node i (0-based): node-a, node-b, ...
func nodeName(i int) string { return "node-" + string(rune('a'+i)) }

// nodeIP is the fabric address of node i.
func nodeIP(i int) netip.Addr { return netip.AddrFrom4([4]byte{198, 18, 0, byte(i + 1)}) }

// podCIDR is the pod network of node i.
func podCIDR(i int) netip.Prefix {
	return netip.PrefixFrom(netip.AddrFrom4([4]byte{198, 18, byte(i + 1), 0}), 24)
}

// externalIP is the fabric address of the j-th external (0-based).
func externalIP(j int) netip.Addr {
	return netip.AddrFrom4([4]byte{198, 18, 0, byte(firstExternalHost + j)})
}

// validName accepts what this package can use in namespace and interface names.
var validName = regexp.MustCompile(`^[a-z][a-z0-9-]*$`)

// checkName validates the name of a pod or external.
func checkName(name string) error {
	if len(name) > MaxNameLen {
		return fmt.Errorf("name %q: longer than %d characters", name, MaxNameLen)
	}
	if !validName.MatchString(name) {
		return fmt.Errorf("name %q: want a lowercase letter followed by lowercase letters, digits or '-'", name)
	}
	if name == fabricName {
		return fmt.Errorf("name %q: reserved for the fabric namespace", name)
	}
	return nil
}

// newRunID returns a fresh random run id: six hex digits.
func newRunID() (string, error) {
	var b [idLen / 2]byte
	if _, err := rand.Read(b[:]); err != nil {
		return "", fmt.Errorf("run id: %w", err)
	}
	return hex.EncodeToString(b[:]), nil
}

// netnsName is the name of the namespace of name in run id.
func netnsName(id, name string) string { return "zt" + id + "-" + name }

// ourNetns matches exactly the namespace names netnsName makes; the submatch is the run id.
var ourNetns = regexp.MustCompile(`^zt([0-9a-f]{6})-[a-z][a-z0-9-]{0,11}$`)

// runIDOf returns the run id of a namespace name made by netnsName, or "" for any other name.
func runIDOf(netns string) string {
	m := ourNetns.FindStringSubmatch(netns)
	if m == nil {
		return ""
	}
	return m[1]
}

// nextPodIP returns the first address of cidr from .10 upwards, starting after last (when
// valid), that is not in use; it wraps around once. It fails when the /24 is full.
func nextPodIP(cidr netip.Prefix, last netip.Addr, inUse func(netip.Addr) bool) (netip.Addr, error) {
	const hosts = 254 - firstPodHost + 1
	start := 0
	if last.IsValid() && cidr.Contains(last) {
		if h := int(last.As4()[3]); h >= firstPodHost {
			start = h - firstPodHost + 1
		}
	}
	base := cidr.Addr().As4()
	for k := range hosts {
		b := base
		b[3] = byte(firstPodHost + (start+k)%hosts)
		a := netip.AddrFrom4(b)
		if !inUse(a) {
			return a, nil
		}
	}
	return netip.Addr{}, fmt.Errorf("no free pod address in %s", cidr)
}

// checkPodIP validates an explicit pod address for a node whose pod network is cidr.
func checkPodIP(cidr netip.Prefix, ip netip.Addr) error {
	if !ip.Is4() || !cidr.Contains(ip) {
		return fmt.Errorf("pod address %s: not in the node's pod network %s", ip, cidr)
	}
	if h := ip.As4()[3]; h == 0 || h == 255 {
		return fmt.Errorf("pod address %s: network or broadcast address of %s", ip, cidr)
	}
	return nil
}
