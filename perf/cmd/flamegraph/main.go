// Command flamegraph draws a pprof profile as a self-contained SVG flame graph.
//
//	go run ./perf/cmd/flamegraph --title "ztgo node a: CPU, 1-stream throughput" -o flame.svg profile.pprof
//
// The profile is a gzip-compressed protobuf as written by runtime/pprof and net/http/pprof
// (meshbench --profile-dir writes them). The graph is drawn from the cpu sample type, or the
// last one when none is named cpu (so a heap profile draws inuse_space); see package
// perf/flamegraph for what it shows. With --folded the stacks are also written in the folded
// text format of Brendan Gregg's FlameGraph tools, for diffing two runs.
package main

import (
	"bytes"
	"errors"
	"flag"
	"fmt"
	"os"

	"github.com/ztgo/ztgo/perf/flamegraph"
)

func main() {
	if err := run(os.Args[1:]); err != nil {
		fmt.Fprintln(os.Stderr, "flamegraph:", err)
		os.Exit(1)
	}
}

func run(args []string) error {
	fs := flag.NewFlagSet("flamegraph", flag.ContinueOnError)
	fs.Usage = func() {
		fmt.Fprintln(fs.Output(), "usage: flamegraph [--title TEXT] [-o OUT.svg] [--width PX] [--min-width PX] [--static] [--folded OUT.txt] PROFILE")
		fs.PrintDefaults()
	}
	var (
		title    = fs.String("title", "", "title line at the top of the graph (default: the profile's file name)")
		out      = fs.String("o", "", "write the SVG here (default: standard output)")
		width    = fs.Float64("width", 1200, "image width in pixels (120 to 100000)")
		minWidth = fs.Float64("min-width", 1, "narrowest frame drawn, in pixels; narrower siblings are merged into one box")
		static   = fs.Bool("static", false, "leave out the inline click-to-zoom script")
		folded   = fs.String("folded", "", "also write the folded stacks (frame;frame;... value) to this file")
	)
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return nil
		}
		return err
	}
	if fs.NArg() != 1 {
		fs.Usage()
		return errors.New("want exactly one profile file")
	}
	if !(*width >= 120 && *width <= 100000) {
		return fmt.Errorf("--width %g: want 120 to 100000 pixels", *width)
	}
	if !(*minWidth > 0) {
		return fmt.Errorf("--min-width %g: want more than 0 pixels", *minWidth)
	}
	path := fs.Arg(0)
	if *title == "" {
		*title = path
	}

	file, err := os.Open(path)
	if err != nil {
		return fmt.Errorf("read profile: %w", err) // the PathError names the file
	}
	f, err := flamegraph.Read(file)
	file.Close()
	if err != nil {
		return fmt.Errorf("read profile %s: %w", path, err)
	}
	if f.Total == 0 {
		fmt.Fprintf(os.Stderr, "flamegraph: %s has no %s samples; the graph will be empty\n", path, f.SampleType)
	}

	var svg bytes.Buffer
	opts := flamegraph.Options{Title: *title, Width: *width, MinWidth: *minWidth, Interactive: !*static}
	if err := flamegraph.Render(&svg, f, opts); err != nil {
		return err
	}
	if *out == "" {
		_, err = os.Stdout.Write(svg.Bytes())
	} else {
		err = os.WriteFile(*out, svg.Bytes(), 0o644)
	}
	if err != nil {
		return fmt.Errorf("write svg: %w", err)
	}
	if *folded != "" {
		var b bytes.Buffer
		if err := f.WriteFolded(&b); err != nil {
			return err
		}
		if err := os.WriteFile(*folded, b.Bytes(), 0o644); err != nil {
			return fmt.Errorf("write folded stacks: %w", err)
		}
	}
	return nil
}
