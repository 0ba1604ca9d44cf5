package flamegraph

import (
	"bytes"
	"encoding/xml"
	"io"
	"math"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/google/pprof/profile"
)

// sample is one synthetic sample: stack is root first, ";" between locations and "+"
// between the functions of one location, the outer one first ("a;b+c" is a calling b, with c
// inlined into b); values are one per sample type.
type sample struct {
	stack  string
	values []int64
}

var (
	cpuTypes  = []*profile.ValueType{{Type: "samples", Unit: "count"}, {Type: "cpu", Unit: "nanoseconds"}}
	heapTypes = []*profile.ValueType{{Type: "alloc_objects", Unit: "count"}, {Type: "alloc_space", Unit: "bytes"},
		{Type: "inuse_objects", Unit: "count"}, {Type: "inuse_space", Unit: "bytes"}}
)

// cpu is a CPU profile sample of n 10 ms samples.
func cpu(stack string, n int64) sample { return sample{stack, []int64{n, n * 10e6}} }

// newProfile builds a valid profile (as CheckValid sees it) with one location per stack
// element, in pprof's order: locations leaf first, a location's lines innermost first.
func newProfile(types []*profile.ValueType, samples ...sample) *profile.Profile {
	p := &profile.Profile{SampleType: types, PeriodType: &profile.ValueType{Type: "cpu", Unit: "nanoseconds"},
		Period: 10e6, DurationNanos: 5e9}
	funcs := map[string]*profile.Function{}
	fn := func(name string) *profile.Function {
		if f, ok := funcs[name]; ok {
			return f
		}
		f := &profile.Function{ID: uint64(len(p.Function) + 1), Name: name, SystemName: name}
		funcs[name] = f
		p.Function = append(p.Function, f)
		return f
	}
	for _, s := range samples {
		ps := &profile.Sample{Value: s.values}
		if s.stack != "" {
			locs := strings.Split(s.stack, ";")
			for i := len(locs) - 1; i >= 0; i-- {
				loc := &profile.Location{ID: uint64(len(p.Location) + 1), Address: uint64(0x1000 + len(p.Location))}
				names := strings.Split(locs[i], "+")
				for j := len(names) - 1; j >= 0; j-- {
					loc.Line = append(loc.Line, profile.Line{Function: fn(names[j]), Line: int64(j + 1)})
				}
				p.Location = append(p.Location, loc)
				ps.Location = append(ps.Location, loc)
			}
		}
		p.Sample = append(p.Sample, ps)
	}
	return p
}

func folded(t *testing.T, f *Folded) string {
	t.Helper()
	var b strings.Builder
	if err := f.WriteFolded(&b); err != nil {
		t.Fatal(err)
	}
	return b.String()
}

func TestFold(t *testing.T) {
	tests := []struct {
		name      string
		types     []*profile.ValueType
		samples   []sample
		want      string // folded
		wantType  string
		wantUnit  string
		wantTotal int64
		wantCount int64 // -1: no count
	}{{
		name:    "one stack",
		types:   cpuTypes,
		samples: []sample{cpu("main.main;main.work;runtime.memmove", 3)},
		want:    "main.main;main.work;runtime.memmove 30000000\n",
		// the cpu type is the second one; samples/count becomes Count
		wantType: "cpu", wantUnit: "nanoseconds", wantTotal: 30e6, wantCount: 3,
	}, {
		name:  "identical stacks merge, stacks sort frame by frame",
		types: cpuTypes,
		samples: []sample{
			cpu("b;c", 3), cpu("a", 1), cpu("b;c", 2), cpu("b", 4), cpu("b;a;z", 1), cpu("ab", 1),
		},
		want:     "a 10000000\nab 10000000\nb 40000000\nb;a;z 10000000\nb;c 50000000\n",
		wantType: "cpu", wantUnit: "nanoseconds", wantTotal: 120e6, wantCount: 12,
	}, {
		name:     "inlined functions are frames of their own, outer first",
		types:    cpuTypes,
		samples:  []sample{cpu("main.main;bufio.(*Writer).Write+bufio.(*Writer).Flush;syscall.write", 2)},
		want:     "main.main;bufio.(*Writer).Write;bufio.(*Writer).Flush;syscall.write 20000000\n",
		wantType: "cpu", wantUnit: "nanoseconds", wantTotal: 20e6, wantCount: 2,
	}, {
		name:     "cpu first",
		types:    []*profile.ValueType{{Type: "cpu", Unit: "nanoseconds"}, {Type: "samples", Unit: "count"}},
		samples:  []sample{{"f", []int64{7, 1}}},
		want:     "f 7\n",
		wantType: "cpu", wantUnit: "nanoseconds", wantTotal: 7, wantCount: 1,
	}, {
		name:     "no cpu type: the last one (heap inuse_space), no count",
		types:    heapTypes,
		samples:  []sample{{"main.main;main.alloc", []int64{10, 1000, 2, 200}}, {"main.main", []int64{1, 50, 1, 50}}},
		want:     "main.main 50\nmain.main;main.alloc 200\n",
		wantType: "inuse_space", wantUnit: "bytes", wantTotal: 250, wantCount: -1,
	}, {
		name:  "zero and negative values are left out",
		types: cpuTypes,
		samples: []sample{
			{"a", []int64{1, 0}}, {"b", []int64{1, -5}}, cpu("c", 1),
		},
		want:     "c 10000000\n",
		wantType: "cpu", wantUnit: "nanoseconds", wantTotal: 10e6, wantCount: 1,
	}, {
		name:     "a sample without locations is the root's own",
		types:    cpuTypes,
		samples:  []sample{cpu("", 1), cpu("a", 1)},
		want:     " 10000000\na 10000000\n",
		wantType: "cpu", wantUnit: "nanoseconds", wantTotal: 20e6, wantCount: 2,
	}, {
		name:     "generic names are kept as they are",
		types:    cpuTypes,
		samples:  []sample{cpu("main.main;sync.(*Pool[go.shape.*uint8]).Get;cmp.Less[go.shape.string]", 1)},
		want:     "main.main;sync.(*Pool[go.shape.*uint8]).Get;cmp.Less[go.shape.string] 10000000\n",
		wantType: "cpu", wantUnit: "nanoseconds", wantTotal: 10e6, wantCount: 1,
	}}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p := newProfile(tt.types, tt.samples...)
			if err := p.CheckValid(); err != nil {
				t.Fatalf("synthetic profile: %v", err)
			}
			f, err := Fold(p)
			if err != nil {
				t.Fatal(err)
			}
			if got := folded(t, f); got != tt.want {
				t.Errorf("folded:\n%s\nwant:\n%s", got, tt.want)
			}
			if f.SampleType != tt.wantType || f.Unit != tt.wantUnit {
				t.Errorf("sample type %s/%s, want %s/%s", f.SampleType, f.Unit, tt.wantType, tt.wantUnit)
			}
			if f.Total != tt.wantTotal {
				t.Errorf("total %d, want %d", f.Total, tt.wantTotal)
			}
			if tt.wantCount < 0 {
				if f.HasCount || f.TotalCount != 0 {
					t.Errorf("count %v/%d, want none", f.HasCount, f.TotalCount)
				}
			} else if !f.HasCount || f.TotalCount != tt.wantCount {
				t.Errorf("count %v/%d, want %d", f.HasCount, f.TotalCount, tt.wantCount)
			}

			// The same through the gzip protobuf that runtime/pprof writes.
			var buf bytes.Buffer
			if err := p.Write(&buf); err != nil {
				t.Fatal(err)
			}
			f2, err := Read(&buf)
			if err != nil {
				t.Fatalf("read back: %v", err)
			}
			if got := folded(t, f2); got != tt.want {
				t.Errorf("folded after write and read:\n%s\nwant:\n%s", got, tt.want)
			}
		})
	}
}

func TestFoldUnsymbolized(t *testing.T) {
	m := &profile.Mapping{ID: 1, Start: 0x1000, Limit: 0x9000, File: "/usr/lib/libc.so.6"}
	l1 := &profile.Location{ID: 1, Mapping: m, Address: 0x1234}
	l2 := &profile.Location{ID: 2, Address: 0xbeef}
	l3 := &profile.Location{ID: 3, Line: []profile.Line{{Function: &profile.Function{ID: 1, SystemName: "_start"}}}}
	p := &profile.Profile{SampleType: cpuTypes, Mapping: []*profile.Mapping{m}, Location: []*profile.Location{l1, l2, l3},
		Sample: []*profile.Sample{{Location: []*profile.Location{l1, l2, l3}, Value: []int64{1, 10}}}}
	f, err := Fold(p)
	if err != nil {
		t.Fatal(err)
	}
	if got, want := folded(t, f), "_start;0xbeef;libc.so.6 0x1234 10\n"; got != want {
		t.Errorf("folded %q, want %q", got, want)
	}
}

func TestFoldErrors(t *testing.T) {
	tests := []struct {
		name string
		p    *profile.Profile
		want string
	}{
		{"no sample types", &profile.Profile{}, "no sample types"},
		{"values do not match types", &profile.Profile{SampleType: cpuTypes,
			Sample: []*profile.Sample{{Value: []int64{1}}}}, "sample 0 has 1 values for 2 sample types"},
		{"overflow", newProfile(cpuTypes, sample{"a", []int64{1, math.MaxInt64}}, sample{"b", []int64{1, 1}}),
			"sample 1: cpu values overflow int64"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := Fold(tt.p)
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("error %v, want one containing %q", err, tt.want)
			}
		})
	}
}

func TestReadInvalid(t *testing.T) {
	for name, data := range map[string][]byte{
		"empty":       nil,
		"text":        []byte("module example.com/x\n"),
		"broken gzip": {0x1f, 0x8b, 8, 0, 0, 0},
	} {
		t.Run(name, func(t *testing.T) {
			if _, err := Read(bytes.NewReader(data)); err == nil {
				t.Fatal("no error")
			}
		})
	}
}

// foldedOf folds "stack value" lines (stack root first, ";" between frames) without a
// profile, for layout tests.
func foldedOf(lines ...string) *Folded {
	f := &Folded{SampleType: "cpu", Unit: "nanoseconds"}
	for _, l := range lines {
		i := strings.LastIndexByte(l, ' ')
		v, err := strconv.ParseInt(l[i+1:], 10, 64)
		if err != nil {
			panic(err)
		}
		var frames []string
		if l[:i] != "" {
			frames = strings.Split(l[:i], ";")
		}
		f.Stacks = append(f.Stacks, Stack{Frames: frames, Value: v, Count: v})
		f.Total += v
		f.TotalCount += v
	}
	f.HasCount = true
	return f
}

// box is a frame as tests check it: x and width in pixels.
type box struct {
	name     string
	depth    int
	x, width float64
}

func boxes(g *Graph) []box {
	var b []box
	for _, fr := range g.Frames {
		b = append(b, box{fr.Name, fr.Depth, fr.X, fr.Width})
	}
	return b
}

func TestLayout(t *testing.T) {
	// Width 420 leaves 400 px between the 10 px margins.
	tests := []struct {
		name       string
		stacks     []string
		opts       Options
		want       []box
		wantLevels int
	}{{
		name:   "widths proportional to values",
		stacks: []string{"a 1", "b 3"},
		opts:   Options{Width: 420},
		want: []box{
			{"all", 0, 10, 400},
			{"a", 1, 10, 100},
			{"b", 1, 110, 300},
		},
		wantLevels: 2,
	}, {
		name: "siblings alphabetical whatever their order or size, depth first",
		// not sorted on purpose: Layout sorts whatever it gets
		stacks: []string{"main;zeta 2", "main;alpha;x 1", "main;Beta 1", "main;alpha 3", "init 1", "main 1"},
		opts:   Options{Width: 420},
		want: []box{
			{"all", 0, 10, 400},
			{"init", 1, 10, 400.0 / 9},
			{"main", 1, 10 + 400.0/9, 400 * 8.0 / 9},
			{"Beta", 2, 10 + 400.0/9, 400.0 / 9}, // upper case sorts first, as bytes do
			{"alpha", 2, 10 + 400*2.0/9, 400 * 4.0 / 9},
			{"x", 3, 10 + 400*2.0/9, 400.0 / 9},
			{"zeta", 2, 10 + 400*6.0/9, 400 * 2.0 / 9},
		},
		wantLevels: 4,
	}, {
		name: "narrow siblings merge into one box after the wide ones, their callees dropped",
		// 1000 units over 400 px: 1 unit is 0.4 px
		stacks: []string{"a;s1;deep 1", "a;s2 1", "a;s3 1", "a;big 993", "z 4"},
		opts:   Options{Width: 420},
		want: []box{
			{"all", 0, 10, 400},
			{"a", 1, 10, 398.4},
			{"big", 2, 10, 397.2},
			{"[3 small frames]", 2, 407.2, 1.2},
			{"z", 1, 408.4, 1.6},
		},
		wantLevels: 3,
	}, {
		name:   "one narrow frame alone is omitted",
		stacks: []string{"a;s1 1", "a;big 998", "z 1"}, // z too
		opts:   Options{Width: 420},
		want: []box{
			{"all", 0, 10, 400},
			{"a", 1, 10, 399.6},
			{"big", 2, 10, 399.2},
		},
		wantLevels: 3,
	}, {
		name:   "narrow siblings whose sum is narrow too are omitted",
		stacks: []string{"a 9997", "b 1", "c 1", "d 1"}, // 3 x 0.04 px
		opts:   Options{Width: 420},
		want: []box{
			{"all", 0, 10, 400},
			{"a", 1, 10, 399.88},
		},
		wantLevels: 2,
	}, {
		name:   "minimum width is an option",
		stacks: []string{"a 10", "b 10", "c 80"},
		opts:   Options{Width: 420, MinWidth: 50}, // a and b are 40 px each
		want: []box{
			{"all", 0, 10, 400},
			{"c", 1, 10, 320},
			{"[2 small frames]", 1, 330, 80},
		},
		wantLevels: 2,
	}, {
		name:       "no samples, no frames",
		stacks:     nil,
		opts:       Options{Width: 420},
		want:       nil,
		wantLevels: 0,
	}, {
		name:   "default width 1200",
		stacks: []string{"a 1", "b 1"},
		want: []box{
			{"all", 0, 10, 1180},
			{"a", 1, 10, 590},
			{"b", 1, 600, 590},
		},
		wantLevels: 2,
	}}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			g := Layout(foldedOf(tt.stacks...), tt.opts)
			got := boxes(g)
			if len(got) != len(tt.want) {
				t.Fatalf("frames:\n%v\nwant:\n%v", got, tt.want)
			}
			for i := range got {
				if got[i].name != tt.want[i].name || got[i].depth != tt.want[i].depth ||
					math.Abs(got[i].x-tt.want[i].x) > 1e-9 || math.Abs(got[i].width-tt.want[i].width) > 1e-9 {
					t.Errorf("frame %d = %+v, want %+v", i, got[i], tt.want[i])
				}
			}
			if g.Levels != tt.wantLevels {
				t.Errorf("levels %d, want %d", g.Levels, tt.wantLevels)
			}
			if want := headerHeight + float64(tt.wantLevels)*frameHeight + padBottom; g.Height != want {
				t.Errorf("height %g, want %g", g.Height, want)
			}
		})
	}
}

func TestLayoutMergedFrame(t *testing.T) {
	g := Layout(foldedOf("a;s1;deep 1", "a;s2 2", "a;big 997"), Options{Width: 420})
	i := slices.IndexFunc(g.Frames, func(f Frame) bool { return f.Kind == KindMerged })
	if i < 0 {
		t.Fatal("no merged frame")
	}
	m := g.Frames[i]
	if m.Merged != 2 || m.Value != 3 || m.Count != 3 || m.Name != "[2 small frames]" {
		t.Errorf("merged frame %+v", m)
	}
	if math.Abs(m.Share-0.003) > 1e-12 || math.Abs(m.Left-0.997) > 1e-12 {
		t.Errorf("merged frame at %g, %g of the total, want 0.997, 0.003", m.Left, m.Share)
	}
}

func TestClassify(t *testing.T) {
	tests := []struct {
		name string
		want Kind
	}{
		{"runtime.memmove", KindRuntime},
		{"runtime/pprof.profileWriter", KindRuntime},
		{"syscall.Syscall", KindRuntime},
		{"internal/runtime/syscall/linux.Syscall6", KindRuntime},
		{"internal/poll.(*FD).Write", KindRuntime},
		{"github.com/ztgo/ztgo/runtime/relay.(*Relay).pipe", KindOwn}, // own before runtime
		{"github.com/ztgo/ztgo/stages/hbone.(*Conn).writeDataLocked", KindOwn},
		{"main.main", KindOwn},
		{"crypto/internal/fips140/aes/gcm.gcmAesEnc", KindOther}, // internal/ only at the start
		{"crypto/tls.(*Conn).Write", KindOther},
		{"golang.org/x/net/http2.(*Framer).WriteData", KindOther},
		{"github.com/ztgo/ztgoextra.F", KindOther},
		{"0x4a2b1c", KindOther},
	}
	for _, tt := range tests {
		if got := classify(tt.name, defaultOwnPrefixes); got != tt.want {
			t.Errorf("classify(%q) = %v, want %v", tt.name, got, tt.want)
		}
	}
	if got := classify("example.com/app.F", []string{"example.com/app."}); got != KindOwn {
		t.Errorf("classify with own prefixes = %v, want own", got)
	}
}

// hue returns the hue in degrees of a #rrggbb colour.
func hue(t *testing.T, c string) float64 {
	t.Helper()
	v, err := strconv.ParseUint(strings.TrimPrefix(c, "#"), 16, 32)
	if err != nil || len(c) != 7 {
		t.Fatalf("colour %q", c)
	}
	r, g, b := float64(v>>16)/255, float64(v>>8&0xff)/255, float64(v&0xff)/255
	hi, lo := max(r, g, b), min(r, g, b)
	d := hi - lo
	if d == 0 {
		return 0
	}
	var h float64
	switch hi {
	case r:
		h = math.Mod((g-b)/d, 6)
	case g:
		h = (b-r)/d + 2
	default:
		h = (r-g)/d + 4
	}
	h *= 60
	if h < 0 {
		h += 360
	}
	return h
}

func TestColor(t *testing.T) {
	families := map[Kind][2]float64{KindRuntime: {189, 226}, KindOwn: {89, 141}, KindOther: {4, 51}}
	names := map[Kind][]string{
		KindRuntime: {"runtime.memmove", "runtime.mallocgc", "syscall.Syscall", "internal/poll.(*FD).Write", "runtime.netpoll"},
		KindOwn:     {"github.com/ztgo/ztgo/runtime/relay.(*Relay).pipe", "github.com/ztgo/ztgo/stages/hbone.(*Stream).Write", "main.main"},
		KindOther:   {"crypto/tls.(*Conn).Write", "bufio.(*Writer).Flush", "net.(*conn).Read", "golang.org/x/net/http2.(*Framer).ReadFrame"},
	}
	seen := map[string]string{}
	for kind, ns := range names {
		for _, n := range ns {
			c := color(Frame{Name: n, Kind: kind})
			if again := color(Frame{Name: n, Kind: kind}); again != c {
				t.Errorf("%s: colour %s then %s", n, c, again)
			}
			if h, fam := hue(t, c), families[kind]; h < fam[0] || h > fam[1] {
				t.Errorf("%s (%v): colour %s hue %.1f, want %v", n, kind, c, h, fam)
			}
			seen[c] = n
		}
	}
	if len(seen) < 10 {
		t.Errorf("only %d distinct colours for 12 names: the hash does not vary the shade", len(seen))
	}
	if c := color(Frame{Name: "all", Kind: KindRoot}); c != "#b8b8b8" {
		t.Errorf("root colour %s", c)
	}
}

func TestLabel(t *testing.T) {
	tests := []struct {
		name  string
		width float64
		want  string
	}{
		{"runtime.memmove", 200, "runtime.memmove"},
		{"runtime.memmove", 6 + 15*charWidth, "runtime.memmove"},
		{"runtime.memmove", 6 + 14*charWidth, "runtime.memm.."},
		{"runtime.memmove", 6 + 3*charWidth, "r.."},
		{"runtime.memmove", 6 + 2.9*charWidth, ""},
		{"ab", 6 + 3*charWidth, "ab"},
		{"fünf.größe", 6 + 6*charWidth, "fünf.."}, // runes, not bytes
	}
	for _, tt := range tests {
		if got := Label(tt.name, tt.width); got != tt.want {
			t.Errorf("Label(%q, %g) = %q, want %q", tt.name, tt.width, got, tt.want)
		}
	}
}

// svgFrame is a frame as read back from the SVG.
type svgFrame struct {
	title, label string
	x, width     float64
	fill         string
}

// parseSVG walks doc with encoding/xml, failing on any well-formedness error, and returns
// its frames and the number of script elements.
func parseSVG(t testing.TB, doc []byte) (frames []svgFrame, scripts int) {
	t.Helper()
	d := xml.NewDecoder(bytes.NewReader(doc))
	var cur *svgFrame
	var inTitle, inLabel bool
	depth, frameDepth := 0, -1
	for {
		tok, err := d.Token()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatalf("svg is not well-formed XML: %v", err)
		}
		switch tok := tok.(type) {
		case xml.StartElement:
			depth++
			attr := func(name string) string {
				for _, a := range tok.Attr {
					if a.Name.Local == name {
						return a.Value
					}
				}
				return ""
			}
			switch {
			case tok.Name.Local == "script":
				scripts++
			case tok.Name.Local == "g" && attr("class") == "f":
				frames = append(frames, svgFrame{})
				cur, frameDepth = &frames[len(frames)-1], depth
			case cur != nil && tok.Name.Local == "title":
				inTitle = true
			case cur != nil && tok.Name.Local == "svg":
				cur.x, _ = strconv.ParseFloat(attr("x"), 64)
				cur.width, _ = strconv.ParseFloat(attr("width"), 64)
			case cur != nil && tok.Name.Local == "rect":
				cur.fill = attr("fill")
			case cur != nil && tok.Name.Local == "text":
				inLabel = true
			}
		case xml.EndElement:
			if depth == frameDepth {
				cur, frameDepth = nil, -1
			}
			depth--
			inTitle, inLabel = false, false
		case xml.CharData:
			switch {
			case inTitle:
				cur.title += string(tok)
			case inLabel:
				cur.label += string(tok)
			}
		}
	}
	return frames, scripts
}

func TestRender(t *testing.T) {
	names := []string{
		"main.main",
		"sync.(*Pool[go.shape.*uint8]).Get",    // generic: brackets
		"cmp.Less[go.shape.string]",            //
		`weird<T>&"quoted"&'single'`,           // everything XML escapes
		"a]]>b<!--c-->",                        // CDATA and comment closers
		"bad\xffutf8\x00nul\x01ctl\ttab\nline", // characters XML cannot hold
		"github.com/ztgo/ztgo/runtime/relay.(*Relay).pipe",
	}
	var stacks []string
	for i, n := range names {
		stacks = append(stacks, "main.main;"+n+" "+strconv.Itoa(100_000*(i+1)))
	}
	f := foldedOf(stacks...)
	for _, interactive := range []bool{false, true} {
		t.Run("interactive="+strconv.FormatBool(interactive), func(t *testing.T) {
			opts := Options{Title: "node <a> & b", Interactive: interactive}
			var buf bytes.Buffer
			if err := Render(&buf, f, opts); err != nil {
				t.Fatal(err)
			}
			doc := buf.Bytes()
			frames, scripts := parseSVG(t, doc)
			if want := map[bool]int{false: 0, true: 1}[interactive]; scripts != want {
				t.Errorf("%d scripts, want %d", scripts, want)
			}
			if !bytes.Contains(doc, []byte("node &lt;a&gt; &amp; b")) {
				t.Error("title line missing or not escaped")
			}
			if !bytes.Contains(doc, []byte("Total: 2.80 ms of cpu in 2800000 samples<")) {
				t.Errorf("no total line in\n%.600s", doc)
			}
			// Self-contained: nothing refers outside the file.
			for _, ref := range []string{"href", "url(", "@import", "<image", "<use", "<foreignObject", "src="} {
				if bytes.Contains(doc, []byte(ref)) {
					t.Errorf("svg contains %q", ref)
				}
			}
			if n := bytes.Count(doc, []byte("http")); n != 1+map[bool]int{false: 0, true: 1}[interactive] {
				// the xmlns, and the script's namespace for createElementNS
				t.Errorf("svg mentions http %d times", n)
			}

			g := Layout(f, opts)
			if len(frames) != len(g.Frames) || len(frames) != 2+len(names) {
				t.Fatalf("%d frames in the svg, %d laid out, want %d", len(frames), len(g.Frames), 2+len(names))
			}
			for i, sf := range frames {
				fr := g.Frames[i]
				if math.Abs(sf.x-fr.X) > 0.005 || math.Abs(sf.width-fr.Width) > 0.005 {
					t.Errorf("%q at x=%g width %g, laid out at %g width %g", fr.Name, sf.x, sf.width, fr.X, fr.Width)
				}
				wantTitle := xmlSafe(fr.Name) + " (" + frameStats(f, fr) + ")"
				if sf.title != wantTitle {
					t.Errorf("title %q, want %q", sf.title, wantTitle)
				}
				if sf.label != xmlSafe(Label(fr.Name, fr.Width)) {
					t.Errorf("label %q for %q at %g px", sf.label, fr.Name, fr.Width)
				}
				if float64(len([]rune(sf.label)))*charWidth+3 > sf.width {
					t.Errorf("label %q overflows %g px", sf.label, sf.width)
				}
				if sf.fill != color(fr) {
					t.Errorf("%q fill %s, want %s", fr.Name, sf.fill, color(fr))
				}
			}
			// Frames on one level are sorted and as wide as their values.
			if frames[0].title != "all (2.80 ms, 2800000 samples, 100.00%)" {
				t.Errorf("root title %q", frames[0].title)
			}
			if want := "a]]>b<!--c--> (500.00 µs, 500000 samples, 17.86%)"; frames[2].title != want {
				t.Errorf("first leaf title %q, want %q", frames[2].title, want)
			}
			var prev string
			for _, fr := range g.Frames[2:] {
				if fr.Name < prev {
					t.Errorf("%q after %q", fr.Name, prev)
				}
				prev = fr.Name
				if want := float64(fr.Value) / float64(f.Total) * 1180; math.Abs(fr.Width-want) > 1e-9 {
					t.Errorf("%q width %g, want %g", fr.Name, fr.Width, want)
				}
			}
		})
	}
}

// xmlSafe is s as an XML parser reads it back after xml.EscapeText.
func xmlSafe(s string) string {
	var b strings.Builder
	xml.EscapeText(&b, []byte(s))
	var out string
	if err := xml.Unmarshal([]byte("<a>"+b.String()+"</a>"), &out); err != nil {
		panic(err)
	}
	return out
}

func TestRenderEmpty(t *testing.T) {
	var buf bytes.Buffer
	if err := Render(&buf, &Folded{SampleType: "cpu", Unit: "nanoseconds"}, Options{Title: "idle"}); err != nil {
		t.Fatal(err)
	}
	frames, _ := parseSVG(t, buf.Bytes())
	if len(frames) != 0 || !bytes.Contains(buf.Bytes(), []byte("no samples")) {
		t.Errorf("empty profile: %d frames\n%s", len(frames), buf.Bytes())
	}
}

func TestFormatValue(t *testing.T) {
	tests := []struct {
		v         int64
		unit, typ string
		want      string
	}{
		{2_290_000_000, "nanoseconds", "cpu", "2.29 s"},
		{10_000_000, "nanoseconds", "cpu", "10.00 ms"},
		{1500, "nanoseconds", "cpu", "1.50 µs"},
		{999, "nanoseconds", "cpu", "999 ns"},
		{3 << 20, "bytes", "inuse_space", "3.00 MiB"},
		{1536, "bytes", "inuse_space", "1.50 KiB"},
		{100, "bytes", "inuse_space", "100 B"},
		{42, "count", "contentions", "42 contentions"},
		{7, "widgets", "x", "7 widgets"},
	}
	for _, tt := range tests {
		if got := formatValue(tt.v, tt.unit, tt.typ); got != tt.want {
			t.Errorf("formatValue(%d, %q) = %q, want %q", tt.v, tt.unit, got, tt.want)
		}
	}
}

// realProfile is a CPU profile of a ztgo node during meshbench's 1-stream throughput run.
const realProfile = "../profiles/throughput-node-a.pprof"

func TestRealProfile(t *testing.T) {
	for _, path := range []string{realProfile, "../profiles/throughput-node-b.pprof"} {
		t.Run(filepath.Base(path), func(t *testing.T) {
			file, err := os.Open(path)
			if err != nil {
				t.Fatal(err)
			}
			defer file.Close()
			f, err := Read(file)
			if err != nil {
				t.Fatal(err)
			}
			if f.SampleType != "cpu" || f.Total <= 0 || !f.HasCount {
				t.Fatalf("sample type %s, total %d, count %v", f.SampleType, f.Total, f.HasCount)
			}
			var buf bytes.Buffer
			if err := Render(&buf, f, Options{Title: path, Interactive: true}); err != nil {
				t.Fatal(err)
			}
			frames, _ := parseSVG(t, buf.Bytes())
			var own int
			found := map[string]bool{}
			for _, sf := range frames {
				name := sf.title[:strings.LastIndex(sf.title, " (")]
				found[name] = true
				if strings.HasPrefix(name, "github.com/ztgo/ztgo/") {
					own++
				}
			}
			// A proxy moving bytes spends its time writing to sockets and encrypting.
			for _, hot := range []string{"internal/runtime/syscall/linux.Syscall6", "crypto/tls.(*Conn).Write"} {
				if !found[hot] {
					t.Errorf("no %s frame", hot)
				}
			}
			if own == 0 {
				t.Error("no ztgo frames")
			}
		})
	}
}

func FuzzRead(f *testing.F) {
	if data, err := os.ReadFile(realProfile); err == nil {
		f.Add(data)
	}
	var buf bytes.Buffer
	if err := newProfile(cpuTypes, cpu("a;b+c;d", 2), cpu("a;<e>", 1)).Write(&buf); err != nil {
		f.Fatal(err)
	}
	f.Add(buf.Bytes())
	buf.Reset()
	if err := newProfile(cpuTypes, cpu("a;b", 1)).WriteUncompressed(&buf); err != nil {
		f.Fatal(err)
	}
	f.Add(buf.Bytes())
	f.Add([]byte{})
	f.Add([]byte("--- contention:\ncycles/second=1000000000\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		fd, err := Read(bytes.NewReader(data))
		if err != nil {
			return
		}
		checkGraph(t, fd)
	})
}

// FuzzRender feeds arbitrary function names through the layout and the SVG writer.
func FuzzRender(f *testing.F) {
	f.Add("main.main;F[go.shape.int]", "main.main;a<b>&c", int64(1), int64(1000))
	f.Add("x]]>", "\xff\x00", int64(5), int64(5))
	f.Add("", "a;;b", int64(0), int64(-1))
	f.Fuzz(func(t *testing.T, s1, s2 string, v1, v2 int64) {
		fd := &Folded{SampleType: "cpu", Unit: "nanoseconds"}
		for _, st := range []Stack{{Frames: strings.Split(s1, ";"), Value: v1}, {Frames: strings.Split(s2, ";"), Value: v2}} {
			if st.Value <= 0 || st.Value > math.MaxInt64/2 {
				continue
			}
			fd.Stacks = append(fd.Stacks, st)
			fd.Total += st.Value
		}
		checkGraph(t, fd)
	})
}

// checkGraph renders fd and checks that the document is well-formed and every frame lies
// on its parent's span.
func checkGraph(t *testing.T, fd *Folded) {
	t.Helper()
	var out bytes.Buffer
	if err := Render(&out, fd, Options{Interactive: true}); err != nil {
		t.Fatal(err)
	}
	parseSVG(t, out.Bytes())
	g := Layout(fd, Options{})
	var open []Frame // the current frame's ancestors
	for _, fr := range g.Frames {
		open = open[:min(len(open), fr.Depth)]
		if len(open) != fr.Depth {
			t.Fatalf("%q at depth %d without a parent", fr.Name, fr.Depth)
		}
		if fr.Depth > 0 {
			p := open[fr.Depth-1]
			if fr.Left < p.Left-1e-9 || fr.Left+fr.Share > p.Left+p.Share+1e-9 {
				t.Fatalf("%q [%g, +%g] outside its parent %q [%g, +%g]", fr.Name, fr.Left, fr.Share, p.Name, p.Left, p.Share)
			}
		}
		if fr.Width < 1-1e-9 {
			t.Fatalf("%q drawn %g px wide", fr.Name, fr.Width)
		}
		open = append(open, fr)
	}
}
