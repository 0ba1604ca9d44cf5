package hbone

import (
	"encoding/hex"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"strings"
)

// Header names HBONE uses (lower case, as HTTP/2 requires).
const (
	HeaderBaggage          = "baggage"
	HeaderForwarded        = "forwarded"
	HeaderTraceParent      = "traceparent"
	HeaderForwardedNetwork = "x-forwarded-network"
)

// Header is one HTTP/2 header field.
type Header struct {
	Name, Value string
}

// Request is a CONNECT request: the target and the metadata headers.
type Request struct {
	// Authority is the CONNECT target, "ip:port" or "[ipv6]:port" (or "host:port").
	Authority string
	// Method is the request method; requests built by ztgo always use CONNECT.
	Method string
	// Header holds every non-pseudo header in arrival order.
	Header []Header
}

// Get returns the first value of the named (lower-case) header, or "".
func (r *Request) Get(name string) string { return getHeader(r.Header, name) }

// Response is the answer to a CONNECT request.
type Response struct {
	Status int
	Header []Header
}

// Get returns the first value of the named (lower-case) header, or "".
func (r *Response) Get(name string) string { return getHeader(r.Header, name) }

func getHeader(h []Header, name string) string {
	for i := range h {
		if h[i].Name == name {
			return h[i].Value
		}
	}
	return ""
}

// StatusError is a CONNECT that the peer answered with a status other than 200.
type StatusError struct {
	Status int
}

func (e *StatusError) Error() string {
	return fmt.Sprintf("hbone: CONNECT refused with status %d", e.Status)
}

// Baggage describes a workload the way ztunnel's baggage header does; empty values are left out.
type Baggage struct {
	ClusterID, Namespace, WorkloadType, WorkloadName, Service, Version, Region, Zone string
}

// String formats b as a W3C baggage list in ztunnel's key order.
func (b Baggage) String() string {
	var sb strings.Builder
	add := func(k, v string) {
		if v == "" {
			return
		}
		if sb.Len() > 0 {
			sb.WriteByte(',')
		}
		sb.WriteString(k)
		sb.WriteByte('=')
		sb.WriteString(v)
	}
	add("k8s.cluster.name", b.ClusterID)
	add("k8s.namespace.name", b.Namespace)
	if b.WorkloadType != "" {
		add("k8s."+b.WorkloadType+".name", b.WorkloadName)
	}
	add("service.name", b.Service)
	add("service.version", b.Version)
	add("cloud.region", b.Region)
	add("cloud.availability_zone", b.Zone)
	return sb.String()
}

// ParseBaggage reads the keys ztunnel writes from a baggage header; unknown keys are ignored.
func ParseBaggage(v string) Baggage {
	var b Baggage
	for _, member := range strings.Split(v, ",") {
		k, val, ok := strings.Cut(strings.TrimSpace(member), "=")
		if !ok {
			continue
		}
		// Properties after ';' are not part of the value.
		val, _, _ = strings.Cut(val, ";")
		switch k {
		case "k8s.cluster.name":
			b.ClusterID = val
		case "k8s.namespace.name":
			b.Namespace = val
		case "service.name":
			b.Service = val
		case "service.version":
			b.Version = val
		case "cloud.region":
			b.Region = val
		case "cloud.availability_zone":
			b.Zone = val
		default:
			for _, t := range []string{"deployment", "cronjob", "pod", "job"} {
				if k == "k8s."+t+".name" {
					b.WorkloadType, b.WorkloadName = t, val
				}
			}
		}
	}
	return b
}

// Forwarded builds the forwarded header ztunnel sends: the client address, plus the destination
// service hostname when one is known.
func Forwarded(client netip.AddrPort, serviceHost string) string {
	v := `for="` + client.String() + `"`
	if serviceHost != "" {
		v += ";host=" + serviceHost
	}
	return v
}

// ForwardedHost returns the host= parameter of a forwarded header, quotes stripped.
func ForwardedHost(v string) string {
	for _, elem := range strings.Split(v, ",") {
		for _, pair := range strings.Split(elem, ";") {
			k, val, ok := strings.Cut(strings.TrimSpace(pair), "=")
			if ok && strings.EqualFold(k, "host") {
				return strings.Trim(val, `"`)
			}
		}
	}
	return ""
}

// NewTraceParent returns a fresh W3C traceparent with random trace and parent ids, not sampled.
func NewTraceParent(r *rand.Rand) string {
	var b [24]byte
	for i := 0; i < 24; i += 8 {
		u := r.Uint64()
		for j := 0; j < 8; j++ {
			b[i+j] = byte(u >> (8 * j))
		}
	}
	var out [55]byte
	copy(out[:3], "00-")
	hex.Encode(out[3:35], b[:16])
	out[35] = '-'
	hex.Encode(out[36:52], b[16:])
	copy(out[52:], "-00")
	return string(out[:])
}
