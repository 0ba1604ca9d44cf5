// Package flamegraph turns a pprof profile into a self-contained SVG flame graph.
//
// The work is three steps, each exported so that it can be tested and reused on its own:
//
//   - Fold (or Read, which parses first) reduces a profile to its distinct call stacks, root
//     first, each with the sum of one sample value: the "cpu" type (nanoseconds in a Go CPU
//     profile), or the last sample type when none is named cpu (inuse_space in a heap
//     profile). Inlined calls are expanded into frames of their own, as pprof shows them.
//     The stacks come out sorted, so the folded text (WriteFolded) is stable from run to run.
//   - Layout builds the call tree of those stacks and places each frame: the root ("all") at
//     the bottom, every frame as wide as its share of the total, siblings sorted
//     alphabetically left to right as classic flame graphs do (so the x axis is not time and
//     the same profile always draws the same picture). Siblings narrower than the minimum
//     width are not drawn one by one: together they become one grey "[N small frames]" box
//     after their wider siblings when that box is wide enough, and are omitted otherwise,
//     with everything above them.
//   - Render writes the SVG. It loads nothing from anywhere: no fonts, stylesheets or
//     scripts from outside the file. Each frame is a rect in a nested <svg> viewport, which
//     clips its label to the rect (the label is also cut short with ".." where it would not
//     fit), under a <title> tooltip with the function name, its value and its percentage of
//     the total. Colours are derived from a hash of the function name, so a function has the
//     same colour in every graph, within a hue family that tells its kind apart: blue for the
//     Go runtime, syscall and internal/ packages, green for the profiled project's own code
//     (Options.OwnPrefixes, github.com/ztgo/ztgo by default), warm for the rest. With
//     Options.Interactive a small inline script adds click-to-zoom; the graph renders the
//     same without it.
//
// The command perf/cmd/flamegraph wraps these for the profiles written by meshbench.
package flamegraph
