#!/bin/bash
# Distributed overhead: training tokens/s of a real lmps job with one worker
# and one parameter-server shard (lmps_local: scheduler + lmps_server +
# lmps_worker on loopback; every step pulls the model, pushes the gradient,
# GradNorm and Apply with AdamW on the shard) against the same model's
# training step run in-process by //bench:train_step_bench (forward,
# backward and an SGD update; no RPC), with the same model, batch and thread
# count. For each config prints
#   distributed/in-process tokens/s ratio: X.XX
# where distributed is the worker's "done: ... T tokens/s" (tokens over the
# wall time of its whole training loop: a mean) and in-process is
# train_step_bench's mean tokens/s (its median-based figure is printed
# too). Runs ROUNDS rounds, alternating the two (the machine may be shared),
# and compares the best round of each (the distributed variants run in the
# reverse order every second round). Also printed:
#   steady-state distributed/in-process tokens/s ratio: X.XX
# with the distributed job timed as train_step_bench times its own steps
# (after 3 warm-up steps; without the last step, whose Apply writes the
# checkpoint), from the times in the job's step log (steps.jsonl): the
# worker's "done" mean also holds its first step (connections, first pull,
# first touch of every buffer) and the checkpoint, which the in-process
# figure does not.
#
# Configs: "small" = the launcher's default model (n_layer 4, n_head 4,
# n_embd 128, block_size 64, batch 16); "medium" = n_embd 256, block_size
# 128, batch 8. The job evaluates only after its last step and checkpoints
# only at its last step (written inside the last Apply, so inside the timed
# loop: a few MB).
#
# The distributed job runs twice per round: with train.layerwise_pull OFF
# (the whole pull before the forward pass: the "before") and ON (layer-wise
# pull pipelining, the default: the "after"), each printed with its ratio and
# the mean fraction of communication hidden behind compute (comm_hidden of
# the step log). Both move payloads through shared memory (JobSpec
# shared_memory AUTO, the default: worker and shard share this host); the
# variant "sock" is "off" with shared_memory OFF (payloads through the
# loopback socket, as before shared memory); the variant "sep" is "off"
# with lmps_worker --pull_with_push=false (each step pulls in a call of its
# own instead of in the push's answer: the "before" of PushRequest.then_pull).
#
# Usage: bench/overhead.sh [small|medium]...   (default: both)
# Environment: STEPS (default 80), THREADS (default 2), ROUNDS (default 2),
# VARIANTS (default "sock sep off on").
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/round_order.sh

STEPS="${STEPS:-80}"
THREADS="${THREADS:-2}"
ROUNDS="${ROUNDS:-2}"
VARIANTS="${VARIANTS:-sock sep off on}"
declare -A best_dist best_steady hidden wargs
configs=("$@")
[ ${#configs[@]} -gt 0 ] || configs=(small medium)

tmp="$(mktemp -d /tmp/lmps_overhead.XXXXXX)"
cleanup() {
  rm -rf "$tmp"
  bazel shutdown >/dev/null 2>&1 || true
}
trap cleanup EXIT

targets=(//launcher:lmps_local //bench:train_step_bench)
bazel build "${targets[@]}" >/dev/null 2>&1 || bazel build "${targets[@]}"
BIN="$(bazel info bazel-bin 2>/dev/null)"

max() { awk -v a="$1" -v b="$2" 'BEGIN { print (a > b) ? a : b }'; }

for config in "${configs[@]}"; do
  case "$config" in
    small) layers=4 heads=4 embd=128 block=64 batch=16 ;;
    medium) layers=4 heads=4 embd=256 block=128 batch=8 ;;
    *) echo "overhead: unknown config '$config' (small, medium)" >&2; exit 2 ;;
  esac
  for variant in $VARIANTS; do
    case "$variant" in
      sock) mode=LAYERWISE_PULL_OFF shm=SHARED_MEMORY_OFF ;;
      off|sep) mode=LAYERWISE_PULL_OFF shm=SHARED_MEMORY_AUTO ;;
      on) mode=LAYERWISE_PULL_ON shm=SHARED_MEMORY_AUTO ;;
      *) echo "overhead: unknown variant '$variant' (sock, off, sep, on)" >&2; exit 2 ;;
    esac
    wargs[$variant]=""
    [ "$variant" != sep ] || wargs[$variant]="--pull_with_push=false"
    cat >"$tmp/$config-$variant.textproto" <<EOF
name: "overhead-$config"
model { n_layer: $layers n_head: $heads n_embd: $embd block_size: $block vocab_size: 256 }
train {
  steps: $STEPS batch_size: $batch micro_batches: 1 seed: 1337
  eval_interval: $((STEPS + 1)) eval_batches: 1 checkpoint_interval: $STEPS
  sample_tokens: 1 layerwise_pull: $mode
}
layout { dp: 1 num_shards: 1 }
shared_memory: $shm
EOF
    best_dist[$variant]=0
    best_steady[$variant]=0
    hidden[$variant]=-
  done
  echo "=== $config: n_layer=$layers n_head=$heads n_embd=$embd" \
       "block_size=$block batch=$batch threads=$THREADS steps=$STEPS"
  best_mean=0
  best_median=0
  for round in $(seq 1 "$ROUNDS"); do
    # shellcheck disable=SC2086  # VARIANTS is a word list
    for variant in $(round_order "$round" $VARIANTS); do
      run_dir="$tmp/run-$config-$variant-$round"
      start=$(date +%s.%N)
      if ! "$BIN/launcher/lmps_local" --job="$tmp/$config-$variant.textproto" \
          --workers=1 --shards=1 \
          --run_dir="$run_dir" --quiet --export_model=false \
          --worker_args="--threads=$THREADS ${wargs[$variant]}" >"$run_dir.out" 2>&1; then
        cat "$run_dir.out" >&2
        echo "overhead: lmps_local failed; logs in $run_dir/logs" >&2
        trap - EXIT
        bazel shutdown >/dev/null 2>&1 || true
        exit 1
      fi
      secs=$(awk -v s="$start" -v e="$(date +%s.%N)" 'BEGIN { printf "%.1f", e - s }')
      done_line="$(grep -h 'done: step' "$run_dir/logs/worker-0.log" | tail -1)"
      dist="$(echo "$done_line" | awk '{ for (i = 1; i < NF; ++i)
        if ($(i + 1) == "tokens/s") print $i }')"
      # The mean over the steps of the worker's comm_hidden (steps.jsonl).
      h="$(python3 -c '
import json, sys
v = [r["workers"][w]["comm_hidden"] for r in map(json.loads, open(sys.argv[1]))
     for w in r.get("workers", {}) if "comm_hidden" in r["workers"][w]]
print("%.2f" % (sum(v) / len(v)) if v else "-")' "$run_dir/steps.jsonl" 2>/dev/null || echo -)"
      # Steady state, timed as train_step_bench times its steps: after 3
      # warm-up steps, and without the last (whose Apply writes the
      # checkpoint): tokens of steps 3 .. STEPS-2 over the step log's time
      # from the end of step 2 to the end of step STEPS-2.
      steady="$(python3 -c '
import json, sys
t = {r["step"]: r["time"] for r in map(json.loads, open(sys.argv[1]))}
n, tokens = int(sys.argv[2]), int(sys.argv[3])
print("%.0f" % ((n - 4) * tokens / (t[n - 2] - t[2])))' \
        "$run_dir/steps.jsonl" "$STEPS" $((batch * block)) 2>/dev/null || echo 0)"
      echo "round $round distributed, variant $variant: $done_line" \
           "(steady state $steady tokens/s; comm hidden $h; lmps_local ran ${secs} s)"
      best_steady[$variant]="$(max "$steady" "${best_steady[$variant]}")"
      if awk -v a="$dist" -v b="${best_dist[$variant]}" 'BEGIN { exit !(a > b) }'; then
        best_dist[$variant]="$dist"
        hidden[$variant]="$h"
      fi
    done

    out="$("$BIN/bench/train_step_bench" --n_layer="$layers" --n_head="$heads" \
      --n_embd="$embd" --block_size="$block" --batch="$batch" \
      --threads="$THREADS" --steps=30 --warmup=3)"
    mean="$(echo "$out" | awk -F': ' '/^lmps mean tokens\/s:/ { print $2 }')"
    median="$(echo "$out" | awk -F': ' '/^lmps tokens\/s:/ { print $2 }')"
    echo "round $round in-process: mean $mean tokens/s, median-step $median tokens/s" \
         "($(echo "$out" | grep '^lmps ms/step'))"
    best_mean="$(max "$best_mean" "$mean")"
    best_median="$(max "$best_median" "$median")"
  done
  echo "--- $config, best of $ROUNDS rounds"
  echo "in-process tokens/s: $best_mean (mean; median-step: $best_median)"
  for variant in $VARIANTS; do
    d="${best_dist[$variant]}"
    echo "variant $variant: distributed tokens/s: $d" \
         "(comm hidden ${hidden[$variant]})"
    awk -v d="$d" -v m="$best_mean" -v md="$best_median" -v b="$batch" \
        -v t="$block" -v v="$variant" 'BEGIN {
      printf "variant %s: per step: distributed %.1f ms, in-process %.1f ms (overhead %.1f ms)\n",
             v, 1e3 * b * t / d, 1e3 * b * t / m, 1e3 * b * t / d - 1e3 * b * t / m
      printf "variant %s: distributed/in-process (median-step) tokens/s ratio: %.2f\n", v, d / md
      printf "variant %s: distributed/in-process tokens/s ratio: %.2f\n", v, d / m
    }'
    awk -v s="${best_steady[$variant]}" -v m="$best_mean" -v v="$variant" 'BEGIN {
      printf "variant %s: steady-state distributed/in-process tokens/s ratio: %.2f (distributed %.0f tokens/s)\n", v, s / m, s
    }'
  done
done
