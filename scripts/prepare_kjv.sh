#!/usr/bin/env bash
# The main job's corpus: the King James Bible from Debian's bible-kjv-text
# (printed by its `bible` program, one verse per line, without the verse
# references), tokenised with GPT-2's BPE by lmps_prepare into
#   lmps_data/kjv_train.bin   the first 90% of the tokens
#   lmps_data/kjv_val.bin     the last 10% (the end of the New Testament)
# in llm.c's token-shard format. Does nothing when both exist. Needs what
# scripts/install_deps.sh build installs (bible-kjv, GPT-2's vocabulary).
set -euo pipefail
cd "$(dirname "$0")/.."
out=lmps_data/kjv
if [ -s "${out}_train.bin" ] && [ -s "${out}_val.bin" ]; then
  exit 0
fi
command -v bible >/dev/null ||
  { echo "prepare_kjv: no 'bible' program: run scripts/install_deps.sh" >&2; exit 1; }
bazel build //tools:lmps_prepare
mkdir -p lmps_data
text=$(mktemp)
trap 'rm -f "$text"' EXIT
bible -f "Gen1:1-Rev22:21" </dev/null | sed -E 's/^[1-3]?[A-Za-z]+[0-9]+:[0-9]+ //' >"$text"
verses=$(wc -l <"$text")
if [ "$verses" -ne 31102 ]; then
  echo "prepare_kjv: expected the 31102 verses of the KJV, got $verses" >&2
  exit 1
fi
.bazel/bin/tools/lmps_prepare --out_prefix="$out" "$text"
