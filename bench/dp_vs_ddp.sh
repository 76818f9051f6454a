#!/bin/bash
# Data-parallel training throughput: lmps with dp = 2 workers (one CPU
# thread each) in both aggregation modes -- the parameter servers
# (train.dp_aggregation PARAMETER_SERVER, 2 shards) and the ring all-reduce
# among the workers (RING_ALLREDUCE; the shards only receive dp rank 0's
# background copy) -- against PyTorch DDP (gloo, 2 processes of 1 thread,
# bench/torch_ddp.py), same GPT (4 layers x 256 wide, block 128, byte
# vocabulary), same per-worker batch and steps, AdamW everywhere. lmps's
# figure is the sum over both workers of their "done: ... tokens/s" (tokens
# over the wall time of the whole training loop, first pull included);
# DDP's is measured the same way on rank 0. ROUNDS rounds alternate the
# three (the machine may be shared), in reverse order every second round
# (so none always runs first); the best round of each is compared:
#   ps/ddp tokens/s ratio: X.XX
#   ring/ddp tokens/s ratio: X.XX
# and what bounds these ratios on this machine, measured in the same run
# (bench/train_step_bench, one thread, the same model and batch): two
# workers whose every matrix product ran at OpenBLAS's one-thread sgemm
# peak with nothing else costing time (no other layer, no communication,
# no optimizer) would reach 2 x "OpenBLAS-peak tokens/s":
#   ceiling/ddp tokens/s ratio: X.XX
# No implementation of this data-parallel job on one core per worker can
# exceed it against the same DDP figure.
#
# Usage: bench/dp_vs_ddp.sh
# Environment: STEPS (default 40), BATCH per worker (default 8), ROUNDS
# (default 2), PYTHON (default /usr/bin/python3).
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/round_order.sh

STEPS="${STEPS:-40}"
BATCH="${BATCH:-8}"
ROUNDS="${ROUNDS:-2}"
PYTHON="${PYTHON:-/usr/bin/python3}"

tmp="$(mktemp -d /tmp/lmps_dp_vs_ddp.XXXXXX)"
trap 'rm -rf "$tmp"' EXIT

bazel build //launcher:lmps_local //bench:train_step_bench >/dev/null 2>&1 ||
  bazel build //launcher:lmps_local //bench:train_step_bench
BIN="$(bazel info bazel-bin 2>/dev/null)"

max() { awk -v a="$1" -v b="$2" 'BEGIN { print (a > b) ? a : b }'; }

# lmps MODE: prints the job's tokens/s (sum over the two workers) in V.
lmps() {
  local mode="$1" run_dir="$tmp/run-$1-$2" spec="$tmp/$1.textproto"
  cat >"$spec" <<SPEC
name: "dp-vs-ddp-$mode"
model { n_layer: 4 n_head: 4 n_embd: 256 block_size: 128 vocab_size: 256 }
train {
  steps: $STEPS batch_size: $((2 * BATCH)) micro_batches: 1 seed: 1337
  eval_interval: $((STEPS + 1)) eval_batches: 1 checkpoint_interval: $STEPS
  sample_tokens: 1 dp_aggregation: $mode
}
layout { dp: 2 num_shards: 2 }
SPEC
  if ! OPENBLAS_NUM_THREADS=1 "$BIN/launcher/lmps_local" --job="$spec" \
      --workers=2 --shards=2 --run_dir="$run_dir" --quiet \
      --export_model=false --worker_args="--threads=1" \
      >"$run_dir.out" 2>&1; then
    cat "$run_dir.out" >&2
    echo "dp_vs_ddp: lmps_local ($mode) failed; logs in $run_dir/logs" >&2
    trap - EXIT
    exit 1
  fi
  V="$(grep -h 'done: step' "$run_dir"/logs/worker-[01].log | awk '
    { for (i = 1; i < NF; ++i) if ($(i + 1) == "tokens/s") s += $i }
    END { printf "%.1f", s }')"
}

best_ps=0
best_ring=0
best_ddp=0
best_peak=0
# One variant of a round: ps, ring or ddp.
run_variant() {
  local variant="$1" round="$2" out
  case "$variant" in
    ps)
      lmps PARAMETER_SERVER "$round"
      echo "round $round lmps dp=2 PARAMETER_SERVER: $V tokens/s"
      best_ps="$(max "$best_ps" "$V")" ;;
    ring)
      lmps RING_ALLREDUCE "$round"
      echo "round $round lmps dp=2 RING_ALLREDUCE: $V tokens/s"
      best_ring="$(max "$best_ring" "$V")" ;;
    ddp)
      out="$(OPENBLAS_NUM_THREADS=1 "$PYTHON" bench/torch_ddp.py --world=2 \
        --threads=1 --batch="$BATCH" --steps="$STEPS")"
      echo "$out" | sed "s/^/round $round /"
      V="$(echo "$out" | awk -F': ' '/^ddp tokens\/s:/ { print $2 }')"
      best_ddp="$(max "$best_ddp" "$V")" ;;
  esac
}

for round in $(seq 1 "$ROUNDS"); do
  for variant in $(round_order "$round" ps ring ddp); do
    run_variant "$variant" "$round"
  done
  out="$(OPENBLAS_NUM_THREADS=1 "$BIN/bench/train_step_bench" --threads=1 \
    --batch="$BATCH" --steps=10)"
  echo "$out" | grep -E 'tokens/s|GFLOP|ratio' | sed "s/^/round $round one thread: /"
  V="$(echo "$out" | awk -F': ' '/^OpenBLAS-peak tokens\/s:/ { print $2 }')"
  best_peak="$(max "$best_peak" "$V")"
done
echo "== best of $ROUNDS rounds (steps $STEPS, batch $BATCH per worker)"
echo "lmps PARAMETER_SERVER tokens/s: $best_ps"
echo "lmps RING_ALLREDUCE tokens/s: $best_ring"
echo "torch DDP tokens/s: $best_ddp"
awk -v a="$best_ps" -v b="$best_ddp" \
  'BEGIN { printf "ps/ddp tokens/s ratio: %.2f\n", a / b }'
awk -v a="$best_ring" -v b="$best_ddp" \
  'BEGIN { printf "ring/ddp tokens/s ratio: %.2f\n", a / b }'
awk -v a="$best_ring" -v b="$best_ps" \
  'BEGIN { printf "ring/ps tokens/s ratio: %.2f\n", a / b }'
awk -v a="$best_peak" -v b="$best_ddp" \
  'BEGIN { printf "ceiling/ddp tokens/s ratio: %.2f\n", 2 * a / b }'
