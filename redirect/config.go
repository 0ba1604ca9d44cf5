package redirect

import (
	"errors"
	"fmt"
	"net/netip"
	"time"
)

// Ports ztgo listens on inside every pod network namespace (ztunnel's and istio-cni's constants).
const (
	PortOutbound         = 15001 // outbound capture; the app's TCP connects are redirected here
	PortInboundPlaintext = 15006 // inbound plaintext capture (non-mesh sources)
	PortInboundHBONE     = 15008 // inbound HBONE (mTLS + HTTP/2 CONNECT); never redirected
	PortDNS              = 15053 // DNS proxy, TCP and UDP, on 127.0.0.1 and ::1
)

// Marks and policy routing shared with istio-cni's in-pod rules
// (istio/istio cni/pkg/config: InpodMark, InpodMask, InpodTProxyMark, InpodTProxyMask,
// RouteTableInbound; cni/pkg/iptables/iptables_linux.go: rule priority 32764).
const (
	// PacketMark is SO_MARK on every socket ztgo opens in a pod (ztunnel's PACKET_MARK 1337).
	// The capture rules skip packets carrying it, so ztgo's own connections are not captured
	// again.
	PacketMark uint32 = 0x539
	// MarkMask is the part of the mark the rules compare; the upper bits stay free for the CNI.
	MarkMask uint32 = 0xfff
	// TProxyMark is the connmark given to connections ztgo originated (packets seen with
	// PacketMark on the way in); replies restore it as the packet mark, and the policy rule
	// sends packets with it to RouteTable, which delivers everything locally. That is how a
	// reply to a spoofed (original) source address reaches ztgo's transparent socket.
	TProxyMark uint32 = 0x111
	// RouteTable is the routing table holding "local 0.0.0.0/0 dev lo" (and ::/0).
	RouteTable = 100
	// RulePriority is the preference of "ip rule fwmark 0x111/0xfff lookup 100".
	RulePriority = 32764
	// TableName is ztgo's nftables table (family inet) in a pod netns. Install, Remove and
	// Check never look at any other table.
	TableName = "ztgo-inpod"
)

// Default kubelet health-probe SNAT addresses: istio-cni SNATs kubelet probes on the node to
// these so that the in-pod rules can exempt them from capture
// (istio/istio cni/pkg/config HostProbeSNATAddress, HostProbeV6SNATAddress).
var (
	DefaultProbeSNAT   = netip.MustParseAddr("169.254.7.127")
	DefaultProbeSNATv6 = netip.MustParseAddr("fd16:9254:7127:1337:ffff:ffff:ffff:ffff")
)

// Ports are the in-pod listener ports. A zero field takes the default.
type Ports struct {
	Outbound         uint16 // 15001
	InboundPlaintext uint16 // 15006
	InboundHBONE     uint16 // 15008
	DNS              uint16 // 15053
}

func (p Ports) withDefaults() Ports {
	if p.Outbound == 0 {
		p.Outbound = PortOutbound
	}
	if p.InboundPlaintext == 0 {
		p.InboundPlaintext = PortInboundPlaintext
	}
	if p.InboundHBONE == 0 {
		p.InboundHBONE = PortInboundHBONE
	}
	if p.DNS == 0 {
		p.DNS = PortDNS
	}
	return p
}

// RuleConfig describes the capture rules of one pod. The zero value is istio-cni's default:
// outbound, inbound and DNS capture for IPv4 and IPv6 with the standard ports and marks.
type RuleConfig struct {
	// Ports are the redirect targets; they must match the listeners' ports.
	Ports Ports
	// Mark is the mark ztgo's sockets carry (SocketConfig.Mark); default PacketMark. It must
	// fit in MarkMask and differ from TProxyMark.
	Mark uint32
	// ProbeSNAT and ProbeSNATv6 are the kubelet probe source addresses exempted from inbound
	// capture; defaults DefaultProbeSNAT and DefaultProbeSNATv6.
	ProbeSNAT, ProbeSNATv6 netip.Addr
	// DisableDNS leaves DNS (UDP and TCP port 53) alone instead of redirecting it to Ports.DNS.
	DisableDNS bool
	// DisableIPv6 omits the IPv6 rules, the IPv6 policy rule and the IPv6 local route.
	// IPv6 routing is also skipped when the pod's loopback has no IPv6 address.
	DisableIPv6 bool
}

// WithDefaults returns c with every zero field set to its default.
func (c RuleConfig) WithDefaults() RuleConfig {
	c.Ports = c.Ports.withDefaults()
	if c.Mark == 0 {
		c.Mark = PacketMark
	}
	if !c.ProbeSNAT.IsValid() {
		c.ProbeSNAT = DefaultProbeSNAT
	}
	if !c.ProbeSNATv6.IsValid() {
		c.ProbeSNATv6 = DefaultProbeSNATv6
	}
	return c
}

// Validate reports a configuration the rules cannot express. It applies defaults first.
func (c RuleConfig) Validate() error {
	c = c.WithDefaults()
	if c.Mark&^MarkMask != 0 {
		return fmt.Errorf("redirect: mark %#x does not fit in mask %#x", c.Mark, MarkMask)
	}
	if c.Mark == TProxyMark {
		return fmt.Errorf("redirect: mark %#x collides with the transparent-return mark", c.Mark)
	}
	if !c.ProbeSNAT.Is4() {
		return fmt.Errorf("redirect: probe SNAT address %s is not IPv4", c.ProbeSNAT)
	}
	if !c.ProbeSNATv6.Is6() || c.ProbeSNATv6.Is4In6() {
		return fmt.Errorf("redirect: probe SNAT address %s is not IPv6", c.ProbeSNATv6)
	}
	p := c.Ports
	seen := map[uint16]string{}
	for _, e := range []struct {
		name string
		port uint16
	}{{"outbound", p.Outbound}, {"inbound plaintext", p.InboundPlaintext}, {"inbound HBONE", p.InboundHBONE}, {"DNS", p.DNS}} {
		if prev, dup := seen[e.port]; dup {
			return fmt.Errorf("redirect: %s and %s ports are both %d", prev, e.name, e.port)
		}
		seen[e.port] = e.name
	}
	return nil
}

// SocketConfig holds the settings of the sockets a SocketFactory opens in a pod.
type SocketConfig struct {
	// Ports are the listener ports; zero fields take the defaults.
	Ports Ports
	// Mark is SO_MARK on every listener and upstream socket; default PacketMark. Set
	// NoMark to open sockets without a mark (then the capture rules would capture ztgo's
	// own upstream connections: only for setups without in-pod rules).
	Mark   uint32
	NoMark bool
	// ConnectTimeout bounds an upstream connect; default 10 s (ztunnel's).
	ConnectTimeout time.Duration
	// Keepalive of accepted and dialed connections; zero values take ztunnel's 180 s idle,
	// 180 s interval, 9 probes.
	KeepaliveIdle, KeepaliveInterval time.Duration
	KeepaliveCount                   int
}

func (c SocketConfig) withDefaults() SocketConfig {
	c.Ports = c.Ports.withDefaults()
	if c.Mark == 0 && !c.NoMark {
		c.Mark = PacketMark
	}
	if c.NoMark {
		c.Mark = 0
	}
	if c.ConnectTimeout <= 0 {
		c.ConnectTimeout = 10 * time.Second
	}
	if c.KeepaliveIdle <= 0 {
		c.KeepaliveIdle = 180 * time.Second
	}
	if c.KeepaliveInterval <= 0 {
		c.KeepaliveInterval = 180 * time.Second
	}
	if c.KeepaliveCount <= 0 {
		c.KeepaliveCount = 9
	}
	return c
}

// ErrConnectTimeout marks an upstream connect that did not complete within
// SocketConfig.ConnectTimeout.
var ErrConnectTimeout = errors.New("connect timed out")

// ErrUnsupported is returned on platforms without network namespaces.
var ErrUnsupported = errors.New("redirect: in-pod capture needs Linux")
