package hbone

import (
	"io"
	"sync"
)

// Buffers recycles a node's HBONE buffers between its connections: stream receive chunks
// (32 KiB) and frame-batching write buffers (64 KiB). A connection holds a write buffer only
// from its first write to the flush that ends the batch, and a chunk only while it holds
// received bytes, so an idle connection holds neither.
type Buffers struct {
	chunks sync.Pool
	// Write buffers are a bounded free list rather than a sync.Pool: a batch takes and
	// returns one per flush, and the race detector's random sync.Pool drops would turn that
	// into an allocation the established-path test (run with -race in CI) could not tell from
	// a real one.
	mu     sync.Mutex
	writes []*[]byte
}

// maxFreeWrites bounds the idle write buffers kept (64 KiB each): enough for the batches
// in flight at once on a node, which are few (one per connection writing right now).
const maxFreeWrites = 64

// NewBuffers returns empty pools.
func NewBuffers() *Buffers {
	b := &Buffers{}
	b.chunks.New = func() any { return new(chunk) }
	return b
}

func (b *Buffers) getWrite() *[]byte {
	b.mu.Lock()
	if n := len(b.writes); n > 0 {
		p := b.writes[n-1]
		b.writes[n-1] = nil
		b.writes = b.writes[:n-1]
		b.mu.Unlock()
		return p
	}
	b.mu.Unlock()
	p := make([]byte, writeBufSize)
	return &p
}

func (b *Buffers) putWrite(p *[]byte) {
	b.mu.Lock()
	if len(b.writes) < maxFreeWrites {
		b.writes = append(b.writes, p)
	}
	b.mu.Unlock()
}

func (b *Buffers) getChunk() *chunk  { return b.chunks.Get().(*chunk) }
func (b *Buffers) putChunk(c *chunk) { b.chunks.Put(c) }

// batchWriter batches frames into few writes to the TLS connection, as a bufio.Writer of
// writeBufSize would, but takes its buffer from the pool at the first write of a batch and
// gives it back at the Flush that ends it. Every write path of a Conn ends with a Flush, so an
// idle connection holds no write buffer. Like bufio.Writer, a write at least as large as the
// buffer goes straight through when nothing is buffered, and an error sticks.
type batchWriter struct {
	w    io.Writer
	pool *Buffers
	buf  *[]byte
	n    int
	err  error
}

func (b *batchWriter) Write(p []byte) (int, error) {
	if b.err != nil {
		return 0, b.err
	}
	total := 0
	for len(p) > 0 {
		if b.n == 0 && len(p) >= writeBufSize {
			n, err := b.w.Write(p)
			total += n
			if err != nil {
				b.err = err
			}
			return total, err
		}
		if b.buf == nil {
			b.buf = b.pool.getWrite()
		}
		m := copy((*b.buf)[b.n:], p)
		b.n += m
		total += m
		p = p[m:]
		if b.n == len(*b.buf) {
			if err := b.flushBuf(); err != nil {
				return total, err
			}
		}
	}
	return total, nil
}

func (b *batchWriter) WriteString(s string) (int, error) {
	return b.Write([]byte(s)) // only the client preface: once per connection
}

// Flush writes what is buffered and gives the buffer back.
func (b *batchWriter) Flush() error {
	err := b.flushBuf()
	if b.buf != nil {
		if b.n == 0 {
			b.pool.putWrite(b.buf)
		}
		b.buf = nil
		b.n = 0
	}
	return err
}

func (b *batchWriter) flushBuf() error {
	if b.err != nil {
		return b.err
	}
	if b.n == 0 {
		return nil
	}
	n, err := b.w.Write((*b.buf)[:b.n])
	if err == nil && n < b.n {
		err = io.ErrShortWrite
	}
	if err != nil {
		b.err = err
		return err
	}
	b.n = 0
	return nil
}
