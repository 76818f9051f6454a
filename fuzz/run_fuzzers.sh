#!/usr/bin/env bash
# Runs every lmps fuzz target (fuzz/*_fuzzer.cc: the job-spec parser,
# SchedulerCore, ParameterShard) for a bounded time each, one after the
# other, and fails on the first crash, sanitizer report, violated property,
# timeout or out-of-memory.
#
#   fuzz/run_fuzzers.sh [SECONDS_PER_TARGET] [FUZZER ...]    (default 20 s)
#
# The fuzzers are libFuzzer binaries built by Bazel with the system clang++
# (fuzz/clang_fuzzers.bzl): this script runs `bazel build //fuzz:fuzzers`
# first, unless LMPS_FUZZ_BIN names a directory holding them (the sh_test
# //tests:fuzz_test runs it that way, from its runfiles). Without clang or
# libFuzzer's runtime the fuzzers are stubs: the script says so and exits 0
# (install the Debian packages clang and libclang-rt-14-dev).
#
# Each target starts from its seed corpus (fuzz/corpus/<target>/, plus the
# example job specs for the job-spec parser) copied to a scratch directory.
# Exploring (the default): a random seed each run, for SECONDS each. A fixed
# replay (what //tests:fuzz_test does, so that the suite gives the same
# answer every time): LMPS_FUZZ_SEED=N (libFuzzer's -seed) and
# LMPS_FUZZ_RUNS=R (-runs: R inputs, SECONDS only a cap); a slower machine
# that hits the cap has run a prefix of the same inputs.
#
# Crashing inputs are written to $LMPS_FUZZ_ARTIFACTS (default: the scratch
# directory, or Bazel's undeclared test outputs); reproduce one with
#   .bazel/bin/fuzz/<target> <crash-file>
set -uo pipefail

seconds="${1:-20}"
shift || true
if ! [[ "$seconds" =~ ^[0-9]+$ ]] || [ "$seconds" -lt 1 ]; then
  echo "usage: $0 [SECONDS_PER_TARGET] [FUZZER ...]" >&2
  exit 2
fi

# Where the sources (corpora, dictionaries) and the binaries are.
if [ -n "${TEST_SRCDIR:-}" ]; then
  root="$TEST_SRCDIR/${TEST_WORKSPACE:-lmps}"
else
  root="$(cd "$(dirname "$0")/.." && pwd)"
fi
bin="${LMPS_FUZZ_BIN:-}"
if [ -z "$bin" ]; then
  (cd "$root" && bazel build //fuzz:fuzzers) || {
    echo "run_fuzzers: bazel build //fuzz:fuzzers failed" >&2
    exit 1
  }
  bin="$root/.bazel/bin/fuzz"
fi
case "$bin" in /*) ;; *) bin="$root/$bin" ;; esac

targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  targets=(jobspec_fuzzer scheduler_fuzzer shard_fuzzer)
fi

scratch="$(mktemp -d "${TEST_TMPDIR:-/tmp}/lmps_fuzz.XXXXXX")"
trap 'rm -rf "$scratch"' EXIT
artifacts="${LMPS_FUZZ_ARTIFACTS:-${TEST_UNDECLARED_OUTPUTS_DIR:-$scratch/artifacts}}"
mkdir -p "$artifacts"

failed=()
skipped=0
for t in "${targets[@]}"; do
  exe="$bin/$t"
  if [ ! -x "$exe" ]; then
    echo "run_fuzzers: $exe not found" >&2
    exit 1
  fi
  if [ "$(head -c 2 "$exe")" = "#!" ]; then
    # A stub: clang or libFuzzer is missing where it was built.
    echo "run_fuzzers: SKIPPED $t: $("$exe" | sed 's/^lmps-fuzz-skip: //')"
    skipped=$((skipped + 1))
    continue
  fi
  corpus="$scratch/corpus/$t"
  mkdir -p "$corpus"
  name="${t%_fuzzer}"
  [ -d "$root/fuzz/corpus/$name" ] && cp "$root/fuzz/corpus/$name"/* "$corpus"/ 2>/dev/null
  extra=()
  if [ "$name" = jobspec ]; then
    cp "$root"/examples/*.textproto "$corpus"/ 2>/dev/null
    extra+=("-dict=$root/fuzz/jobspec.dict" -max_len=4096)
  else
    # Operation sequences: long inputs from the start (libFuzzer otherwise
    # grows the length limit slowly, and a short run never gets far).
    extra+=(-max_len=2048 -len_control=0)
  fi
  if [ -n "${LMPS_FUZZ_SEED:-}" ]; then
    extra+=("-seed=$LMPS_FUZZ_SEED")
  fi
  if [ -n "${LMPS_FUZZ_RUNS:-}" ]; then
    extra+=("-runs=$LMPS_FUZZ_RUNS")
  fi
  log="$scratch/$t.log"
  echo "run_fuzzers: $t for ${seconds}s${LMPS_FUZZ_SEED:+ (seed $LMPS_FUZZ_SEED)}${LMPS_FUZZ_RUNS:+, at most $LMPS_FUZZ_RUNS inputs}"
  # -timeout: one input taking longer is a hang (a bug); -rss_limit_mb: so is
  # runaway memory. Leak checking stays on (ASan's default).
  "$exe" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 \
    -print_final_stats=1 -artifact_prefix="$artifacts/$t-" \
    "${extra[@]}" "$corpus" >"$log" 2>&1
  rc=$?
  if [ $rc -ne 0 ]; then
    echo "run_fuzzers: FAILED $t (exit $rc); the end of its log:" >&2
    tail -n 60 "$log" >&2
    crash="$(ls -t "$artifacts/$t-"* 2>/dev/null | head -n 1)"
    [ -n "$crash" ] && echo "run_fuzzers: reproduce with: $exe $crash" >&2
    failed+=("$t")
  else
    grep -E '^(#[0-9]+\s+DONE|stat::number_of_executed_units|stat::new_units_added)' "$log" |
      sed "s/^/  /"
  fi
done

if [ ${#failed[@]} -ne 0 ]; then
  echo "run_fuzzers: ${#failed[@]} target(s) failed: ${failed[*]}" >&2
  exit 1
fi
if [ "$skipped" -gt 0 ]; then
  # For scripts/test.sh: clang and libclang-rt are in scripts/install_deps.sh.
  echo "LMPS_SKIP(installable): $skipped of ${#targets[@]} fuzz targets are stubs (clang/libFuzzer missing where they were built: apt-get install clang libclang-rt-14-dev)"
fi
if [ "$skipped" -eq ${#targets[@]} ]; then
  echo "run_fuzzers: every target SKIPPED (clang/libFuzzer missing where they were built)"
elif [ "$skipped" -gt 0 ]; then
  echo "run_fuzzers: $skipped target(s) SKIPPED; the others ran without a crash"
else
  echo "run_fuzzers: all targets ran without a crash"
fi
