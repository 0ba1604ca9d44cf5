package hbone

import (
	"io"
	"testing"
)

// drainHandler answers 200 and reads the stream to its end.
func drainHandler(s *Stream) {
	go func() {
		defer s.Close()
		if err := s.Respond(200, []Header{{Name: "baggage", Value: "k8s.namespace.name=srv"}}); err != nil {
			return
		}
		buf := make([]byte, 64<<10)
		for {
			if _, err := s.Read(buf); err != nil {
				return
			}
		}
	}()
}

// BenchmarkStreamWrite is the framer's bulk path: one stream on a plain TCP connection,
// 64 KiB writes (DATA frames, flow control, window updates), the peer reading as it comes.
func BenchmarkStreamWrite(b *testing.B) {
	c, _ := pair(b, drainHandler, Settings{})
	s := connect(b, c, "10.0.0.1:80")
	defer s.Close()
	p := make([]byte, 64<<10)
	b.SetBytes(int64(len(p)))
	b.ReportAllocs()
	b.ResetTimer()
	for range b.N {
		if _, err := s.Write(p); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkEchoRoundTrip is the latency path: 1 byte out and back on an established stream.
func BenchmarkEchoRoundTrip(b *testing.B) {
	c, _ := pair(b, echoHandler, Settings{})
	s := connect(b, c, "10.0.0.1:80")
	defer s.Close()
	one := []byte{1}
	back := make([]byte, 1)
	b.ReportAllocs()
	b.ResetTimer()
	for range b.N {
		if _, err := s.Write(one); err != nil {
			b.Fatal(err)
		}
		if _, err := io.ReadFull(s, back); err != nil {
			b.Fatal(err)
		}
	}
}

// TestEstablishedPathAllocs: once a stream is established, moving bytes through it (DATA
// frames both ways, window updates) allocates nothing per frame, on either side.
func TestEstablishedPathAllocs(t *testing.T) {
	c, _ := pair(t, echoHandler, Settings{})
	s := connect(t, c, "10.0.0.1:80")
	defer s.Close()
	p := make([]byte, 16<<10)
	back := make([]byte, len(p))
	round := func() {
		if _, err := s.Write(p); err != nil {
			t.Fatal(err)
		}
		if _, err := io.ReadFull(s, back); err != nil {
			t.Fatal(err)
		}
	}
	for range 50 {
		round() // warm pools and buffers
	}
	if n := testing.AllocsPerRun(200, round); n > 0 {
		t.Errorf("%v allocations per 16 KiB round trip on an established stream", n)
	}
}
