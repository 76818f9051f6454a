#!/bin/bash
# Parameter-server throughput vs raw TCP on loopback. Installs what is
# missing (scripts/install_deps.sh bench: iperf3), builds //bench:ps_bench,
# measures a single-stream iperf3 on 127.0.0.1 for 5 s, then runs ps_bench
# (pull, push f32, push bf16 of a >= 100 MB model over --shards shards; see
# bench/ps_bench.cc), and prints the ratios of ps_bench's median rates to
# iperf3's rate (payload bytes/s against iperf3's received bytes/s):
#   ps pull / iperf3 ratio: X.XX
#   ps push / iperf3 ratio: X.XX        (push f32)
#   ps push bf16 / iperf3 ratio: X.XX   (bf16 payload bytes)
# The target is >= 0.5. Ends with `bazel shutdown`: nothing is left running.
#
# Usage: bench/ps_vs_iperf3.sh [ps_bench flags, e.g. --shards=4 --repeats=9]
# Environment: IPERF_PORT (default: a free port).
set -euo pipefail
cd "$(dirname "$0")/.."

source bench/iperf3_loopback.sh
cleanup() {
  iperf3_cleanup
  bazel shutdown >/dev/null 2>&1 || true
}
trap cleanup EXIT

scripts/install_deps.sh bench
bazel build //bench:ps_bench >/dev/null 2>&1 || bazel build //bench:ps_bench
BIN="$(bazel info bazel-bin 2>/dev/null)/bench/ps_bench"

measure_iperf3

echo "== ps_bench $*"
status=0
out="$("$BIN" "$@")" || status=$?
echo "$out"
if [ "$status" -ne 0 ]; then
  echo "ps_vs_iperf3: ps_bench failed (exit status $status)" >&2
  exit "$status"
fi
rate() {  # the GB/s of ps_bench's line "$1: X GB/s ..."
  echo "$out" | awk -v name="$1:" \
    'index($0, name) == 1 { print $(split(name, a, " ") + 1); exit }'
}
cpu() {  # client + shards cpu s/GB of ps_bench's line "$1: ..."
  echo "$out" | grep "^$1:" | sed -E \
    's/.*cpu s\/GB: client ([0-9.]+), shards ([0-9.]+).*/\1 \2/' |
    awk '{ print $1 + $2 }'
}
pull="$(rate "pull")"
push="$(rate "push f32")"
push_bf16="$(rate "push bf16")"
# The machine may be shared: wall-clock rates move with the load, CPU
# seconds per GB much less. Both are printed.
echo "== cpu s/GB of payload, both ends (lower is better)"
awk -v i="$iperf_cpu" -v p="$(cpu "pull")" -v q="$(cpu "push f32")" \
    -v r="$(cpu "push bf16")" 'BEGIN {
  printf "iperf3 %.2f, ps pull %.2f, ps push f32 %.2f, ps push bf16 %.2f\n", i, p, q, r
  printf "ps pull / iperf3 cpu-efficiency ratio: %.2f\n", i / p
  printf "ps push / iperf3 cpu-efficiency ratio: %.2f\n", i / q
}'
echo "== ratios (ps_bench median payload rate / iperf3 rate; target >= 0.5)"
awk -v p="$pull" -v q="$push" -v r="$push_bf16" -v b="$iperf_bps" 'BEGIN {
  i = b / 8e9
  printf "ps push bf16 / iperf3 ratio: %.2f\n", r / i
  printf "ps pull / iperf3 ratio: %.2f\n", p / i
  printf "ps push / iperf3 ratio: %.2f\n", q / i
}'
