#!/bin/bash
# A GPU-shaped SIMULATION of lmps's communication (issue #13's benchmark):
# GPT-2 small's parameter set (12 layers x 768, vocabulary 50304, context
# 1024, 124 M parameters) trained by W workers against S shards on
# loopback, with the compute replaced by a declared delay: the workers run
# the simulated device of worker/backend/sim_backend.h (--backend=sim:TFLOPS),
# which computes nothing and sleeps the time its FLOPs would take at a
# throughput chosen so that one step's forward and backward take DELAY_MS
# (default 40 ms, about an H100's bf16 step of batch 8 x 1024). Everything
# else is real: the pulls, pushes, shards' AdamW, copies in and out of the
# "device" memory. The loss is meaningless (0): this measures time only.
#
# For each configuration prints the median step time (the spacing of the
# steps' end times in steps.jsonl, the first and the last steps left out),
# its ratio to the declared compute time (1.0 would be communication
# entirely hidden or free) and the median fraction of communication hidden
# behind compute that layer-wise pulls report. Configurations: see CONFIGS
# below, numbered as issue #13's parts; each row is "name|train
# fields|lmps_local flags|worker flags". Part 4 (hierarchical aggregation)
# puts all WORKERS on one "host" (workers_per_host = WORKERS): on loopback
# that measures the cost of the local ring plus one push, not a network
# saved.
#
# Usage: bench/gpu_sim.sh [name-filter]
# Environment: WORKERS (2), SHARDS (2), STEPS (8), DELAY_MS (40), BATCH (8
# per worker), SEQ (1024).
set -euo pipefail
cd "$(dirname "$0")/.."

WORKERS="${WORKERS:-2}"
SHARDS="${SHARDS:-2}"
STEPS="${STEPS:-8}"
DELAY_MS="${DELAY_MS:-40}"
BATCH="${BATCH:-8}"
SEQ="${SEQ:-1024}"
FILTER="${1:-}"

L=12 C=768 NH=12 V=50304
OFF="layerwise_pull: LAYERWISE_PULL_OFF pull_dtype: F32"
CONFIGS=(
  "baseline: fp32 whole-model pull and push|$OFF||"
  "1. bf16 pulls|layerwise_pull: LAYERWISE_PULL_OFF pull_dtype: BF16||"
  "2. layer-wise prioritised pulls|layerwise_pull: LAYERWISE_PULL_ON pull_dtype: F32||"
  "3. int8 compression (error feedback)|$OFF compression { kind: QUANT_INT8 }||"
  "3. top-k 0.01 (error feedback)|$OFF compression { kind: TOPK ratio: 0.01 }||"
  "bf16 pushes (--push_dtype=bf16)|$OFF||--push_dtype=bf16"
  "1+2+3: bf16 pulls, layer-wise, int8 pushes|layerwise_pull: LAYERWISE_PULL_ON pull_dtype: BF16 compression { kind: QUANT_INT8 }||"
  "4. hierarchical aggregation (one host)|$OFF workers_per_host: $WORKERS||"
  "5. ring all-reduce (dp_aggregation)|dp_aggregation: RING_ALLREDUCE pull_dtype: F32||"
)

tmp="$(mktemp -d /tmp/lmps_gpu_sim.XXXXXX)"
cleanup() {
  rm -rf "$tmp"
  bazel shutdown >/dev/null 2>&1 || true
}
trap cleanup EXIT

targets=(//launcher:lmps_local)
bazel build "${targets[@]}" >/dev/null 2>&1 || bazel build "${targets[@]}"
BIN="$(bazel info bazel-bin 2>/dev/null)"

# The FLOPs of one worker's step as SimBackend charges them (forward: the
# blocks' products 24*N*C^2, attention 2*B*T^2*C per layer, the head
# 2*N*C*V; backward twice the forward), and the throughput that makes them
# take DELAY_MS.
read -r TFLOPS FLOPS < <(awk -v L=$L -v C=$C -v V=$V -v B="$BATCH" -v T="$SEQ" \
    -v ms="$DELAY_MS" 'BEGIN {
  N = B * T
  f = L * (24 * N * C * C + 2 * B * T * T * C) + 2 * N * C * V
  printf "%.6f %.4g\n", 3 * f / (ms / 1000) / 1e12, 3 * f }')

echo "SIMULATION (not a GPU): GPT-2 small, $WORKERS workers x $SHARDS shards" \
     "on loopback, batch $BATCH x $SEQ per worker, compute replaced by" \
     "$DELAY_MS ms per step ($FLOPS FLOP at a declared $TFLOPS TFLOP/s)," \
     "$(nproc) cores"
printf '%-46s %10s %13s %7s\n' "configuration" "step (ms)" "step/compute" "hidden"
for row in "${CONFIGS[@]}"; do
  IFS='|' read -r name train flags worker_flags <<<"$row"
  [[ -z "$FILTER" || "$name" == *"$FILTER"* ]] || continue
  dir="$tmp/run-$(echo "$name" | tr -c 'a-zA-Z0-9' '_')"
  mkdir -p "$dir"
  cat >"$dir/job.textproto" <<EOF
name: "gpu-sim"
model { n_layer: $L n_head: $NH n_embd: $C block_size: $SEQ vocab_size: $V }
optimizer { type: ADAMW lr: 0.0006 }
train {
  steps: $STEPS batch_size: $((BATCH * WORKERS)) seed: 1
  eval_interval: $((STEPS + 1)) eval_batches: 1 checkpoint_interval: -1
  sample_tokens: 0 $train
}
layout { dp: $WORKERS num_shards: $SHARDS }
EOF
  # shellcheck disable=SC2086
  if ! "$BIN/launcher/lmps_local" --job="$dir/job.textproto" \
      --run_dir="$dir/run" --quiet --export_model=false $flags \
      --worker_args="--backend=sim:$TFLOPS $worker_flags" \
      >"$dir/out" 2>&1; then
    cat "$dir/out" >&2
    echo "gpu_sim: '$name' failed; logs in $dir/run/logs" >&2
    trap - EXIT
    bazel shutdown >/dev/null 2>&1 || true
    exit 1
  fi
  /usr/bin/python3 - "$dir/run/steps.jsonl" "$DELAY_MS" "$name" <<'EOF'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
times = [r["time"] for r in rows]
gaps = [b - a for a, b in zip(times, times[1:])][:-1]  # not the last step
ms = 1e3 * statistics.median(gaps)
# The fraction of communication time hidden behind compute (layer-wise
# pulls report it; "-" where the configuration does not).
hidden = [w["comm_hidden"] for r in rows for w in r.get("workers", {}).values()
          if "comm_hidden" in w]
h = "%.2f" % statistics.median(hidden) if hidden else "-"
print("%-46s %10.0f %13.1f %7s" % (sys.argv[3], ms, ms / float(sys.argv[2]), h))
EOF
done
