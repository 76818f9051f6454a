#!/usr/bin/env bash
# Checks the deployment material under deploy/ with real tools, offline
# after the first run:
#  1. `kubectl kustomize` renders k8s/base, overlays/cpu, overlays/gpu, overlays/tls, overlays/elastic and overlays/replicated;
#  2. deploy/validate_k8s.js validates every rendered object against the
#     Kubernetes schemas (npm kubernetes-models + yaml, installed once with
#     `npm ci` from deploy/package-lock.json into <repo>/.cache/deploy_test,
#     git-ignored) and lmps's own rules (limits, probes, GPU, flags, layout);
#     deliberately broken renderings must be rejected (among them
#     NetworkPolicies that are missing, leave a gRPC port open beyond the
#     job's pods or keep Prometheus from the metrics port);
#  3. the job spec parses as an lmps.JobSpec (protoc --encode);
#  4. the Prometheus config and alerts pass promtool (check config, check
#     rules, test rules), and so do the dashboard's queries;
#  5. the Grafana dashboard parses and shows every metric family;
#  6. the Dockerfiles run the binaries as a non-root user.
# Without kubectl the test is skipped (exit 0, with an LMPS_SKIP line that
# scripts/test.sh counts); without
# node/npm, or when npm cannot install, it fails saying so.
set -euo pipefail

fail() { echo "FAIL: $*" >&2; exit 1; }
note() { echo "deploy_test: $*"; }

# --- where things are -------------------------------------------------------------
runfiles="${TEST_SRCDIR:-}/${TEST_WORKSPACE:-lmps}"
[ -d "$runfiles/deploy" ] || runfiles="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
[ -f "$runfiles/deploy/validate_k8s.js" ] || fail "deploy/ not found (runfiles: $runfiles)"
if [ -n "${TEST_TMPDIR:-}" ]; then
  tmp="$TEST_TMPDIR"
else
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
fi

if ! command -v kubectl >/dev/null; then
  echo "LMPS_SKIP(environment): kubectl is not installed, so kustomize cannot render deploy/k8s" \
       "(install kubectl to run this test; scripts/install_deps.sh does not install it)"
  exit 0
fi
note "kubectl: $(kubectl version --client 2>/dev/null | head -1)"
command -v node >/dev/null || fail "node is not installed (apt-get install nodejs npm)"
command -v npm >/dev/null || fail "npm is not installed (apt-get install npm)"

# A real copy: kustomize refuses files reached through symlinks out of its root.
cp -rL "$runfiles/deploy" "$tmp/deploy"
deploy="$tmp/deploy"

# --- npm packages, cached in the source tree's .cache/ ------------------------------------
src_root="$(dirname "$(dirname "$(readlink -f "$runfiles/deploy/validate_k8s.js")")")"
if [ -f "$src_root/WORKSPACE" ] && [ -w "$src_root" ]; then
  cache_root="$src_root/.cache"
else
  cache_root="$tmp/.cache"
fi
cache="$cache_root/deploy_test"
mkdir -p "$cache"
[ -f "$cache_root/.gitignore" ] || echo '*' >"$cache_root/.gitignore"  # ignore itself too
want="$(sha256sum "$deploy/package-lock.json" | cut -d' ' -f1)"
(
  flock 9
  if [ "$(cat "$cache/.installed" 2>/dev/null)" != "$want" ] || [ ! -d "$cache/node_modules/kubernetes-models" ]; then
    note "installing kubernetes-models and yaml with npm ci into $cache (first run)"
    cp "$deploy/package.json" "$deploy/package-lock.json" "$cache/"
    if ! (cd "$cache" && npm_config_cache="$cache/npm-cache" timeout 240 \
          npm ci --no-audit --no-fund --ignore-scripts --loglevel=error >"$cache/npm.log" 2>&1); then
      tail -20 "$cache/npm.log" >&2
      fail "npm ci could not install kubernetes-models/yaml (is the npm registry reachable?)"
    fi
    echo "$want" >"$cache/.installed"
  fi
) 9>"$cache/.lock"
export NODE_PATH="$cache/node_modules"

# --- 1+2. render and validate -----------------------------------------------------------------
for variant in base overlays/cpu overlays/gpu overlays/tls overlays/elastic overlays/replicated; do
  out="$tmp/render-$(basename "$variant").yaml"
  kubectl kustomize "$deploy/k8s/$variant" >"$out" 2>"$tmp/kustomize.err" ||
    fail "kubectl kustomize deploy/k8s/$variant: $(cat "$tmp/kustomize.err")"
  flags=()
  [ "$variant" != overlays/gpu ] || flags+=(--gpu)
  [ "$variant" != overlays/cpu ] || flags+=(--prometheus_out="$tmp/prometheus")
  node "$deploy/validate_k8s.js" "${flags[@]}" "$out" || fail "deploy/k8s/$variant is invalid"
done
grep -q 'namespace: lmps' "$tmp/render-cpu.yaml" || fail "overlays/cpu does not set namespace lmps"
grep -q 'image: lmps-worker:' "$tmp/render-gpu.yaml" || fail "overlays/gpu does not use the lmps-worker image"

# The validator must reject broken renderings (each with its reason).
mutate() {  # mutate IN OUT JS: runs JS with `docs` (the objects), writes OUT
  node -e '
    const Y = require("yaml"), fs = require("fs");
    const docs = Y.parseAllDocuments(fs.readFileSync(process.argv[1], "utf8")).map((d) => d.toJS());
    const by = (k, n) => docs.find((d) => d.kind === k && d.metadata.name === n);
    new Function("docs", "by", process.argv[3])(docs, by);
    fs.writeFileSync(process.argv[2], docs.map((d) => Y.stringify(d)).join("---\n"));
  ' "$1" "$2" "$3"
}
expect_rejected() {  # expect_rejected NAME EXPECTED-MESSAGE VARIANT JS [FLAGS]
  local name="$1" msg="$2" in="$tmp/render-$3.yaml" js="$4" bad="$tmp/bad.yaml" err
  shift 4
  mutate "$in" "$bad" "$js"
  if err="$(node "$deploy/validate_k8s.js" "$@" "$bad" 2>&1)"; then
    fail "validate_k8s.js accepted a rendering with $name"
  fi
  grep -q -- "$msg" <<<"$err" || fail "$name: expected \"$msg\", got: $err"
  rejected=$((rejected + 1))
}
rejected=0
sched='by("Deployment","lmps-scheduler").spec.template.spec.containers[0]'
expect_rejected "no liveness probe" "no livenessProbe" cpu "delete $sched.livenessProbe"
expect_rejected "an HTTP probe on the scheduler" "not a gRPC health probe" cpu \
  "$sched.readinessProbe = {httpGet: {path: \"/\", port: 9090}}"
expect_rejected "no memory limit" "no resources.limits.memory" cpu \
  'delete by("StatefulSet","lmps-server").spec.template.spec.containers[0].resources.limits.memory'
expect_rejected "a bad quantity" "schema" cpu "$sched.resources.limits.memory = \"plenty\""
expect_rejected "a string port" "schema" cpu "$sched.ports[0].containerPort = \"grpc\""
expect_rejected "a gRPC probe with TLS on" "TCP probe (TLS is on)" tls \
  'by("Deployment","lmps-scheduler").spec.template.spec.containers[0].readinessProbe = {grpc: {port: 7070}}'
expect_rejected "TLS flags without certificates" "no certificates mounted" tls \
  'const c = by("StatefulSet","lmps-server").spec.template.spec.containers[0]; c.volumeMounts = c.volumeMounts.filter((m) => m.name !== "tls")'
expect_rejected "replicas != dp x pp x tp" "layout.dp x pp x tp" cpu 'by("Deployment","lmps-worker").spec.replicas = 3'
expect_rejected "a GPU worker without a GPU" "no nvidia.com/gpu limit" gpu \
  'delete by("Deployment","lmps-worker").spec.template.spec.containers[0].resources.limits["nvidia.com/gpu"]' --gpu
expect_rejected "a GPU limit in the CPU rendering" "requests nvidia.com/gpu" gpu ''
expect_rejected "a missing ConfigMap" "missing ConfigMap" cpu \
  'docs.splice(docs.findIndex((d) => d.kind === "ConfigMap" && d.metadata.name.startsWith("lmps-job")), 1)'
expect_rejected "backups of the wrong count" "replicas 3 != layout.num_shards 2" replicated \
  'by("StatefulSet","lmps-server-backup").spec.replicas = 3'
expect_rejected "backups without shard_backups" "layout.shard_backups is not 1" cpu \
  'by("StatefulSet","lmps-server").spec.template.spec.containers[0].args.push("--backup")'
# The NetworkPolicy: missing, a gRPC port open to everything (or to other
# namespaces, or to Prometheus), another policy allowing everything (policies
# add up), the metrics port left out, pods the policy does not select.
np='by("NetworkPolicy","lmps")'
expect_rejected "no NetworkPolicy" "no NetworkPolicy" cpu \
  'docs.splice(docs.findIndex((d) => d.kind === "NetworkPolicy"), 1)'
expect_rejected "a gRPC rule without from" "gRPC port grpc (7070) is open to every source" cpu \
  "delete $np.spec.ingress[0].from"
expect_rejected "the gRPC ports open to every namespace" "gRPC port peer (7072) is open to" cpu \
  "$np.spec.ingress[0].from[0].namespaceSelector = {}"
expect_rejected "Prometheus allowed on every port" "gRPC port grpc (7071) is open to" cpu \
  "delete $np.spec.ingress[1].ports"
expect_rejected "a second policy allowing everything" "is open to every source (NetworkPolicy/allow-all" cpu \
  'docs.push({apiVersion: "networking.k8s.io/v1", kind: "NetworkPolicy",
     metadata: {name: "allow-all", namespace: "lmps"}, spec: {podSelector: {}, ingress: [{}]}})'
expect_rejected "the metrics port left out" "metrics port metrics (9090) is not reachable by Prometheus" cpu \
  "$np.spec.ingress.splice(1, 1)"
expect_rejected "backups outside the policy" "StatefulSet/lmps-server-backup: its pods are selected by no NetworkPolicy" replicated \
  "$np.spec.podSelector = {matchLabels: {\"app.kubernetes.io/name\": \"lmps\", \"lmps.io/slot\": \"primary\"}}"
expect_rejected "backups in another namespace" "objects in more than one namespace" replicated \
  'delete by("StatefulSet","lmps-server-backup").metadata.namespace'
note "ok: $rejected broken renderings are rejected"

# --- 3. the job spec is an lmps.JobSpec --------------------------------------------------------
protoc=""
for p in "${TEST_SRCDIR:-}/sys/bin/protoc" "$runfiles/external/sys/bin/protoc" "$(command -v protoc || true)"; do
  [ -n "$p" ] && [ -x "$p" ] && { protoc="$p"; break; }
done
proto="$runfiles/proto/lmps.proto"
if [ -n "$protoc" ] && [ -f "$proto" ]; then
  for f in base/job.textproto overlays/replicated/job.textproto; do
    "$protoc" -I "$(dirname "$proto")" --encode=lmps.JobSpec lmps.proto \
      <"$deploy/k8s/$f" >/dev/null 2>"$tmp/protoc.err" ||
      fail "deploy/k8s/$f is not a valid lmps.JobSpec: $(cat "$tmp/protoc.err")"
  done
  note "ok: the job.textproto files parse as lmps.JobSpec"
else
  note "note: protoc or proto/lmps.proto not found; job spec not parsed"
fi

# --- 4+5. Prometheus and Grafana ---------------------------------------------------------------
node "$deploy/grafana/check_dashboard.js" "$deploy/grafana/lmps-dashboard.json" \
  --rules_out="$tmp/dashboard-rules.yml" || fail "the Grafana dashboard"
if command -v promtool >/dev/null; then
  promtool check config "$tmp/prometheus/prometheus.yml" >"$tmp/promtool.log" 2>&1 ||
    fail "promtool check config (prometheus-config ConfigMap): $(cat "$tmp/promtool.log")"
  cp "$deploy/k8s/base/prometheus/lmps-alerts_test.yml" "$tmp/prometheus/"
  (cd "$tmp/prometheus" && promtool test rules lmps-alerts_test.yml) >"$tmp/promtool.log" 2>&1 ||
    fail "promtool test rules: $(cat "$tmp/promtool.log")"
  promtool check rules "$tmp/dashboard-rules.yml" >"$tmp/promtool.log" 2>&1 ||
    fail "dashboard queries are not valid PromQL: $(cat "$tmp/promtool.log")"
  note "ok: promtool accepts the scrape config, the alerts (and their unit tests) and the dashboard's queries"
else
  note "note: promtool not installed (apt-get install prometheus); Prometheus files not checked"
fi

# --- 6. Dockerfiles and the image script --------------------------------------------------------
for f in scheduler server worker worker-cpu; do
  df="$deploy/docker/Dockerfile.$f"
  [ -f "$df" ] || fail "no deploy/docker/Dockerfile.$f"
  grep -q '^ARG BASE=' "$df" || fail "Dockerfile.$f: no ARG BASE"
  grep -q '^FROM \${BASE}' "$df" || fail "Dockerfile.$f: not FROM \${BASE}"
  grep -q '^USER \${UID}' "$df" || fail "Dockerfile.$f: no non-root USER"
  grep -q '^ENTRYPOINT \["/usr/local/bin/lmps_[a-z]*"\]' "$df" || fail "Dockerfile.$f: ENTRYPOINT is not the binary"
  ! grep -q '^USER root' "$df" || fail "Dockerfile.$f runs as root"
done
grep -q '^ARG BASE=nvidia/cuda:.*-runtime-' "$deploy/docker/Dockerfile.worker" || fail "Dockerfile.worker: not a CUDA runtime base"
grep -q '^ARG BASE=debian:bookworm-slim' "$deploy/docker/Dockerfile.worker-cpu" || fail "Dockerfile.worker-cpu: not bookworm-slim"
bash -n "$deploy/build_images.sh" || fail "build_images.sh has a syntax error"
# The worker images carry GPT-2's vocabulary where a worker looks by default
# (common/text/gpt2_bpe.h, read by scripts/gpt2_paths.sh).
source "$runfiles/scripts/gpt2_paths.sh" || fail "scripts/gpt2_paths.sh"
for f in worker worker-cpu; do
  grep -q "^COPY share/gpt2/ $gpt2_pkg/\$" "$deploy/docker/Dockerfile.$f" ||
    fail "Dockerfile.$f does not copy GPT-2's vocabulary to $gpt2_pkg"
done
note "ok: Dockerfiles (non-root, ENTRYPOINT the binary, ARG BASE)"
echo "PASS"
