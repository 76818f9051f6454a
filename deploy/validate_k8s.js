#!/usr/bin/env node
// Offline checks of rendered lmps Kubernetes manifests (the output of
// `kubectl kustomize`), used by tests/deploy_test.sh.
//
//   node validate_k8s.js [--gpu] [--prometheus_out=DIR] rendered.yaml
//
// 1. Every document validates against the Kubernetes OpenAPI schema
//    (npm kubernetes-models; note it does not reject unknown fields).
// 2. lmps's own rules: resources requests and limits on every container,
//    readiness and liveness probes (gRPC health for the scheduler and the
//    servers), non-root pods, Prometheus annotations pointing at a declared
//    port, Services selecting pods and naming their ports, ConfigMaps that
//    exist, `$(VAR)` references that are defined, the daemons' flags, the
//    job spec's layout matching the replicas (and a --backup server
//    StatefulSet exactly when layout.shard_backups is 1), and for --gpu an
//    nvidia.com/gpu limit with --backend=cuda (without --gpu: none, cpu);
//    a NetworkPolicy isolating every lmps pod, its gRPC ports reachable
//    only from the job's own pods and its metrics port from Prometheus.
// 3. With --prometheus_out, writes the prometheus-config ConfigMap's files
//    there for promtool, with kubernetes_sd_configs replaced by a static
//    target (Debian's Prometheus is built without Kubernetes discovery) and
//    rule_files pointing into DIR.
//
// Exits 1 listing every problem found, 0 with a summary otherwise.
'use strict';

const fs = require('fs');
const path = require('path');
const YAML = require('yaml');

const args = process.argv.slice(2);
const gpu = args.includes('--gpu');
const promOutArg = args.find((a) => a.startsWith('--prometheus_out='));
const promOut = promOutArg ? promOutArg.split('=')[1] : '';
const files = args.filter((a) => !a.startsWith('--'));
if (files.length !== 1) {
  console.error('usage: validate_k8s.js [--gpu] [--prometheus_out=DIR] rendered.yaml');
  process.exit(2);
}

const problems = [];
const problem = (where, msg) => problems.push(`${where}: ${msg}`);

// --- parse ---------------------------------------------------------------------
const text = fs.readFileSync(files[0], 'utf8');
const docs = [];
for (const d of YAML.parseAllDocuments(text)) {
  if (d.errors.length) {
    for (const e of d.errors) problem('yaml', e.message);
    continue;
  }
  const obj = d.toJS();
  if (obj !== null) docs.push(obj);
}
if (docs.length === 0) problem('yaml', 'no documents');
const nameOf = (o) => `${o.kind}/${o.metadata && o.metadata.name}`;

// --- 1. schemas ------------------------------------------------------------------
function modelFor(apiVersion, kind) {
  const group = apiVersion.includes('/') ? apiVersion : apiVersion; // "v1", "apps/v1"
  let mod;
  try {
    mod = require(`kubernetes-models/${group}`);
  } catch (e) {
    return null;
  }
  return mod[kind] || null;
}
for (const o of docs) {
  if (!o.apiVersion || !o.kind) {
    problem(JSON.stringify(o).slice(0, 60), 'missing apiVersion or kind');
    continue;
  }
  const Model = modelFor(o.apiVersion, o.kind);
  if (!Model) {
    problem(nameOf(o), `no schema for ${o.apiVersion} ${o.kind}`);
    continue;
  }
  try {
    new Model(o).validate();
  } catch (e) {
    problem(nameOf(o), `schema: ${e.message}`);
  }
}

// --- 2. lmps rules ------------------------------------------------------------------
const byKind = (k) => docs.filter((o) => o.kind === k);
const workloads = [...byKind('Deployment'), ...byKind('StatefulSet')];
const configMaps = byKind('ConfigMap');
const services = byKind('Service');
const component = (o) =>
  (o.spec.template.metadata.labels || {})['app.kubernetes.io/component'];
const flagsOf = (c) => [...(c.command || []), ...(c.args || [])];
const hasFlag = (c, prefix) => flagsOf(c).some((a) => a.includes(prefix));

for (const w of workloads) {
  const where = nameOf(w);
  const pod = w.spec.template.spec || {};
  const sc = pod.securityContext || {};
  if (sc.runAsNonRoot !== true) problem(where, 'pod securityContext.runAsNonRoot is not true');
  if (!w.spec.selector || !w.spec.selector.matchLabels) {
    problem(where, 'no selector.matchLabels');
  } else {
    for (const [k, v] of Object.entries(w.spec.selector.matchLabels)) {
      if ((w.spec.template.metadata.labels || {})[k] !== v) {
        problem(where, `selector ${k}=${v} does not match the pod template's labels`);
      }
    }
  }
  const all = [...(pod.initContainers || []), ...(pod.containers || [])];
  for (const c of all) {
    const cw = `${where} container ${c.name}`;
    const r = c.resources || {};
    for (const kind of ['requests', 'limits']) {
      for (const res of ['cpu', 'memory']) {
        if (!r[kind] || r[kind][res] === undefined) problem(cw, `no resources.${kind}.${res}`);
      }
    }
    if (!c.image) problem(cw, 'no image');
    const csc = c.securityContext || {};
    if (csc.allowPrivilegeEscalation !== false) problem(cw, 'allowPrivilegeEscalation is not false');
    // $(VAR) in command/args must be defined in env.
    const env = new Set((c.env || []).map((e) => e.name));
    for (const a of flagsOf(c)) {
      for (const m of a.matchAll(/\$\(([A-Za-z_][A-Za-z0-9_]*)\)/g)) {
        if (!env.has(m[1])) problem(cw, `${a} refers to undefined env ${m[1]}`);
      }
    }
    // Mounted ConfigMaps exist in this rendering.
    for (const vm of c.volumeMounts || []) {
      const vol = (pod.volumes || []).find((v) => v.name === vm.name);
      const isClaim = (w.spec.volumeClaimTemplates || []).some((t) => t.metadata.name === vm.name);
      if (!vol && !isClaim) problem(cw, `mounts undefined volume ${vm.name}`);
      if (vol && vol.configMap && !configMaps.some((m) => m.metadata.name === vol.configMap.name)) {
        problem(cw, `volume ${vol.name} uses missing ConfigMap ${vol.configMap.name}`);
      }
    }
  }
  const main = pod.containers || [];
  if (main.length !== 1) problem(where, `expected one container, found ${main.length}`);
  for (const c of main) {
    const cw = `${where} container ${c.name}`;
    for (const p of ['readinessProbe', 'livenessProbe']) {
      if (!c[p]) problem(cw, `no ${p}`);
    }
    const ports = new Map((c.ports || []).map((p) => [p.name, p.containerPort]));
    // gRPC health for the daemons that serve gRPC; with TLS (kubelet's gRPC
    // probes cannot speak it) a TCP probe of the gRPC port instead.
    if (['scheduler', 'server'].includes(component(w))) {
      const tls = (c.args || []).some((a) => a.startsWith('--tls_ca='));
      for (const p of ['readinessProbe', 'livenessProbe', 'startupProbe']) {
        if (!c[p]) continue;
        const kind = tls ? 'tcpSocket' : 'grpc';
        if (!c[p][kind]) {
          problem(cw, `${p} is not a ${tls ? 'TCP probe (TLS is on)' : 'gRPC health probe'}`);
        } else if (c[p][kind].port !== ports.get('grpc')) {
          problem(cw, `${p} checks port ${c[p][kind].port}, not the grpc port ${ports.get('grpc')}`);
        }
      }
      if (tls && !(c.volumeMounts || []).some((m) => m.mountPath === '/etc/lmps/tls')) {
        problem(cw, 'TLS flags but no certificates mounted at /etc/lmps/tls');
      }
    }
    // Prometheus annotations.
    const ann = w.spec.template.metadata.annotations || {};
    if (ann['prometheus.io/scrape'] !== 'true') problem(where, 'no prometheus.io/scrape: "true"');
    const mport = Number(ann['prometheus.io/port']);
    if (![...ports.values()].includes(mport)) {
      problem(where, `prometheus.io/port ${ann['prometheus.io/port']} is not a container port`);
    }
    if (!hasFlag(c, `--metrics_listen=0.0.0.0:${mport}`)) {
      problem(cw, `no --metrics_listen=0.0.0.0:${mport}`);
    }
    // The daemons' flags.
    const need = {
      scheduler: ['--job=/etc/lmps/job.textproto', '--listen=0.0.0.0:7070'],
      server: ['--scheduler=lmps-scheduler:7070', '--listen=0.0.0.0:7071',
        '--advertise_host=$(POD_NAME).lmps-server', '--shard=', '--checkpoint_dir=/ckpt'],
      worker: ['--scheduler=lmps-scheduler:7070', '--data=/data/', '--backend='],
    }[component(w)];
    if (!need) problem(where, `unknown component ${component(w)}`);
    for (const f of need || []) if (!hasFlag(c, f)) problem(cw, `missing flag ${f}`);
    // GPU or not.
    if (component(w) === 'worker') {
      const gpus = ((c.resources || {}).limits || {})['nvidia.com/gpu'];
      const backend = flagsOf(c).find((a) => a.startsWith('--backend='));
      if (gpu) {
        if (!(Number(gpus) >= 1)) problem(cw, 'gpu overlay: no nvidia.com/gpu limit');
        if (!/^--backend=cuda(:\d+)?$/.test(backend || '')) problem(cw, `gpu overlay: ${backend}`);
      } else {
        if (gpus !== undefined) problem(cw, 'cpu rendering requests nvidia.com/gpu');
        if (backend !== '--backend=cpu') problem(cw, `cpu rendering: ${backend}`);
      }
    }
  }
}

// The StatefulSet's checkpoints and DNS.
for (const s of byKind('StatefulSet')) {
  const where = nameOf(s);
  const ckpt = (s.spec.volumeClaimTemplates || []).find((t) => t.metadata.name === 'ckpt');
  const mounted = (s.spec.template.spec.containers[0].volumeMounts || [])
    .some((m) => m.name === 'ckpt' && m.mountPath === '/ckpt');
  if (!ckpt || !mounted) problem(where, 'no ckpt volumeClaimTemplate mounted at /ckpt');
  const svc = services.find((x) => x.metadata.name === s.spec.serviceName);
  if (!svc) problem(where, `serviceName ${s.spec.serviceName} has no Service`);
  else if (svc.spec.clusterIP !== 'None') problem(where, `Service ${svc.metadata.name} is not headless`);
}

// Services select pods and name their ports.
for (const svc of services) {
  const where = nameOf(svc);
  const sel = svc.spec.selector || {};
  const targets = workloads.filter((w) =>
    Object.entries(sel).every(([k, v]) => (w.spec.template.metadata.labels || {})[k] === v));
  if (targets.length === 0) {
    problem(where, 'selects no pods');
    continue;
  }
  for (const p of svc.spec.ports || []) {
    if (typeof p.targetPort !== 'string') continue;
    for (const w of targets) {
      const ok = w.spec.template.spec.containers.some((c) =>
        (c.ports || []).some((cp) => cp.name === p.targetPort));
      if (!ok) problem(where, `targetPort ${p.targetPort} is not a port of ${nameOf(w)}`);
    }
  }
}
const scheduler = services.find((s) => s.metadata.name === 'lmps-scheduler');
if (!scheduler || !(scheduler.spec.ports || []).some((p) => p.port === 7070)) {
  problem('Service/lmps-scheduler', 'missing, or no port 7070');
}
if (!scheduler || !(scheduler.spec.ports || []).some((p) => p.port === 9090)) {
  problem('Service/lmps-scheduler', 'no metrics port 9090');
}

// One namespace for every namespaced object: Service names, the scheduler's
// address and the NetworkPolicy only work within it.
const namespaces = new Map();
for (const o of docs) {
  if (o.kind === 'Namespace') continue;
  const ns = (o.metadata && o.metadata.namespace) || '(none)';
  namespaces.set(ns, [...(namespaces.get(ns) || []), nameOf(o)]);
}
if (namespaces.size > 1) {
  problem('rendering', 'objects in more than one namespace: ' +
    [...namespaces].map(([ns, objs]) => `${ns}: ${objs.join(', ')}`).join('; '));
}

// NetworkPolicy: every lmps pod is isolated for ingress by a policy; its
// gRPC ports (every container port but `metrics`) are reachable only from
// the job's own pods (a podSelector requiring app.kubernetes.io/name=lmps,
// no namespaceSelector, no ipBlock), its metrics port only from Prometheus
// (pods labelled app.kubernetes.io/name=prometheus, any namespace) and from
// them at least. Policies are additive, so every rule of every policy that
// selects the pod and covers the port counts.
const netpols = byKind('NetworkPolicy');
if (netpols.length === 0) problem('rendering', 'no NetworkPolicy (networking.k8s.io/v1): every port is open to every source');
const selects = (sel, labels) => {
  if (!sel) return true; // an absent or empty podSelector selects every pod
  for (const [k, v] of Object.entries(sel.matchLabels || {})) if (labels[k] !== v) return false;
  for (const e of sel.matchExpressions || []) {
    const has = Object.prototype.hasOwnProperty.call(labels, e.key);
    const vals = e.values || [];
    if (e.operator === 'In' && !(has && vals.includes(labels[e.key]))) return false;
    if (e.operator === 'NotIn' && has && vals.includes(labels[e.key])) return false;
    if (e.operator === 'Exists' && !has) return false;
    if (e.operator === 'DoesNotExist' && has) return false;
  }
  return true;
};
// Does the selector admit only pods labelled k=v?
const requires = (sel, k, v) => !!sel && ((sel.matchLabels || {})[k] === v ||
  (sel.matchExpressions || []).some((e) => e.key === k && e.operator === 'In' &&
    (e.values || []).length > 0 && e.values.every((x) => x === v)));
const ingressPolicy = (p) => !p.spec.policyTypes || p.spec.policyTypes.includes('Ingress');
// Does an ingress rule cover a container port? (No ports: every port.)
const covers = (rule, cp) => !rule.ports || rule.ports.length === 0 || rule.ports.some((np) => {
  if ((np.protocol || 'TCP') !== (cp.protocol || 'TCP')) return false;
  if (np.port === undefined) return true;
  if (typeof np.port === 'string') return np.port === cp.name;
  return cp.containerPort >= np.port && cp.containerPort <= (np.endPort ?? np.port);
});
const jobPeer = (peer) => !peer.ipBlock && !peer.namespaceSelector &&
  requires(peer.podSelector, 'app.kubernetes.io/name', 'lmps');
const promPeer = (peer) => !peer.ipBlock && requires(peer.podSelector, 'app.kubernetes.io/name', 'prometheus');
for (const w of workloads) {
  const where = nameOf(w);
  const labels = w.spec.template.metadata.labels || {};
  const pols = netpols.filter((p) => (p.metadata.namespace || '') === (w.metadata.namespace || '') &&
    ingressPolicy(p) && selects(p.spec.podSelector, labels));
  if (pols.length === 0) {
    problem(where, 'its pods are selected by no NetworkPolicy for Ingress: every port is open to every source');
    continue;
  }
  for (const c of w.spec.template.spec.containers || []) {
    for (const cp of c.ports || []) {
      const metrics = cp.name === 'metrics';
      const what = `${metrics ? 'metrics' : 'gRPC'} port ${cp.name} (${cp.containerPort})`;
      const allowed = metrics ? promPeer : jobPeer;
      const who = metrics ? 'only Prometheus (app.kubernetes.io/name=prometheus)'
        : "only the job's own pods (podSelector app.kubernetes.io/name=lmps)";
      let fromProm = false;
      for (const p of pols) {
        for (const r of p.spec.ingress || []) {
          if (!covers(r, cp)) continue;
          const by = `NetworkPolicy/${p.metadata.name}`;
          if (!r.from || r.from.length === 0) {
            problem(where, `${what} is open to every source (${by} has an ingress rule without from); ${who} may reach it`);
            continue;
          }
          for (const peer of r.from) {
            if (!allowed(peer)) problem(where, `${what} is open to ${JSON.stringify(peer)} (${by}); ${who} may reach it`);
            if (promPeer(peer)) fromProm = true;
          }
        }
      }
      if (metrics && !fromProm) {
        problem(where, `${what} is not reachable by Prometheus: no NetworkPolicy ingress rule from app.kubernetes.io/name=prometheus pods covers it`);
      }
    }
  }
}

// The job spec: present, and its layout matches the replicas.
const job = configMaps.find((m) => (m.data || {})['job.textproto'] !== undefined);
if (!job) {
  problem('ConfigMap lmps-job', 'no ConfigMap with job.textproto');
} else {
  const spec = job.data['job.textproto'].replace(/#.*$/gm, '');
  const num = (re) => { const m = spec.match(re); return m ? Number(m[1]) : 1; };
  const dp = num(/\bdp\s*:\s*(\d+)/);
  const pp = num(/\bpp\s*:\s*(\d+)/);
  const tp = num(/\btp\s*:\s*(\d+)/);
  const shards = num(/\bnum_shards\s*:\s*(\d+)/);
  const worker = workloads.find((w) => component(w) === 'worker');
  const server = workloads.find((w) => component(w) === 'server');
  if (worker && (worker.spec.replicas ?? 1) !== dp * pp * tp) {
    problem(nameOf(worker), `replicas ${worker.spec.replicas} != layout.dp x pp x tp ` +
            `(${dp} x ${pp} x ${tp}) in job.textproto`);
  }
  if (server && (server.spec.replicas ?? 1) !== shards) {
    problem(nameOf(server), `replicas ${server.spec.replicas} != layout.num_shards ${shards}`);
  }
  // Shard replication: one backup StatefulSet (--backup) of num_shards
  // replicas, advertising its own headless Service's names; none without.
  const backupsWanted = /\bshard_backups\s*:\s*1\b/.test(spec);
  const backupSets = workloads.filter((w) => component(w) === 'server' &&
    hasFlag(w.spec.template.spec.containers[0], '--backup'));
  if (backupsWanted && backupSets.length !== 1) {
    problem('rendering', `layout.shard_backups: 1 needs one server StatefulSet with --backup, found ${backupSets.length}`);
  }
  if (!backupsWanted && backupSets.length > 0) {
    problem('rendering', '--backup servers but layout.shard_backups is not 1');
  }
  for (const b of backupSets) {
    if ((b.spec.replicas ?? 1) !== shards) {
      problem(nameOf(b), `replicas ${b.spec.replicas} != layout.num_shards ${shards}`);
    }
    if (!hasFlag(b.spec.template.spec.containers[0], `.${b.spec.serviceName}`) ||
        b.spec.serviceName === server?.spec.serviceName) {
      problem(nameOf(b), 'backups must advertise their own headless Service');
    }
  }
  for (const c of ['scheduler', 'server', 'worker']) {
    if (!workloads.some((w) => component(w) === c)) problem('rendering', `no ${c} workload`);
  }
}

// --- 3. Prometheus config --------------------------------------------------------------
const prom = configMaps.find((m) => m.metadata.name === 'prometheus-config');
if (!prom || !(prom.data || {})['prometheus.yml']) {
  problem('ConfigMap/prometheus-config', 'missing, or no prometheus.yml');
} else {
  const cfg = YAML.parse(prom.data['prometheus.yml']);
  const jobs = cfg.scrape_configs || [];
  const lmps = jobs.find((j) => j.job_name === 'lmps');
  if (!lmps) problem('prometheus.yml', 'no scrape job "lmps"');
  for (const j of jobs) {
    const sd = j.kubernetes_sd_configs;
    if (!sd || !sd.some((s) => s.role === 'pod')) {
      problem('prometheus.yml', `job ${j.job_name} has no kubernetes_sd_configs role: pod`);
    }
    if (promOut) {
      delete j.kubernetes_sd_configs;
      j.static_configs = [{ targets: ['127.0.0.1:9090'] }];
    }
  }
  if (promOut) {
    fs.mkdirSync(promOut, { recursive: true });
    for (const [name, body] of Object.entries(prom.data)) {
      if (name !== 'prometheus.yml') fs.writeFileSync(path.join(promOut, name), body);
    }
    cfg.rule_files = (cfg.rule_files || []).map((f) => path.join(promOut, path.basename(f)));
    for (const f of cfg.rule_files) {
      if (!fs.existsSync(f)) problem('prometheus.yml', `rule file ${path.basename(f)} is not in the ConfigMap`);
    }
    fs.writeFileSync(path.join(promOut, 'prometheus.yml'), YAML.stringify(cfg));
  }
}

if (problems.length) {
  console.error(`${files[0]}: ${problems.length} problem(s):`);
  for (const p of problems) console.error(`  ${p}`);
  process.exit(1);
}
const kinds = {};
for (const o of docs) kinds[o.kind] = (kinds[o.kind] || 0) + 1;
console.log(`${path.basename(files[0])}: ${docs.length} objects valid (` +
  Object.entries(kinds).map(([k, n]) => `${n} ${k}`).join(', ') + ')' + (gpu ? ' [gpu]' : ''));
