package grafana

import (
	"encoding/json"
	"fmt"
	"os"
	"regexp"
	"slices"
	"strings"
	"testing"

	"github.com/ztgo/ztgo/runtime/metricslint"
)

// subnet of 127.80.0.0/16 for this package's node (runtime/metricslint uses 1 and 2).
const subnet = 3

type dashboard struct {
	UID        string  `json:"uid"`
	Title      string  `json:"title"`
	Panels     []panel `json:"panels"`
	Templating struct {
		List []variable `json:"list"`
	} `json:"templating"`
}

type panel struct {
	ID         int    `json:"id"`
	Type       string `json:"type"`
	Title      string `json:"title"`
	Datasource *struct {
		Type string `json:"type"`
		UID  string `json:"uid"`
	} `json:"datasource"`
	GridPos struct{ H, W, X, Y int } `json:"gridPos"`
	Targets []struct {
		Expr  string `json:"expr"`
		RefID string `json:"refId"`
	} `json:"targets"`
	// Panels of a collapsed row.
	Panels []panel `json:"panels"`
}

type variable struct {
	Name  string          `json:"name"`
	Type  string          `json:"type"`
	Query json.RawMessage `json:"query"`
}

func load(t *testing.T) dashboard {
	t.Helper()
	raw, err := os.ReadFile("ztgo-dashboard.json")
	if err != nil {
		t.Fatal(err)
	}
	var d dashboard
	dec := json.NewDecoder(strings.NewReader(string(raw)))
	if err := dec.Decode(&d); err != nil {
		t.Fatalf("ztgo-dashboard.json: %v", err)
	}
	return d
}

// queries returns every PromQL expression of d, each with where it is used.
func queries(t *testing.T, d dashboard) map[string]string {
	t.Helper()
	out := map[string]string{}
	var walk func(ps []panel)
	walk = func(ps []panel) {
		for _, p := range ps {
			for _, tg := range p.Targets {
				out[tg.Expr] = fmt.Sprintf("panel %q target %s", p.Title, tg.RefID)
			}
			walk(p.Panels)
		}
	}
	walk(d.Panels)
	labelValues := regexp.MustCompile(`^\s*label_values\((.*),\s*[a-zA-Z_][a-zA-Z0-9_]*\s*\)\s*$`)
	for _, v := range d.Templating.List {
		if v.Type != "query" {
			continue
		}
		var q struct {
			Query string `json:"query"`
		}
		if err := json.Unmarshal(v.Query, &q); err != nil {
			// Older dashboards store the query as a plain string.
			if err := json.Unmarshal(v.Query, &q.Query); err != nil {
				t.Fatalf("variable %s: query: %v", v.Name, err)
			}
		}
		expr := q.Query
		if m := labelValues.FindStringSubmatch(expr); m != nil {
			expr = m[1] // Grafana's label_values(<series selector>, <label>)
		}
		out[expr] = fmt.Sprintf("variable %s", v.Name)
	}
	return out
}

func TestDashboardShape(t *testing.T) {
	d := load(t)
	if d.UID == "" || d.Title != "ztgo" {
		t.Fatalf("uid %q, title %q; want a uid and title ztgo", d.UID, d.Title)
	}
	var hasDS bool
	for _, v := range d.Templating.List {
		if v.Type == "datasource" && v.Name == "datasource" && string(v.Query) == `"prometheus"` {
			hasDS = true
		}
	}
	if !hasDS {
		t.Fatal(`no "datasource" variable of Prometheus data sources`)
	}
	ids := map[int]bool{}
	var walk func(ps []panel)
	walk = func(ps []panel) {
		for _, p := range ps {
			if ids[p.ID] {
				t.Errorf("panel %q: id %d used twice", p.Title, p.ID)
			}
			ids[p.ID] = true
			if g := p.GridPos; g.W <= 0 || g.H <= 0 || g.X < 0 || g.X+g.W > 24 {
				t.Errorf("panel %q: gridPos %+v outside the 24-column grid", p.Title, g)
			}
			walk(p.Panels)
			if p.Type == "row" {
				continue
			}
			if p.Datasource == nil || p.Datasource.UID != "${datasource}" {
				t.Errorf("panel %q: data source is not the ${datasource} variable", p.Title)
			}
			if len(p.Targets) == 0 {
				t.Errorf("panel %q has no query", p.Title)
			}
			refs := map[string]bool{}
			for _, tg := range p.Targets {
				if tg.RefID == "" || refs[tg.RefID] {
					t.Errorf("panel %q: refId %q missing or repeated", p.Title, tg.RefID)
				}
				refs[tg.RefID] = true
				if names, err := metricNames(tg.Expr); err != nil || len(names) == 0 {
					t.Errorf("panel %q target %s: %v, names %v: want a query over at least one metric", p.Title, tg.RefID, err, names)
				}
			}
		}
	}
	walk(d.Panels)
}

// TestDashboardMetricsExist checks every metric the dashboard queries against the registry
// of a running node that carried flows (so labelled families have series).
func TestDashboardMetricsExist(t *testing.T) {
	d := load(t)
	_, mfs := metricslint.Families(t, subnet)
	exported := metricslint.SeriesNames(mfs)
	used := map[string]bool{}
	for expr, where := range queries(t, d) {
		names, err := metricNames(expr)
		if err != nil {
			t.Errorf("%s: %v", where, err)
			continue
		}
		for _, n := range names {
			family, ok := exported[n]
			if !ok {
				t.Errorf("%s queries %s, which a ztgo node does not export", where, n)
				continue
			}
			used[family] = true
		}
	}
	// What the dashboard is for: each of these has a panel.
	for _, want := range []string{
		"ztgo_stage_duration_seconds", "ztgo_stage_queue_seconds", "ztgo_stage_mailbox_depth",
		"ztgo_stage_backpressure_total", "ztgo_stage_rejected_total",
		"istio_tcp_connections_opened_total", "istio_tcp_connections_closed_total", "istio_tcp_connections_failed_total",
		"istio_tcp_received_bytes_total", "istio_tcp_sent_bytes_total", "istio_tcp_sockets_open",
		"ztgo_pool_connections", "ztgo_pool_streams", "ztgo_pool_dials_total",
		"ztgo_snapshot_built_timestamp_seconds",
		"process_cpu_seconds_total", "process_resident_memory_bytes", "process_open_fds", "go_goroutines",
	} {
		if !used[want] {
			t.Errorf("no panel shows %s", want)
		}
	}
}

// PromQL words that are not metric names: aggregation operators, binary and set operators,
// modifiers, and number literals.
var keywords = map[string]bool{
	"sum": true, "min": true, "max": true, "avg": true, "group": true, "stddev": true, "stdvar": true,
	"count": true, "count_values": true, "bottomk": true, "topk": true, "quantile": true,
	"limitk": true, "limit_ratio": true,
	"and": true, "or": true, "unless": true, "atan2": true, "bool": true, "offset": true,
	"by": true, "without": true, "on": true, "ignoring": true, "group_left": true, "group_right": true,
	"inf": true, "nan": true,
}

// Keywords followed by a parenthesised list of label names.
var labelLists = map[string]bool{
	"by": true, "without": true, "on": true, "ignoring": true, "group_left": true, "group_right": true,
}

// metricNames returns the metric names expr selects, in order, without repeats. It lexes
// PromQL as far as needed to tell a metric name from everything else: function names (an
// identifier followed by "("), keywords, label names (in {} matchers and by/on/... lists),
// strings, numbers and durations, range and subquery brackets, and Grafana variables ($x,
// ${x}, $__rate_interval). A {__name__="..."} matcher names a metric too.
func metricNames(expr string) ([]string, error) {
	var names []string
	add := func(n string) {
		if !slices.Contains(names, n) {
			names = append(names, n)
		}
	}
	s := expr
	i := 0
	for i < len(s) {
		c := s[i]
		switch {
		case c == ' ' || c == '\t' || c == '\n' || c == '\r':
			i++
		case c == '"' || c == '\'' || c == '`':
			_, end, err := lexString(s, i)
			if err != nil {
				return nil, err
			}
			i = end
		case c == '#': // comment to end of line
			for i < len(s) && s[i] != '\n' {
				i++
			}
		case c == '{':
			name, end, err := lexMatchers(s, i)
			if err != nil {
				return nil, err
			}
			if name != "" {
				add(name)
			}
			i = end
		case c == '[':
			end := strings.IndexByte(s[i:], ']')
			if end < 0 {
				return nil, fmt.Errorf("unclosed [ at %d in %q", i, expr)
			}
			i += end + 1
		case c == '$':
			i = lexVariable(s, i)
		case isDigit(c) || (c == '.' && i+1 < len(s) && isDigit(s[i+1])):
			i = lexNumber(s, i)
		case isIdentStart(c):
			start := i
			for i < len(s) && isIdentChar(s[i]) {
				i++
			}
			word := s[start:i]
			next := i
			for next < len(s) && (s[next] == ' ' || s[next] == '\t' || s[next] == '\n') {
				next++
			}
			lower := strings.ToLower(word)
			switch {
			case labelLists[lower]:
				if next < len(s) && s[next] == '(' {
					end := strings.IndexByte(s[next:], ')')
					if end < 0 {
						return nil, fmt.Errorf("unclosed label list after %s in %q", word, expr)
					}
					i = next + end + 1
				}
			case keywords[lower]:
			case next < len(s) && s[next] == '(':
				// A function call.
			default:
				add(word)
			}
		default:
			i++ // operators, parentheses, commas, @
		}
	}
	return names, nil
}

// lexString returns the string starting at s[i] (quote included) and the index after it.
func lexString(s string, i int) (string, int, error) {
	q := s[i]
	j := i + 1
	for j < len(s) {
		switch {
		case s[j] == '\\' && q != '`':
			j += 2
			continue
		case s[j] == q:
			return s[i+1 : j], j + 1, nil
		}
		j++
	}
	return "", 0, fmt.Errorf("unterminated string at %d in %q", i, s)
}

// lexMatchers skips the label matchers starting at s[i] == '{' and returns the metric named
// by a __name__="..." matcher, if any.
func lexMatchers(s string, i int) (string, int, error) {
	var name string
	j := i + 1
	for j < len(s) {
		for j < len(s) && (s[j] == ' ' || s[j] == ',' || s[j] == '\t' || s[j] == '\n') {
			j++
		}
		if j < len(s) && s[j] == '}' {
			return name, j + 1, nil
		}
		start := j
		for j < len(s) && isIdentChar(s[j]) {
			j++
		}
		label := s[start:j]
		for j < len(s) && strings.IndexByte(" \t\n=!~", s[j]) >= 0 {
			j++
		}
		if label == "" || j >= len(s) || (s[j] != '"' && s[j] != '\'' && s[j] != '`') {
			return "", 0, fmt.Errorf("bad label matcher at %d in %q", start, s)
		}
		value, end, err := lexString(s, j)
		if err != nil {
			return "", 0, err
		}
		if label == "__name__" && !strings.ContainsAny(value, ".*+?|[(") {
			name = value
		}
		j = end
	}
	return "", 0, fmt.Errorf("unclosed { at %d in %q", i, s)
}

// lexVariable skips a Grafana variable: $name, ${name} or ${name:format}.
func lexVariable(s string, i int) int {
	j := i + 1
	if j < len(s) && s[j] == '{' {
		if end := strings.IndexByte(s[j:], '}'); end >= 0 {
			return j + end + 1
		}
		return len(s)
	}
	for j < len(s) && isIdentChar(s[j]) {
		j++
	}
	return j
}

// lexNumber skips a number or a duration: 0.99, 1e-9, 0x1f, 5m, 1h30m.
func lexNumber(s string, i int) int {
	j := i
	for j < len(s) {
		c := s[j]
		switch {
		case isIdentChar(c) || c == '.':
			j++
		case (c == '+' || c == '-') && (s[j-1] == 'e' || s[j-1] == 'E') && !strings.HasPrefix(strings.ToLower(s[i:]), "0x"):
			j++
		default:
			return j
		}
	}
	return j
}

func isDigit(c byte) bool      { return c >= '0' && c <= '9' }
func isIdentStart(c byte) bool { return c == '_' || c == ':' || (c|0x20 >= 'a' && c|0x20 <= 'z') }
func isIdentChar(c byte) bool  { return isIdentStart(c) || isDigit(c) }

func TestMetricNames(t *testing.T) {
	for _, tc := range []struct {
		expr string
		want []string
	}{
		{`histogram_quantile(0.99, sum by (le, stage) (rate(foo_bucket{a="b}", c=~"$x"}[$__rate_interval])))`, []string{"foo_bucket"}},
		{`time() - bar_timestamp_seconds{instance=~"$instance"}`, []string{"bar_timestamp_seconds"}},
		{`sum(rate(x_total[5m])) by (le) / on(instance) group_left(version) y_info`, []string{"x_total", "y_info"}},
		{`{__name__="z_total", job="a"}`, []string{"z_total"}},
		{`a > 0 and b offset 5m`, []string{"a", "b"}},
		{`1e-9 * c + 0x1f - Inf`, []string{"c"}},
		{`count_values("v", d) unless ignoring(x) e`, []string{"d", "e"}},
		{`max_over_time(f[1h:5m]) @ end()`, []string{"f"}},
		{`sum by (instance) (g{instance=~"${instance:regex}"}) / sum by (instance) (g > 0)`, []string{"g"}},
		{`label_replace(h, "dst", "$1", "src", "(.*)")`, []string{"h"}},
	} {
		got, err := metricNames(tc.expr)
		if err != nil || !slices.Equal(got, tc.want) {
			t.Errorf("metricNames(%s) = %v, %v; want %v", tc.expr, got, err, tc.want)
		}
	}
	for _, bad := range []string{`x{a="b"`, `x{a="b}`, `rate(x[5m)`, `x{a}`} {
		if _, err := metricNames(bad); err == nil {
			t.Errorf("metricNames(%s): want an error", bad)
		}
	}
}
