#!/usr/bin/env bash
# The metrics exposition of common/rpc/metrics, judged by Prometheus's own tools:
#  1. `promtool check metrics` lints the text exposition (naming conventions,
#     _total on counters, base units, HELP on every family);
#  2. the same over HTTP from a live exposer (bound to 127.0.0.1:0);
#  3. a real Prometheus server scrapes that exposer every second; its target
#     must be `up` and a query must return the series with the constant
#     labels node/daemon.
# Skips (exit 0, with a message) only when promtool/prometheus are absent
# (Debian package `prometheus`; scripts/install_deps.sh).
set -euo pipefail

fail() { echo "FAIL: $*" >&2; exit 1; }

if ! command -v promtool >/dev/null || ! command -v prometheus >/dev/null; then
  echo "LMPS_SKIP(installable): promtool/prometheus not installed (apt-get install prometheus)"
  exit 0
fi
for tool in curl python3; do
  command -v "$tool" >/dev/null || fail "$tool is needed"
done

bin="${TEST_SRCDIR:-.}/${TEST_WORKSPACE:-lmps}/tests/metrics_exposition"
[ -x "$bin" ] || bin="tests/metrics_exposition"
[ -x "$bin" ] || bin="$(dirname "${BASH_SOURCE[0]}")/../.bazel/bin/tests/metrics_exposition"
[ -x "$bin" ] || fail "metrics_exposition binary not found"
if [ -n "${TEST_TMPDIR:-}" ]; then
  tmp="$TEST_TMPDIR"
else
  tmp="$(mktemp -d)"
fi

pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  [ -n "${TEST_TMPDIR:-}" ] || rm -rf "$tmp"
}
trap cleanup EXIT

# 1. The exposition as Serialize() prints it.
"$bin" >"$tmp/metrics.txt" || fail "metrics_exposition failed"
grep -q '^lmps_rpc_total{' "$tmp/metrics.txt" || fail "no lmps_rpc_total in exposition"
if ! out=$(promtool check metrics <"$tmp/metrics.txt" 2>&1) || [ -n "$out" ]; then
  cat "$tmp/metrics.txt" >&2
  fail "promtool check metrics (text): $out"
fi
echo "ok: promtool check metrics accepts the exposition ($(grep -c '^# TYPE' "$tmp/metrics.txt") families)"

# 2. Over HTTP from a live exposer.
"$bin" --listen=127.0.0.1:0 --port_file="$tmp/port" --serve_s=60 &
pids+=($!)
for _ in $(seq 100); do [ -s "$tmp/port" ] && break; sleep 0.1; done
[ -s "$tmp/port" ] || fail "exposer did not report its port"
port=$(cat "$tmp/port")
curl -sf "http://127.0.0.1:$port/metrics" >"$tmp/scrape.txt" || fail "GET /metrics on port $port"
if ! out=$(promtool check metrics <"$tmp/scrape.txt" 2>&1) || [ -n "$out" ]; then
  fail "promtool check metrics (HTTP): $out"
fi
echo "ok: GET /metrics on 127.0.0.1:$port passes promtool"

# 3. A real Prometheus scraping it.
prom_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cat >"$tmp/prometheus.yml" <<EOF
global:
  scrape_interval: 1s
  evaluation_interval: 1s
scrape_configs:
  - job_name: lmps
    static_configs:
      - targets: ["127.0.0.1:$port"]
EOF
promtool check config "$tmp/prometheus.yml" >/dev/null || fail "promtool check config"
prometheus --config.file="$tmp/prometheus.yml" --storage.tsdb.path="$tmp/tsdb" \
  --web.listen-address="127.0.0.1:$prom_port" --log.level=warn \
  >"$tmp/prometheus.log" 2>&1 &
pids+=($!)
api="http://127.0.0.1:$prom_port/api/v1"
up=""
for _ in $(seq 150); do
  if curl -sf "$api/targets" 2>/dev/null | grep -q '"health":"up"'; then up=1; break; fi
  sleep 0.2
done
[ -n "$up" ] || { tail -20 "$tmp/prometheus.log" >&2; fail "Prometheus target never became up"; }
echo "ok: Prometheus target 127.0.0.1:$port is up"

result=""
for _ in $(seq 50); do
  result=$(curl -sf "$api/query" --data-urlencode 'query=lmps_rpc_total{method="Pull",code="OK"}' || true)
  grep -q '"node":"server-0"' <<<"$result" && break
  sleep 0.2
done
grep -q '"node":"server-0"' <<<"$result" || fail "query lmps_rpc_total: $result"
grep -q '"daemon":"server"' <<<"$result" || fail "no daemon label: $result"
result=$(curl -sf "$api/query" --data-urlencode \
  'query=histogram_quantile(0.5, sum by (le) (lmps_rpc_duration_seconds_bucket))') ||
  fail "histogram_quantile query"
grep -q '"resultType":"vector","result":\[{' <<<"$result" || fail "histogram query: $result"
echo "ok: Prometheus queries return the series with node/daemon labels"
echo "PASS"
