#!/bin/bash
# GPT-2 tokenizer throughput: lmps's C++ encoder (common/text, through
# `bpe_tool bench`) against the JavaScript reference it matches, npm's
# gpt-3-encoder 1.1.4 (`node tests/bpe_reference.js ... bench`), encoding the
# same text on one core each (both pinned with taskset to one CPU). The text
# is tests/bpe_corpus.py's (the reference test's): about 1 MB of English
# prose, code, generated Unicode, whitespace runs, digits and apostrophes.
# Each side's figure is the best of REPEATS passes, every pass with an empty
# merge cache (the vocabulary loaded beforehand, not timed). Prints
#   cpp encode: X MB/s ...
#   js encode: Y MB/s ...
#   cpp/js encode ratio: Z
# Installs what is missing (scripts/install_deps.sh build: node, the npm
# package), builds //common/text:bpe_tool, ends with `bazel shutdown`.
#
# Usage: bench/bpe_vs_js.sh
# Environment: REPEATS (default 3), CPU (default 0: the core to pin to).
set -euo pipefail
cd "$(dirname "$0")/.."

REPEATS="${REPEATS:-3}"
CPU="${CPU:-0}"
tmp="$(mktemp -d /tmp/lmps_bpe_bench.XXXXXX)"
cleanup() {
  rm -rf "$tmp"
  bazel shutdown >/dev/null 2>&1 || true
}
trap cleanup EXIT

scripts/install_deps.sh build
bazel build //common/text:bpe_tool >/dev/null 2>&1 || bazel build //common/text:bpe_tool
tool="$(bazel info bazel-bin 2>/dev/null)/common/text/bpe_tool"
pkg="$("$tool" vocab_dir)"

mapfile -t sources < <( (find /usr/share/common-licenses -maxdepth 1 -type f;
                         ls tests/*.cc tests/*.h tests/*.py tests/*.sh common/text/*.cc common/text/*.h) | sort)
python3 tests/bpe_corpus.py --out "$tmp/corpus.txt" "${sources[@]}"

echo "== load average: $(cut -d' ' -f1-3 /proc/loadavg)"
cpp="$(taskset -c "$CPU" "$tool" bench "$tmp/corpus.txt" --repeats="$REPEATS")"
echo "$cpp"
js="$(taskset -c "$CPU" node tests/bpe_reference.js "$pkg" bench "$tmp/corpus.txt" "$REPEATS")"
echo "$js"
awk -v c="$(awk '{print $3}' <<<"$cpp")" -v j="$(awk '{print $3}' <<<"$js")" \
  'BEGIN { printf "cpp/js encode ratio: %.1f\n", c / j }'
