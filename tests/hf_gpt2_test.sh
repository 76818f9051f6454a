#!/usr/bin/env bash
# Hugging Face GPT-2 checkpoints both ways, against an independent PyTorch
# GPT-2 written to transformers' conventions (tests/hf_gpt2_test.py):
# lmps_export --format=hf of a real job, and hand-made Hugging Face
# checkpoints read by lmps_eval and by lmps_server --init_from; losses within
# 1e-5, parameters bit-identical through the shards.
set -euo pipefail
if ! /usr/bin/python3 -c "import torch" 2>/dev/null; then
  echo "LMPS_SKIP(installable): PyTorch is not installed (apt-get install python3-torch)"
  exit 0
fi
root="${TEST_SRCDIR}/${TEST_WORKSPACE}"
exec timeout -k 10 280 /usr/bin/python3 "$root/tests/hf_gpt2_test.py" --bin_dir="$root"
