#!/usr/bin/env bash
# Runs the whole lmps test suite (unit, gradient-check, equivalence and
# multi-process tests) and ends with a line "N passed, N failed".
set -uo pipefail
cd "$(dirname "$0")/.."
scripts/install_deps.sh build || exit 1
jobs="${LMPS_TEST_JOBS:-2}"
bazel test //... --test_output=errors --local_test_jobs="$jobs" 2>&1 | tee .bazel-test.log
rc=${PIPESTATUS[0]}
passed=$(grep -cE '^//\S+\s+(\(cached\) )?PASSED' .bazel-test.log || true)
failed=$(grep -cE '^//\S+\s+(\(cached\) )?(FAILED|TIMEOUT|NO STATUS|INCOMPLETE)' .bazel-test.log || true)
skipped=$(grep -cE '^//\S+\s+SKIPPED' .bazel-test.log || true)
bazel shutdown >/dev/null 2>&1 || true
rm -f .bazel-test.log
if [ "$rc" -ne 0 ] && [ "$failed" -eq 0 ]; then failed=1; echo "bazel test exited with $rc (build failure?)"; fi
echo "${passed} passed, ${failed} failed"
[ "$failed" -eq 0 ]
