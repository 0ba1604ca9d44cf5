package relay

import (
	"io"
	"os"
	"runtime"
	"sync"
	"testing"
	"time"
)

// TestPooledPipesAreClosed: a garbage collection empties the pipe pool, and the pipes it
// drops are closed: after rounds of spliced flows and collections the process holds no more
// descriptors than after the first.
func TestPooledPipesAreClosed(t *testing.T) {
	r := relays(t)["eventloop"]
	openFDs := func() int {
		ents, err := os.ReadDir("/proc/self/fd")
		if err != nil {
			t.Skipf("no /proc/self/fd: %v", err)
		}
		return len(ents)
	}
	round := func() {
		const n = 16
		var wg sync.WaitGroup
		for range n {
			client, down := tcpPair(t)
			up, server := tcpPair(t)
			wg.Add(1)
			go func() {
				defer wg.Done()
				done := make(chan Result, 1)
				r.Start(down, up, nil, nil, nil, func(res Result) { done <- res })
				client.Write([]byte("ping"))
				client.CloseWrite()
				io.ReadAll(server)
				server.Write([]byte("pong"))
				server.CloseWrite()
				io.ReadAll(client)
				if res := <-done; res.Err != nil || res.Sent != 4 || res.Recv != 4 {
					t.Errorf("flow: %+v", res)
				}
				client.Close()
				server.Close()
			}()
		}
		wg.Wait()
		runtime.GC() // a pool's items survive one collection (victim cache), not two
		runtime.GC()
	}
	round()
	time.Sleep(50 * time.Millisecond) // cleanups run on their own goroutine
	base := openFDs()
	for range 3 {
		round()
	}
	var now int
	for range 100 {
		if now = openFDs(); now <= base+4 {
			return
		}
		runtime.GC()
		time.Sleep(10 * time.Millisecond)
	}
	t.Fatalf("%d descriptors open after more spliced flows, %d before: dropped pipes leak", now, base)
}
