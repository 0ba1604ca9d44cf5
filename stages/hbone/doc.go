// Package hbone is ztgo's HBONE engine: HTTP/2 CONNECT tunnels over a mutual-TLS connection,
// wire-compatible with Istio's ztunnel. It is built on x/net/http2's Framer and hpack, not on
// its goroutine-per-stream Server and Transport.
//
// # Wire flow
//
//	client (outbound node)                         server (inbound node, port 15008)
//	TLS 1.3 handshake, ALPN h2, client cert = source workload, server cert = destination workload
//	preface, SETTINGS{window 4 MiB, frame 1 MiB}, WINDOW_UPDATE(conn, +16 MiB - 64 KiB)
//	HEADERS  :method CONNECT                     ->
//	         :authority <podIP>:<port>
//	         baggage, forwarded, traceparent
//	                                             <- HEADERS :status 200 (+ baggage)
//	DATA ...                                     <-> DATA ...
//	DATA END_STREAM (client FIN)                 ->
//	                                             <- DATA END_STREAM (server FIN)
//
// A non-200 status (400, 401, 503) is sent with END_STREAM and ends the stream.
//
// # Concurrency
//
// Each Conn has one read loop goroutine that owns frame reading and dispatch; it never blocks on
// a write. Frames are written by whoever holds the write lock: stream writers for DATA, and, for
// control frames the read loop queues (SETTINGS ACK, PING ACK, WINDOW_UPDATE, RST_STREAM), the
// next lock holder, which drains the control queue first. So a peer that stops reading stalls
// only writers, never frame processing, and two nodes writing to each other cannot deadlock.
//
// # Flow control and memory
//
// Each stream may buffer at most its receive window (4 MiB) of unread data; a reader that does
// not read stops WINDOW_UPDATEs for its stream, which stalls the peer's writer of that stream
// only. The connection window is replenished as data arrives, so one slow stream never starves
// its siblings. Received data lives in pooled chunks that return to the pool when read, so an
// idle stream holds no buffer.
package hbone
