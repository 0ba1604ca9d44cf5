package admin

import (
	"math"
	"net/http"
	"strconv"
	"time"

	dto "github.com/prometheus/client_model/go"

	"github.com/ztgo/ztgo/runtime/trace"
)

// Stats is what GET /debug/stats serves: the dashboard's data, computed on the server from the
// trace window and the node's metrics.
type Stats struct {
	Time time.Time `json:"time"`
	// WindowEnd is the second the stage series end at; each series has
	// WindowSeconds/StepSeconds points, oldest first, the last one holding WindowEnd.
	WindowEnd     time.Time    `json:"windowEnd"`
	WindowSeconds int          `json:"windowSeconds"`
	StepSeconds   int          `json:"stepSeconds"`
	Stages        []StageStats `json:"stages"`
	// RateSeconds is the interval the per-second rates below are computed over (between two
	// gathers of the metrics); 0 on the first request, when there is nothing to compare with.
	RateSeconds float64         `json:"rateSeconds"`
	Connections ConnStats       `json:"connections"`
	Throughput  Throughput      `json:"throughput"`
	History     History         `json:"history"`
	Pipeline    PipelineStats   `json:"pipeline"`
	Pool        PoolStats       `json:"pool"`
	Process     ProcessStats    `json:"process"`
	Snapshot    SnapshotSummary `json:"snapshot"`
}

// StageStats is one stage's work time in one direction over the window (microseconds).
type StageStats struct {
	Stage     string      `json:"stage"`
	Direction string      `json:"direction"`
	Count     int         `json:"count"`
	P50US     float64     `json:"p50Micros"`
	P99US     float64     `json:"p99Micros"`
	MeanUS    float64     `json:"meanMicros"`
	MaxUS     float64     `json:"maxMicros"`
	Series    StageSeries `json:"series"`
}

// StageSeries are per-step values, oldest first; a step with count 0 had no sample.
type StageSeries struct {
	Count []int     `json:"count"`
	P50US []float64 `json:"p50Micros"`
	P99US []float64 `json:"p99Micros"`
}

// ConnStats are Istio's TCP connection metrics (istio_tcp_*), summed over their labels.
type ConnStats struct {
	// Open is the sum of istio_tcp_sockets_open.
	Open           float64            `json:"open"`
	OpenByReporter map[string]float64 `json:"openByReporter"`
	Opened         Counter            `json:"opened"`
	Closed         Counter            `json:"closed"`
	Failed         Counter            `json:"failed"`
}

// Counter is a counter's total and rate, also split by the response_flags label.
type Counter struct {
	Total         float64            `json:"total"`
	PerSec        float64            `json:"perSec"`
	TotalByFlags  map[string]float64 `json:"totalByFlags"`
	PerSecByFlags map[string]float64 `json:"perSecByFlags"`
}

// Throughput is from istio_tcp_received_bytes_total (client to server) and
// istio_tcp_sent_bytes_total (server to client); they grow when a connection closes.
type Throughput struct {
	ReceivedBytesTotal  float64 `json:"receivedBytesTotal"`
	SentBytesTotal      float64 `json:"sentBytesTotal"`
	ReceivedBytesPerSec float64 `json:"receivedBytesPerSec"`
	SentBytesPerSec     float64 `json:"sentBytesPerSec"`
}

// History holds one entry per gather of the metrics in the last minute (the server gathers when
// /debug/stats is asked, at most twice a second), oldest first: the sparklines.
type History struct {
	TimeMS         []int64   `json:"timeMillis"`
	Open           []float64 `json:"open"`
	ReceivedPerSec []float64 `json:"receivedBytesPerSec"`
	SentPerSec     []float64 `json:"sentBytesPerSec"`
	OpenedPerSec   []float64 `json:"openedPerSec"`
	FailedPerSec   []float64 `json:"failedPerSec"`
}

// PipelineStats are the stage actors' mailbox metrics, by stage.
type PipelineStats struct {
	MailboxDepth       map[string]float64 `json:"mailboxDepth"`
	BackpressureTotal  map[string]float64 `json:"backpressureTotal"`
	BackpressurePerSec map[string]float64 `json:"backpressurePerSec"`
	RejectedTotal      map[string]float64 `json:"rejectedTotal"`
	RejectedPerSec     map[string]float64 `json:"rejectedPerSec"`
}

// PoolStats is the HBONE connection pool.
type PoolStats struct {
	Connections float64            `json:"connections"`
	DialsTotal  map[string]float64 `json:"dialsTotal"`
}

// ProcessStats are the process's own metrics.
type ProcessStats struct {
	Goroutines        float64 `json:"goroutines"`
	ResidentBytes     float64 `json:"residentBytes"`
	CPUPercent        float64 `json:"cpuPercent"`
	UptimeSeconds     float64 `json:"uptimeSeconds"`
	RelayBuffersInUse float64 `json:"relayBuffersInUse"`
}

// SnapshotSummary describes the node's current snapshot in a few numbers.
type SnapshotSummary struct {
	Node            string    `json:"node,omitempty"`
	Version         string    `json:"version,omitempty"` // ztgo's build
	SnapshotVersion uint64    `json:"snapshotVersion"`
	Built           time.Time `json:"built"`
	AgeSeconds      float64   `json:"ageSeconds"`
	Workloads       int       `json:"workloads"`
	LocalWorkloads  int       `json:"localWorkloads"`
	Services        int       `json:"services"`
	Policies        int       `json:"policies"`
	// Certificates are the local workloads' certificates, with a count per state.
	Certificates      int            `json:"certificates"`
	CertificateStates map[string]int `json:"certificateStates"`
}

const (
	// minSampleGap: requests closer than this to the last gather reuse its history entry.
	minSampleGap = 500 * time.Millisecond
	// rateWindow: rates compare with the oldest gather at most this old.
	rateWindow     = 5 * time.Second
	maxSamples     = 2*trace.WindowSeconds + 8
	maxHistoryGap  = 10 * time.Second
	historySeconds = trace.WindowSeconds
)

// sample is one gather of the metrics the dashboard uses.
type sample struct {
	at                     time.Time
	open                   float64
	openBy                 map[string]float64
	received, sent         float64
	opened, closed, failed flagged
	depth                  map[string]float64
	backpressure, rejected map[string]float64
	poolConns              float64
	dials                  map[string]float64
	cpu, rss, goroutines   float64
	start, relayBuffers    float64
}

// flagged is a counter summed over its labels, and per response_flags.
type flagged struct {
	total  float64
	byFlag map[string]float64
}

func (f *flagged) add(m *dto.Metric) {
	v := value(m)
	f.total += v
	if f.byFlag == nil {
		f.byFlag = map[string]float64{}
	}
	f.byFlag[label(m, "response_flags")] += v
}

func value(m *dto.Metric) float64 {
	switch {
	case m.Counter != nil:
		return m.Counter.GetValue()
	case m.Gauge != nil:
		return m.Gauge.GetValue()
	case m.Untyped != nil:
		return m.Untyped.GetValue()
	}
	return 0
}

func label(m *dto.Metric, name string) string {
	for _, l := range m.Label {
		if l.GetName() == name {
			return l.GetValue()
		}
	}
	return ""
}

func byLabel(dst map[string]float64, mf *dto.MetricFamily, name string) {
	for _, m := range mf.Metric {
		dst[label(m, name)] += value(m)
	}
}

func sum(mf *dto.MetricFamily) float64 {
	var v float64
	for _, m := range mf.Metric {
		v += value(m)
	}
	return v
}

// gather reads the metrics the dashboard needs from the node's registry.
func (s *Server) gather(now time.Time) (sample, error) {
	mfs, err := s.cfg.Gatherer.Gather()
	smp := sample{at: now, openBy: map[string]float64{}, depth: map[string]float64{},
		backpressure: map[string]float64{}, rejected: map[string]float64{}, dials: map[string]float64{}}
	if err != nil && len(mfs) == 0 {
		return smp, err
	}
	for _, mf := range mfs {
		switch mf.GetName() {
		case "istio_tcp_sockets_open":
			smp.open = sum(mf)
			byLabel(smp.openBy, mf, "reporter")
		case "istio_tcp_received_bytes_total":
			smp.received = sum(mf)
		case "istio_tcp_sent_bytes_total":
			smp.sent = sum(mf)
		case "istio_tcp_connections_opened_total":
			for _, m := range mf.Metric {
				smp.opened.add(m)
			}
		case "istio_tcp_connections_closed_total":
			for _, m := range mf.Metric {
				smp.closed.add(m)
			}
		case "istio_tcp_connections_failed_total":
			for _, m := range mf.Metric {
				smp.failed.add(m)
			}
		case "ztgo_stage_mailbox_depth":
			byLabel(smp.depth, mf, "stage")
		case "ztgo_stage_backpressure_total":
			byLabel(smp.backpressure, mf, "stage")
		case "ztgo_stage_rejected_total":
			byLabel(smp.rejected, mf, "stage")
		case "ztgo_pool_connections":
			smp.poolConns = sum(mf)
		case "ztgo_pool_dials_total":
			byLabel(smp.dials, mf, "result")
		case "ztgo_relay_buffers_in_use":
			smp.relayBuffers = sum(mf)
		case "process_cpu_seconds_total":
			smp.cpu = sum(mf)
		case "process_resident_memory_bytes":
			smp.rss = sum(mf)
		case "process_start_time_seconds":
			smp.start = sum(mf)
		case "go_goroutines":
			smp.goroutines = sum(mf)
		}
	}
	return smp, err
}

// rate is (b - a) per second over dt, never negative (a counter reset reads as 0).
func rate(a, b, dt float64) float64 {
	if dt <= 0 || b < a {
		return 0
	}
	return (b - a) / dt
}

func rates(a, b map[string]float64, dt float64) map[string]float64 {
	out := make(map[string]float64, len(b))
	for k, v := range b {
		out[k] = rate(a[k], v, dt)
	}
	return out
}

func counter(a, b flagged, dt float64) Counter {
	c := Counter{Total: b.total, TotalByFlags: b.byFlag, PerSec: rate(a.total, b.total, dt), PerSecByFlags: rates(a.byFlag, b.byFlag, dt)}
	if c.TotalByFlags == nil {
		c.TotalByFlags = map[string]float64{}
	}
	return c
}

// record adds cur to the history (unless the last gather is too recent) and returns the gather
// to compute rates against, if any.
func (s *Server) record(cur sample) (prev sample, ok bool, hist []sample) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if n := len(s.samples); n == 0 || cur.at.Sub(s.samples[n-1].at) >= minSampleGap {
		s.samples = append(s.samples, cur)
	}
	// Drop what is older than the history, keeping one entry before it to compute a rate from.
	cut := 0
	for cut < len(s.samples)-1 && cur.at.Sub(s.samples[cut+1].at) > historySeconds*time.Second {
		cut++
	}
	if len(s.samples)-cut > maxSamples {
		cut = len(s.samples) - maxSamples
	}
	if cut > 0 {
		s.samples = append(s.samples[:0], s.samples[cut:]...)
	}
	for i := range s.samples {
		sm := &s.samples[i]
		if d := cur.at.Sub(sm.at); d >= minSampleGap/2 && d <= rateWindow {
			prev, ok = *sm, true
			break
		}
	}
	if !ok {
		// Nothing in the last few seconds: the newest older gather, if it is in the window.
		for i := len(s.samples) - 1; i >= 0; i-- {
			sm := &s.samples[i]
			if d := cur.at.Sub(sm.at); d >= minSampleGap/2 && d <= historySeconds*time.Second {
				prev, ok = *sm, true
				break
			}
		}
	}
	return prev, ok, append([]sample(nil), s.samples...)
}

func history(samples []sample) History {
	h := History{TimeMS: []int64{}, Open: []float64{}, ReceivedPerSec: []float64{}, SentPerSec: []float64{},
		OpenedPerSec: []float64{}, FailedPerSec: []float64{}}
	for i := 1; i < len(samples); i++ {
		a, b := &samples[i-1], &samples[i]
		dt := b.at.Sub(a.at).Seconds()
		if dt > maxHistoryGap.Seconds() {
			continue // nobody was watching: no rate for the gap
		}
		h.TimeMS = append(h.TimeMS, b.at.UnixMilli())
		h.Open = append(h.Open, b.open)
		h.ReceivedPerSec = append(h.ReceivedPerSec, rate(a.received, b.received, dt))
		h.SentPerSec = append(h.SentPerSec, rate(a.sent, b.sent, dt))
		h.OpenedPerSec = append(h.OpenedPerSec, rate(a.opened.total, b.opened.total, dt))
		h.FailedPerSec = append(h.FailedPerSec, rate(a.failed.total, b.failed.total, dt))
	}
	return h
}

func (s *Server) stats(w http.ResponseWriter, r *http.Request) {
	step := time.Second
	if v := r.URL.Query().Get("step"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 1 || n > trace.WindowSeconds {
			http.Error(w, "invalid step: want whole seconds from 1 to 60", http.StatusBadRequest)
			return
		}
		step = time.Duration(n) * time.Second
	}
	st, err := s.Stats(step)
	if err != nil {
		s.cfg.Logger.Warn("gathering metrics for /debug/stats", "error", err)
	}
	w.Header().Set("Cache-Control", "no-store")
	writeJSON(w, st)
}

// Stats computes what /debug/stats serves, with stage series in steps of step.
func (s *Server) Stats(step time.Duration) (*Stats, error) {
	now := time.Now()
	end, ws := s.cfg.Recorder.Window(step)
	st := &Stats{Time: now, WindowEnd: end, WindowSeconds: trace.WindowSeconds,
		StepSeconds: int(max(1, step/time.Second)), Stages: make([]StageStats, 0, len(ws))}
	for _, sw := range ws {
		ss := StageStats{Stage: sw.Stage, Direction: sw.Direction, Count: sw.Count, P50US: us(sw.P50),
			P99US: us(sw.P99), MeanUS: us(sw.Mean), MaxUS: us(sw.Max), Series: StageSeries{
				Count: make([]int, len(sw.Points)), P50US: make([]float64, len(sw.Points)), P99US: make([]float64, len(sw.Points))}}
		for i, p := range sw.Points {
			ss.Series.Count[i], ss.Series.P50US[i], ss.Series.P99US[i] = p.Count, us(p.P50), us(p.P99)
		}
		st.Stages = append(st.Stages, ss)
	}

	cur, err := s.gather(now)
	prev, ok, samples := s.record(cur)
	dt := 0.0
	if ok {
		dt = cur.at.Sub(prev.at).Seconds()
	}
	st.RateSeconds = math.Round(dt*1000) / 1000
	st.Connections = ConnStats{Open: cur.open, OpenByReporter: cur.openBy,
		Opened: counter(prev.opened, cur.opened, dt), Closed: counter(prev.closed, cur.closed, dt),
		Failed: counter(prev.failed, cur.failed, dt)}
	st.Throughput = Throughput{ReceivedBytesTotal: cur.received, SentBytesTotal: cur.sent,
		ReceivedBytesPerSec: rate(prev.received, cur.received, dt), SentBytesPerSec: rate(prev.sent, cur.sent, dt)}
	st.History = history(samples)
	st.Pipeline = PipelineStats{MailboxDepth: cur.depth, BackpressureTotal: cur.backpressure,
		BackpressurePerSec: rates(prev.backpressure, cur.backpressure, dt), RejectedTotal: cur.rejected,
		RejectedPerSec: rates(prev.rejected, cur.rejected, dt)}
	st.Pool = PoolStats{Connections: cur.poolConns, DialsTotal: cur.dials}
	st.Process = ProcessStats{Goroutines: cur.goroutines, ResidentBytes: cur.rss,
		CPUPercent: 100 * rate(prev.cpu, cur.cpu, dt), RelayBuffersInUse: cur.relayBuffers}
	if cur.start > 0 {
		st.Process.UptimeSeconds = math.Round(now.Sub(time.Unix(0, int64(cur.start*1e9))).Seconds())
	}
	st.Snapshot = s.summary(now)
	return st, err
}

// summary returns Config.Summary's view of the snapshot (empty without one), with its age.
func (s *Server) summary(now time.Time) SnapshotSummary {
	var sum SnapshotSummary
	if s.cfg.Summary != nil {
		sum = s.cfg.Summary()
	}
	if sum.CertificateStates == nil {
		sum.CertificateStates = map[string]int{}
	}
	if !sum.Built.IsZero() {
		sum.AgeSeconds = math.Round(now.Sub(sum.Built).Seconds()*10) / 10
	}
	return sum
}
