# shellcheck shell=bash
# Sourced by the benchmarks that compare variants in rounds (overhead.sh,
# dp_vs_ddp.sh, ps_features.sh): the machine's speed drifts within a round,
# so the variants run in their given order in odd rounds and reversed in
# even ones, and none always runs first.
#
#   round_order ROUND VARIANT...   prints the variants in ROUND's order
#                                  (rounds count from 1)
round_order() {
  local round="$1" i
  shift
  if (( round % 2 == 1 )); then
    echo "$*"
    return
  fi
  local reversed=()
  for (( i = $#; i >= 1; --i )); do reversed+=("${!i}"); done
  echo "${reversed[*]}"
}
