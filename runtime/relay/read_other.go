//go:build !linux

package relay

import (
	"errors"
	"syscall"
)

func readFD(fd int, p []byte) (int, error) {
	n, err := syscall.Read(fd, p)
	if n < 0 {
		n = 0
	}
	return n, err
}

func isAgain(err error) bool { return errors.Is(err, syscall.EAGAIN) }

func writeFD(fd int, p []byte) (int, error) {
	n, err := syscall.Write(fd, p)
	if n < 0 {
		n = 0
	}
	return n, err
}
