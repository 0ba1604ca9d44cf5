package localfile

import (
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strconv"
	"strings"

	"gopkg.in/yaml.v3"
)

// Limits of the decoder. A local config is small; these bound the work a hostile or broken
// file can cause (YAML aliases can make a small document describe an exponential tree).
const (
	// MaxErrors is how many errors Parse reports before it stops.
	MaxErrors = 50
	// maxNodes bounds the nodes the decoder visits, aliases counted each time they are followed.
	maxNodes = 1 << 20
)

// FieldError is one problem in a config document: where it is and what is wrong.
type FieldError struct {
	// Path names the field, e.g. `workloads[0].protocol` or `services[1].ports[80]`; it is
	// empty for the document itself.
	Path string
	// Line is the 1-based line of the offending node (0 when unknown).
	Line int
	// Msg says what is wrong.
	Msg string
}

func (e *FieldError) Error() string {
	p := e.Path
	if p == "" {
		p = "document"
	}
	if e.Line > 0 {
		return fmt.Sprintf("%s (line %d): %s", p, e.Line, e.Msg)
	}
	return p + ": " + e.Msg
}

// abort is panicked inside the decoder to stop early; Parse recovers it.
type abort struct{}

// decoder walks a yaml.v3 node tree, collecting FieldErrors.
type decoder struct {
	errs  []error
	nodes int
}

func (d *decoder) errorf(path string, n *yaml.Node, format string, args ...any) {
	line := 0
	if n != nil {
		line = n.Line
	}
	d.errs = append(d.errs, &FieldError{Path: path, Line: line, Msg: fmt.Sprintf(format, args...)})
	if len(d.errs) >= MaxErrors {
		d.errs = append(d.errs, &FieldError{Msg: fmt.Sprintf("too many errors, stopped after %d", MaxErrors)})
		panic(abort{})
	}
}

// resolve follows aliases and counts the node against the work budget.
func (d *decoder) resolve(n *yaml.Node) *yaml.Node {
	for hops := 0; n != nil && n.Kind == yaml.AliasNode; hops++ {
		if n.Alias == nil || hops > 100 {
			d.errorf("", n, "unresolvable alias %q", n.Value)
			panic(abort{})
		}
		n = n.Alias
	}
	d.nodes++
	if d.nodes > maxNodes {
		d.errs = append(d.errs, &FieldError{Line: n.Line, Msg: fmt.Sprintf("document too large: more than %d nodes (after expanding aliases)", maxNodes)})
		panic(abort{})
	}
	return n
}

func isNull(n *yaml.Node) bool {
	return n.Kind == yaml.ScalarNode && n.ShortTag() == "!!null"
}

// customTag reports the application tag ("!Exact") of n, or "" for none or a standard "!!" tag.
func customTag(n *yaml.Node) string {
	if n.Style&yaml.TaggedStyle == 0 {
		return ""
	}
	t := n.ShortTag()
	if strings.HasPrefix(t, "!") && !strings.HasPrefix(t, "!!") {
		return t
	}
	return ""
}

// describe names the kind of a node for "must be X, got Y" messages.
func describe(n *yaml.Node) string {
	switch n.Kind {
	case yaml.MappingNode:
		return "a mapping"
	case yaml.SequenceNode:
		return "a list"
	case yaml.ScalarNode:
		if isNull(n) {
			return "null"
		}
		return fmt.Sprintf("%s %q", strings.TrimPrefix(n.ShortTag(), "!!"), truncate(n.Value))
	default:
		return "an unexpected node"
	}
}

func truncate(s string) string {
	const max = 64
	if len(s) > max {
		return s[:max] + "..."
	}
	return s
}

// field is one known key of a mapping.
type field struct {
	name     string
	required bool
	// set decodes the value. It is not called for a null value (null means "absent").
	set func(path string, v *yaml.Node)
}

// object decodes a mapping whose keys are field names. It reports unknown, duplicate and missing
// required fields. It returns false if n is not a mapping.
func (d *decoder) object(n *yaml.Node, path string, fields []field) bool {
	n = d.resolve(n)
	if n.Kind != yaml.MappingNode {
		d.errorf(path, n, "must be a mapping, got %s", describe(n))
		return false
	}
	if t := customTag(n); t != "" {
		d.errorf(path, n, "unexpected YAML tag %s", t)
	}
	seen := make(map[string]int, len(n.Content)/2)
	present := make(map[string]bool, len(n.Content)/2)
	for i := 0; i+1 < len(n.Content); i += 2 {
		k, v := d.resolve(n.Content[i]), d.resolve(n.Content[i+1])
		if k.Kind != yaml.ScalarNode {
			d.errorf(path, k, "field names must be strings, got %s", describe(k))
			continue
		}
		name := k.Value
		if first, dup := seen[name]; dup {
			d.errorf(join(path, name), k, "duplicate field %q (first at line %d)", name, first)
			continue
		}
		seen[name] = k.Line
		idx := slices.IndexFunc(fields, func(f field) bool { return f.name == name })
		if idx < 0 {
			msg := fmt.Sprintf("unknown field %q", name)
			if name == "<<" {
				msg += " (YAML merge keys are not supported)"
			} else if s := suggest(name, fields); s != "" {
				msg += fmt.Sprintf("; did you mean %q?", s)
			}
			d.errorf(path, k, "%s", msg)
			continue
		}
		if isNull(v) {
			continue
		}
		present[name] = true
		fields[idx].set(join(path, name), v)
	}
	for _, f := range fields {
		if f.required && !present[f.name] {
			d.errorf(path, n, "missing required field %q", f.name)
		}
	}
	return true
}

func join(path, name string) string {
	if path == "" {
		return name
	}
	return path + "." + name
}

func index(path string, i int) string { return fmt.Sprintf("%s[%d]", path, i) }

// suggest returns the known field closest to name, if it is plausibly a typo of it.
func suggest(name string, fields []field) string {
	best, bestDist := "", 3
	for _, f := range fields {
		if strings.EqualFold(f.name, name) {
			return f.name
		}
		if d := editDistance(strings.ToLower(name), strings.ToLower(f.name)); d < bestDist {
			best, bestDist = f.name, d
		}
	}
	return best
}

func editDistance(a, b string) int {
	if len(a) > 64 || len(b) > 64 {
		return 1 << 30
	}
	prev := make([]int, len(b)+1)
	cur := make([]int, len(b)+1)
	for j := range prev {
		prev[j] = j
	}
	for i := 1; i <= len(a); i++ {
		cur[0] = i
		for j := 1; j <= len(b); j++ {
			cost := 1
			if a[i-1] == b[j-1] {
				cost = 0
			}
			cur[j] = min(prev[j]+1, cur[j-1]+1, prev[j-1]+cost)
		}
		prev, cur = cur, prev
	}
	return prev[len(b)]
}

// list decodes a sequence, calling fn for each element.
func (d *decoder) list(n *yaml.Node, path string, fn func(path string, el *yaml.Node)) {
	n = d.resolve(n)
	if n.Kind != yaml.SequenceNode {
		d.errorf(path, n, "must be a list, got %s", describe(n))
		return
	}
	if t := customTag(n); t != "" {
		d.errorf(path, n, "unexpected YAML tag %s", t)
	}
	for i, el := range n.Content {
		fn(index(path, i), el)
	}
}

// mapping decodes a mapping with arbitrary scalar keys, rejecting duplicate keys. keyPath names
// an entry (see quotedKey, bareKey); fn gets that path, the key node (resolved) and the value node.
func (d *decoder) mapping(n *yaml.Node, path string, keyPath func(path, k string) string, fn func(path string, k, v *yaml.Node)) {
	n = d.resolve(n)
	if n.Kind != yaml.MappingNode {
		d.errorf(path, n, "must be a mapping, got %s", describe(n))
		return
	}
	if t := customTag(n); t != "" {
		d.errorf(path, n, "unexpected YAML tag %s", t)
	}
	seen := make(map[string]int, len(n.Content)/2)
	for i := 0; i+1 < len(n.Content); i += 2 {
		k := d.resolve(n.Content[i])
		if k.Kind != yaml.ScalarNode || isNull(k) {
			d.errorf(path, k, "keys must be scalars, got %s", describe(k))
			continue
		}
		kp := keyPath(path, k.Value)
		if first, dup := seen[k.Value]; dup {
			d.errorf(kp, k, "duplicate key %q (first at line %d)", truncate(k.Value), first)
			continue
		}
		seen[k.Value] = k.Line
		fn(kp, k, n.Content[i+1])
	}
}

// quotedKey names a string-keyed entry: path["key"].
func quotedKey(path, k string) string { return fmt.Sprintf("%s[%q]", path, truncate(k)) }

// bareKey names a number-keyed entry: path[80].
func bareKey(path, k string) string { return fmt.Sprintf("%s[%s]", path, truncate(k)) }

// scalar checks that n is a non-null scalar without an application tag.
func (d *decoder) scalar(n *yaml.Node, path, want string) (*yaml.Node, bool) {
	n = d.resolve(n)
	if n.Kind != yaml.ScalarNode || isNull(n) {
		d.errorf(path, n, "must be %s, got %s", want, describe(n))
		return n, false
	}
	if t := customTag(n); t != "" {
		d.errorf(path, n, "unexpected YAML tag %s", t)
		return n, false
	}
	return n, true
}

// text decodes any non-null scalar as its text, as serde does for string fields.
func (d *decoder) text(n *yaml.Node, path string) (string, *yaml.Node, bool) {
	n, ok := d.scalar(n, path, "a string")
	if !ok {
		return "", n, false
	}
	return n.Value, n, true
}

func (d *decoder) str(n *yaml.Node, path string) string {
	s, _, _ := d.text(n, path)
	return s
}

// strList decodes a list of strings.
func (d *decoder) strList(n *yaml.Node, path string) []string {
	var out []string
	d.list(n, path, func(p string, el *yaml.Node) {
		out = append(out, d.str(el, p))
	})
	return out
}

func (d *decoder) boolean(n *yaml.Node, path string) bool {
	n, ok := d.scalar(n, path, "true or false")
	if !ok {
		return false
	}
	if n.ShortTag() == "!!bool" {
		switch strings.ToLower(n.Value) {
		case "true":
			return true
		case "false":
			return false
		}
	}
	d.errorf(path, n, "must be true or false, got %s", describe(n))
	return false
}

// uint decodes an integer in [lo, hi]. Integer-looking keys may be quoted (keyOK), as in JSON.
func (d *decoder) uint(n *yaml.Node, path string, lo, hi uint64, keyOK bool) (uint64, bool) {
	n, ok := d.scalar(n, path, "an integer")
	if !ok {
		return 0, false
	}
	if tag := n.ShortTag(); tag != "!!int" && !(keyOK && tag == "!!str") {
		d.errorf(path, n, "must be an integer, got %s", describe(n))
		return 0, false
	}
	v, err := parseUint(n.Value)
	if err != nil || v < lo || v > hi {
		d.errorf(path, n, "%q is not an integer from %d to %d", truncate(n.Value), lo, hi)
		return 0, false
	}
	return v, true
}

// parseUint parses a YAML 1.2 core-schema integer: decimal (an optional "+", no leading zero,
// which YAML 1.1 would read as octal), or 0x hexadecimal, or 0o octal.
func parseUint(s string) (uint64, error) {
	switch {
	case strings.HasPrefix(s, "0x"):
		return strconv.ParseUint(s[2:], 16, 64)
	case strings.HasPrefix(s, "0o"):
		return strconv.ParseUint(s[2:], 8, 64)
	}
	s = strings.TrimPrefix(s, "+")
	if len(s) > 1 && s[0] == '0' {
		return 0, errors.New("leading zero")
	}
	return strconv.ParseUint(s, 10, 64)
}

// port decodes a port number 1..65535.
func (d *decoder) port(n *yaml.Node, path string) uint16 {
	v, _ := d.uint(n, path, 1, 65535, false)
	return uint16(v)
}

func (d *decoder) u32(n *yaml.Node, path string, lo uint64) uint32 {
	v, _ := d.uint(n, path, lo, 1<<32-1, false)
	return uint32(v)
}

// portMap decodes {servicePort: targetPort}. Service ports are 1..65535; a target port may be 0,
// which (as in ztunnel) means "the endpoint's own port for this service port".
func (d *decoder) portMap(n *yaml.Node, path string) map[uint16]uint16 {
	out := map[uint16]uint16{}
	d.mapping(n, path, bareKey, func(p string, k, v *yaml.Node) {
		sp, ok := d.uint(k, p, 1, 65535, true)
		if !ok {
			return
		}
		tp, ok := d.uint(v, p, 0, 65535, false)
		if !ok {
			return
		}
		if _, dup := out[uint16(sp)]; dup {
			// 80 and 0x50 are different keys in YAML but the same port.
			d.errorf(p, k, "port %d is listed twice", sp)
			return
		}
		out[uint16(sp)] = uint16(tp)
	})
	return out
}

// parseIP parses an IP address as Rust's IpAddr does: no zone, no brackets.
func parseIP(s string) (netip.Addr, error) {
	a, err := netip.ParseAddr(s)
	if err != nil {
		return netip.Addr{}, fmt.Errorf("%q is not an IP address", truncate(s))
	}
	if a.Zone() != "" {
		return netip.Addr{}, fmt.Errorf("%q: IP zones are not allowed", truncate(s))
	}
	return a, nil
}

func (d *decoder) ip(n *yaml.Node, path string) netip.Addr {
	s, n, ok := d.text(n, path)
	if !ok {
		return netip.Addr{}
	}
	a, err := parseIP(s)
	if err != nil {
		d.errorf(path, n, "%v", err)
	}
	return a
}

// parsePrefix parses a CIDR "addr/len" as ipnet does: the length is required.
func parsePrefix(s string) (netip.Prefix, error) {
	if !strings.Contains(s, "/") {
		return netip.Prefix{}, fmt.Errorf("%q is not a CIDR (want address/length, e.g. 10.0.0.0/8 or 10.0.0.1/32)", truncate(s))
	}
	p, err := netip.ParsePrefix(s)
	if err != nil {
		return netip.Prefix{}, fmt.Errorf("%q is not a CIDR (want address/length)", truncate(s))
	}
	return p.Masked(), nil
}

func (d *decoder) prefixList(n *yaml.Node, path string) []netip.Prefix {
	var out []netip.Prefix
	d.list(n, path, func(p string, el *yaml.Node) {
		s, el, ok := d.text(el, p)
		if !ok {
			return
		}
		pf, err := parsePrefix(s)
		if err != nil {
			d.errorf(p, el, "%v", err)
			return
		}
		out = append(out, pf)
	})
	return out
}

// enum decodes one of names (serde's unit-variant spelling, case-sensitive) and returns its index.
func (d *decoder) enum(n *yaml.Node, path string, names ...string) int {
	n, ok := d.scalar(n, path, "one of "+strings.Join(names, ", "))
	if !ok {
		return -1
	}
	if i := slices.Index(names, n.Value); i >= 0 {
		return i
	}
	d.errorf(path, n, "%q is not one of %s", truncate(n.Value), strings.Join(names, ", "))
	return -1
}
