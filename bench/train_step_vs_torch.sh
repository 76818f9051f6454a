#!/bin/bash
# Training-step throughput of lmps (CPU backend) vs PyTorch on the same GPT,
# same batch and thread count (forward + backward + plain SGD update).
#
# Builds //bench:train_step_bench, then for ROUNDS rounds runs, back to
# back: lmps, PyTorch as installed, and PyTorch with OPENBLAS_NUM_THREADS=1
# (Debian's PyTorch calls the pthreads OpenBLAS, whose own threads fight
# PyTorch's OpenMP threads; with one BLAS thread PyTorch is often faster, so
# the better of the two PyTorch configurations is the baseline). Each
# program reports B*T over its median step time. The machine may be
# shared: alternating exposes all runs to the same conditions, and the best
# round of each approximates its speed on an idle machine. Last line:
#   lmps/torch tokens/s ratio: X.XX
#
# Usage: bench/train_step_vs_torch.sh [--n_layer=4 --n_head=4 --n_embd=256
#          --block_size=128 --batch=8 --threads=2 --steps=20]
# Environment: ROUNDS (default 3), PYTHON (default /usr/bin/python3).
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS="${ROUNDS:-3}"
PYTHON="${PYTHON:-/usr/bin/python3}"
ARGS=(--n_layer=4 --n_head=4 --n_embd=256 --block_size=128 --batch=8
      --threads=2 --steps=20 "$@")

bazel build //bench:train_step_bench >/dev/null 2>&1 ||
  bazel build //bench:train_step_bench
BIN="$(bazel info bazel-bin 2>/dev/null)/bench/train_step_bench"

max() { awk -v a="$1" -v b="$2" 'BEGIN { print (a > b) ? a : b }'; }
# Runs "$@", echoes its output, and stores its "<tag> tokens/s:" value in V.
run() {
  local out
  out="$("$@")"
  echo "$out"
  V="$(echo "$out" | awk -F': ' '/^(lmps|torch) tokens\/s:/ { print $2 }')"
}

best_lmps=0
best_torch=0
best_torch1=0
for round in $(seq 1 "$ROUNDS"); do
  echo "== round $round: lmps"
  run "$BIN" "${ARGS[@]}"
  best_lmps="$(max "$best_lmps" "$V")"
  echo "== round $round: torch"
  run "$PYTHON" bench/torch_train_step.py "${ARGS[@]}"
  best_torch="$(max "$best_torch" "$V")"
  echo "== round $round: torch, OPENBLAS_NUM_THREADS=1"
  run env OPENBLAS_NUM_THREADS=1 "$PYTHON" bench/torch_train_step.py "${ARGS[@]}"
  best_torch1="$(max "$best_torch1" "$V")"
done
baseline="$(max "$best_torch" "$best_torch1")"
echo "== best of $ROUNDS rounds"
echo "lmps tokens/s: $best_lmps"
echo "torch tokens/s: $best_torch (OPENBLAS_NUM_THREADS=1: $best_torch1)"
awk -v a="$best_lmps" -v b="$baseline" \
  'BEGIN { printf "lmps/torch tokens/s ratio: %.2f\n", a / b }'
