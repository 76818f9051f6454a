#!/usr/bin/env bash
# Runs the whole lmps test suite (unit, gradient-check, equivalence,
# reference, simulation and multi-process tests) and ends with a line
#   N passed, N failed, N skipped
# preceded by the list of skipped tests with what each lacked.
#
# Skips are visible: a test that cannot run here prints one line
#   LMPS_SKIP(environment): REASON   no GPU, not root, no network namespaces,
#                                    a tool that scripts/install_deps.sh does
#                                    not install: counted as skipped;
#   LMPS_SKIP(installable): REASON   something scripts/install_deps.sh
#                                    installs: counted as FAILED;
# and exits 0, which Bazel reports as PASSED; this script reads those lines
# from the tests' logs. A GoogleTest binary whose every case was skipped
# counts as skipped too.
set -uo pipefail
cd "$(dirname "$0")/.."
scripts/install_deps.sh build || exit 1
jobs="${LMPS_TEST_JOBS:-2}"
bazel test //... --test_output=errors --local_test_jobs="$jobs" 2>&1 | tee .bazel-test.log
rc=${PIPESTATUS[0]}
passed=$(grep -cE '^//\S+\s+(\(cached\) )?PASSED' .bazel-test.log || true)
failed=$(grep -cE '^//\S+\s+(\(cached\) )?(FAILED|TIMEOUT|NO STATUS|INCOMPLETE)' .bazel-test.log || true)
skipped=0
skip_report=()
while read -r label; do
  [ -n "$label" ] || continue
  pkg="${label#//}"
  name="${pkg#*:}"
  pkg="${pkg%%:*}"
  # This run's logs: test.log, or shard_K_of_N/test.log (not the run_K_of_N
  # directories a --runs_per_test run may have left).
  logs=$(find ".bazel/testlogs/$pkg/$name" -maxdepth 2 -name test.log -not -path '*run_*_of_*' 2>/dev/null)
  [ -n "$logs" ] || continue
  # shellcheck disable=SC2086
  why=$(grep -h '^LMPS_SKIP(' $logs | sort -u)
  # shellcheck disable=SC2086
  if [ -z "$why" ] && grep -q '^\[  PASSED  \] 0 tests' $logs && grep -q '^\[  SKIPPED \]' $logs; then
    why="LMPS_SKIP(environment): every test case skipped (see its test.log)"
  fi
  [ -n "$why" ] || continue
  passed=$((passed - 1))
  if grep -q '^LMPS_SKIP(installable)' <<<"$why"; then
    failed=$((failed + 1))
    skip_report+=("FAILED $label: skipped for something scripts/install_deps.sh installs: $(paste -sd' ' <<<"$why")")
  else
    skipped=$((skipped + 1))
    skip_report+=("SKIPPED $label: $(paste -sd' ' <<<"$why")")
  fi
done < <(awk '/^\/\/[^ ]+ +(\(cached\) )?PASSED/ {print $1}' .bazel-test.log)
bazel shutdown >/dev/null 2>&1 || true
rm -f .bazel-test.log
if [ "$rc" -ne 0 ] && [ "$failed" -eq 0 ]; then failed=1; echo "bazel test exited with $rc (build failure?)"; fi
if [ "${#skip_report[@]}" -gt 0 ]; then
  echo "Skipped tests (what each lacked):"
  printf '  %s\n' "${skip_report[@]}"
fi
echo "${passed} passed, ${failed} failed, ${skipped} skipped"
[ "$failed" -eq 0 ]
