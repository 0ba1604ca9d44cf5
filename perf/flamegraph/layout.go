package flamegraph

import (
	"slices"
	"strconv"
	"strings"
)

// Options shape the graph. The zero value gives a 1200 px wide static graph without a title.
type Options struct {
	// Title is the line at the top, e.g. "ztgo node a: CPU, 1-stream throughput".
	Title string
	// Width is the image's width in pixels; 0 means 1200 (at least 120, at most 100,000).
	Width float64
	// MinWidth is the narrowest frame drawn, in pixels; 0 means 1. Narrower siblings are
	// merged into one "[N small frames]" box, or omitted when that too is narrower.
	MinWidth float64
	// OwnPrefixes are the function name prefixes of the profiled project's own code, drawn
	// in greens; nil means ztgo's: github.com/ztgo/ztgo/... and main.
	OwnPrefixes []string
	// Interactive embeds a small script for click-to-zoom (click a frame to make it the
	// full width, click the root or press Escape to reset).
	Interactive bool
}

// defaultOwnPrefixes are ztgo's function name prefixes (main is the profiled binary's own);
// read only, like runtimePrefixes.
var defaultOwnPrefixes = []string{"github.com/ztgo/ztgo/", "github.com/ztgo/ztgo.", "main."}

// runtimePrefixes are the packages drawn in blues: the Go runtime, syscalls and the
// standard library's internal packages, the layer under everyone's code.
var runtimePrefixes = []string{"runtime.", "runtime/", "syscall.", "internal/"}

// Geometry, in pixels.
const (
	defaultWidth    = 1200.0
	maxWidth        = 100000.0
	defaultMinWidth = 1.0
	padX            = 10.0
	headerHeight    = 56.0
	padBottom       = 10.0
	frameHeight     = 16.0
	fontSize        = 11.0
	// charWidth is a monospace glyph's advance at fontSize (0.6 em, a little more than
	// DejaVu Sans Mono's 0.602 em would need rounding up to), used to shorten labels.
	charWidth = 6.7
)

// Kind is what a frame's function is, which picks its hue family.
type Kind int

// Kinds of frames.
const (
	KindOther   Kind = iota // standard library and third-party code: reds to yellows
	KindRuntime             // runtime., syscall., internal/: blues
	KindOwn                 // Options.OwnPrefixes: greens
	KindRoot                // the "all" frame at the bottom: grey
	KindMerged              // siblings too narrow to draw, merged: light grey
)

// String returns the kind's name as the legend shows it.
func (k Kind) String() string {
	switch k {
	case KindOther:
		return "other"
	case KindRuntime:
		return "runtime"
	case KindOwn:
		return "own"
	case KindRoot:
		return "root"
	case KindMerged:
		return "merged"
	}
	return "Kind(" + strconv.Itoa(int(k)) + ")"
}

// Frame is one box of the graph.
type Frame struct {
	// Name is the function's name; for a merged box, "[N small frames]".
	Name string
	Kind Kind
	// Depth is 0 for the root, 1 for the frames on it, and so on up.
	Depth int
	// X and Width are in pixels, X from the image's left edge.
	X, Width float64
	// Left and Share are X and Width as fractions of the total (0..1).
	Left, Share float64
	// Value and Count are the frame's cumulative value and sample count (itself and
	// everything it called).
	Value, Count int64
	// Merged is how many sibling frames a merged box stands for; 0 otherwise.
	Merged int
}

// Graph is a laid-out flame graph.
type Graph struct {
	// Frames are in depth-first order, each frame before the frames on it, siblings left
	// to right.
	Frames []Frame
	// Levels is the number of rows drawn (the deepest drawn frame's Depth + 1), 0 when the
	// profile has no samples.
	Levels int
	// Width is the image's width; Height its height.
	Width, Height float64
}

type node struct {
	name         string
	value, count int64
	children     []*node
	index        map[string]*node
}

func (n *node) child(name string) *node {
	if c, ok := n.index[name]; ok {
		return c
	}
	if n.index == nil {
		n.index = make(map[string]*node)
	}
	c := &node{name: name}
	n.index[name] = c
	n.children = append(n.children, c)
	return c
}

// Layout builds the call tree of f's stacks and places its frames.
func Layout(f *Folded, opts Options) *Graph {
	opts = opts.withDefaults()
	g := &Graph{Width: opts.Width}
	root := &node{name: "all"}
	for _, s := range f.Stacks {
		n := root
		n.value += s.Value
		n.count += s.Count
		for _, fr := range s.Frames {
			n = n.child(fr)
			n.value += s.Value
			n.count += s.Count
		}
	}
	if root.value > 0 {
		l := layouter{g: g, opts: opts, total: float64(root.value), scale: (opts.Width - 2*padX) / float64(root.value)}
		l.place(root, 0, 0, KindRoot)
	}
	g.Height = headerHeight + float64(g.Levels)*frameHeight + padBottom
	return g
}

type layouter struct {
	g     *Graph
	opts  Options
	total float64 // the root's value
	scale float64 // pixels per unit of value
}

// place adds n's frame at depth, offset units of value from the left, then the frames on it.
func (l *layouter) place(n *node, depth int, offset int64, kind Kind) {
	l.add(Frame{Name: n.name, Kind: kind, Depth: depth, Value: n.value, Count: n.count}, offset)

	slices.SortFunc(n.children, func(a, b *node) int { return strings.Compare(a.name, b.name) })
	var small []*node
	for _, c := range n.children {
		if float64(c.value)*l.scale < l.opts.MinWidth {
			small = append(small, c)
			continue
		}
		l.place(c, depth+1, offset, classify(c.name, l.opts.OwnPrefixes))
		offset += c.value
	}
	if len(small) < 2 {
		return // one small frame alone is as narrow merged as it is by itself
	}
	m := Frame{Kind: KindMerged, Depth: depth + 1, Merged: len(small),
		Name: "[" + strconv.Itoa(len(small)) + " small frames]"}
	for _, c := range small {
		m.Value += c.value
		m.Count += c.count
	}
	if float64(m.Value)*l.scale >= l.opts.MinWidth {
		l.add(m, offset)
	}
}

func (l *layouter) add(fr Frame, offset int64) {
	fr.Left = float64(offset) / l.total
	fr.Share = float64(fr.Value) / l.total
	fr.X = padX + float64(offset)*l.scale
	fr.Width = float64(fr.Value) * l.scale
	l.g.Frames = append(l.g.Frames, fr)
	l.g.Levels = max(l.g.Levels, fr.Depth+1)
}

func classify(name string, own []string) Kind {
	for _, p := range own {
		if strings.HasPrefix(name, p) {
			return KindOwn
		}
	}
	for _, p := range runtimePrefixes {
		if strings.HasPrefix(name, p) {
			return KindRuntime
		}
	}
	return KindOther
}

func (o Options) withDefaults() Options {
	if !(o.Width > 0) { // also NaN
		o.Width = defaultWidth
	}
	o.Width = min(max(o.Width, 2*padX+100), maxWidth)
	if !(o.MinWidth > 0) {
		o.MinWidth = defaultMinWidth
	}
	if o.OwnPrefixes == nil {
		o.OwnPrefixes = defaultOwnPrefixes
	}
	return o
}
