package hbone

import (
	"bytes"
	"errors"
	"testing"
)

// recWriter records each Write it gets.
type recWriter struct {
	writes []int
	buf    bytes.Buffer
	err    error
}

func (w *recWriter) Write(p []byte) (int, error) {
	if w.err != nil {
		return 0, w.err
	}
	w.writes = append(w.writes, len(p))
	return w.buf.Write(p)
}

func TestBatchWriter(t *testing.T) {
	big := bytes.Repeat([]byte{'b'}, writeBufSize+5)
	cases := []struct {
		name   string
		writes [][]byte
		want   []int // sizes of the writes that reach the connection, after Flush
	}{
		{"small writes batch into one", [][]byte{[]byte("abc"), []byte("de"), []byte("f")}, []int{6}},
		{"a big write goes through when nothing is buffered", [][]byte{big}, []int{len(big)}},
		{"header then big payload: the buffer fills, then the rest", [][]byte{[]byte("123456789"), big}, []int{writeBufSize, len(big) + 9 - writeBufSize}},
		{"nothing written, nothing sent", nil, nil},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			w := &recWriter{}
			pool := NewBuffers()
			b := &batchWriter{w: w, pool: pool}
			var all []byte
			for _, p := range tc.writes {
				if n, err := b.Write(p); err != nil || n != len(p) {
					t.Fatalf("Write = %d, %v", n, err)
				}
				all = append(all, p...)
			}
			if err := b.Flush(); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(w.buf.Bytes(), all) {
				t.Fatalf("connection got %d bytes, want %d", w.buf.Len(), len(all))
			}
			if len(w.writes) != len(tc.want) {
				t.Fatalf("writes %v, want %v", w.writes, tc.want)
			}
			for i := range tc.want {
				if w.writes[i] != tc.want[i] {
					t.Fatalf("writes %v, want %v", w.writes, tc.want)
				}
			}
			if b.buf != nil {
				t.Fatal("buffer held after Flush")
			}
			if len(tc.writes) > 0 && tc.writes[0][0] != 'b' && len(pool.writes) != 1 {
				t.Fatalf("%d buffers back in the pool, want 1", len(pool.writes))
			}
		})
	}
}

func TestBatchWriterErrorSticks(t *testing.T) {
	boom := errors.New("boom")
	w := &recWriter{err: boom}
	b := &batchWriter{w: w, pool: NewBuffers()}
	b.Write([]byte("x"))
	if err := b.Flush(); !errors.Is(err, boom) {
		t.Fatalf("Flush = %v", err)
	}
	if _, err := b.Write([]byte("y")); !errors.Is(err, boom) {
		t.Fatalf("Write after a failed flush = %v", err)
	}
	if b.buf != nil {
		t.Fatal("buffer held after a failed Flush")
	}
}

// TestIdleConnHoldsNoWriteBuffer: between writes a connection holds no write buffer.
func TestIdleConnHoldsNoWriteBuffer(t *testing.T) {
	c, _ := pair(t, echoHandler, Settings{})
	s := connect(t, c, "10.0.0.1:80")
	defer s.Close()
	s.Write([]byte("hello"))
	back := make([]byte, 5)
	if _, err := s.Read(back); err != nil {
		t.Fatal(err)
	}
	c.wmu.Lock()
	held := c.bw.buf != nil
	c.wmu.Unlock()
	if held {
		t.Fatal("idle connection holds a write buffer")
	}
}
