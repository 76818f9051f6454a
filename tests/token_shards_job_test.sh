#!/usr/bin/env bash
# Token shards end to end, with the real binaries:
#  1. lmps_prepare tokenizes Debian's licences with GPT-2's BPE into
#     llm.c .bin shards (train and val); the header and token count check
#     out, and every document starts with the end-of-text token;
#  2. lmps_local trains a small GPT (vocab_size 50257, dp 2) on them for 40
#     steps: the loss starts near ln(50257) = 10.8 and falls by more than
#     2, evaluation runs, and the sample is GPT-2 text after the prompt;
#     with pp 2 (sampled by lmps_eval from the exported model) too; its
#     lmps_export --format=hf holds GPT-2's tokenizer files (vocab.json,
#     merges.txt: the installed encoder.json and vocab.bpe);
#  3. bad shards stop lmps_local before any daemon starts (exit 2, no
#     steps.jsonl), naming the file and the fault: wrong magic, wrong
#     version, truncated, a token >= model.vocab_size.
# Without GPT-2's vocabulary (scripts/install_deps.sh installs it) it prints
# LMPS_SKIP(installable) and exits 0, which scripts/test.sh counts as a
# failure.
set -euo pipefail

fail() { echo "FAIL: $*" >&2; exit 1; }

runfiles="${TEST_SRCDIR:-}/${TEST_WORKSPACE:-lmps}"
bin="$runfiles"
[ -x "$bin/launcher/lmps_local" ] || bin="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/.bazel/bin"
for b in launcher/lmps_local tools/lmps_prepare common/text/bpe_tool; do
  [ -x "$bin/$b" ] || fail "$b not found (bazel build //launcher:lmps_local //tools:lmps_prepare //common/text:bpe_tool)"
done
if [ -n "${TEST_TMPDIR:-}" ]; then
  tmp="$TEST_TMPDIR"
else
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
fi
vocab="$("$bin/common/text/bpe_tool" vocab_dir)"
if [ ! -f "$vocab/encoder.json" ] || [ ! -f "$vocab/vocab.bpe" ]; then
  echo "LMPS_SKIP(installable): GPT-2's vocabulary is not in $vocab (scripts/install_deps.sh installs it)"
  exit 0
fi

# --- 1. lmps_prepare ----------------------------------------------------------
mapfile -t texts < <(find /usr/share/common-licenses -maxdepth 1 -type f | sort)
"$bin/tools/lmps_prepare" --out_prefix="$tmp/lic" --val_fraction=0.1 "${texts[@]}" \
  >"$tmp/prepare.out" 2>"$tmp/prepare.err" || { cat "$tmp/prepare.err" >&2; fail "lmps_prepare failed"; }
grep -q '100%' "$tmp/prepare.err" || fail "no progress bar on stderr: $(cat "$tmp/prepare.err")"
grep -q 'format: TOKEN_SHARDS' "$tmp/prepare.out" || fail "no job spec printed: $(cat "$tmp/prepare.out")"
python3 - "$tmp/lic_train.bin" "$tmp/lic_val.bin" "${#texts[@]}" <<'EOF' || fail "the shards are not what lmps_prepare should write"
import struct, sys
docs = int(sys.argv[3])
counts = []
eots = 0
for i, path in enumerate(sys.argv[1:3]):
    data = open(path, "rb").read()
    header = struct.unpack("<256i", data[:1024])
    assert header[0] == 20240520 and header[1] == 1, header[:3]
    assert all(h == 0 for h in header[3:]), "header not zero-padded"
    n = header[2]
    assert len(data) == 1024 + 2 * n, (path, len(data), n)
    tokens = struct.unpack("<%dH" % n, data[1024:])
    assert max(tokens) <= 50256
    if i == 0:
        assert tokens[0] == 50256, "the first document does not start with <|endoftext|>"
    eots += tokens.count(50256)
    counts.append(n)
total = sum(counts)
assert counts[1] == int(total * 0.1) or abs(counts[1] - total * 0.1) < 2, counts
assert eots == docs, (eots, docs)
print("ok: shards of %d + %d tokens, %d documents" % (counts[0], counts[1], docs))
EOF

# A sample of a model trained on the (ASCII) licences, decoded with GPT-2's
# tokenizer, is ASCII text; token ids read as bytes would not be.
ascii_text() {
  python3 -c "
import sys
b = open(sys.argv[1], 'rb').read()
ok = sum(1 for c in b if 32 <= c < 127 or c in (9, 10, 13))
sys.exit(0 if len(b) > 4 and ok >= 0.95 * len(b) else 1)" "$1"
}

# --- 2. a job on them ------------------------------------------------------------
cat >"$tmp/job.textproto" <<EOF
name: "token-shards"
model { n_layer: 2 n_head: 2 n_embd: 64 block_size: 32 vocab_size: 50257 }
optimizer { lr: 0.01 min_lr: 0.001 warmup_steps: 5 }
train { steps: 40 batch_size: 8 eval_interval: 20 eval_batches: 2 sample_tokens: 20
        checkpoint_interval: -1 }
layout { dp: 2 num_shards: 1 }
data { format: TOKEN_SHARDS train_shards: "$tmp/lic_train.bin" val_shards: "$tmp/lic_val.bin" }
EOF
if ! timeout -k 10 600 "$bin/launcher/lmps_local" --job="$tmp/job.textproto" --run_dir="$tmp/run" \
     --quiet --timeout_s=500 >"$tmp/job.log" 2>&1; then
  tail -30 "$tmp/job.log" >&2
  fail "lmps_local on token shards failed"
fi
python3 - "$tmp/run/steps.jsonl" <<'EOF' || { tail -30 "$tmp/job.log" >&2; fail "the job did not learn from the token shards"; }
import json, math, sys
steps = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
assert len(steps) == 40, len(steps)
first, last = steps[0]["loss"], steps[-1]["loss"]
assert abs(first - math.log(50257)) < 1.0, first
assert last < first - 2, (first, last)
evals = [s["eval_loss"] for s in steps if "eval_loss" in s]
assert evals and all(math.isfinite(e) for e in evals), evals
print("ok: loss %.2f -> %.2f (ln 50257 = %.2f), eval %s" % (first, last, math.log(50257), evals))
EOF
[ -s "$tmp/run/sample.txt" ] || fail "no sample.txt"
sample="$(cat "$tmp/run/sample.txt")"
[[ "$sample" == "The "* ]] || fail "the sample does not start with the prompt: $sample"
grep -q '<[0-9]*>' "$tmp/run/sample.txt" && fail "the sample shows token ids, not text: $sample"
ascii_text "$tmp/run/sample.txt" || fail "the sample is not GPT-2-decoded text: $sample"
echo "ok: sample: $(head -c 120 "$tmp/run/sample.txt" | tr '\n' ' ')"

# Its Hugging Face export carries GPT-2's tokenizer: the installed files,
# byte for byte, as vocab.json and merges.txt.
if ! "$bin/server/lmps_export" --checkpoint_dir="$tmp/run/ckpt" --format=hf \
     --out="$tmp/hf" 2>"$tmp/export.log"; then
  cat "$tmp/export.log" >&2
  fail "lmps_export --format=hf of the token-shards job failed"
fi
grep -q "GPT-2's tokenizer from $vocab (50257 tokens)" "$tmp/export.log" ||
  fail "hf export: no tokenizer said: $(cat "$tmp/export.log")"
cmp -s "$vocab/encoder.json" "$tmp/hf/vocab.json" || fail "hf export: vocab.json is not $vocab/encoder.json"
cmp -s "$vocab/vocab.bpe" "$tmp/hf/merges.txt" || fail "hf export: merges.txt is not $vocab/vocab.bpe"
grep -q '"model_max_length": 32,' "$tmp/hf/tokenizer_config.json" ||
  fail "hf export: tokenizer_config.json: $(cat "$tmp/hf/tokenizer_config.json")"
echo "ok: the Hugging Face export carries GPT-2's tokenizer"

# A pipeline job (pp 2): no worker holds the whole model, so lmps_local
# samples from the exported model with lmps_eval --gpt2_vocab_dir.
sed -e 's|steps: 40|steps: 6|' -e 's|layout { dp: 2 num_shards: 1 }|layout { dp: 1 pp: 2 num_shards: 1 }|' \
  "$tmp/job.textproto" >"$tmp/pp.textproto"
if ! timeout -k 10 300 "$bin/launcher/lmps_local" --job="$tmp/pp.textproto" --run_dir="$tmp/pprun" \
     --quiet --timeout_s=250 >"$tmp/pp.log" 2>&1; then
  tail -30 "$tmp/pp.log" >&2
  fail "lmps_local with pp 2 on token shards failed"
fi
sample="$(cat "$tmp/pprun/sample.txt")"
[[ "$sample" == "The "* ]] || fail "pp 2: the sample does not start with the prompt: $sample"
grep -q '<[0-9]*>' "$tmp/pprun/sample.txt" && fail "pp 2: the sample shows token ids: $sample"
ascii_text "$tmp/pprun/sample.txt" || fail "pp 2: the sample is not GPT-2-decoded text: $sample"
echo "ok: pp 2 sample (lmps_eval): $(head -c 80 "$tmp/pprun/sample.txt" | tr '\n' ' ')"

# --- 3. bad shards stop the launcher ---------------------------------------------
bad_case() {  # name, python that writes $tmp/bad.bin from lic_val.bin, expected text,
              # [vocab_size, the file named]
  local name="$1" code="$2" want="$3" vocab_size="${4:-50257}" file="${5:-$tmp/bad.bin}"
  python3 -c "
import struct, sys
src = open('$tmp/lic_val.bin', 'rb').read()
header = list(struct.unpack('<256i', src[:1024]))
body = src[1024:]
$code
open('$tmp/bad.bin', 'wb').write(struct.pack('<256i', *header) + body)"
  sed -e "s|$tmp/lic_val.bin|$tmp/bad.bin|" -e "s|vocab_size: 50257|vocab_size: $vocab_size|" \
    "$tmp/job.textproto" >"$tmp/bad.textproto"
  rm -rf "$tmp/badrun"
  local rc=0
  timeout -k 10 120 "$bin/launcher/lmps_local" --job="$tmp/bad.textproto" --run_dir="$tmp/badrun" \
    --quiet >"$tmp/bad.log" 2>&1 || rc=$?
  [ "$rc" -ne 0 ] || fail "$name: lmps_local accepted the bad shard"
  grep -qF "token shard '$file'" "$tmp/bad.log" || fail "$name: the error does not name the file: $(cat "$tmp/bad.log")"
  grep -q "$want" "$tmp/bad.log" || fail "$name: no '$want' in: $(cat "$tmp/bad.log")"
  [ ! -e "$tmp/badrun/steps.jsonl" ] || fail "$name: training started"
  echo "ok: $name: exit $rc, $(grep -o "token shard.*" "$tmp/bad.log" | head -1 | cut -c1-150)"
}
bad_case "wrong magic" "header[0] = 20240519" "wrong magic 20240519"
bad_case "wrong version" "header[1] = 2" "version 2, expected 1"
bad_case "truncated" "body = body[:-10]" "truncated"
bad_case "token count" "header[2] += 1" "counts"
# Here the training shard (checked first) already has one: every document
# starts with 50256.
bad_case "token >= vocab_size" "pass" "token 50256 at index 0 is not below the model's vocab_size 50000" \
  50000 "$tmp/lic_train.bin"
echo "PASS"
