#!/bin/bash
# Training-step throughput of lmps (CPU backend) vs PyTorch on the same GPT,
# same batch and thread count. Builds //bench:train_step_bench, then runs
# lmps and PyTorch alternately for ROUNDS rounds (the machine may be shared:
# alternating exposes both to the same conditions) and compares the best
# round of each. Prints the last line
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

best_lmps=0
best_torch=0
max() { awk -v a="$1" -v b="$2" 'BEGIN { print (a > b) ? a : b }'; }
for round in $(seq 1 "$ROUNDS"); do
  echo "== round $round"
  out="$("$BIN" "${ARGS[@]}")"
  echo "$out"
  v="$(echo "$out" | awk -F': ' '/^lmps tokens\/s:/ { print $2 }')"
  best_lmps="$(max "$best_lmps" "$v")"

  out="$("$PYTHON" bench/torch_train_step.py "${ARGS[@]}")"
  echo "$out"
  v="$(echo "$out" | awk -F': ' '/^torch tokens\/s:/ { print $2 }')"
  best_torch="$(max "$best_torch" "$v")"
done
echo "== best of $ROUNDS rounds"
echo "lmps tokens/s: $best_lmps"
echo "torch tokens/s: $best_torch"
awk -v a="$best_lmps" -v b="$best_torch" \
  'BEGIN { printf "lmps/torch tokens/s ratio: %.2f\n", a / b }'
