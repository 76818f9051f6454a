#!/bin/bash
# Sequence parallelism and the vocab-parallel head against plain tensor
# parallelism: step time and peak activation memory per worker. Builds
# //launcher:lmps_local and trains a small GPT with lmps_local on this
# machine (in a temporary directory, removed at the end) with
# train.debug_trace_steps, so every worker logs per step its compute time
# and peak_activation_bytes / peak_layernorm_activation_bytes (the
# lmps_peak_activation_bytes gauge; StageModel::activation_memory()).
#
# Model and job: 4 layers, 4 heads, 128 wide, context 256, vocabulary 256,
# batch 8 sequences, one micro-batch, pp = 1, SYNC, one shard, PS_STEPS
# steps (default 8; the first 2 are warm-up), no evaluation, no export.
# Every worker gets --threads=1.
#
# For tp in 2 4: plain tp, + sequence_parallel, + sequence_parallel and
# vocab_parallel. Printed per run: median over steps of the slowest tp
# rank's compute_s (forward, backward and gradient copy-out of the step,
# collectives included), the largest peak activation bytes of a worker and
# of its LayerNorm region; then the ratios against plain tp at the same tp
# (the LayerNorm region should be 1/tp of plain tp's). Last line, for
# docs/benchmarks.md:
#   sequence parallel tp=4: layernorm activations x0.25, all activations xA.AA, step time xS.SS
# On 2 cores tp = 4 time-shares the cores (4 workers, one thread each): the
# step-time ratios compare like with like but are not a speed claim.
# Ends with `bazel shutdown`.
#
# Usage: bench/sequence_parallel.sh
# Environment: PS_STEPS (default 8), PS_KEEP=DIR (keep the runs there).
set -euo pipefail
cd "$(dirname "$0")/.."

STEPS="${PS_STEPS:-8}"
WARMUP=2
if [ "$STEPS" -le "$WARMUP" ]; then
  echo "sequence_parallel: PS_STEPS must be > $WARMUP" >&2
  exit 2
fi

tmp=""
cleanup() {
  if [ -n "$tmp" ] && [ -z "${PS_KEEP:-}" ]; then rm -rf "$tmp"; fi
  bazel shutdown >/dev/null 2>&1 || true
}
trap cleanup EXIT

bazel build //launcher:lmps_local >/dev/null 2>&1 || bazel build //launcher:lmps_local
LAUNCHER="$(bazel info bazel-bin 2>/dev/null)/launcher/lmps_local"
if [ -n "${PS_KEEP:-}" ]; then
  tmp="$PS_KEEP"
  mkdir -p "$tmp"
else
  tmp="$(mktemp -d /tmp/sequence_parallel.XXXXXX)"
fi

run() {  # run NAME TP SP VP
  local name="$1" tp="$2" sp="$3" vp="$4"
  mkdir -p "$tmp/$name"
  cat >"$tmp/$name/job.textproto" <<EOF
name: "sequence_parallel_bench"
model { n_layer: 4 n_head: 4 n_embd: 128 block_size: 256 vocab_size: 256 }
train {
  steps: $STEPS batch_size: 8 eval_interval: -1 checkpoint_interval: -1
  sample_tokens: 1 debug_trace_steps: true
}
layout {
  dp: 1 pp: 1 tp: $tp num_shards: 1
  sequence_parallel: $sp vocab_parallel: $vp
}
EOF
  local start=$SECONDS
  if ! "$LAUNCHER" --job="$tmp/$name/job.textproto" --run_dir="$tmp/$name/run" \
      --worker_args=--threads=1 --export_model=false --quiet --restart_job=0 \
      --restart_workers=0 --timeout_s=600 >"$tmp/$name.out" 2>&1; then
    echo "sequence_parallel: run $name failed; its output:" >&2
    tail -n 30 "$tmp/$name.out" >&2
    exit 1
  fi
  rm -rf "${tmp:?}/$name/run/ckpt"
  echo "  $name: $((SECONDS - start)) s"
}

load() { cut -d' ' -f1 /proc/loadavg; }
load_before="$(load)"
echo "== runs ($STEPS steps each; the first $WARMUP are warm-up); load average $load_before on $(nproc) cores"
for tp in 2 4; do
  run "tp$tp-plain" "$tp" false false
  run "tp$tp-sp" "$tp" true false
  run "tp$tp-sp-vp" "$tp" true true
done
/usr/bin/python3 bench/sequence_parallel.py "$tmp" "$WARMUP"
echo "(1-minute load average $load_before before the runs, $(load) after, on $(nproc) cores)"
