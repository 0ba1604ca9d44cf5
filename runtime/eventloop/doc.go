// Package eventloop tells ztgo when an idle socket of an established flow becomes readable,
// without a goroutine per socket.
//
// A Go program that reads a socket with net.Conn.Read parks one goroutine per socket, with
// its stack (2-8 KiB), for as long as the socket is idle. A node proxy holds two sockets per
// flow and most flows are idle most of the time, so that is where its memory per connection
// goes. A Loop replaces those parked readers: a flow's relay arms a Watch on a socket it has
// drained, returns its goroutine, and the Loop calls the Watch's function once the socket has
// bytes, a FIN, a reset or an error. The relay then runs the flow's next burst on a fresh
// goroutine until the socket would block again. An idle flow therefore holds no goroutine;
// a busy one holds one per direction, only while it is moving bytes or waiting for its far
// side.
//
// # How it waits
//
// The Loop owns one epoll instance. Each Watch is registered on it with EPOLLIN, EPOLLRDHUP
// and EPOLLONESHOT: after one report the socket is disarmed until the relay arms it again,
// which is how backpressure works. A relay that cannot hand bytes on (the HTTP/2 stream has
// no send window, the far socket is full) does not arm the Watch, so nothing reads the socket,
// its receive buffer fills and TCP's window closes towards the sender. No byte is buffered in
// user space beyond the one read in flight. Re-arming a socket that is already readable
// reports it at once (the kernel checks readiness on EPOLL_CTL_MOD), so no wakeup is lost.
//
// The epoll descriptor itself is pollable: the Loop hands it to Go's netpoller and waits for it
// with a RawConn read, then drains it with epoll_wait(timeout 0). No OS thread is parked in
// epoll_wait, and the loop goroutine runs on the scheduler like any other. The function a
// Watch calls runs on that goroutine, so it must not block: the relay's only claims the
// parked direction and starts a goroutine for it.
//
// # Why not gnet
//
// The design card names gnet/v2 for the event loop. gnet cannot pause reading a connection:
// while EPOLLIN fires it keeps reading into the connection's inbound buffer whether or not the
// handler consumed the last bytes (gnet issue #722), so a flow whose far side is slow would
// grow a buffer without bound; that breaks the rule "a slow reader stalls its writer". gnet
// also binds its listeners itself from addresses, while ztgo's in-pod listeners are opened
// inside each pod's network namespace by redirect's socket factory and cannot be handed to it.
// What gnet would save (no goroutine per idle connection) this package gives with one epoll
// set and one-shot arming, and the sockets stay ordinary *net.TCPConn that the splice, TLS
// and HTTP/2 code paths already use. Measured (perf/RESULTS.md, 10,000 idle connections
// through two nodes): 2.04 -> 0.04 goroutines and ~16 -> ~5.7 KB of RSS per connection per
// node, with throughput, round trips and connection rate unchanged within the noise.
//
// One-shot arming costs an epoll_ctl per burst. Edge-triggered registration without it would
// save that call but report every arriving segment of a busy socket to the loop, a wake-up per
// 64 KiB during bulk transfers; one-shot keeps a busy flow off the loop entirely.
//
// # Descriptor lifetime
//
// Every epoll_ctl runs inside the connection's RawConn.Control, which holds Go's reference to
// the descriptor: a Watch can never arm or remove a descriptor number that the connection has
// already closed and the kernel has since given to another socket. Closing a connection drops
// it from the epoll set without a report, so whoever closes a watched connection from outside
// the relay must also wake the relay (relay's Abort does both).
package eventloop
