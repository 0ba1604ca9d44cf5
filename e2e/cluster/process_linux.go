package cluster

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"sync"
	"syscall"
	"time"
)

// maxLogLines is how many lines a Process keeps in memory at least (at most a quarter more);
// older ones are dropped, and the log file keeps everything.
const maxLogLines = 100_000

// killWait bounds the wait for a process to end after SIGKILL.
const killWait = 10 * time.Second

// Process is a long-running program started by Cluster.StartProcess. Its stdout and stderr
// go, interleaved as written, to its log file and to memory, line by line.
type Process struct {
	name    string
	logPath string
	cmd     *exec.Cmd
	log     *os.File
	pgid    int // the process group every signal goes to; 0 to signal the process only
	done    chan struct{}

	mu      sync.Mutex
	lines   []string // lines[i] is line number dropped+i
	dropped int
	partial []byte
	changed chan struct{} // closed and replaced on every new line and on exit
	exited  bool
	err     error // how the process ended, once exited
	logErr  error // first error writing the log file
}

// Name is the name given to StartProcess.
func (p *Process) Name() string { return p.name }

// Pid is the process id of the program.
func (p *Process) Pid() int { return p.cmd.Process.Pid }

// LogPath is the file its output is written to.
func (p *Process) LogPath() string { return p.logPath }

// Done is closed when the process has ended and all its output has been read.
func (p *Process) Done() <-chan struct{} { return p.done }

// Err is how the process ended (nil for exit status 0) once Done is closed; before that it
// is nil.
func (p *Process) Err() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.err
}

// Lines returns the output lines held in memory (at least the last 100,000).
func (p *Process) Lines() []string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return append([]string(nil), p.lines...)
}

// LineCount is the number of lines output so far. Pass it to WaitLogSince to wait for a line
// printed after this point.
func (p *Process) LineCount() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.dropped + len(p.lines)
}

// Tail returns the last n lines held in memory, joined with newlines.
func (p *Process) Tail(n int) string {
	p.mu.Lock()
	defer p.mu.Unlock()
	l := p.lines
	if len(l) > n {
		l = l[len(l)-n:]
	}
	s := strings.Join(l, "\n")
	if len(p.partial) > 0 {
		s += "\n" + string(p.partial)
	}
	return s
}

// WaitLog waits up to timeout for an output line (any since the start) for which match is
// true, and returns it. It fails early when the process ends without printing one.
func (p *Process) WaitLog(timeout time.Duration, match func(line string) bool) (string, error) {
	return p.WaitLogSince(0, timeout, match)
}

// WaitLogContains waits up to timeout for an output line containing substr.
func (p *Process) WaitLogContains(timeout time.Duration, substr string) (string, error) {
	line, err := p.WaitLog(timeout, func(l string) bool { return strings.Contains(l, substr) })
	if err != nil {
		return "", fmt.Errorf("%w (looking for %q)", err, substr)
	}
	return line, nil
}

// WaitLogSince is WaitLog for lines numbered since and later (see LineCount).
func (p *Process) WaitLogSince(since int, timeout time.Duration, match func(line string) bool) (string, error) {
	timer := time.NewTimer(timeout)
	defer timer.Stop()
	next := since
	for {
		// match runs without the lock: it may call p's methods.
		p.mu.Lock()
		next = max(next, p.dropped)
		fresh := p.lines[next-p.dropped:]
		next += len(fresh)
		changed, exited, exitErr := p.changed, p.exited, p.err
		p.mu.Unlock()
		for _, l := range fresh {
			if match(l) {
				return l, nil
			}
		}
		if exited {
			return "", fmt.Errorf("wait for log line of %s: process ended (%v) first; last lines:\n%s", p.name, exitStatus(exitErr), p.Tail(20))
		}
		select {
		case <-changed:
		case <-timer.C:
			return "", fmt.Errorf("wait for log line of %s: none within %v; last lines:\n%s", p.name, timeout, p.Tail(20))
		}
	}
}

func exitStatus(err error) string {
	if err == nil {
		return "exit status 0"
	}
	return err.Error()
}

// Signal sends sig to the process's group (the program and its children), unless it has
// ended.
func (p *Process) Signal(sig syscall.Signal) error {
	select {
	case <-p.done:
		return fmt.Errorf("signal %s: %s already ended", sig, p.name)
	default:
	}
	var err error
	if p.pgid > 0 {
		err = syscall.Kill(-p.pgid, sig)
	} else {
		err = p.cmd.Process.Signal(sig)
	}
	if err != nil && !errors.Is(err, syscall.ESRCH) && !errors.Is(err, os.ErrProcessDone) {
		return fmt.Errorf("signal %s to %s: %w", sig, p.name, err)
	}
	return nil
}

// Stop sends SIGTERM, waits up to grace for the process to end, then sends SIGKILL. It
// returns how the process ended: nil for exit status 0, so a program that shuts down cleanly
// on SIGTERM stops without error. Stopping an ended process just returns how it ended.
func (p *Process) Stop(grace time.Duration) error {
	if err := p.Signal(syscall.SIGTERM); err != nil {
		select {
		case <-p.done: // it ended by itself
		default:
			return fmt.Errorf("stop %s: %w", p.name, err)
		}
	}
	select {
	case <-p.done:
	case <-time.After(grace):
		p.Signal(syscall.SIGKILL)
		select {
		case <-p.done:
		case <-time.After(killWait):
			return fmt.Errorf("stop %s: still running %v after SIGKILL", p.name, killWait)
		}
		return fmt.Errorf("stop %s: killed after ignoring SIGTERM for %v: %w", p.name, grace, p.Err())
	}
	if err := p.Err(); err != nil {
		return fmt.Errorf("stop %s: %w", p.name, err)
	}
	return nil
}

// logError returns the first error writing the log file, if any.
func (p *Process) logError() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.logErr
}

// write takes a chunk of the program's output; only the reader goroutine calls it.
func (p *Process) write(b []byte) {
	if _, err := p.log.Write(b); err != nil {
		p.mu.Lock()
		if p.logErr == nil {
			p.logErr = fmt.Errorf("write %s: %w", p.logPath, err)
		}
		p.mu.Unlock()
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	p.partial = append(p.partial, b...)
	added := false
	for {
		i := bytes.IndexByte(p.partial, '\n')
		if i < 0 {
			break
		}
		p.addLineLocked(string(bytes.TrimSuffix(p.partial[:i], []byte("\r"))))
		p.partial = p.partial[i+1:]
		added = true
	}
	if len(p.partial) == 0 {
		p.partial = nil // let the buffer go
	}
	if added {
		p.notifyLocked()
	}
}

func (p *Process) addLineLocked(l string) {
	p.lines = append(p.lines, l)
	// Trim in steps of a quarter so that a chatty process costs O(1) per line.
	if len(p.lines) > maxLogLines+maxLogLines/4 {
		n := len(p.lines) - maxLogLines
		p.lines = append([]string(nil), p.lines[n:]...)
		p.dropped += n
	}
}

func (p *Process) notifyLocked() {
	close(p.changed)
	p.changed = make(chan struct{})
}

// outputDrain bounds how long the output pipe may stay open after the process and its group
// have ended (a daemon that left the group may hold it).
const outputDrain = 5 * time.Second

// read copies the program's output pipe into p until every writer has closed it.
func (p *Process) read(out *os.File, done chan<- struct{}) {
	defer close(done)
	buf := make([]byte, 32<<10)
	for {
		n, err := out.Read(buf)
		if n > 0 {
			p.write(buf[:n])
		}
		if err != nil {
			return
		}
	}
}

// wait reaps the process, ends what is left of its group, drains its output and records how
// it ended.
func (p *Process) wait(out *os.File, readDone <-chan struct{}) {
	err := p.cmd.Wait()
	if p.pgid > 0 {
		// Children left in the group (a shell's background jobs) would outlive the test and
		// hold the output pipe open; the group's id cannot be reused while any of them lives.
		syscall.Kill(-p.pgid, syscall.SIGKILL)
	}
	select {
	case <-readDone:
	case <-time.After(outputDrain):
		out.Close() // unblocks the reader
		<-readDone
	}
	out.Close()
	closeErr := p.log.Close()
	p.mu.Lock()
	if len(p.partial) > 0 {
		p.addLineLocked(string(p.partial))
		p.partial = nil
	}
	p.exited = true
	p.err = err
	if p.logErr == nil && closeErr != nil {
		p.logErr = fmt.Errorf("close %s: %w", p.logPath, closeErr)
	}
	p.notifyLocked()
	p.mu.Unlock()
	close(p.done)
}
