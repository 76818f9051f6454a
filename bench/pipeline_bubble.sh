#!/bin/bash
# Pipeline parallelism: step time of pp=2 with m micro-batches against the
# ideal from the bubble formula. Installs what is missing
# (scripts/install_deps.sh bench), builds //launcher:lmps_local, and trains a
# small GPT with lmps_local on this machine (runs in a temporary directory,
# removed at the end), with train.debug_trace_steps so every worker logs
# its per-step times.
#
# Model and job: 8 layers, 4 heads, 256 wide, context 128, vocabulary 256,
# global batch 16 sequences (divisible by every m), 12 steps, no evaluation,
# one checkpoint at the end, no export (--export_model=false), one shard,
# sample_tokens 1 (0 would mean the default 200, and a pp=1 worker samples
# by itself after its last step whatever --export_model says).
# Big enough that compute dominates the activation messages on loopback
# (2 MB per direction per step), small enough that a run takes ~15-20 s on
# 2 cores. Every worker gets --threads=1 (one core each).
#
# For m in 1 2 4 8:
#   Baseline: pp=1, one worker, m micro-batches. T1(m) = median over steps
#     (the first 2 steps are warm-up and skipped) of its compute time,
#     push_start_us - pull_done_us of its trace line (forward and backward of
#     all m micro-batches and the gradient copy-out; worker/trainer.cc).
#   Pipeline: pp=2, two workers (one per stage), m micro-batches, schedule
#     1f1b (and gpipe for m = PB_GPIPE_M, default 8, to show that the
#     two schedules give the same time).
#     Tpp(m) = median over steps of the max over the stages of compute_s
#     (the stage's micro-batch schedule and gradient copy-out, waits for its
#     neighbour included; worker/pipeline/pipeline_trainer.cc). The measured
#     bubble is stage 0's median bubble (fraction of compute_s it waited).
#   Ideal from the bubble formula: with perfectly balanced stages each stage
#     is busy T1(m)/pp, and the schedule takes busy / (1 - bubble) with
#     bubble = (pp-1)/(m+pp-1), i.e. Tpp ideal = (T1(m)/pp) * (m+pp-1)/m.
# Printed per m: T1, Tpp measured, Tpp ideal, ideal/measured (1.00 = as good
# as the formula allows), measured bubble, formula bubble, speed-up T1/Tpp;
# then per stage the busy time compute_s * (1 - bubble) against T1/pp (stage
# imbalance: common/model/parallel_layout.h splits the layers by FLOPs, the last
# stage also holds the LM head) and their sum against T1 (work the split
# adds: activation messages, per-micro-batch overheads). Last line, for the
# docs/benchmarks.md:
#   pipeline pp=2 m=8: ideal/measured X.XX
# The pp=1 baseline runs with one worker on one core while the pp=2 runs use
# both cores (plus the scheduler's and shard's threads): on a shared machine
# the pp=2 numbers suffer more from other load. Ends with `bazel shutdown`:
# nothing is left running.
#
# Usage: bench/pipeline_bubble.sh
# Environment: PB_MS (default "1 2 4 8"), PB_STEPS (default 12),
#   PB_GPIPE_M (default 8; 0: no gpipe run), PB_REPEATS (default 1: with R > 1
#   every configuration runs R times, interleaved, and the run with the
#   smallest median step time counts -- other load only slows runs down),
#   PB_KEEP=DIR (keep the runs there instead of a temporary directory).
set -euo pipefail
cd "$(dirname "$0")/.."

MS="${PB_MS:-1 2 4 8}"
STEPS="${PB_STEPS:-12}"
GPIPE_M="${PB_GPIPE_M:-8}"
REPEATS="${PB_REPEATS:-1}"
PP=2
WARMUP=2
if [ "$STEPS" -le "$WARMUP" ]; then
  echo "pipeline_bubble: PB_STEPS must be > $WARMUP" >&2
  exit 2
fi

tmp=""
cleanup() {
  if [ -n "$tmp" ] && [ -z "${PB_KEEP:-}" ]; then rm -rf "$tmp"; fi
  bazel shutdown >/dev/null 2>&1 || true
}
trap cleanup EXIT

scripts/install_deps.sh bench
bazel build //launcher:lmps_local >/dev/null 2>&1 || bazel build //launcher:lmps_local
LAUNCHER="$(bazel info bazel-bin 2>/dev/null)/launcher/lmps_local"

if [ -n "${PB_KEEP:-}" ]; then
  tmp="$PB_KEEP"
  mkdir -p "$tmp"
else
  tmp="$(mktemp -d /tmp/pipeline_bubble.XXXXXX)"
fi
job="$tmp/job.textproto"
cat >"$job" <<EOF
name: "pipeline_bubble"
model { n_layer: 8 n_head: 4 n_embd: 256 block_size: 128 vocab_size: 256 }
train {
  steps: $STEPS batch_size: 16 eval_interval: -1 checkpoint_interval: -1
  sample_tokens: 1 debug_trace_steps: true
}
layout { dp: 1 pp: 1 tp: 1 num_shards: 1 }
EOF

run() {  # run NAME LAUNCHER_FLAGS...: one job into $tmp/NAME
  local name="$1"
  shift
  local start=$SECONDS
  if ! "$LAUNCHER" --job="$job" --run_dir="$tmp/$name" --worker_args=--threads=1 \
      --export_model=false --quiet --restart_job=0 --restart_workers=0 \
      --timeout_s=600 "$@" >"$tmp/$name.out" 2>&1; then
    echo "pipeline_bubble: run $name failed; its output:" >&2
    tail -n 30 "$tmp/$name.out" >&2
    for f in "$tmp/$name"/logs/*.log; do
      [ -f "$f" ] && { echo "-- $f" >&2; tail -n 10 "$f" >&2; }
    done
    exit 1
  fi
  rm -rf "${tmp:?}/$name/ckpt"  # ~80 MB per run; only the logs are needed
  echo "  $name: $((SECONDS - start)) s"
}

load() { cut -d' ' -f1 /proc/loadavg; }
load_before="$(load)"
echo "== runs ($STEPS steps each; the first $WARMUP are warm-up); load average $load_before on $(nproc) cores"
for ((r = 0; r < REPEATS; r++)); do
  for m in $MS; do
    run "pp1-m$m-r$r" --pp=1 --micro_batches="$m"
    run "pp$PP-1f1b-m$m-r$r" --pp="$PP" --micro_batches="$m" --schedule=1f1b
  done
  if [ "$GPIPE_M" -gt 0 ]; then
    case " $MS " in
      *" $GPIPE_M "*) ;;
      *) run "pp1-m$GPIPE_M-r$r" --pp=1 --micro_batches="$GPIPE_M" ;;
    esac
    run "pp$PP-gpipe-m$GPIPE_M-r$r" --pp="$PP" --micro_batches="$GPIPE_M" --schedule=gpipe
  fi
done

# shellcheck disable=SC2086  # MS is a list of numbers
/usr/bin/python3 bench/pipeline_bubble.py "$tmp" "$PP" "$WARMUP" "$REPEATS" "$GPIPE_M" $MS
echo "(1-minute load average $load_before before the runs, $(load) after, on $(nproc)" \
     "cores: well above ~1 other processes shared the cores and the times are noisy)"
