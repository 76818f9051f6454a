#!/bin/bash
# Tensor-parallel all-reduce bandwidth vs raw TCP on loopback. Installs what
# is missing (scripts/install_deps.sh bench: iperf3), builds
# //bench:allreduce_bench, measures a single-stream iperf3 on 127.0.0.1 for
# 5 s, then runs allreduce_bench (a ring all-reduce of --ranks workers, each
# with its own WorkerPeerService gRPC server on 127.0.0.1, over buffers of
# --mib MiB; see bench/allreduce_bench.cc) and prints the ratio of its bus
# bandwidth at the largest size (median) to iperf3's rate (received
# bytes/s):
#   allreduce busbw / iperf3 ratio: X.XX
# and, less sensitive to other load on the machine, the ratio of iperf3's
# CPU seconds per GB (client + server) to the benchmark's (the whole
# process: every rank's sends, receives, copies and additions, per GB that
# any connection carried):
#   allreduce / iperf3 cpu-efficiency ratio: X.XX
#
# Why bus bandwidth: in a ring all-reduce of n ranks over a buffer of B
# bytes, every rank sends 2(n-1)/n * B bytes to its next neighbour
# (reduce-scatter, then all-gather) and receives as many from its previous
# one, each over its one TCP connection per neighbour. busbw =
# 2(n-1)/n * B / time (NCCL's convention) is therefore the rate each of
# those connections carries, the same quantity as one iperf3 stream's rate;
# algbw = B / time depends on n and is not comparable with a link rate. All
# n connections share this machine's cores as iperf3's client and server do,
# so the ratio measures the per-byte cost of the gRPC transport (framing,
# copies, mailbox) against a plain socket. Ends with `bazel shutdown`:
# nothing is left running.
#
# Usage: bench/allreduce_vs_iperf3.sh [allreduce_bench flags, e.g. --ranks=3
#        --mib=16,64,256 --repeats=9]
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
bazel build //bench:allreduce_bench >/dev/null 2>&1 ||
  bazel build //bench:allreduce_bench
BIN="$(bazel info bazel-bin 2>/dev/null)/bench/allreduce_bench"

measure_iperf3

echo "== allreduce_bench $*"
status=0
out="$("$BIN" "$@")" || status=$?
echo "$out"
if [ "$status" -ne 0 ]; then
  echo "allreduce_vs_iperf3: allreduce_bench failed (exit status $status)" >&2
  exit "$status"
fi
last() {  # the value of allreduce_bench's line "$1: X"
  echo "$out" | awk -v name="$1:" \
    'index($0, name) == 1 { print $NF; exit }'
}
busbw="$(last "allreduce busbw GB/s (largest size, median)")"
cpu="$(last "allreduce cpu s/GB (largest size)")"
if [ -z "$busbw" ] || [ -z "$cpu" ]; then
  echo "allreduce_vs_iperf3: allreduce_bench's summary lines are missing" >&2
  exit 1
fi
# The machine may be shared: wall-clock rates move with the load, CPU
# seconds per GB much less. Both are printed.
echo "== cpu s/GB carried by a connection, both ends (lower is better)"
awk -v i="$iperf_cpu" -v a="$cpu" 'BEGIN {
  printf "iperf3 %.2f, allreduce %.2f\n", i, a
  printf "allreduce / iperf3 cpu-efficiency ratio: %.2f\n", i / a
}'
echo "== ratio (allreduce busbw at the largest size, median / iperf3 rate)"
awk -v a="$busbw" -v b="$iperf_bps" 'BEGIN {
  printf "allreduce busbw / iperf3 ratio: %.2f\n", a / (b / 8e9)
}'
