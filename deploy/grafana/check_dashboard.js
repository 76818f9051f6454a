#!/usr/bin/env node
// Checks deploy/grafana/lmps-dashboard.json (tests/deploy_test.sh):
//   node check_dashboard.js DASHBOARD.json [--rules_out=FILE]
// - it parses, has a uid/title, unique panel ids, panels inside the 24-column
//   grid that do not overlap, and a Prometheus query on every panel;
// - every metric the daemons export (METRICS below) is shown somewhere, and
//   every lmps_* name in a query is one of them (catches typos);
// - with --rules_out, writes every query as a recording rule (Grafana's
//   variables replaced) so `promtool check rules FILE` parses the PromQL.
// No dependencies beyond Node itself.
'use strict';

const fs = require('fs');

// The metric families the lmps daemons export (common/rpc/metrics.h users).
const METRICS = [
  'lmps_step', 'lmps_loss', 'lmps_eval_loss', 'lmps_tokens_per_second',
  'lmps_step_phase_seconds', 'lmps_rpc_total', 'lmps_rpc_received_bytes_total',
  'lmps_rpc_sent_bytes_total', 'lmps_rpc_duration_seconds', 'lmps_grad_norm',
  'lmps_parameter_version', 'lmps_server_memory_bytes', 'lmps_nodes_alive',
  'lmps_heartbeat_age_seconds', 'lmps_rejected_pushes_total',
];
const HISTOGRAMS = ['lmps_rpc_duration_seconds'];
const PHASES = ['compute', 'pull', 'push', 'wait'];

const args = process.argv.slice(2);
const file = args.find((a) => !a.startsWith('--'));
const rulesArg = args.find((a) => a.startsWith('--rules_out='));
if (!file) {
  console.error('usage: check_dashboard.js DASHBOARD.json [--rules_out=FILE]');
  process.exit(2);
}

const problems = [];
let dash;
try {
  dash = JSON.parse(fs.readFileSync(file, 'utf8'));
} catch (e) {
  console.error(`${file}: not JSON: ${e.message}`);
  process.exit(1);
}
if (!dash.uid || !dash.title) problems.push('no uid or title');
if (!Array.isArray(dash.panels) || dash.panels.length === 0) problems.push('no panels');

const panels = [];
for (const p of dash.panels || []) {
  panels.push(p);
  for (const q of p.panels || []) panels.push(q);  // collapsed rows
}
const ids = new Set();
const boxes = [];
const exprs = [];
for (const p of panels) {
  const where = `panel ${p.id} "${p.title}"`;
  if (ids.has(p.id)) problems.push(`${where}: duplicate id`);
  ids.add(p.id);
  const g = p.gridPos;
  if (!g || g.x < 0 || g.w <= 0 || g.h <= 0 || g.x + g.w > 24) {
    problems.push(`${where}: gridPos ${JSON.stringify(g)} outside the 24-column grid`);
  } else {
    for (const b of boxes) {
      if (g.x < b.x + b.w && b.x < g.x + g.w && g.y < b.y + b.h && b.y < g.y + g.h) {
        problems.push(`${where}: overlaps panel ${b.id}`);
      }
    }
    boxes.push({ ...g, id: p.id });
  }
  if (p.type === 'row') continue;
  if (!p.title) problems.push(`panel ${p.id}: no title`);
  if (!p.targets || p.targets.length === 0) problems.push(`${where}: no queries`);
  for (const t of p.targets || []) {
    if (!t.expr) problems.push(`${where}: target ${t.refId} has no expr`);
    else exprs.push({ where, expr: t.expr });
  }
}

const used = new Set();
for (const { where, expr } of exprs) {
  for (const m of expr.matchAll(/\blmps_[a-z0-9_]+/g)) {
    let name = m[0];
    const base = name.replace(/_(bucket|sum|count)$/, '');
    if (HISTOGRAMS.includes(base)) name = base;
    if (!METRICS.includes(name)) problems.push(`${where}: unknown metric ${m[0]} in ${expr}`);
    used.add(name);
  }
}
for (const m of METRICS) if (!used.has(m)) problems.push(`metric ${m} is on no panel`);
const phaseExprs = exprs.filter((e) => e.expr.includes('lmps_step_phase_seconds'));
if (!phaseExprs.some((e) => /by \(phase\)/.test(e.expr))) {
  problems.push(`no panel breaks the step time down by phase (${PHASES.join('/')})`);
}
if (!exprs.some((e) => e.expr.includes('histogram_quantile'))) {
  problems.push('no RPC latency quantile panel');
}

if (rulesArg && problems.length === 0) {
  const out = rulesArg.split('=')[1];
  const rules = exprs.map((e, i) => ({
    record: `lmps:dashboard_query_${i}`,
    expr: e.expr.replace(/\$__rate_interval|\$__interval|\$__range/g, '1m')
      .replace(/\$\{?[A-Za-z_]+\}?/g, '.*'),
  }));
  fs.writeFileSync(out, JSON.stringify({ groups: [{ name: 'dashboard', rules }] }, null, 1));
}

if (problems.length) {
  console.error(`${file}: ${problems.length} problem(s):`);
  for (const p of problems) console.error(`  ${p}`);
  process.exit(1);
}
console.log(`${file.split('/').pop()}: ${panels.length} panels, ${exprs.length} queries, ` +
  `all ${METRICS.length} metric families shown`);
