#!/usr/bin/env bash
# A job over a real (virtual) network, not loopback: five network namespaces
# (scheduler, server0, server1, worker0, worker1), each a "host" with its own
# 10.77.0.x address and a veth link to a bridge in a sixth namespace acting
# as the switch. Each daemon starts in its namespace with the flags the
# Kubernetes manifests (deploy/k8s/base/*.yaml) give it:
#   scheduler: --job --listen=0.0.0.0:7070 --metrics_listen=0.0.0.0:9090
#              --exit_when_finished=false
#   server:    --scheduler=<sched ip>:7070 --listen=0.0.0.0:7071
#              --advertise_host=<its ip> --shard=N --checkpoint_dir
#              --metrics_listen=0.0.0.0:9090
#   worker:    --scheduler=<sched ip>:7070 --backend=cpu
#              --metrics_listen=0.0.0.0:9090 --data=<corpus> --threads=1
# The job (dp 2, num_shards 2, 5 steps) must finish: both workers and both
# shards exit 0, each shard's checkpoint directory holds the last step's
# checkpoint, every node registered with its own address, and the scheduler
# (which stays up) reports FINISHED on its /metrics, read from another host.
# Namespaces, links and processes are removed on every exit path.
# Then a second job on two more hosts (hA, hB, two workers each) checks
# hierarchical aggregation (train.workers_per_host 2) against a flat dp 4 run.
# Needs root; skips (exit 0, with an LMPS_SKIP line) when not root or when network
# namespaces / veth / bridges cannot be created (an unprivileged sandbox).
set -euo pipefail

fail() { echo "FAIL: $*" >&2; exit 1; }
note() { echo "multihost_netns_test: $*"; }

if [ "$(id -u)" -ne 0 ]; then
  echo "LMPS_SKIP(environment): needs root to create network namespaces (run as root)"
  exit 0
fi
command -v ip >/dev/null || { echo "LMPS_SKIP(installable): iproute2 (ip) is not installed"; exit 0; }
command -v curl >/dev/null || fail "curl is needed"

runfiles="${TEST_SRCDIR:-}/${TEST_WORKSPACE:-lmps}"
bin="$runfiles"
[ -x "$bin/server/lmps_server" ] || bin="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/.bazel/bin"
for b in server/scheduler/lmps_scheduler server/lmps_server worker/lmps_worker; do
  [ -x "$bin/$b" ] || fail "$bin/$b not found (bazel build //launcher:lmps_local)"
done
if [ -n "${TEST_TMPDIR:-}" ]; then
  tmp="$TEST_TMPDIR/multihost"
  rm -rf "$tmp"
  mkdir -p "$tmp"
else
  tmp="$(mktemp -d)"
fi
data=/usr/share/common-licenses/GPL-3
[ -r "$data" ] || fail "$data is missing"

# --- namespaces: unique names, removed on every exit --------------------------------
pfx="lmps$$"
sw="$pfx-sw"
hosts=(sched s0 s1 w0 w1 hA hB)
declare -A ip_of=([sched]=10.77.0.10 [s0]=10.77.0.20 [s1]=10.77.0.21 [w0]=10.77.0.30 [w1]=10.77.0.31
                  [hA]=10.77.0.40 [hB]=10.77.0.41)
created=()
declare -A pid_of=()

cleanup() {
  local rc=$?
  set +e
  for h in "${!pid_of[@]}"; do kill -TERM "${pid_of[$h]}" 2>/dev/null; done
  for _ in $(seq 50); do
    local alive=""
    for h in "${!pid_of[@]}"; do kill -0 "${pid_of[$h]}" 2>/dev/null && alive=1; done
    [ -z "$alive" ] && break
    sleep 0.1
  done
  for h in "${!pid_of[@]}"; do kill -KILL "${pid_of[$h]}" 2>/dev/null; wait "${pid_of[$h]}" 2>/dev/null; done
  # Anything still inside our namespaces was started by this script.
  for ns in "${created[@]}"; do
    for p in $(ip netns pids "$ns" 2>/dev/null); do kill -KILL "$p" 2>/dev/null; done
  done
  for ns in "${created[@]}"; do ip netns del "$ns" 2>/dev/null; done
  local left
  left=$(ip netns list 2>/dev/null | grep -c "^$pfx-" || true)
  [ "$left" = 0 ] || echo "WARNING: $left namespace(s) $pfx-* left behind" >&2
  if [ "$rc" -ne 0 ]; then
    for f in "$tmp"/*.log; do
      [ -f "$f" ] || continue
      echo "---- tail $f" >&2
      tail -12 "$f" >&2
    done
  fi
  [ -n "${TEST_TMPDIR:-}" ] || rm -rf "$tmp"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 143' TERM
trap 'exit 130' INT

add_ns() {
  ip netns add "$1" 2>"$tmp/netns.err" || return 1
  created+=("$1")
  ip -n "$1" link set lo up
}

# The switch; if this much fails, the environment cannot do it: skip.
if ! add_ns "$sw"; then
  echo "LMPS_SKIP(environment): 'ip netns add' failed ($(cat "$tmp/netns.err")); network namespaces are unavailable here"
  exit 0
fi
if ! ip -n "$sw" link add br0 type bridge 2>"$tmp/netns.err"; then
  echo "LMPS_SKIP(environment): cannot create a bridge in a network namespace ($(cat "$tmp/netns.err"))"
  exit 0
fi
ip -n "$sw" link set br0 up
for h in "${hosts[@]}"; do
  ns="$pfx-$h"
  add_ns "$ns" || fail "ip netns add $ns: $(cat "$tmp/netns.err")"
  if ! ip link add eth0 netns "$ns" type veth peer name "p-$h" netns "$sw" 2>"$tmp/netns.err"; then
    [ "$h" = sched ] && { echo "LMPS_SKIP(environment): cannot create veth pairs ($(cat "$tmp/netns.err"))"; exit 0; }
    fail "veth for $h: $(cat "$tmp/netns.err")"
  fi
  ip -n "$sw" link set "p-$h" master br0 up
  ip -n "$ns" addr add "${ip_of[$h]}/24" dev eth0
  ip -n "$ns" link set eth0 up
done
note "namespaces ${created[*]}: ${hosts[*]} on 10.77.0.0/24 behind a bridge"

inns() { local h=$1; shift; ip netns exec "$pfx-$h" "$@"; }

sched_ip=${ip_of[sched]}
cat >"$tmp/job.textproto" <<EOF
name: "multihost-netns-test"
model { n_layer: 1 n_head: 2 n_embd: 32 block_size: 16 }
data { path: "$data" }
train { steps: 5 batch_size: 4 eval_interval: 5 checkpoint_interval: 5 sample_tokens: 8 }
layout { dp: 2 num_shards: 2 }
EOF

start_as() {  # start_as <name> <host> <binary> <args...>: in <host>'s namespace, logs to <name>.log
  local name=$1 h=$2; shift 2
  inns "$h" "$@" >"$tmp/$name.log" 2>&1 &
  pid_of[$name]=$!
}
start() { start_as "$1" "$@"; }  # start <host> <binary> <args...>

start sched "$bin/server/scheduler/lmps_scheduler" --job="$tmp/job.textproto" \
  --listen=0.0.0.0:7070 --metrics_listen=0.0.0.0:9090 --exit_when_finished=false
for s in 0 1; do
  start "s$s" "$bin/server/lmps_server" --shard="$s" --scheduler="$sched_ip:7070" \
    --listen=0.0.0.0:7071 --advertise_host="${ip_of[s$s]}" \
    --checkpoint_dir="$tmp/ckpt-$s" --metrics_listen=0.0.0.0:9090
done
for w in 0 1; do
  start "w$w" "$bin/worker/lmps_worker" --scheduler="$sched_ip:7070" --backend=cpu \
    --metrics_listen=0.0.0.0:9090 --data="$data" --threads=1
done

# Reachability across the switch: worker0's host reads the scheduler's and a
# shard's /metrics by their addresses.
deadline=$((SECONDS + 20))
until inns w0 curl -sf -m 2 -o /dev/null "http://$sched_ip:9090/metrics" &&
      inns w0 curl -sf -m 2 -o /dev/null "http://${ip_of[s1]}:9090/metrics"; do
  kill -0 "${pid_of[sched]}" 2>/dev/null || fail "the scheduler exited early"
  [ $SECONDS -lt $deadline ] || fail "worker0's namespace cannot reach $sched_ip:9090 / ${ip_of[s1]}:9090"
  sleep 0.2
done
note "ok: /metrics of the scheduler and server1 reachable from worker0's namespace"

# --- the job finishes ------------------------------------------------------------------
wait_exit() {  # wait_exit <host> <timeout s>: its exit status, or fail
  local h=$1 t=$2 deadline=$((SECONDS + $2))
  while kill -0 "${pid_of[$h]}" 2>/dev/null; do
    [ $SECONDS -lt $deadline ] || fail "$h did not exit within ${t} s"
    sleep 0.2
  done
  local rc=0
  wait "${pid_of[$h]}" || rc=$?
  unset "pid_of[$h]"
  [ "$rc" -eq 0 ] || fail "$h exited with status $rc"
}
wait_exit w0 60
wait_exit w1 10
note "ok: both workers exited 0"
wait_exit s0 30
wait_exit s1 10
note "ok: both shards exited 0"

for s in 0 1; do
  f="$tmp/ckpt-$s/step_00000005/shard_$s.ckpt"
  [ -s "$f" ] || fail "missing checkpoint $f (have: $(cd "$tmp/ckpt-$s" 2>/dev/null && find . -type f | tr '\n' ' '))"
done
note "ok: step_00000005/shard_0.ckpt and step_00000005/shard_1.ckpt written"

# Every node registered under its own host's address.
for s in 0 1; do
  grep -q "server-$s (${ip_of[s$s]}:7071) registered" "$tmp/sched.log" ||
    fail "scheduler log lacks 'server-$s (${ip_of[s$s]}:7071) registered'"
done

# The scheduler stays up (--exit_when_finished=false) and says FINISHED.
m=$(inns w1 curl -sf -m 5 "http://$sched_ip:9090/metrics") || fail "scheduler /metrics after the job"
grep -Eq '^lmps_job_state\{[^}]*\} 3$' <<<"$m" ||
  fail "scheduler's lmps_job_state is not 3 (FINISHED): $(echo "$m" | grep '^lmps_job_state')"
grep -Eq '^lmps_step\{[^}]*\} 5$' <<<"$m" ||
  fail "scheduler's lmps_step is not 5: $(echo "$m" | grep '^lmps_step')"
note "ok: the scheduler reports FINISHED at step 5 (read from worker1's namespace)"
kill -TERM "${pid_of[sched]}"
deadline=$((SECONDS + 10))
while kill -0 "${pid_of[sched]}" 2>/dev/null; do
  [ $SECONDS -lt $deadline ] || fail "the scheduler did not stop within 10 s of SIGTERM"
  sleep 0.1
done
wait "${pid_of[sched]}" 2>/dev/null || true
unset "pid_of[sched]"

# --- hierarchical aggregation: 2 hosts x 2 workers --------------------------------------
# train.workers_per_host 2 with dp 4 on hosts hA and hB (two workers each, named
# by --host_name). They register interleaved (hA, hB, hA, hB), which the lowest
# free rank would split across hosts; the scheduler must give each host the
# ranks of one group. The final parameters (exported from the shards'
# checkpoint) equal a flat dp 4 run of lmps_local within 2e-5.
hjob() {  # hjob <extra train fields>
  cat <<EOF2
name: "multihost-hierarchical"
model { n_layer: 1 n_head: 2 n_embd: 32 block_size: 16 }
data { path: "$data" }
train { steps: 4 batch_size: 8 eval_interval: -1 checkpoint_interval: -1 sample_tokens: 0 $1 }
layout { dp: 4 num_shards: 2 }
EOF2
}
hjob "workers_per_host: 2" >"$tmp/hier.textproto"
hjob "" >"$tmp/flat.textproto"
# Ports of their own: the first job's may still be in TIME_WAIT.
start_as hsched sched "$bin/server/scheduler/lmps_scheduler" --job="$tmp/hier.textproto" \
  --listen=0.0.0.0:7080 --metrics_listen=0.0.0.0:9190
for s in 0 1; do
  start_as "hs$s" "s$s" "$bin/server/lmps_server" --shard="$s" --scheduler="$sched_ip:7080" \
    --listen=0.0.0.0:7081 --advertise_host="${ip_of[s$s]}" --checkpoint_dir="$tmp/hckpt"
done
n=0
for w in hA0 hB0 hA1 hB1; do
  h=${w%?}
  start_as "$w" "$h" "$bin/worker/lmps_worker" --scheduler="$sched_ip:7080" --backend=cpu \
    --data="$data" --threads=1 --host_name="$h" --advertise_host="${ip_of[$h]}" \
    --metrics_listen="0.0.0.0:$((9190 + ${w: -1}))"
  n=$((n + 1))
  deadline=$((SECONDS + 30))
  until [ "$(grep -Ec '^.*worker-[0-9]+ \(10\.77\.0\.4[01]:[0-9]+\) registered' "$tmp/hsched.log")" -ge "$n" ]; do
    kill -0 "${pid_of[$w]}" 2>/dev/null || fail "worker $w exited before registering"
    [ $SECONDS -lt $deadline ] || fail "worker $w did not register within 30 s"
    sleep 0.1
  done
done
for w in hA0 hB0 hA1 hB1; do wait_exit "$w" 90; done
for s in 0 1; do wait_exit "hs$s" 30; done
wait_exit hsched 30
for pair in "0 1" "2 3"; do
  set -- $pair
  a=$(grep -Eo "worker-$1 \(10\.77\.0\.4[01]" "$tmp/hsched.log" | head -1 | grep -Eo '10\.77\.0\.4[01]')
  b=$(grep -Eo "worker-$2 \(10\.77\.0\.4[01]" "$tmp/hsched.log" | head -1 | grep -Eo '10\.77\.0\.4[01]')
  [ -n "$a" ] && [ "$a" = "$b" ] ||
    fail "dp ranks $1 and $2 are not one host's: worker-$1 at '$a', worker-$2 at '$b'"
done
note "ok: the workers of each host hold one group's dp ranks (0-1, 2-3)"
"$bin/server/lmps_export" --checkpoint_dir="$tmp/hckpt" --out="$tmp/hier.safetensors" \
  >"$tmp/export.log" 2>&1 || fail "lmps_export of the hierarchical run: $(cat "$tmp/export.log")"
"$bin/launcher/lmps_local" --job="$tmp/flat.textproto" --run_dir="$tmp/flat" --quiet \
  >"$tmp/flat.log" 2>&1 || fail "the flat dp 4 run failed: $(tail -5 "$tmp/flat.log")"
python3 - "$tmp/hier.safetensors" "$tmp/flat/model.safetensors" <<'PY' || fail "hierarchical != flat dp 4"
import json, struct, sys
def load(path):
    with open(path, 'rb') as f:
        raw = f.read()
    (n,) = struct.unpack('<Q', raw[:8])
    header = json.loads(raw[8:8 + n])
    out = {}
    for name, t in header.items():
        if name == '__metadata__':
            continue
        assert t['dtype'] == 'F32', (name, t['dtype'])
        b, e = t['data_offsets']
        out[name] = struct.unpack('<%df' % ((e - b) // 4), raw[8 + n + b:8 + n + e])
    return out
a, b = load(sys.argv[1]), load(sys.argv[2])
assert a.keys() == b.keys(), (sorted(a), sorted(b))
worst = max(max(abs(x - y) for x, y in zip(a[k], b[k])) for k in a)
print('multihost_netns_test: max |hierarchical - flat dp 4| = %.3g' % worst)
sys.exit(0 if worst <= 2e-5 else 1)
PY
note "ok: 2 hosts x 2 workers with workers_per_host 2 equal flat dp 4 within 2e-5"
echo "PASS"
