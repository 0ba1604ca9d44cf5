package flamegraph

import (
	"bufio"
	"encoding/xml"
	"fmt"
	"hash/fnv"
	"io"
	"math"
	"strconv"
	"strings"
	"time"
)

// Render lays out f and writes it to w as a self-contained SVG document.
func Render(w io.Writer, f *Folded, opts Options) error {
	opts = opts.withDefaults()
	g := Layout(f, opts)
	bw := bufio.NewWriter(w)
	s := &svgWriter{w: bw}
	s.document(f, g, opts)
	if err := bw.Flush(); err != nil {
		return fmt.Errorf("write svg: %w", err)
	}
	return nil
}

type svgWriter struct {
	w *bufio.Writer
}

func (s *svgWriter) raw(parts ...string) {
	for _, p := range parts {
		s.w.WriteString(p)
	}
}

// text writes t escaped for XML character data and attribute values alike: &, <, >, quotes
// and control characters are escaped, and characters XML cannot hold (invalid UTF-8, NUL)
// become U+FFFD, so any function name makes a well-formed document.
func (s *svgWriter) text(t string) {
	xml.EscapeText(s.w, []byte(t)) // errors are bufio's, reported by Flush
}

func (s *svgWriter) document(f *Folded, g *Graph, opts Options) {
	width, height := num(g.Width), num(g.Height)
	s.raw(`<?xml version="1.0" encoding="UTF-8" standalone="no"?>`, "\n",
		`<svg xmlns="http://www.w3.org/2000/svg" version="1.1" width="`, width, `" height="`, height,
		`" viewBox="0 0 `, width, " ", height, `" font-family="monospace" font-size="`, num(fontSize), `">`, "\n")
	s.raw("<style>text{fill:#000;white-space:pre}.f:hover rect{stroke:#000;stroke-width:0.5}")
	if opts.Interactive {
		s.raw(".f{cursor:pointer}")
	}
	s.raw("</style>\n")
	s.raw(`<rect width="100%" height="100%" fill="#f6f6f2"/>`, "\n")

	mid := num(g.Width / 2)
	s.raw(`<text x="`, mid, `" y="22" font-size="16" text-anchor="middle" font-family="sans-serif">`)
	s.text(opts.Title)
	s.raw("</text>\n")
	s.raw(`<text x="`, num(padX), `" y="44">`)
	s.text(totalLine(f))
	s.raw("</text>\n")
	s.legend(g.Width - padX)

	if len(g.Frames) == 0 {
		s.raw(`<text x="`, mid, `" y="`, num(headerHeight+frameHeight), `" text-anchor="middle">no samples</text>`, "\n")
	}
	s.raw(`<g id="frames">`, "\n")
	for _, fr := range g.Frames {
		s.frame(f, g, fr)
	}
	s.raw("</g>\n")
	if opts.Interactive {
		s.raw(`<script type="text/ecmascript"><![CDATA[`,
			fmt.Sprintf("var padX=%s,drawW=%s,charW=%s;", num(padX), num(g.Width-2*padX), num(charWidth)),
			zoomScript, "]]></script>\n")
	}
	s.raw("</svg>\n")
}

// legend writes the hue families' swatches right-aligned to right, on the total's line.
func (s *svgWriter) legend(right float64) {
	items := []struct {
		kind  Kind
		label string
	}{{KindOwn, "own code"}, {KindOther, "std & third-party"}, {KindRuntime, "runtime, syscall, internal/"}}
	x := right
	for i := len(items) - 1; i >= 0; i-- {
		it := items[i]
		x -= float64(len(it.label))*charWidth + 12 + 18
		s.raw(`<rect x="`, num(x), `" y="35" width="12" height="12" rx="2" fill="`, familySample(it.kind), `"/>`,
			`<text x="`, num(x+16), `" y="45">`)
		s.text(it.label)
		s.raw("</text>\n")
	}
}

func (s *svgWriter) frame(f *Folded, g *Graph, fr Frame) {
	y := g.Height - padBottom - float64(fr.Depth+1)*frameHeight
	s.raw(`<g class="f" data-l="`, strconv.FormatFloat(fr.Left, 'g', 12, 64),
		`" data-w="`, strconv.FormatFloat(fr.Share, 'g', 12, 64),
		`" data-d="`, strconv.Itoa(fr.Depth), `"><title>`)
	s.text(fr.Name)
	s.raw(" (")
	s.text(frameStats(f, fr))
	s.raw(")</title>")
	// The nested viewport clips the label to the frame.
	s.raw(`<svg x="`, num(fr.X), `" y="`, num(y), `" width="`, num(fr.Width), `" height="`, num(frameHeight-1), `">`,
		`<rect width="100%" height="100%" rx="2" fill="`, color(fr), `"/>`)
	if label := Label(fr.Name, fr.Width); label != "" {
		s.raw(`<text x="3" y="`, num(frameHeight-5), `">`)
		s.text(label)
		s.raw("</text>")
	}
	s.raw("</svg></g>\n")
}

// Label is name as it fits in a frame width pixels wide: whole, cut short with "..", or
// empty when not even three characters fit.
func Label(name string, width float64) string {
	fit := int((width - 6) / charWidth)
	if fit < 3 {
		return ""
	}
	r := []rune(name)
	if len(r) <= fit {
		return name
	}
	return string(r[:fit-2]) + ".."
}

func frameStats(f *Folded, fr Frame) string {
	var b strings.Builder
	if fr.Merged > 0 {
		b.WriteString("each narrower than the minimum width; ")
	}
	b.WriteString(formatValue(fr.Value, f.Unit, f.SampleType))
	if f.HasCount {
		b.WriteString(", ")
		b.WriteString(strconv.FormatInt(fr.Count, 10))
		b.WriteString(" samples")
	}
	b.WriteString(", ")
	b.WriteString(strconv.FormatFloat(fr.Share*100, 'f', 2, 64))
	b.WriteString("%")
	return b.String()
}

func totalLine(f *Folded) string {
	var b strings.Builder
	b.WriteString("Total: ")
	b.WriteString(formatValue(f.Total, f.Unit, f.SampleType))
	if f.Unit != "count" {
		b.WriteString(" of ")
		b.WriteString(f.SampleType)
	}
	if f.HasCount {
		b.WriteString(" in ")
		b.WriteString(strconv.FormatInt(f.TotalCount, 10))
		b.WriteString(" samples")
	}
	if f.DurationNanos > 0 {
		b.WriteString(" over a ")
		b.WriteString(time.Duration(f.DurationNanos).Round(10 * time.Millisecond).String())
		b.WriteString(" profile")
	}
	return b.String()
}

// formatValue writes v in unit the way pprof does: time and memory scaled, counts as they are.
func formatValue(v int64, unit, sampleType string) string {
	x := float64(v)
	switch unit {
	case "nanoseconds":
		switch {
		case v >= 1e9:
			return strconv.FormatFloat(x/1e9, 'f', 2, 64) + " s"
		case v >= 1e6:
			return strconv.FormatFloat(x/1e6, 'f', 2, 64) + " ms"
		case v >= 1e3:
			return strconv.FormatFloat(x/1e3, 'f', 2, 64) + " µs"
		}
		return strconv.FormatInt(v, 10) + " ns"
	case "bytes":
		switch {
		case v >= 1<<30:
			return strconv.FormatFloat(x/(1<<30), 'f', 2, 64) + " GiB"
		case v >= 1<<20:
			return strconv.FormatFloat(x/(1<<20), 'f', 2, 64) + " MiB"
		case v >= 1<<10:
			return strconv.FormatFloat(x/(1<<10), 'f', 2, 64) + " KiB"
		}
		return strconv.FormatInt(v, 10) + " B"
	case "count", "":
		return strconv.FormatInt(v, 10) + " " + sampleType
	}
	return strconv.FormatInt(v, 10) + " " + unit
}

// num formats a coordinate with at most two decimals and no trailing zeros.
func num(x float64) string {
	if math.IsNaN(x) || math.IsInf(x, 0) {
		return "0"
	}
	t := strconv.FormatFloat(x, 'f', 2, 64)
	t = strings.TrimRight(t, "0")
	t = strings.TrimSuffix(t, ".")
	if t == "-0" {
		return "0"
	}
	return t
}

// color picks fr's fill: a hue family by its kind, and a shade within it by a hash of its
// name, so that a function keeps its colour from graph to graph.
func color(fr Frame) string {
	h := fnv.New32a()
	h.Write([]byte(fr.Name))
	sum := h.Sum32()
	a := float64(sum&0xffff) / 0xffff     // hue within the family
	b := float64(sum>>16&0xffff) / 0xffff // saturation and lightness
	return shade(fr.Kind, a, b)
}

func shade(k Kind, a, b float64) string {
	switch k {
	case KindRuntime:
		return hsl(190+35*a, 0.50+0.25*b, 0.66+0.10*b)
	case KindOwn:
		return hsl(90+50*a, 0.45+0.25*b, 0.52+0.12*b)
	case KindRoot:
		return hsl(0, 0, 0.72)
	case KindMerged:
		return hsl(0, 0, 0.86)
	}
	return hsl(5+45*a, 0.75+0.20*b, 0.56+0.10*b)
}

// familySample is the colour the legend shows for a kind: the middle of its family.
func familySample(k Kind) string { return shade(k, 0.5, 0.5) }

// hsl converts a hue (degrees), saturation and lightness (0..1) to #rrggbb, which every
// SVG renderer understands.
func hsl(h, s, l float64) string {
	c := (1 - math.Abs(2*l-1)) * s
	hp := math.Mod(h, 360) / 60
	x := c * (1 - math.Abs(math.Mod(hp, 2)-1))
	var r, g, b float64
	switch {
	case hp < 1:
		r, g = c, x
	case hp < 2:
		r, g = x, c
	case hp < 3:
		g, b = c, x
	case hp < 4:
		g, b = x, c
	case hp < 5:
		r, b = x, c
	default:
		r, b = c, x
	}
	m := l - c/2
	to := func(v float64) int { return int(math.Round((v + m) * 255)) }
	return fmt.Sprintf("#%02x%02x%02x", to(r), to(g), to(b))
}

// zoomScript makes a clicked frame the full width, its ancestors full width and faded, and
// hides what is not on it; clicking the root or Escape resets. It relies on the data-l
// (left), data-w (width) fractions and data-d (depth) of each frame, and on padX, drawW and
// charW defined before it.
const zoomScript = `
(function () {
  var frames = Array.prototype.slice.call(document.querySelectorAll('g.f'));
  function attr(g, n) { return parseFloat(g.getAttribute(n)); }
  function label(g, w) {
    var t = g.querySelector('title').textContent, name = t.slice(0, t.lastIndexOf(' ('));
    var fit = Math.floor((w - 6) / charW);
    if (fit < 3) return '';
    return name.length <= fit ? name : name.slice(0, fit - 2) + '..';
  }
  function zoom(z) {
    var l = attr(z, 'data-l'), w = attr(z, 'data-w'), d = attr(z, 'data-d'), eps = 1e-9;
    frames.forEach(function (g) {
      var gl = attr(g, 'data-l'), gw = attr(g, 'data-w'), gd = attr(g, 'data-d'), x, fw;
      if (gd < d && gl <= l + eps && gl + gw >= l + w - eps) { x = 0; fw = 1; }
      else if (gd >= d && gl >= l - eps && gl + gw <= l + w + eps) { x = (gl - l) / w; fw = gw / w; }
      else { g.style.display = 'none'; return; }
      g.style.display = '';
      g.style.opacity = gd < d ? '0.55' : '';
      var v = g.querySelector('svg'), px = fw * drawW, t = v.querySelector('text');
      v.setAttribute('x', padX + x * drawW);
      v.setAttribute('width', px);
      var s = label(g, px);
      if (!t && s) {
        t = document.createElementNS('http://www.w3.org/2000/svg', 'text');
        t.setAttribute('x', '3'); t.setAttribute('y', '11'); v.appendChild(t);
      }
      if (t) t.textContent = s;
    });
  }
  frames.forEach(function (g) { g.addEventListener('click', function () { zoom(g); }); });
  document.addEventListener('keydown', function (e) {
    if (e.key === 'Escape' && frames.length) zoom(frames[0]);
  });
})();
`
