#!/usr/bin/env bash
# lmps_generate against an independent PyTorch GPT-2 (tests/generate_test.py).
set -euo pipefail
if ! /usr/bin/python3 -c "import torch" 2>/dev/null; then
  echo "LMPS_SKIP(installable): PyTorch is not installed (apt-get install python3-torch)"
  exit 0
fi
root="${TEST_SRCDIR}/${TEST_WORKSPACE}"
vocab_dir="$("$root/common/text/bpe_tool" vocab_dir)"
exec timeout -k 10 280 /usr/bin/python3 "$root/tests/generate_test.py" \
  --bin_dir="$root" --vocab_dir="$vocab_dir"
