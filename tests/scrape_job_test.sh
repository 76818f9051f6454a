#!/usr/bin/env bash
# The /metrics of a real training job, scraped the way an operator would:
# lmps_local runs a tiny job (2 shards, 2 workers) with
# --metrics_base_port=P, so the scheduler serves /metrics on 127.0.0.1:P,
# shard s on P+1+s and worker w on P+3+w. Then
#  (a) `promtool check metrics` accepts the /metrics of every daemon
#      (fetched with curl);
#  (b) a real Prometheus server scrapes all five every second: every target
#      is `up`, `lmps_loss` returns finite values below ln(256) from the
#      workers and the scheduler, the workers' `lmps_step` grows between two
#      queries, the workers' `lmps_rpc_total` has
#      method="lmps.ParameterServer/Push", and the median Push latency from
#      their `lmps_rpc_duration_seconds` histogram (histogram_quantile over
#      rate()) is finite;
#  (c) each daemon exports the metric families docs/operations.md and the Grafana
#      dashboard rely on (worker, server and scheduler lists below).
# Then the job is stopped (SIGTERM to the launcher, which stops its
# children). Every process this script starts is reaped on every exit path.
# Every wait is on a condition, polled until a deadline whose failure names
# what was awaited and the last answer seen; there are no fixed sleeps.
# Skips (exit 0, with a message) only when prometheus/promtool are absent.
set -euo pipefail

fail() { echo "FAIL: $*" >&2; exit 1; }
note() { echo "scrape_job_test: $*"; }

if ! command -v promtool >/dev/null || ! command -v prometheus >/dev/null; then
  echo "LMPS_SKIP(installable): promtool/prometheus not installed (apt-get install prometheus)"
  exit 0
fi
command -v curl >/dev/null || fail "curl is needed"
PY=/usr/bin/python3
[ -x "$PY" ] || fail "$PY is needed"

# --- where things are ---------------------------------------------------------
runfiles="${TEST_SRCDIR:-}/${TEST_WORKSPACE:-lmps}"
launcher="$runfiles/launcher/lmps_local"
[ -x "$launcher" ] || launcher="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/.bazel/bin/launcher/lmps_local"
[ -x "$launcher" ] || fail "lmps_local not found (bazel build //launcher:lmps_local)"
if [ -n "${TEST_TMPDIR:-}" ]; then
  tmp="$TEST_TMPDIR/scrape_job"
  rm -rf "$tmp"
  mkdir -p "$tmp"
else
  tmp="$(mktemp -d)"
fi

# --- process bookkeeping: every child is stopped and reaped on any exit -------
pids=()
cleanup() {
  local rc=$?
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  # The launcher stops its own children within ~5 s; then force.
  for _ in $(seq 80); do
    local alive=""
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    [ -z "$alive" ] && break
    sleep 0.1
  done
  for pid in "${pids[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  if [ "$rc" -ne 0 ]; then
    if [ -n "${TEST_UNDECLARED_OUTPUTS_DIR:-}" ]; then
      cp "$tmp"/*.prom "$tmp"/launcher.log "$tmp"/prometheus.log \
        "$TEST_UNDECLARED_OUTPUTS_DIR"/ 2>/dev/null || true
    fi
    for f in "$tmp"/launcher.log "$tmp"/run/logs/*.log "$tmp"/prometheus.log; do
      [ -f "$f" ] || continue
      echo "---- tail $f" >&2
      tail -15 "$f" >&2
    done
  fi
  [ -n "${TEST_TMPDIR:-}" ] || rm -rf "$tmp"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 143' TERM
trap 'exit 130' INT

# --- free ports: P..P+4 for the job, and one for Prometheus -------------------
W=2
S=2
N=$((1 + S + W))
read -r P prom_port < <("$PY" - "$N" <<'EOF'
import random, socket, sys
n = int(sys.argv[1])
def free(port):
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", port))
        return True
    except OSError:
        return False
    finally:
        s.close()
rng = random.Random()
for _ in range(500):
    base = rng.randrange(20000, 60000 - n - 1)
    if all(free(base + i) for i in range(n + 1)):
        print(base, base + n)
        sys.exit(0)
sys.exit("no free port range found")
EOF
) || fail "no free port range"
note "metrics base port $P, Prometheus on $prom_port"

# A job long enough to be scraped for as long as the test needs; the test
# stops it (the launcher's own --timeout_s is the backstop).
cat >"$tmp/job.textproto" <<'EOF'
name: "scrape-job-test"
model { n_layer: 2 n_head: 2 n_embd: 32 block_size: 32 }
train { steps: 1000000 batch_size: 8 eval_interval: 20 checkpoint_interval: 1000000 }
EOF
"$launcher" --job="$tmp/job.textproto" --workers=$W --shards=$S \
  --run_dir="$tmp/run" --metrics_base_port="$P" --timeout_s=150 \
  --export_model=false --quiet >"$tmp/launcher.log" 2>&1 &
launcher_pid=$!
pids+=("$launcher_pid")

names=(scheduler)
ports=("$P")
for s in $(seq 0 $((S - 1))); do names+=("server-$s"); ports+=($((P + 1 + s))); done
for w in $(seq 0 $((W - 1))); do names+=("worker-$w"); ports+=($((P + 1 + S + w))); done

launcher_alive() {
  kill -0 "$launcher_pid" 2>/dev/null || fail "lmps_local exited early: $(tail -5 "$tmp/launcher.log")"
}

scrape() {  # scrape <port> <out file>
  curl -sf -m 5 "http://127.0.0.1:$1/metrics" >"$2"
}

# await <timeout s> <what> <command> [<arg>...]: runs the command (which
# prints why not when it fails) every 0.5 s until it succeeds and leaves its
# output in $why. Fails after the timeout naming what was awaited and the
# command's last answer, or at once if the launcher has exited.
await() {
  local limit=$1 what=$2
  local end=$((SECONDS + limit))
  shift 2
  until why=$("$@" 2>&1); do
    launcher_alive
    [ $SECONDS -lt $end ] || fail "waited ${limit} s for $what; last answer: ${why:-(none)}"
    sleep 0.5
  done
}

# Wait until every daemon serves /metrics and the workers have trained a few
# steps (their lmps_step gauge appears after the first step).
deadline=$((SECONDS + 60))
for i in "${!names[@]}"; do
  until scrape "${ports[$i]}" "$tmp/${names[$i]}.prom" 2>/dev/null; do
    launcher_alive
    [ $SECONDS -lt $deadline ] || fail "${names[$i]} never served /metrics on 127.0.0.1:${ports[$i]}"
    sleep 0.2
  done
done
for w in $(seq 0 $((W - 1))); do
  until scrape $((P + 1 + S + w)) "$tmp/w.prom" && grep -Eq '^lmps_step\{[^}]*\} ([5-9]|[1-9][0-9]+)' "$tmp/w.prom"; do
    launcher_alive
    [ $SECONDS -lt $deadline ] || fail "worker-$w did not reach step 5 within 60 s"
    sleep 0.2
  done
done
note "every daemon serves /metrics; the workers are training"

# --- (c) the expected metric names ----------------------------------------------
# need <daemon> <metric> [<label>=<value regex>|=<value regex>]...: some sample
# of <metric> on <daemon> has every label (any order), and the value if given;
# if not, it is added to $missing.
nonzero='[1-9][0-9.e+]*'  # a sample value > 0
need() {
  local n=$1 m=$2 lines labels="" value=""
  shift 2
  lines=$(grep -E "^$m\{" "$tmp/$n.prom" || true)
  for c in "$@"; do
    if [ "${c:0:1}" = "=" ]; then
      lines=$(echo "$lines" | grep -E "\} ${c:1}\$" || true)
      value=" ${c:1}"
    else
      lines=$(echo "$lines" | grep -E "[{,]${c%%=*}=\"${c#*=}\"[,}]" || true)
      labels="$labels${labels:+,}${c%%=*}=\"${c#*=}\""
    fi
  done
  [ -n "$lines" ] || missing+=("$n: $m{$labels}$value")
}
# Scrapes every daemon into $tmp/<name>.prom and checks that each exports the
# families below; prints what is missing (and what is exported) if not.
expected_metrics() {
  local i n
  missing=()
  for i in "${!names[@]}"; do
    scrape "${ports[$i]}" "$tmp/${names[$i]}.prom" ||
      { echo "GET http://127.0.0.1:${ports[$i]}/metrics (${names[$i]}) failed"; return 1; }
  done
  for n in "${names[@]}"; do
    case "$n" in
      worker-*)
        need "$n" lmps_step
        need "$n" lmps_loss
        need "$n" lmps_tokens_per_second
        for phase in compute pull push wait; do
          need "$n" lmps_step_phase_seconds "phase=$phase"
        done
        need "$n" lmps_rpc_total 'method=lmps\.ParameterServer/Push' code=OK
        need "$n" lmps_rpc_total 'method=lmps\.ParameterServer/Pull' code=OK
        # Pull and Push carry raw byte buffers (common/wire): counted too.
        need "$n" lmps_rpc_sent_bytes_total 'method=lmps\.ParameterServer/Push' "=$nonzero"
        need "$n" lmps_rpc_received_bytes_total 'method=lmps\.ParameterServer/Pull' "=$nonzero"
        need "$n" lmps_rpc_duration_seconds_bucket 'method=lmps\.ParameterServer/Push' 'le=\+Inf'
        need "$n" lmps_node_info 'node_id=worker-[0-9]+' 'dp_rank=[0-9]+' role=worker
        ;;
      server-*)
        for m in lmps_parameter_version lmps_grad_norm lmps_server_memory_bytes lmps_shard_parameters; do
          need "$n" "$m"
        done
        need "$n" lmps_rejected_pushes_total reason=nonfinite
        need "$n" lmps_rpc_total 'method=lmps\.ParameterServer/Push' code=OK
        need "$n" lmps_rpc_received_bytes_total 'method=lmps\.ParameterServer/Push' "=$nonzero"
        need "$n" lmps_rpc_sent_bytes_total 'method=lmps\.ParameterServer/Pull' "=$nonzero"
        need "$n" lmps_node_info "node_id=$n" role=server "shard=${n#server-}"
        ;;
      scheduler)
        need "$n" lmps_nodes_alive role=worker "=$W"
        need "$n" lmps_nodes_alive role=server "=$S"
        need "$n" lmps_heartbeat_age_seconds 'peer=worker-0'
        need "$n" lmps_heartbeat_age_seconds "peer=server-$((S - 1))"
        need "$n" lmps_loss
        need "$n" lmps_step
        need "$n" lmps_tokens_per_second
        need "$n" lmps_job_state "=2"
        need "$n" lmps_rpc_total 'method=lmps\.Scheduler/Heartbeat' code=OK
        ;;
    esac
  done
  [ "${#missing[@]}" -eq 0 ] && return 0
  echo "${#missing[@]} expected metric(s) missing:"
  printf '  missing: %s\n' "${missing[@]}"
  for i in "${!names[@]}"; do
    echo "  ${names[$i]} (127.0.0.1:${ports[$i]}) exports:" $(sed -n 's/^# TYPE \([^ ]*\) .*/\1/p' "$tmp/${names[$i]}.prom")
  done
  return 1
}
# Some gauges are set only after a step or a heartbeat (the servers update
# theirs with each heartbeat, every lease/3 = 3.3 s by default): scrape again
# until every family is there.
await 30 "every daemon to export the expected metric families" expected_metrics
note "ok: every expected metric family is exported"

# --- (a) promtool on every daemon's exposition ---------------------------------
# The expositions just scraped, now that every gauge has been set.
for i in "${!names[@]}"; do
  f="$tmp/${names[$i]}.prom"
  if ! out=$(promtool check metrics <"$f" 2>&1) || [ -n "$out" ]; then
    fail "promtool check metrics rejects ${names[$i]} (127.0.0.1:${ports[$i]}): $out"
  fi
  daemon=${names[$i]%%-*}
  grep -Eq "^lmps_[a-z_]+\{[^}]*daemon=\"$daemon\"" "$f" ||
    fail "${names[$i]}: no lmps_ series with the constant label daemon=\"$daemon\""
  note "ok: promtool check metrics accepts ${names[$i]} ($(grep -c '^# TYPE' "$f") families)"
done

# --- (b) a real Prometheus scraping the whole job ------------------------------
{
  cat <<EOF
global:
  scrape_interval: 1s
  scrape_timeout: 1s
  evaluation_interval: 1s
scrape_configs:
EOF
  for i in "${!names[@]}"; do
    cat <<EOF
  - job_name: ${names[$i]}
    static_configs:
      - targets: ["127.0.0.1:${ports[$i]}"]
EOF
  done
} >"$tmp/prometheus.yml"
promtool check config "$tmp/prometheus.yml" >/dev/null || fail "promtool check config"
prometheus --config.file="$tmp/prometheus.yml" --storage.tsdb.path="$tmp/tsdb" \
  --web.listen-address="127.0.0.1:$prom_port" --log.level=warn \
  >"$tmp/prometheus.log" 2>&1 &
pids+=($!)
api="http://127.0.0.1:$prom_port/api/v1"

# Checks a Prometheus API answer on stdin; prints why not, exits 1 if not met.
check() {
  "$PY" -c '
import json, math, sys
what = sys.argv[1]
try:
    doc = json.load(sys.stdin)
except ValueError as e:
    sys.exit("not JSON: %s" % e)
if doc.get("status") != "success":
    sys.exit("status %r" % doc.get("status"))
data = doc["data"]
if what == "targets":
    want = int(sys.argv[2])
    up = sorted(t["labels"]["job"] for t in data["activeTargets"] if t["health"] == "up")
    down = ["%s: %s" % (t["labels"]["job"], t.get("lastError") or t["health"])
            for t in data["activeTargets"] if t["health"] != "up"]
    if len(up) != want:
        sys.exit("%d of %d targets up (%s); not up: %s" % (len(up), want, up, down))
    print(" ".join(up))
elif what == "series":  # series <min count> [<lo> <hi>]: finite values in (lo, hi)
    res = data["result"]
    if len(res) < int(sys.argv[2]):
        sys.exit("%d series, want >= %s: %s" % (len(res), sys.argv[2], res))
    out = []
    for r in res:
        v = float(r["value"][1])
        who = r["metric"].get("job", "?")
        if not math.isfinite(v):
            sys.exit("%s: non-finite value %s" % (who, v))
        if len(sys.argv) > 3 and not float(sys.argv[3]) < v < float(sys.argv[4]):
            sys.exit("%s: %s not in (%s, %s)" % (who, v, sys.argv[3], sys.argv[4]))
        out.append("%s=%g" % (who, v))
    print(" ".join(sorted(out)))
' "$@"
}

query() { curl -sf -m 5 "$api/query" --data-urlencode "query=$1"; }

# series <PromQL> <check series args>...: the instant query's answer passes
# `check series`.
series() { local q=$1; shift; query "$q" | check series "$@"; }
targets_up() { curl -sf -m 5 "$api/targets" | check targets "${#names[@]}"; }

await 30 "Prometheus to scrape all ${#names[@]} daemons (every target up)" targets_up
note "ok: Prometheus scrapes every daemon: $why"

# lmps_loss: the scheduler's job-level gauge and each worker's, finite and
# below the loss of a uniform guess over 256 bytes (ln 256 = 5.545).
await 20 "lmps_loss from the scheduler and $W workers, finite and below ln 256" \
  series 'lmps_loss' $((1 + W)) 0 5.545
note "ok: lmps_loss: $why"

await 20 "lmps_rpc_total{method=\"lmps.ParameterServer/Push\",code=\"OK\"} from $W workers" \
  series 'lmps_rpc_total{daemon="worker",method="lmps.ParameterServer/Push",code="OK"}' "$W" 0 1e18
note "ok: workers' lmps_rpc_total{method=\"lmps.ParameterServer/Push\"}: $why"

# The median Push latency from the workers' histogram. The checks above pass
# on the first scrape of each target (an instant query needs one sample),
# but rate() needs at least two samples of a series inside its window, and
# until each worker's buckets have them the quantile has no series at all.
# So first wait for every worker's Push histogram to hold >= 2 samples in
# the window, then for a finite median (NaN while no Push fell in the window).
push_hist='lmps_rpc_duration_seconds_bucket{daemon="worker",method="lmps.ParameterServer/Push"'
window=5s
await 30 "each of the $W workers' Push latency histograms to hold >= 2 samples in the last $window (what rate() needs)" \
  series "count_over_time(${push_hist},le=\"+Inf\"}[$window])" "$W" 1.5 1e9
await 30 "a finite median Push latency from the workers' histogram (histogram_quantile over rate()[$window])" \
  series "histogram_quantile(0.5, sum by (le) (rate(${push_hist}}[$window])))" 1 0 60
note "ok: median Push latency (s): $why"

# Training goes on while being scraped: the workers' step grows. (A scrape
# that times out on a loaded machine marks its series stale for a moment, so
# even these instant queries are retried.)
await 20 "min(lmps_step) of the workers" series 'min(lmps_step{daemon="worker"})' 1
first=${why#*=}
step_grew() {
  local now
  now=$(series 'min(lmps_step{daemon="worker"})' 1) || { echo "$now"; return 1; }
  now=${now#*=}
  echo "$now"
  "$PY" -c 'import sys; sys.exit(0 if float(sys.argv[2]) > float(sys.argv[1]) else 1)' "$first" "$now"
}
await 20 "the workers' min lmps_step to grow beyond $first" step_grew
note "ok: min worker lmps_step grew from $first to $why while scraped"

await 20 "the shards' min(lmps_parameter_version), finite and > 0" \
  series 'min(lmps_parameter_version)' 1 0 1e12
note "ok: shards' min lmps_parameter_version: $why"

# --- stop the job ----------------------------------------------------------------
kill -TERM "$launcher_pid"
for _ in $(seq 100); do kill -0 "$launcher_pid" 2>/dev/null || break; sleep 0.1; done
kill -0 "$launcher_pid" 2>/dev/null && fail "lmps_local did not stop within 10 s of SIGTERM"
wait "$launcher_pid" 2>/dev/null || true
for i in "${!names[@]}"; do
  if curl -s -m 1 -o /dev/null "http://127.0.0.1:${ports[$i]}/metrics"; then
    fail "${names[$i]} still serves /metrics after the launcher stopped"
  fi
done
note "ok: the job stopped; no daemon left behind"
echo "PASS"
