package inpod

import (
	"io"
	"net/netip"
	"testing"
	"time"

	"github.com/ztgo/ztgo/e2e/cluster"
	"github.com/ztgo/ztgo/e2e/meshtest"
)

// BenchmarkPrivilegedInPod measures the in-pod path end to end: an app in the client pod on
// node-a to the echo app in a pod on node-b, captured on both sides and carried as mTLS
// HBONE, against the same apps reached directly (the client dials from the non-mesh pod,
// which node-b still captures through 15006, so "direct" means a pod with no proxy on the
// client side and plaintext delivery on the server side: the bare network is not in this
// cluster's reach without removing the rules). Throughput is one connection streaming
// 4 MiB each way; connect is a new connection plus a 1-byte round trip.
func BenchmarkPrivilegedInPod(b *testing.B) {
	e := newEnv(b)
	echo := netip.AddrPortFrom(e.echo.IP(), 9090)
	payload := meshtest.RandomBytes(4<<20, 3)
	for _, src := range []struct {
		name string
		from *cluster.Namespace
	}{{"hbone", e.client.Namespace}, {"plaintext", e.legacy.Namespace}} {
		from := src.from
		b.Run(src.name+"/throughput", func(b *testing.B) {
			c := dial(b, from, echo)
			defer c.Close()
			b.SetBytes(int64(len(payload)))
			b.ResetTimer()
			for range b.N {
				roundTrip(b, c, payload)
			}
		})
		b.Run(src.name+"/connect", func(b *testing.B) {
			one := []byte{1}
			for range b.N {
				c := dial(b, from, echo)
				c.SetDeadline(time.Now().Add(ioTimeout))
				if _, err := c.Write(one); err != nil {
					b.Fatal(err)
				}
				if _, err := io.ReadFull(c, make([]byte, 1)); err != nil {
					b.Fatal(err)
				}
				c.Close()
			}
		})
	}
}
