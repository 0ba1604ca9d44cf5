//go:build !linux

package eventloop

import (
	"errors"
	"log/slog"
	"syscall"

	"github.com/prometheus/client_golang/prometheus"
)

// Loop needs epoll; elsewhere New fails and callers keep a goroutine per idle socket.
type Loop struct{}

// Watch is one socket registered with a Loop.
type Watch struct{}

var errUnsupported = errors.New("eventloop: needs Linux (epoll)")

// New fails: the event loop needs epoll.
func New(*slog.Logger, prometheus.Registerer) (*Loop, error) { return nil, errUnsupported }

func (l *Loop) Start()                                     {}
func (l *Loop) Stop()                                      {}
func (l *Loop) Watches() int                               { return 0 }
func (l *Loop) Watch(syscall.Conn, func()) (*Watch, error) { return nil, errUnsupported }
func (w *Watch) Arm() error                                { return errUnsupported }
func (w *Watch) Close()                                    {}
