package redirect

import (
	"errors"
	"net"
)

// SocketFactory opens ztgo's sockets inside one pod's network namespace: the capture
// listeners and the upstream connections, all carrying the mark so the pod's capture rules
// let them through. It is safe for concurrent use. It does not own the Netns: the caller
// closes it after the factory is no longer used.
type SocketFactory struct {
	ns  Netns
	cfg SocketConfig
}

// NewSocketFactory returns a factory for the pod whose namespace is ns.
func NewSocketFactory(ns Netns, cfg SocketConfig) (*SocketFactory, error) {
	if !ns.Valid() {
		return nil, errors.New("redirect: socket factory needs an open netns")
	}
	return &SocketFactory{ns: ns, cfg: cfg.withDefaults()}, nil
}

// Listeners are the capture listeners of one pod, as ztunnel opens them in in-pod mode.
type Listeners struct {
	Outbound         *net.TCPListener   // [::]:15001 (or 0.0.0.0 without IPv6)
	InboundPlaintext *net.TCPListener   // [::]:15006, IP_TRANSPARENT
	InboundHBONE     *net.TCPListener   // [::]:15008, IP_TRANSPARENT
	DNSTCP           []*net.TCPListener // 127.0.0.1:15053 and, when the pod has it, [::1]:15053
	DNSUDP           []*net.UDPConn     // the same addresses over UDP
}

// Close closes every listener.
func (l *Listeners) Close() error {
	if l == nil {
		return nil
	}
	var errs []error
	for _, ln := range []*net.TCPListener{l.Outbound, l.InboundPlaintext, l.InboundHBONE} {
		if ln != nil {
			errs = append(errs, ln.Close())
		}
	}
	for _, ln := range l.DNSTCP {
		errs = append(errs, ln.Close())
	}
	for _, c := range l.DNSUDP {
		errs = append(errs, c.Close())
	}
	return errors.Join(errs...)
}
