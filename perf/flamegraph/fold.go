package flamegraph

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"math"
	"slices"
	"strconv"
	"strings"

	"github.com/google/pprof/profile"
)

// Stack is one distinct call stack of a profile and the sum of its samples.
type Stack struct {
	// Frames are function names, root first (e.g. runtime.goexit, ..., the leaf).
	Frames []string
	// Value is the sum of the chosen sample type over the samples with this stack.
	Value int64
	// Count is the sum of the profile's "samples"/"count" sample type over the same samples,
	// when it has one and that is not the chosen type; 0 otherwise.
	Count int64
}

// Folded is a profile reduced to its stacks.
type Folded struct {
	// Stacks are sorted by their frames, compared name by name, and have distinct frames.
	Stacks []Stack
	// SampleType and Unit describe Value, e.g. "cpu" and "nanoseconds".
	SampleType string
	Unit       string
	// HasCount tells whether the stacks' Count is known.
	HasCount bool
	// Total is the sum of the stacks' values, TotalCount of their counts.
	Total      int64
	TotalCount int64
	// DurationNanos is the profile's duration, 0 when it has none.
	DurationNanos int64
}

// Read parses a profile (gzip-compressed protobuf as written by runtime/pprof, or the
// uncompressed protobuf) and folds it.
func Read(r io.Reader) (*Folded, error) {
	p, err := profile.Parse(r)
	if err != nil {
		return nil, err
	}
	return Fold(p)
}

// Fold reduces p to its distinct stacks, valued by the "cpu" sample type or, when no sample
// type is named cpu, by the last one. Samples with a value of zero or less are left out: a
// flame graph has no width for them.
func Fold(p *profile.Profile) (*Folded, error) {
	if len(p.SampleType) == 0 {
		return nil, errors.New("profile has no sample types")
	}
	vi, ci := valueIndexes(p.SampleType)
	f := &Folded{
		SampleType:    p.SampleType[vi].Type,
		Unit:          p.SampleType[vi].Unit,
		HasCount:      ci >= 0,
		DurationNanos: p.DurationNanos,
	}

	byKey := make(map[string]int)
	var frames []string
	for i, s := range p.Sample {
		if len(s.Value) != len(p.SampleType) {
			return nil, fmt.Errorf("sample %d has %d values for %d sample types", i, len(s.Value), len(p.SampleType))
		}
		v := s.Value[vi]
		if v <= 0 {
			continue
		}
		if f.Total > math.MaxInt64-v {
			return nil, fmt.Errorf("sample %d: %s values overflow int64", i, f.SampleType)
		}
		frames = appendFrames(frames[:0], s)
		key := strings.Join(frames, "\x00")
		j, ok := byKey[key]
		if !ok {
			j = len(f.Stacks)
			byKey[key] = j
			f.Stacks = append(f.Stacks, Stack{Frames: slices.Clone(frames)})
		}
		st := &f.Stacks[j]
		st.Value += v
		f.Total += v
		if ci >= 0 {
			if c := s.Value[ci]; c > 0 && f.TotalCount <= math.MaxInt64-c {
				st.Count += c
				f.TotalCount += c
			}
		}
	}
	slices.SortFunc(f.Stacks, func(a, b Stack) int { return slices.Compare(a.Frames, b.Frames) })
	return f, nil
}

// valueIndexes returns the index of the sample type to draw and that of a sample count
// type other than it (-1 when there is none).
func valueIndexes(types []*profile.ValueType) (value, count int) {
	value, count = len(types)-1, -1
	for i, t := range types {
		if t.Type == "cpu" {
			value = i
			break
		}
	}
	for i, t := range types {
		if i != value && t.Type == "samples" && t.Unit == "count" {
			count = i
			break
		}
	}
	return value, count
}

// appendFrames appends s's frames to dst, root first. A sample's locations run leaf first,
// and so do a location's lines: the last line is the function the earlier ones were inlined
// into.
func appendFrames(dst []string, s *profile.Sample) []string {
	start := len(dst)
	for _, loc := range s.Location {
		if loc == nil {
			continue
		}
		if len(loc.Line) == 0 {
			dst = append(dst, unsymbolized(loc))
			continue
		}
		for _, ln := range loc.Line {
			dst = append(dst, functionName(ln.Function))
		}
	}
	slices.Reverse(dst[start:])
	return dst
}

func functionName(fn *profile.Function) string {
	switch {
	case fn == nil:
		return "?"
	case fn.Name != "":
		return fn.Name
	case fn.SystemName != "":
		return fn.SystemName
	}
	return "?"
}

// unsymbolized names a location without line information by its address, and its binary
// when known, as pprof does.
func unsymbolized(loc *profile.Location) string {
	addr := "0x" + strconv.FormatUint(loc.Address, 16)
	if loc.Mapping != nil && loc.Mapping.File != "" {
		file := loc.Mapping.File
		if i := strings.LastIndexByte(file, '/'); i >= 0 {
			file = file[i+1:]
		}
		return file + " " + addr
	}
	return addr
}

// WriteFolded writes the stacks in the folded text format of Brendan Gregg's FlameGraph
// tools: one line a stack, its frames root first joined by ";", a space and its value.
func (f *Folded) WriteFolded(w io.Writer) error {
	bw := bufio.NewWriter(w)
	for _, s := range f.Stacks {
		for i, fr := range s.Frames {
			if i > 0 {
				bw.WriteByte(';')
			}
			bw.WriteString(fr)
		}
		bw.WriteByte(' ')
		bw.WriteString(strconv.FormatInt(s.Value, 10))
		bw.WriteByte('\n')
	}
	return bw.Flush()
}
