package main

import (
	"fmt"
	"io"
	"math"
	"sort"
	"strconv"
	"strings"

	"github.com/ztgo/ztgo/e2e/socks5"
)

// printer writes the demo's report; colour only when it writes to a terminal.
type printer struct {
	w     io.Writer
	color bool
}

func (p *printer) paint(code, s string) string {
	if !p.color {
		return s
	}
	return "\x1b[" + code + "m" + s + "\x1b[0m"
}

func (p *printer) good(s string) string { return p.paint("32", s) }
func (p *printer) bad(s string) string  { return p.paint("31", s) }
func (p *printer) dim(s string) string  { return p.paint("2", s) }
func (p *printer) bold(s string) string { return p.paint("1", s) }

func (p *printer) printf(format string, args ...any) { fmt.Fprintf(p.w, format, args...) }

// row prints an indented "label  text" line with the label padded to a common width.
func (p *printer) row(indent int, label, text string) {
	p.printf("%s%s %s\n", strings.Repeat(" ", indent), p.dim(fmt.Sprintf("%-9s", label)), text)
}

// flowReport prints one flow: a header line with the verdict, then its details.
// width is the width of the widest stage list, so the totals of every flow line up.
func (p *printer) flowReport(r *flowResult, width int) {
	verdict := p.good("OK")
	if !r.ok() {
		verdict = p.bad("FAILED")
	}
	head := fmt.Sprintf("%s %s", r.target, r.what)
	p.printf("  %s  %-50s %-22s %s\n", p.bold(strconv.Itoa(r.n)), head, "expected: "+r.expect, verdict)
	const in = 5

	// Identities: node-a names both ends; node-b names the client from its verified certificate.
	if r.onA != nil && r.onA.SrcIdentity != "" {
		dst := r.onA.DstIdentity
		if dst == "" {
			dst = "(none: not a mesh workload, no mTLS)"
		}
		note := ""
		if r.onB != nil && r.onB.SrcIdentity != "" {
			if r.onB.SrcIdentity == r.onA.SrcIdentity {
				note = p.dim("  (node-b: from the client's certificate)")
			} else {
				note = p.bad("  (node-b saw " + r.onB.SrcIdentity + ")")
			}
		}
		p.row(in, "identity", r.onA.SrcIdentity+" -> "+dst+note)
	}

	switch r.expect {
	case "allowed":
		vip, pod := echoVIP+":"+strconv.Itoa(echoSvcPort), echoIP+":"+strconv.Itoa(echoPort)
		if r.onA != nil {
			vip = r.onA.Dst
		}
		if r.onB != nil {
			pod = r.onB.Dst
		}
		p.row(in, "path", fmt.Sprintf("SOCKS5 -> node-a (VIP %s -> pod echo) -> HBONE mTLS %s:%d -> node-b -> app %s",
			vip, echoIP, hbonePort, pod))
	case "denied":
		verdict := "?"
		if r.onB != nil {
			verdict = r.onB.Outcome
		}
		p.row(in, "path", fmt.Sprintf("SOCKS5 -> node-a -> HBONE mTLS %s:%d -> node-b authz: %s (policy prod/allow-prod-only)",
			dbIP, hbonePort, verdict))
	case "passthrough":
		p.row(in, "path", fmt.Sprintf("SOCKS5 -> node-a -> plain TCP (not a mesh destination: no mTLS) -> app %s:%d",
			outsideIP, outsidePort))
	}

	if r.expect == "denied" {
		if r.replied {
			p.row(in, "socks5", fmt.Sprintf("reply %d (%s); db app accepted %d connections", r.reply, socks5.ReplyText(r.reply), r.appConns))
		}
	} else {
		var data []string
		if r.msgEchoed {
			data = append(data, "line echoed")
		}
		if r.sum != "" && r.sent > 1<<19 {
			check := func(s string) string {
				if s == r.sum {
					return "="
				}
				return p.bad("!=")
			}
			data = append(data, fmt.Sprintf("1 MiB round trip, sha256 %.12s… sent %s app received %s echoed back",
				r.sum, check(r.appSum), check(r.echoSum)))
		}
		if r.eof {
			data = append(data, "half-close ok")
		}
		if len(data) > 0 {
			p.row(in, "data", strings.Join(data, "; "))
		}
		if r.sent > 0 || r.recv > 0 {
			p.row(in, "bytes", fmt.Sprintf("client -> app %s   app -> client %s", thousands(r.sent), thousands(r.recv)))
		}
		if r.app != nil {
			note := p.dim("  (client IP kept)")
			if !strings.HasPrefix(r.app.Peer, clientIP+":") {
				note = p.bad("  (client IP lost)")
			}
			p.row(in, "app saw", r.app.Peer+note)
		}
	}

	for _, side := range []struct {
		name string
		rec  *flowRecord
	}{{"node-a", r.onA}, {"node-b", r.onB}} {
		switch {
		case side.rec != nil:
			p.row(in, side.name, fmt.Sprintf("%-*s = %7s µs  %s", width, stageCells(side.rec), micros(side.rec.TotalUS), side.rec.Outcome))
		case side.name == "node-a" || r.expect != "passthrough":
			p.row(in, side.name, p.bad("no record in /debug/flows"))
		}
	}
	for _, f := range r.failures {
		p.row(in, "problem", p.bad(f))
	}
}

// stagesWidth is the width of the widest stage list of any record of results.
func stagesWidth(results []*flowResult) int {
	w := 0
	for _, r := range results {
		for _, rec := range []*flowRecord{r.onA, r.onB} {
			if rec != nil {
				w = max(w, len(stageCells(rec)))
			}
		}
	}
	return w
}

// stageCells renders a flow's stages as aligned "stage µs" cells.
func stageCells(rec *flowRecord) string {
	var b strings.Builder
	for i, s := range rec.Stages {
		cell := s.Stage + " " + micros(s.WorkUS)
		if i < len(rec.Stages)-1 {
			cell = fmt.Sprintf("%-15s", cell)
		}
		b.WriteString(cell)
	}
	return b.String()
}

func micros(us float64) string { return thousands(int64(math.Round(us))) }

// thousands formats n with comma separators.
func thousands(n int64) string {
	s := strconv.FormatInt(n, 10)
	neg := strings.HasPrefix(s, "-")
	s = strings.TrimPrefix(s, "-")
	var b strings.Builder
	for i, c := range s {
		if i > 0 && (len(s)-i)%3 == 0 {
			b.WriteByte(',')
		}
		b.WriteRune(c)
	}
	if neg {
		return "-" + b.String()
	}
	return b.String()
}

// metricSample is one line of Prometheus text exposition.
type metricSample struct {
	Name   string
	Labels map[string]string
	Value  string
}

// parseMetricLine parses `name{k="v",...} value` (labels optional); comments and blank lines
// are not samples.
func parseMetricLine(line string) (metricSample, bool) {
	line = strings.TrimSpace(line)
	if line == "" || line[0] == '#' {
		return metricSample{}, false
	}
	m := metricSample{Labels: map[string]string{}}
	i := strings.IndexAny(line, "{ ")
	if i < 0 {
		return metricSample{}, false
	}
	m.Name = line[:i]
	rest := line[i:]
	if rest[0] == '{' {
		rest = rest[1:]
		for {
			rest = strings.TrimLeft(rest, ", ")
			if rest == "" {
				return metricSample{}, false
			}
			if rest[0] == '}' {
				rest = rest[1:]
				break
			}
			eq := strings.Index(rest, "=")
			if eq <= 0 || len(rest) < eq+2 || rest[eq+1] != '"' {
				return metricSample{}, false
			}
			key := strings.TrimSpace(rest[:eq])
			rest = rest[eq+2:]
			var val strings.Builder
			closed := false
			for j := 0; j < len(rest); j++ {
				c := rest[j]
				if c == '\\' && j+1 < len(rest) {
					j++
					switch rest[j] {
					case 'n':
						val.WriteByte('\n')
					default:
						val.WriteByte(rest[j])
					}
					continue
				}
				if c == '"' {
					rest = rest[j+1:]
					closed = true
					break
				}
				val.WriteByte(c)
			}
			if !closed {
				return metricSample{}, false
			}
			m.Labels[key] = val.String()
		}
	}
	fields := strings.Fields(rest)
	if len(fields) == 0 {
		return metricSample{}, false
	}
	m.Value = fields[0]
	return m, true
}

// abridged renders a sample with only the named labels (those that are set), in that order.
func (m metricSample) abridged(keys ...string) string {
	var parts []string
	for _, k := range keys {
		if v := m.Labels[k]; v != "" && v != "unknown" && v != "-" {
			parts = append(parts, fmt.Sprintf("%s=%q", k, v))
		}
	}
	return fmt.Sprintf("%s{%s} %s", m.Name, strings.Join(parts, ","), m.Value)
}

// pickMetrics returns the samples of name whose labels include every pair of want, sorted.
func pickMetrics(text, name string, want map[string]string) []metricSample {
	var out []metricSample
	for _, line := range strings.Split(text, "\n") {
		m, ok := parseMetricLine(line)
		if !ok || m.Name != name {
			continue
		}
		match := true
		for k, v := range want {
			if m.Labels[k] != v {
				match = false
				break
			}
		}
		if match {
			out = append(out, m)
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Labels["reporter"] < out[j].Labels["reporter"] })
	return out
}
