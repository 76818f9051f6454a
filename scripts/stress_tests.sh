#!/usr/bin/env bash
# Flake hunting: runs the multi-process tests (the targets in tests/ that
# start the real daemons, i.e. depend directly on //server/scheduler:lmps_scheduler)
# N times each with `bazel test --runs_per_test=N --nocache_test_results`
# while `stress-ng --cpu 2` keeps both cores busy, then prints one line per
# target, "TARGET: P/N passed", and a total. Exits 0 only if every run of
# every target passed (1 otherwise, 2 on bad usage).
#
#   scripts/stress_tests.sh [-n N] [-f REGEX] [-j JOBS] [-- BAZEL_FLAGS...]
#     -n, --runs=N      runs per target (default 20; env LMPS_STRESS_RUNS)
#     -f, --filter=RE   only targets whose label matches the extended regex RE
#                       (env LMPS_STRESS_FILTER), e.g. -f 'scrape|reflection'
#     -j, --jobs=J      test runs in parallel (--local_test_jobs; default 2;
#                       env LMPS_STRESS_JOBS)
#     --cpu=C           stress-ng CPU workers (default 2; env LMPS_STRESS_CPU)
#     --list            print the selected targets and exit
#     -- FLAGS          more flags for `bazel build` and `bazel test` (build
#                       options such as --test_filter=..., --test_env=...)
#
# stress-ng is installed with scripts/install_deps.sh stress when missing. It
# runs in its own process group, which is stopped on every exit path
# (normal end, failure, Ctrl-C, SIGTERM); its own --timeout (24 h) is the
# backstop should this script be SIGKILLed. Like any bazel command this
# leaves the Bazel server running. The default 20 runs of every target take
# hours on 2 cores: narrow with -f and -n.
set -euo pipefail
cd "$(dirname "$0")/.."

usage() { sed -n '9,18p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
runs="${LMPS_STRESS_RUNS:-20}"
filter="${LMPS_STRESS_FILTER:-}"
jobs="${LMPS_STRESS_JOBS:-2}"
cpu="${LMPS_STRESS_CPU:-2}"
list=""
extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    -n) runs="${2:?-n needs a number}"; shift 2 ;;
    --runs=*) runs="${1#*=}"; shift ;;
    -f) filter="${2:?-f needs a regex}"; shift 2 ;;
    --filter=*) filter="${1#*=}"; shift ;;
    -j) jobs="${2:?-j needs a number}"; shift 2 ;;
    --jobs=*) jobs="${1#*=}"; shift ;;
    --cpu=*) cpu="${1#*=}"; shift ;;
    --list) list=1; shift ;;
    --) shift; extra=("$@"); break ;;
    -h|--help) usage ;;
    *) echo "stress_tests: unknown argument $1" >&2; usage ;;
  esac
done
for v in runs jobs cpu; do
  [[ "${!v}" =~ ^[1-9][0-9]*$ ]] || { echo "stress_tests: $v must be a positive integer, got '${!v}'" >&2; exit 2; }
done

# --- the targets: tests in //tests that start the daemons -------------------------
query='tests(//tests:all) intersect rdeps(//tests:all, //server/scheduler:lmps_scheduler, 1)'
if ! found=$(bazel query --noshow_progress "$query" 2>&1); then
  echo "$found" >&2
  echo "stress_tests: bazel query '$query' failed" >&2
  exit 1
fi
mapfile -t targets < <(grep -E '^//' <<<"$found" | sort)
[ "${#targets[@]}" -gt 0 ] || { echo "stress_tests: bazel query found no multi-process tests in //tests" >&2; exit 1; }
if [ -n "$filter" ]; then
  mapfile -t targets < <(printf '%s\n' "${targets[@]}" | grep -E -- "$filter" || true)
  [ "${#targets[@]}" -gt 0 ] || { echo "stress_tests: no multi-process test matches '$filter'" >&2; exit 2; }
fi
if [ -n "$list" ]; then printf '%s\n' "${targets[@]}"; exit 0; fi

# --- load: stress-ng, stopped on every exit path -----------------------------------
command -v stress-ng >/dev/null || scripts/install_deps.sh stress
command -v stress-ng >/dev/null || { echo "stress_tests: stress-ng is not installed" >&2; exit 1; }
work="$(mktemp -d)"
stress_pid=""
bazel_pid=""
stop_stress() {
  [ -n "$stress_pid" ] || return 0
  # The whole group: stress-ng and its CPU workers.
  kill -TERM -- "-$stress_pid" 2>/dev/null || kill -TERM "$stress_pid" 2>/dev/null || true
  for _ in $(seq 50); do kill -0 "$stress_pid" 2>/dev/null || break; sleep 0.1; done
  kill -KILL -- "-$stress_pid" 2>/dev/null || true
  wait "$stress_pid" 2>/dev/null || true
  stress_pid=""
}
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  # Interrupted while the tests ran: the Bazel client cancels them on SIGINT
  # (a Ctrl-C in the terminal has already reached it; a signal sent to this
  # script alone has not, so forward one then; never more than one, as the
  # third interrupt kills the Bazel server).
  if [ -n "$bazel_pid" ] && kill -0 "$bazel_pid" 2>/dev/null; then
    for _ in $(seq 20); do kill -0 "$bazel_pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$bazel_pid" 2>/dev/null && kill -INT "$bazel_pid" 2>/dev/null
    for _ in $(seq 300); do kill -0 "$bazel_pid" 2>/dev/null || break; sleep 0.1; done
  fi
  stop_stress
  rm -rf "$work"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Build first (unloaded), so that the load only meets the tests (with the
# test's flags, so that the analysis is reused).
echo "stress_tests: building ${#targets[@]} target(s)"
bazel build --noshow_progress --runs_per_test="$runs" --nocache_test_results \
  "${targets[@]}" "${extra[@]}"

setsid stress-ng --cpu "$cpu" --timeout 86400s --quiet >"$work/stress-ng.log" 2>&1 &
stress_pid=$!
sleep 0.5
kill -0 "$stress_pid" 2>/dev/null || { cat "$work/stress-ng.log" >&2; echo "stress_tests: stress-ng did not start" >&2; exit 1; }
echo "stress_tests: stress-ng --cpu $cpu running (pid $stress_pid); $runs run(s) of each of:"
printf '  %s\n' "${targets[@]}"

bep="$work/bep.json"
bazel_rc=0
# In the background, so that a signal to this script interrupts the wait and
# the trap runs at once (bash defers traps until a foreground command ends).
bazel test "${targets[@]}" --runs_per_test="$runs" --nocache_test_results \
  --local_test_jobs="$jobs" --build_event_json_file="$bep" "${extra[@]}" &
bazel_pid=$!
wait "$bazel_pid" || bazel_rc=$?
bazel_pid=""
stop_stress

# --- results: per target, a run passed when every shard of it passed ----------------
rc=0
python3 - "$bep" "$runs" "${targets[@]}" <<'EOF' || rc=$?
import json, sys
bep, runs, targets = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
results = {}  # label -> run -> [(shard, status, log)]
try:
    lines = open(bep).read().splitlines()
except OSError:
    lines = []
for line in lines:
    try:
        ev = json.loads(line)
    except ValueError:
        continue
    tid = ev.get("id", {}).get("testResult")
    if not tid or "testResult" not in ev:
        continue
    tr = ev["testResult"]
    log = next((o.get("uri", "") for o in tr.get("testActionOutput", []) if o.get("name") == "test.log"), "")
    results.setdefault(tid["label"], {}).setdefault(tid.get("run", 1), []).append(
        (tid.get("shard", 1), tr.get("status", "NO_STATUS"), log.replace("file://", "")))
total = passed = 0
failed_runs = []
width = max(len(t) for t in targets)
for t in targets:
    by_run = results.get(t, {})
    ok = sum(1 for r in range(1, runs + 1)
             if by_run.get(r) and all(s == "PASSED" for _, s, _ in by_run[r]))
    total += runs
    passed += ok
    print("%s: %d/%d passed" % (t.ljust(width), ok, runs))
    for r in sorted(by_run):
        for shard, status, log in sorted(by_run[r]):
            if status != "PASSED":
                failed_runs.append("  %s run %d shard %d: %s  %s" % (t, r, shard, status, log))
    if not by_run:
        failed_runs.append("  %s: no test result (did it build?)" % t)
print("total: %d/%d passed, %d failed" % (passed, total, total - passed))
if failed_runs:
    print("failed runs (their logs):")
    print("\n".join(failed_runs))
sys.exit(0 if passed == total else 1)
EOF
if [ "$bazel_rc" -eq 8 ]; then  # Bazel's exit code for an interrupted build or test
  echo "stress_tests: interrupted; the runs above are the ones that finished" >&2
  exit 130
fi
if [ "$rc" -eq 0 ] && [ "$bazel_rc" -ne 0 ]; then
  echo "stress_tests: bazel test exited with $bazel_rc" >&2
  rc=1
fi
exit "$rc"
