package hbone

import "time"

// Settings are the HTTP/2 parameters of one side of a connection. The defaults are ztunnel's.
type Settings struct {
	// StreamWindow is the initial receive window of each stream.
	StreamWindow uint32
	// ConnWindow is the receive window of the whole connection.
	ConnWindow uint32
	// MaxFrameSize is the largest DATA frame the peer may send us.
	MaxFrameSize uint32
	// MaxHeaderListSize bounds the decoded size of a header block we accept.
	MaxHeaderListSize uint32
	// MaxConcurrentStreams is what we advertise (server) or the most streams we open (client).
	MaxConcurrentStreams uint32
	// PingInterval is how often a PING is sent; PingTimeout how long to wait for its ACK
	// before the connection is closed. Zero takes the default (10 s); negative disables it.
	PingInterval time.Duration
	PingTimeout  time.Duration
}

// ztunnel's HTTP/2 parameters (HTTP2_STREAM_WINDOW_SIZE, HTTP2_CONNECTION_WINDOW_SIZE,
// HTTP2_FRAME_SIZE, h2 client/server builders).
const (
	DefaultStreamWindow = 4 << 20
	DefaultConnWindow   = 16 << 20
	DefaultMaxFrameSize = 1 << 20
	// ClientMaxStreams is ztunnel's POOL_MAX_STREAMS_PER_CONNECTION default.
	ClientMaxStreams = 100
	// ServerMaxStreams is what ztunnel's inbound server advertises.
	ServerMaxStreams = 200
)

// ClientSettings returns ztunnel's outbound HTTP/2 settings.
func ClientSettings() Settings {
	return Settings{
		StreamWindow:         DefaultStreamWindow,
		ConnWindow:           DefaultConnWindow,
		MaxFrameSize:         DefaultMaxFrameSize,
		MaxHeaderListSize:    16 << 10,
		MaxConcurrentStreams: ClientMaxStreams,
		PingInterval:         10 * time.Second,
		PingTimeout:          20 * time.Second,
	}
}

// ServerSettings returns ztunnel's inbound HTTP/2 settings.
func ServerSettings() Settings {
	return Settings{
		StreamWindow:         DefaultStreamWindow,
		ConnWindow:           DefaultConnWindow,
		MaxFrameSize:         DefaultMaxFrameSize,
		MaxHeaderListSize:    64 << 10,
		MaxConcurrentStreams: ServerMaxStreams,
		PingInterval:         10 * time.Second,
		PingTimeout:          20 * time.Second,
	}
}

func (s *Settings) fill(def Settings) {
	if s.StreamWindow == 0 {
		s.StreamWindow = def.StreamWindow
	}
	if s.ConnWindow == 0 {
		s.ConnWindow = def.ConnWindow
	}
	if s.MaxFrameSize == 0 {
		s.MaxFrameSize = def.MaxFrameSize
	}
	if s.MaxHeaderListSize == 0 {
		s.MaxHeaderListSize = def.MaxHeaderListSize
	}
	if s.MaxConcurrentStreams == 0 {
		s.MaxConcurrentStreams = def.MaxConcurrentStreams
	}
	if s.PingTimeout == 0 {
		s.PingTimeout = def.PingTimeout
	}
	// Keepalive is on unless disabled: without it a peer that stops reading and answering
	// could hold a connection, and its writers, forever. A negative interval disables it.
	if s.PingInterval == 0 {
		s.PingInterval = def.PingInterval
	}
}
