package cluster

import (
	"net/netip"
	"strings"
	"testing"
)

func TestCheckName(t *testing.T) {
	for _, tc := range []struct {
		name string
		ok   bool
	}{
		{"a1", true},
		{"client", true},
		{"web-ext-2", true},
		{"abcdefghijkl", true}, // MaxNameLen
		{"abcdefghijklm", false},
		{"", false},
		{"1pod", false},
		{"-pod", false},
		{"Pod", false},
		{"pod_a", false},
		{"pod.a", false},
		{"a/b", false},
		{"fabric", false},
	} {
		err := checkName(tc.name)
		if (err == nil) != tc.ok {
			t.Errorf("checkName(%q) = %v, want ok=%v", tc.name, err, tc.ok)
		}
	}
}

func TestAddressPlan(t *testing.T) {
	mesh := netip.MustParsePrefix("198.18.0.0/15")
	for _, tc := range []struct {
		got  string
		want string
	}{
		{nodeName(0), "node-a"},
		{nodeName(25), "node-z"},
		{nodeIP(0).String(), "198.18.0.1"},
		{nodeIP(1).String(), "198.18.0.2"},
		{podCIDR(0).String(), "198.18.1.0/24"},
		{podCIDR(1).String(), "198.18.2.0/24"},
		{podCIDR(MaxNodes - 1).String(), "198.18.26.0/24"},
		{externalIP(0).String(), "198.18.0.100"},
		{externalIP(MaxExternals - 1).String(), "198.18.0.199"},
		{fabricPrefix().String(), "198.18.0.0/24"},
		{netnsName("1a2b3c", "node-a"), "zt1a2b3c-node-a"},
	} {
		if tc.got != tc.want {
			t.Errorf("got %s, want %s", tc.got, tc.want)
		}
	}
	for i := range MaxNodes {
		if !mesh.Contains(nodeIP(i)) || !mesh.Contains(podCIDR(i).Addr()) || !fabricPrefix().Contains(nodeIP(i)) {
			t.Errorf("node %d: %s, %s outside the plan", i, nodeIP(i), podCIDR(i))
		}
		if nodeIP(i) == externalIP(0) {
			t.Errorf("node %d and the first external share %s", i, nodeIP(i))
		}
	}
	// Every interface name this package makes fits Linux's 15 bytes.
	if n := len(vethPrefix) + MaxNameLen; n > 15 {
		t.Errorf("veth names can be %d bytes long", n)
	}
}

func TestRunIDOf(t *testing.T) {
	for _, tc := range []struct {
		netns, id string
	}{
		{"zt1a2b3c-node-a", "1a2b3c"},
		{"zt1a2b3c-a1", "1a2b3c"},
		{"zt1a2b3c-fabric", "1a2b3c"},
		{"zt1a2b3c-abcdefghijkl", "1a2b3c"},
		{"zt1a2b3c-abcdefghijklm", ""}, // longer than any name this package makes
		{"zt1a2b3c-", ""},
		{"zt1A2B3C-node-a", ""},
		{"zt1a2b3-node-a", ""},
		{"zt1a2b3cd-node-a", ""},
		{"xzt1a2b3c-node-a", ""},
		{"zt1a2b3c-Node", ""},
		{"zt1a2b3c-node-a\n", ""},
		{"cni-1a2b3c", ""},
	} {
		if got := runIDOf(tc.netns); got != tc.id {
			t.Errorf("runIDOf(%q) = %q, want %q", tc.netns, got, tc.id)
		}
	}
	for i := range 100 {
		id, err := newRunID()
		if err != nil {
			t.Fatal(err)
		}
		if got := runIDOf(netnsName(id, "node-a")); got != id {
			t.Fatalf("run %d: id %q does not round-trip (%q)", i, id, got)
		}
	}
}

func TestNextPodIP(t *testing.T) {
	cidr := podCIDR(0)
	used := map[netip.Addr]bool{}
	inUse := func(a netip.Addr) bool { return used[a] }
	var last netip.Addr
	take := func() netip.Addr {
		t.Helper()
		a, err := nextPodIP(cidr, last, inUse)
		if err != nil {
			t.Fatal(err)
		}
		used[a], last = true, a
		return a
	}
	if a := take(); a.String() != "198.18.1.10" {
		t.Fatalf("first pod: %s", a)
	}
	used[netip.MustParseAddr("198.18.1.11")] = true // given explicitly
	if a := take(); a.String() != "198.18.1.12" {
		t.Fatalf("second pod: %s, want .12 (.11 is taken)", a)
	}
	// A removed pod's address is not reused before the others.
	delete(used, netip.MustParseAddr("198.18.1.10"))
	if a := take(); a.String() != "198.18.1.13" {
		t.Fatalf("after removal: %s, want .13", a)
	}
	// Past .254 it wraps to the lowest free address.
	last = netip.MustParseAddr("198.18.1.254")
	used[last] = true
	if a := take(); a.String() != "198.18.1.10" {
		t.Fatalf("after .254: %s, want .10", a)
	}
	for h := 10; h <= 254; h++ {
		used[netip.AddrFrom4([4]byte{198, 18, 1, byte(h)})] = true
	}
	if a, err := nextPodIP(cidr, last, inUse); err == nil || !strings.Contains(err.Error(), "no free pod address") {
		t.Fatalf("full /24: %s, %v", a, err)
	}
}

func TestCheckPodIP(t *testing.T) {
	cidr := podCIDR(1)
	for _, tc := range []struct {
		ip string
		ok bool
	}{
		{"198.18.2.10", true},
		{"198.18.2.1", true},
		{"198.18.2.254", true},
		{"198.18.2.0", false},
		{"198.18.2.255", false},
		{"198.18.1.10", false},
		{"10.0.0.1", false},
		{"::ffff:198.18.2.10", false},
	} {
		err := checkPodIP(cidr, netip.MustParseAddr(tc.ip))
		if (err == nil) != tc.ok {
			t.Errorf("checkPodIP(%s) = %v, want ok=%v", tc.ip, err, tc.ok)
		}
	}
}
