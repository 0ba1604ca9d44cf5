// ztgo admin dashboard: polls /debug/stats (every second) and /debug/flows (every two seconds)
// and draws everything by hand in SVG. No framework, no external asset.
//
// Elements the browser test looks for:
//   #stage-charts .chart-block[data-direction]   one stacked chart per direction
//     rect.bar[data-stage]                        one bar segment per stage and second
//     table.legend tr[data-stage]                 the legend, one row per stage
//   #waterfall .wf-row[data-flow-id]              one row per slow flow
//     rect[data-stage][data-kind=queue|work]      its stage segments
//   body[data-stats-renders], body[data-flows-renders]  counts of completed renders
//   body[data-render-error]                       set if a render threw
'use strict';

(() => {
  const SVGNS = 'http://www.w3.org/2000/svg';
  const STAGE_ORDER = ['capture', 'identity', 'authz', 'hbone', 'upstream'];
  const STAGE_HELP = {
    capture: 'accept the connection, read its original destination and source workload',
    identity: 'snapshot lookups: destination workload or service, route, waypoint',
    authz: 'L4 authorization policies',
    hbone: 'HTTP/2 CONNECT over pooled mTLS to the destination node',
    upstream: 'TCP connect to the destination',
  };
  const COLORS = {
    capture: '#4e79a7', identity: '#76b7b2', authz: '#f28e2b', hbone: '#59a14f', upstream: '#af7aa1',
  };
  const EXTRA_COLORS = ['#9c755f', '#e15759', '#edc948', '#bab0ac', '#ff9da7'];
  const DIRECTIONS = ['outbound', 'inbound', 'inbound_plaintext'];
  const DIRECTION_HELP = {
    outbound: 'connections from this node\'s workloads',
    inbound: 'HBONE connections to this node\'s workloads',
    inbound_plaintext: 'plain TCP connections to this node\'s workloads',
  };
  const STATS_EVERY = 1000;
  const FLOWS_EVERY = 2000;

  let quantile = 'p50';
  let lastStats = null;
  let lastFlows = null;
  let statsRenders = 0;
  let flowsRenders = 0;
  let lastOK = 0;
  const extraColor = {};

  // ---- small helpers --------------------------------------------------------------------

  function $(sel, root) { return (root || document).querySelector(sel); }

  function h(tag, attrs, ...children) {
    const e = document.createElement(tag);
    setAttrs(e, attrs);
    append(e, children);
    return e;
  }

  function s(tag, attrs, ...children) {
    const e = document.createElementNS(SVGNS, tag);
    setAttrs(e, attrs);
    append(e, children);
    return e;
  }

  function setAttrs(e, attrs) {
    if (!attrs) return;
    for (const [k, v] of Object.entries(attrs)) {
      if (v === undefined || v === null || v === false) continue;
      if (k === 'class') e.setAttribute('class', v);
      else if (k === 'text') e.textContent = v;
      else e.setAttribute(k, v);
    }
  }

  function append(e, children) {
    for (const c of children.flat()) {
      if (c === undefined || c === null || c === false) continue;
      e.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
  }

  function title(text) { return s('title', { text }); }

  function color(stage) {
    if (COLORS[stage]) return COLORS[stage];
    if (!extraColor[stage]) {
      extraColor[stage] = EXTRA_COLORS[Object.keys(extraColor).length % EXTRA_COLORS.length];
    }
    return extraColor[stage];
  }

  function stageRank(stage) {
    const i = STAGE_ORDER.indexOf(stage);
    return i < 0 ? STAGE_ORDER.length : i;
  }

  function byStage(a, b) { return stageRank(a) - stageRank(b) || (a < b ? -1 : a > b ? 1 : 0); }

  function fmtUS(us) {
    if (!isFinite(us) || us <= 0) return '0 µs';
    if (us < 10) return us.toFixed(1) + ' µs';
    if (us < 1000) return Math.round(us) + ' µs';
    if (us < 10000) return (us / 1000).toFixed(2) + ' ms';
    if (us < 1e6) return (us / 1000).toFixed(1) + ' ms';
    return (us / 1e6).toFixed(2) + ' s';
  }

  // fmtTick formats an axis value: 2 ms, not 2.00 ms.
  function fmtTick(us) { return fmtUS(us).replace(/\.0+ /, ' ').replace(/(\.\d*?)0+ /, '$1 '); }

  function fmtNum(n, digits) {
    if (!isFinite(n)) return '–';
    if (n === 0) return '0';
    const d = digits === undefined ? (n < 10 ? 1 : 0) : digits;
    return n.toLocaleString('en-US', { maximumFractionDigits: d, minimumFractionDigits: 0 });
  }

  function fmtBytes(n) {
    if (!isFinite(n) || n <= 0) return '0 B';
    const units = ['B', 'kB', 'MB', 'GB', 'TB'];
    let i = 0;
    while (n >= 1000 && i < units.length - 1) { n /= 1000; i++; }
    return (n < 10 && i > 0 ? n.toFixed(2) : n < 100 && i > 0 ? n.toFixed(1) : Math.round(n)) + ' ' + units[i];
  }

  function fmtAgo(seconds) {
    if (!isFinite(seconds)) return '–';
    if (seconds < 1) return 'just now';
    if (seconds < 60) return Math.round(seconds) + ' s ago';
    if (seconds < 3600) return Math.round(seconds / 60) + ' min ago';
    if (seconds < 86400) return (seconds / 3600).toFixed(1) + ' h ago';
    return (seconds / 86400).toFixed(1) + ' d ago';
  }

  function fmtDuration(seconds) {
    if (!isFinite(seconds) || seconds <= 0) return '–';
    const d = Math.floor(seconds / 86400), hh = Math.floor(seconds % 86400 / 3600);
    const m = Math.floor(seconds % 3600 / 60), sec = Math.floor(seconds % 60);
    if (d) return d + 'd ' + hh + 'h';
    if (hh) return hh + 'h ' + m + 'm';
    if (m) return m + 'm ' + sec + 's';
    return sec + 's';
  }

  // shortID turns spiffe://td/ns/NS/sa/SA into NS/SA.
  function shortID(id) {
    const m = /^spiffe:\/\/[^/]+\/ns\/([^/]+)\/sa\/([^/]+)$/.exec(id || '');
    return m ? m[1] + '/' + m[2] : (id || '');
  }

  // niceStep picks a 1-2-5 step so that max fits in about n steps.
  function niceStep(max, n) {
    if (!(max > 0)) return 1;
    const raw = max / n;
    const mag = Math.pow(10, Math.floor(Math.log10(raw)));
    for (const m of [1, 2, 2.5, 5, 10]) {
      if (raw <= m * mag) return m * mag;
    }
    return 10 * mag;
  }

  function sortedDirections(list) {
    return [...new Set(list)].sort((a, b) => {
      const ia = DIRECTIONS.indexOf(a), ib = DIRECTIONS.indexOf(b);
      return (ia < 0 ? 99 : ia) - (ib < 0 ? 99 : ib) || (a < b ? -1 : 1);
    });
  }

  function setField(root, name, value) {
    const e = root.querySelector('[data-field="' + name + '"]');
    if (!e) return;
    if (value instanceof Node) e.replaceChildren(value);
    else e.textContent = value;
  }

  // ---- sparklines ----------------------------------------------------------------------------

  function sparkline(svg, series) {
    const box = svg.getBoundingClientRect();
    const w = Math.round(box.width) || 200, hgt = Math.round(box.height) || 38;
    svg.setAttribute('viewBox', '0 0 ' + w + ' ' + hgt);
    svg.replaceChildren();
    svg.append(s('line', { class: 'base', x1: 0, x2: w, y1: hgt - 0.5, y2: hgt - 0.5 }));
    let max = 0;
    for (const ser of series) for (const v of ser.values) max = Math.max(max, v);
    if (max <= 0) max = 1;
    for (const ser of series) {
      const v = ser.values;
      if (v.length < 2) continue;
      const x = i => (i / (v.length - 1)) * w;
      const y = val => hgt - 1 - (val / max) * (hgt - 4);
      let d = '';
      v.forEach((val, i) => { d += (i ? 'L' : 'M') + x(i).toFixed(1) + ' ' + y(val).toFixed(1); });
      if (ser.area) {
        svg.append(s('path', { class: 'area ' + (ser.cls || ''), d: d + 'L' + w + ' ' + hgt + 'L0 ' + hgt + 'Z' }));
      }
      svg.append(s('path', { class: 'line ' + (ser.cls || ''), d }));
    }
  }

  // ---- KPIs ------------------------------------------------------------------------------------

  function renderKPIs(st) {
    const c = st.connections, t = st.throughput, hist = st.history;
    const hasRate = st.rateSeconds > 0;

    const open = $('#kpi-open');
    setField(open, 'value', fmtNum(c.open, 0));
    const out = c.openByReporter.source || 0, inb = c.openByReporter.destination || 0;
    setField(open, 'sub', 'outbound ' + fmtNum(out, 0) + ' · inbound ' + fmtNum(inb, 0));
    sparkline($('#spark-open'), [{ values: hist.open, area: true }]);

    const tp = $('#kpi-throughput');
    const both = t.receivedBytesPerSec + t.sentBytesPerSec;
    setField(tp, 'value', hasRate ? withUnit(fmtBytes(both), '/s') : '–');
    setField(tp, 'sub', hasRate
      ? '↑ ' + fmtBytes(t.receivedBytesPerSec) + '/s · ↓ ' + fmtBytes(t.sentBytesPerSec) + '/s · at close'
      : 'measuring…');
    $('[data-field="sub"]', tp).title = '↑ client to server (istio_tcp_received_bytes_total), ' +
      '↓ server to client (istio_tcp_sent_bytes_total); counted when a connection closes';
    sparkline($('#spark-throughput'), [
      { values: hist.receivedBytesPerSec.map((v, i) => v + hist.sentBytesPerSec[i]), area: true, cls: 'rx' },
    ]);

    const cr = $('#kpi-connrate');
    setField(cr, 'value', hasRate ? withUnit(fmtNum(c.opened.perSec), '/s') : '–');
    setField(cr, 'sub', (hasRate ? 'closed ' + fmtNum(c.closed.perSec) + '/s · ' : '') + fmtNum(c.opened.total, 0) + ' total');
    sparkline($('#spark-connrate'), [{ values: hist.openedPerSec, area: true }]);

    const fl = $('#kpi-failed');
    setField(fl, 'value', hasRate ? withUnit(fmtNum(c.failed.perSec), '/s') : '–');
    const flags = Object.entries(c.failed.totalByFlags).sort((a, b) => b[1] - a[1]);
    const sub = h('span');
    if (flags.length === 0) sub.textContent = 'none since start';
    flags.slice(0, 3).forEach(([flag, n], i) => {
      if (i) sub.append(' · ');
      sub.append(h('span', { class: 'bad', text: flag }), ' ' + fmtNum(n, 0));
    });
    setField(fl, 'sub', sub);
    sparkline($('#spark-failed'), [{ values: hist.failedPerSec, cls: 'bad' }]);

    const pool = $('#kpi-pool');
    setField(pool, 'value', withUnit(fmtNum(st.pool.connections, 0), st.pool.connections === 1 ? ' connection' : ' connections'));
    const dials = Object.entries(st.pool.dialsTotal).filter(([, v]) => v > 0).sort()
      .map(([k, v]) => k + ' ' + fmtNum(v, 0)).join(' · ');
    setField(pool, 'sub', dials ? 'dials: ' + dials : 'no dials yet');
    setField(pool, 'sub2', 'relay buffers in use: ' + fmtNum(st.process.relayBuffersInUse, 0));
  }

  function withUnit(value, unit) {
    const span = h('span', { text: value });
    span.append(h('small', { text: unit }));
    return span;
  }

  // ---- stage charts ------------------------------------------------------------------------------

  const blocks = {}; // direction -> {block, svg, legend, sub}

  function chartBlock(dir) {
    if (blocks[dir]) return blocks[dir];
    const svg = s('svg', { class: 'stage-chart', role: 'img', 'aria-label': dir + ' per-stage latency' });
    const sub = h('span', { class: 'muted' });
    const legend = h('table', { class: 'legend' });
    const block = h('div', { class: 'chart-block', 'data-direction': dir },
      h('h3', null, h('span', { class: 'dir', text: dir.replace('_', ' ') }), sub),
      h('div', { class: 'chart-body' }, h('div', { class: 'chart-plot' }, svg), h('div', { class: 'chart-legend' }, legend)));
    blocks[dir] = { block, svg, legend, sub };
    return blocks[dir];
  }

  function renderStageCharts(st) {
    const container = $('#stage-charts');
    const dirs = sortedDirections(st.stages.map(x => x.direction));
    for (const d of Object.keys(blocks)) {
      if (!dirs.includes(d)) { blocks[d].block.remove(); delete blocks[d]; }
    }
    dirs.forEach((d, i) => {
      const b = chartBlock(d);
      if (container.children[i] !== b.block) container.insertBefore(b.block, container.children[i] || null);
    });
    $('#stage-empty').hidden = dirs.length > 0;
    container.dataset.count = String(dirs.length);
    $('#latency-sub').textContent = 'work time per stage, ' + quantile + ' stacked · last ' + st.windowSeconds + ' s, ' +
      st.stepSeconds + ' s per bar';
    for (const d of dirs) {
      const stages = st.stages.filter(x => x.direction === d).sort((a, b) => byStage(a.stage, b.stage));
      drawStageChart(blocks[d], d, stages, st);
    }
  }

  function drawStageChart(b, dir, stages, st) {
    const flows = stages.reduce((m, x) => Math.max(m, x.count), 0);
    b.sub.textContent = DIRECTION_HELP[dir] ? DIRECTION_HELP[dir] + ' · ' + fmtNum(flows, 0) + ' in the last minute' : '';
    const svg = b.svg;
    const box = svg.getBoundingClientRect();
    const W = Math.round(box.width) || 600, H = Math.round(box.height) || 230;
    const m = { l: 62, r: 8, t: 10, b: 24 };
    const pw = W - m.l - m.r, ph = H - m.t - m.b;
    svg.setAttribute('viewBox', '0 0 ' + W + ' ' + H);
    svg.dataset.stages = stages.map(x => x.stage).join(' ');
    const key = quantile === 'p99' ? 'p99Micros' : 'p50Micros';
    const n = stages.length ? stages[0].series.count.length : 0;
    const totals = [];
    let ymax = 0;
    for (let i = 0; i < n; i++) {
      let t = 0;
      for (const x of stages) if (x.series.count[i] > 0) t += x.series[key][i];
      totals.push(t);
      ymax = Math.max(ymax, t);
    }
    const step = niceStep(ymax, 4);
    const top = Math.max(step, Math.ceil(ymax / step) * step);
    const y = v => m.t + ph - (v / top) * ph;

    const parts = [];
    const grid = s('g', { class: 'grid' }), axis = s('g', { class: 'axis' });
    for (let v = 0; v <= top + step / 2; v += step) {
      const yy = Math.round(y(v)) + 0.5;
      grid.append(s('line', { x1: m.l, x2: W - m.r, y1: yy, y2: yy }));
      axis.append(s('text', { x: m.l - 8, y: yy + 4, 'text-anchor': 'end', text: fmtTick(v) }));
    }
    const slot = pw / Math.max(n, 1);
    const barW = Math.max(1, slot - Math.max(1, Math.min(4, slot * 0.22)));
    for (let i = 0; i < n; i++) {
      const ago = (n - 1 - i) * st.stepSeconds;
      if (ago % 15 === 0) {
        axis.append(s('text', {
          x: m.l + i * slot + slot / 2, y: H - 6, 'text-anchor': ago === 0 ? 'end' : 'middle',
          text: ago === 0 ? 'now' : '−' + ago + ' s',
        }));
      }
    }
    parts.push(grid, axis);
    const bars = s('g', { class: 'bars' });
    for (let i = 0; i < n; i++) {
      if (totals[i] <= 0) continue;
      const ago = (n - 1 - i) * st.stepSeconds;
      const x = m.l + i * slot + (slot - barW) / 2;
      const col = s('g', { class: 'col', 'data-index': i });
      const lines = [(ago === 0 ? 'this second' : ago + ' s ago') + ' · ' + quantile + ' per stage'];
      let acc = 0;
      const rects = [];
      for (const st2 of stages) {
        const c = st2.series.count[i];
        if (!(c > 0)) continue;
        const v = st2.series[key][i];
        const y0 = y(acc), y1 = y(acc + v);
        acc += v;
        lines.push(st2.stage + ': ' + fmtUS(v) + ' (' + c + (c === 1 ? ' flow)' : ' flows)'));
        rects.push(s('rect', {
          class: 'bar', x: x.toFixed(2), y: y1.toFixed(2), width: barW.toFixed(2),
          height: Math.max(0.75, y0 - y1).toFixed(2), fill: color(st2.stage),
          'data-stage': st2.stage, 'data-value': v.toFixed(1),
        }));
      }
      col.append(s('rect', { class: 'hit', x: m.l + i * slot, y: m.t, width: slot, height: ph }), title(lines.join('\n')), ...rects);
      bars.append(col);
    }
    parts.push(bars);
    parts.push(s('line', { x1: m.l, x2: W - m.r, y1: m.t + ph + 0.5, y2: m.t + ph + 0.5, stroke: '#c9d1dc' }));
    svg.replaceChildren(...parts);

    const rows = stages.map(x => h('tr', { 'data-stage': x.stage, title: STAGE_HELP[x.stage] || '' },
      h('td', null, h('i', { class: 'swatch', 'data-color': color(x.stage) }), h('span', { class: 'stage-name', text: x.stage })),
      h('td', { text: fmtUS(x.p50Micros) }), h('td', { text: fmtUS(x.p99Micros) }),
      h('td', { text: fmtUS(x.meanMicros) }), h('td', { text: fmtUS(x.maxMicros) }),
      h('td', { text: fmtNum(x.count, 0) })));
    const sumP50 = stages.reduce((a, x) => a + x.p50Micros, 0), sumP99 = stages.reduce((a, x) => a + x.p99Micros, 0);
    rows.push(h('tr', { class: 'total' }, h('td', { text: 'all stages (sum)' }), h('td', { text: fmtUS(sumP50) }),
      h('td', { text: fmtUS(sumP99) }), h('td', { text: '' }), h('td', { text: '' }), h('td', { text: '' })));
    b.legend.replaceChildren(
      h('thead', null, h('tr', null, h('th', { text: 'stage' }), h('th', { text: 'p50' }), h('th', { text: 'p99' }),
        h('th', { text: 'mean' }), h('th', { text: 'max' }), h('th', { text: 'flows' }))),
      h('tbody', null, rows));
    for (const sw of b.legend.querySelectorAll('.swatch')) sw.style.background = sw.dataset.color;
  }

  // ---- snapshot, process, pipeline ---------------------------------------------------------------

  function renderFacts(st) {
    const sn = st.snapshot, p = st.process;
    const nodeName = $('#node-name');
    nodeName.replaceChildren();
    if (sn.node) nodeName.append('node ', h('b', { text: sn.node }));
    document.title = 'ztgo · ' + (sn.node || 'admin');

    const snap = $('#snapshot');
    setField(snap, 'node', sn.node || '–');
    setField(snap, 'snapshotVersion', '#' + sn.snapshotVersion);
    setField(snap, 'age', sn.built && !sn.built.startsWith('0001') ? fmtAgo(sn.ageSeconds) : '–');
    const wl = h('span', { text: fmtNum(sn.workloads, 0) });
    wl.append(h('span', { class: 'muted', text: ' · ' + fmtNum(sn.localWorkloads, 0) + ' on this node' }));
    setField(snap, 'workloads', wl);
    setField(snap, 'services', fmtNum(sn.services, 0));
    setField(snap, 'policies', fmtNum(sn.policies, 0));
    const certs = h('span', { text: fmtNum(sn.certificates, 0) });
    const states = Object.entries(sn.certificateStates).sort().map(([k, v]) => v + ' ' + k).join(', ');
    if (states) certs.append(h('span', { class: 'muted', text: ' · ' + states }));
    setField(snap, 'certificates', certs);
    setField(snap, 'version', sn.version || '–');
    setField(snap, 'uptime', fmtDuration(p.uptimeSeconds));
    setField(snap, 'cpu', st.rateSeconds > 0 ? fmtNum(p.cpuPercent) + ' %' : '–');
    setField(snap, 'rss', fmtBytes(p.residentBytes));
    setField(snap, 'goroutines', fmtNum(p.goroutines, 0));

    const pl = st.pipeline;
    const stages = [...new Set([...Object.keys(pl.mailboxDepth), ...Object.keys(pl.backpressureTotal)])].sort(byStage);
    $('#pipeline-table tbody').replaceChildren(...stages.map(stg => h('tr', { 'data-stage': stg },
      h('td', null, chip(stg)),
      h('td', { class: 'num', text: fmtNum(pl.mailboxDepth[stg] || 0, 0) }),
      h('td', { class: 'num', text: st.rateSeconds > 0 ? fmtNum(pl.backpressurePerSec[stg] || 0) : '–' }),
      h('td', { class: 'num', text: fmtNum(pl.rejectedTotal[stg] || 0, 0) }))));
    const pipe = $('#pipeline');
    setField(pipe, 'relayBuffers', fmtNum(p.relayBuffersInUse, 0));
    setField(pipe, 'rxTotal', fmtBytes(st.throughput.receivedBytesTotal));
    setField(pipe, 'txTotal', fmtBytes(st.throughput.sentBytesTotal));
  }

  function chip(stage) {
    const i = h('i');
    i.style.background = color(stage);
    return h('span', { class: 'chip' }, i, stage);
  }

  // ---- waterfall and failures -----------------------------------------------------------------------

  const NEUTRAL = '#7b8594';

  function ensureHatch(stage, c) {
    const id = 'hatch-' + stage.replace(/[^a-z0-9_-]/gi, '_');
    if (document.getElementById(id)) return id;
    let defs = $('#dashboard-defs defs');
    if (!defs) {
      const holder = s('svg', { id: 'dashboard-defs', width: 0, height: 0, 'aria-hidden': 'true' });
      holder.style.position = 'absolute';
      defs = s('defs');
      holder.append(defs);
      document.body.prepend(holder);
    }
    c = c || color(stage);
    defs.append(s('pattern', { id, width: 5, height: 5, patternUnits: 'userSpaceOnUse', patternTransform: 'rotate(45)' },
      s('rect', { width: 5, height: 5, fill: c, 'fill-opacity': 0.22 }),
      s('line', { x1: 0, y1: 0, x2: 0, y2: 5, stroke: c, 'stroke-width': 2.2 })));
    return id;
  }

  function flowEnd(f) {
    let end = f.totalMicros;
    for (const sp of f.stages || []) end = Math.max(end, sp.offsetMicros + sp.queueMicros + sp.workMicros);
    return end;
  }

  function who(f) {
    const src = f.srcIdentity ? shortID(f.srcIdentity) : f.src;
    const dst = f.dstIdentity ? shortID(f.dstIdentity) : f.dst;
    return [src, dst];
  }

  function renderWaterfall(fl) {
    const flows = (fl.slowestLastMinute || []).slice(0, 10);
    const wf = $('#waterfall');
    $('#waterfall-empty').hidden = flows.length > 0;
    const seen = new Set();
    for (const f of flows) for (const sp of f.stages || []) seen.add(sp.stage);
    const key = $('#waterfall-key');
    const stages = [...seen].sort(byStage);
    const hatch = ensureHatch('-key', NEUTRAL);
    key.replaceChildren(...stages.map(chip),
      h('span', { class: 'k' }, s('svg', { viewBox: '0 0 22 10' }, s('rect', { width: 22, height: 10, fill: 'url(#' + hatch + ')' })), 'queued'),
      h('span', { class: 'k' }, s('svg', { viewBox: '0 0 22 10' }, s('rect', { width: 22, height: 10, rx: 1.5, fill: NEUTRAL })), 'working'));
    if (flows.length === 0) { wf.replaceChildren(); return; }

    const max = Math.max(1, ...flows.map(flowEnd));
    const step = niceStep(max, 5);
    const top = Math.max(step, Math.ceil(max / step) * step);
    const pct = v => (100 * v / top);
    const ticks = [];
    for (let v = 0; v <= top + step / 2; v += step) ticks.push(v);

    const axisSvg = s('svg', null, ...ticks.map((v, i) => s('text', {
      x: pct(v) + '%', y: 15, 'text-anchor': i === 0 ? 'start' : i === ticks.length - 1 ? 'end' : 'middle', text: fmtTick(v),
    })));
    const rows = [h('div', { class: 'wf-axis' }, h('div', { class: 'muted', text: 'source → destination' }), axisSvg,
      h('div', { class: 'muted', text: 'outcome · total' }))];
    const now = Date.now();
    for (const f of flows) {
      const [src, dst] = who(f);
      const bars = s('svg', { preserveAspectRatio: 'none' },
        ...ticks.map(v => s('line', { class: 'gridline', x1: pct(v) + '%', x2: pct(v) + '%', y1: 0, y2: 22 })));
      for (const sp of f.stages || []) {
        const hid = ensureHatch(sp.stage);
        const tip = sp.stage + ': queued ' + fmtUS(sp.queueMicros) + ', worked ' + fmtUS(sp.workMicros) +
          ' (from ' + fmtUS(sp.offsetMicros) + ')';
        const qw = pct(sp.queueMicros), ww = Math.max(0.35, pct(sp.workMicros));
        if (sp.queueMicros > 0) {
          bars.append(s('rect', {
            x: pct(sp.offsetMicros) + '%', y: 4, width: Math.max(0.2, qw) + '%', height: 14,
            fill: 'url(#' + hid + ')', 'data-stage': sp.stage, 'data-kind': 'queue',
          }, title(tip)));
        }
        bars.append(s('rect', {
          x: pct(sp.offsetMicros + sp.queueMicros) + '%', y: 4, width: ww + '%', height: 14, rx: 1.5,
          fill: color(sp.stage), 'data-stage': sp.stage, 'data-kind': 'work',
        }, title(tip)));
      }
      const ok = f.outcome === 'established';
      const started = Date.parse(f.start);
      const ids = h('div', { class: 'ids', title: (f.srcIdentity || f.src) + ' → ' + (f.dstIdentity || f.dst) },
        src, h('span', { class: 'arrow', text: '→' }), dst);
      const meta = h('div', { class: 'meta' }, h('span', { class: 'dirtag', text: f.direction === 'outbound' ? 'out' : 'in' }),
        f.src + ' → ' + f.dst + (isFinite(started) ? ' · ' + fmtAgo((now - started) / 1000) : ''));
      rows.push(h('div', { class: 'wf-row', 'data-flow-id': f.id, 'data-outcome': f.outcome || 'failed' },
        h('div', { class: 'wf-who' }, ids, meta),
        h('div', { class: 'wf-bars' }, bars),
        h('div', { class: 'wf-end' }, h('span', { class: ok ? 'badge' : 'badge bad', text: ok ? 'established' : (f.outcome || 'failed') }),
          h('span', { class: 'total', text: fmtUS(f.totalMicros) }))));
    }
    wf.replaceChildren(...rows);
  }

  function renderFailures(fl) {
    const fails = (fl.failures || []).slice(0, 8);
    $('#failures-empty').hidden = fails.length > 0;
    $('#failures-table').hidden = fails.length === 0;
    $('#failures-sub').textContent = fails.length ? 'latest ' + fails.length : '';
    const now = Date.now();
    $('#failures-table tbody').replaceChildren(...fails.map(f => {
      const [src, dst] = who(f);
      const stages = f.stages || [];
      const last = stages.length ? stages[stages.length - 1].stage : '';
      const started = Date.parse(f.start);
      return h('tr', { 'data-flow-id': f.id, 'data-flags': f.outcome || 'failed' },
        h('td', { text: isFinite(started) ? fmtAgo((now - started) / 1000) : '–' }),
        h('td', { text: f.direction }),
        h('td', { class: 'ids', title: (f.srcIdentity || f.src) + ' → ' + (f.dstIdentity || f.dst) + '\n' + f.src + ' → ' + f.dst, text: src + ' → ' + dst }),
        h('td', null, h('span', { class: 'badge bad', text: f.outcome || 'failed' })),
        h('td', null, last ? chip(last) : '–'),
        h('td', { class: 'num', text: fmtUS(f.totalMicros) }));
    }));
  }

  // ---- polling ----------------------------------------------------------------------------------------

  function renderError(where, err) {
    document.body.dataset.renderError = where + ': ' + (err && err.message || err);
    console.error('dashboard: rendering ' + where + ' failed', err);
  }

  function setLive(ok) {
    const live = $('#live');
    if (ok) lastOK = Date.now();
    const stale = Date.now() - lastOK > 5000;
    live.dataset.state = ok ? 'live' : stale ? 'error' : live.dataset.state;
    $('#live-text').textContent = ok
      ? 'live · ' + new Date(lastOK).toLocaleTimeString('en-GB', { hour12: false })
      : stale ? 'no answer from the node · retrying' : $('#live-text').textContent;
  }

  async function getJSON(url) {
    const r = await fetch(url, { cache: 'no-store' });
    if (!r.ok) throw new Error(url + ': HTTP ' + r.status);
    return r.json();
  }

  function renderAllStats(st) {
    try {
      renderKPIs(st);
      renderStageCharts(st);
      renderFacts(st);
      $('#footer-time').textContent = 'window ends ' + new Date(st.windowEnd).toLocaleTimeString('en-GB', { hour12: false });
      document.body.dataset.statsRenders = String(++statsRenders);
    } catch (err) {
      renderError('stats', err);
    }
  }

  function renderAllFlows(fl) {
    try {
      renderWaterfall(fl);
      renderFailures(fl);
      document.body.dataset.flowsRenders = String(++flowsRenders);
    } catch (err) {
      renderError('flows', err);
    }
  }

  async function pollStats() {
    try {
      lastStats = await getJSON('/debug/stats?step=1');
      setLive(true);
      renderAllStats(lastStats);
    } catch (err) {
      setLive(false);
    }
    setTimeout(pollStats, STATS_EVERY);
  }

  async function pollFlows() {
    try {
      lastFlows = await getJSON('/debug/flows?recent=0');
      renderAllFlows(lastFlows);
    } catch (err) {
      setLive(false);
    }
    setTimeout(pollFlows, FLOWS_EVERY);
  }

  function init() {
    for (const btn of document.querySelectorAll('#quantile-toggle button')) {
      btn.addEventListener('click', () => {
        quantile = btn.dataset.q;
        for (const b of document.querySelectorAll('#quantile-toggle button')) b.classList.toggle('on', b === btn);
        if (lastStats) renderAllStats(lastStats);
      });
    }
    let resizeTimer = 0;
    window.addEventListener('resize', () => {
      clearTimeout(resizeTimer);
      resizeTimer = setTimeout(() => {
        if (lastStats) renderAllStats(lastStats);
        if (lastFlows) renderAllFlows(lastFlows);
      }, 100);
    });
    pollStats();
    pollFlows();
  }

  init();
})();
