#!/bin/bash
# What two parameter-server features cost or save in a data-parallel step,
# each measured against a baseline in the same run: overlapping the gradient
# push with the backward pass (lmps_worker --overlap_push, on by default)
# and synchronous shard replication (layout.shard_backups: 1: every push,
# apply and checkpoint also goes primary -> backup before it is
# acknowledged). Installs what is missing (scripts/install_deps.sh bench),
# builds //launcher:lmps_local and trains a small GPT with lmps_local in a
# temporary directory (removed at the end).
#
# Job: 4 layers, 4 heads, 256 wide, context 128, vocabulary 256, dp 2
# (--threads=1 each), 2 shards, global batch 8, PF_STEPS steps (default 16),
# no evaluation, no checkpoint but the last, train.debug_trace_steps. The
# step time of a run is the median over steps (the first 3 are warm-up) of
# the interval between one step's pull_done_us and the next's on dp rank 0
# (worker/trainer.cc's trace lines: compute, push, GradNorm/Apply, pull).
# Three configurations, interleaved PF_REPEATS times (default 2; in reverse
# order every second time, so none always runs first; the smallest median
# of each counts, as other load only slows runs down):
#   base       --overlap_push=true, no backups (what a CUDA worker does)
#   no_overlap --overlap_push=false
#   replicated layout.shard_backups: 1 (4 server processes)
# Last lines, for docs/benchmarks.md:
#   push overlap: step time no_overlap/base X.XX
#   shard replication: step time replicated/base X.XX
# Ends with `bazel shutdown`: nothing is left running.
#
# Usage: bench/ps_features.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/round_order.sh

STEPS="${PF_STEPS:-16}"
REPEATS="${PF_REPEATS:-2}"
WARMUP=3

tmp=""
cleanup() {
  [ -z "$tmp" ] || rm -rf "$tmp"
  bazel shutdown >/dev/null 2>&1 || true
}
trap cleanup EXIT

scripts/install_deps.sh bench
bazel build //launcher:lmps_local >/dev/null 2>&1 || bazel build //launcher:lmps_local
LAUNCHER="$(bazel info bazel-bin 2>/dev/null)/launcher/lmps_local"
tmp="$(mktemp -d /tmp/ps_features.XXXXXX)"

write_job() {  # write_job FILE BACKUPS
  cat >"$1" <<EOF
name: "ps_features"
model { n_layer: 4 n_head: 4 n_embd: 256 block_size: 128 vocab_size: 256 }
train {
  steps: $STEPS batch_size: 8 eval_interval: -1 checkpoint_interval: -1
  sample_tokens: 1 debug_trace_steps: true
}
layout { dp: 2 num_shards: 2 shard_backups: $2 }
EOF
}
write_job "$tmp/plain.textproto" 0
write_job "$tmp/replicated.textproto" 1

run() {  # run NAME JOB WORKER_ARGS
  local name="$1" job="$2" wargs="$3"
  if ! "$LAUNCHER" --job="$job" --run_dir="$tmp/$name" \
      --worker_args="--threads=1 $wargs" --export_model=false --quiet \
      --restart_job=0 --restart_workers=0 --timeout_s=600 >"$tmp/$name.out" 2>&1; then
    echo "ps_features: run $name failed:" >&2
    tail -n 20 "$tmp/$name.out" >&2
    exit 1
  fi
  rm -rf "${tmp:?}/$name/ckpt"
}

echo "== $REPEATS x 3 runs of $STEPS steps (load average $(cut -d' ' -f1 /proc/loadavg) on $(nproc) cores)"
for ((r = 0; r < REPEATS; r++)); do
  for config in $(round_order $((r + 1)) base no_overlap replicated); do
    case "$config" in
      base) run "base-r$r" "$tmp/plain.textproto" "--overlap_push=true" ;;
      no_overlap) run "no_overlap-r$r" "$tmp/plain.textproto" "--overlap_push=false" ;;
      replicated) run "replicated-r$r" "$tmp/replicated.textproto" "--overlap_push=true" ;;
    esac
  done
done

/usr/bin/python3 - "$tmp" "$REPEATS" "$WARMUP" <<'EOF'
import re, statistics, sys
tmp, repeats, warmup = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
def step_time(name):
    done = {}
    for line in open(f"{tmp}/{name}/logs/worker-0.log"):
        m = re.search(r"trace dp_rank=0 step=(\d+) .*pull_done_us=(\d+)", line)
        if m:
            done[int(m.group(1))] = int(m.group(2))
    steps = sorted(done)
    gaps = [(done[b] - done[a]) / 1e6 for a, b in zip(steps, steps[1:])
            if a >= warmup and b == a + 1]
    if not gaps:
        sys.exit(f"ps_features: no trace lines in {name}")
    return statistics.median(gaps)
best = {}
for config in ("base", "no_overlap", "replicated"):
    times = [step_time(f"{config}-r{r}") for r in range(repeats)]
    best[config] = min(times)
    print(f"{config:11s} step time {best[config]*1000:7.1f} ms "
          f"(runs: {', '.join(f'{t*1000:.1f}' for t in times)})")
print(f"push overlap: step time no_overlap/base {best['no_overlap']/best['base']:.2f}")
print(f"shard replication: step time replicated/base {best['replicated']/best['base']:.2f}")
EOF
