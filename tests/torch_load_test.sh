#!/usr/bin/env bash
# The exported model is loadable in PyTorch: a short local job exports
# model.safetensors; an independent PyTorch GPT-2 (tests/torch_load.py) loads
# it and computes the loss of a text; lmps_eval computes the same loss with
# lmps's CPU backend. They must agree within 1e-4 (fp32, different summation
# orders; a wrong name, layout or transpose changes the loss by > 0.1).
set -euo pipefail
if ! /usr/bin/python3 -c "import torch" 2>/dev/null; then
  echo "LMPS_SKIP(installable): PyTorch is not installed (apt-get install python3-torch)"
  exit 0
fi
root="${TEST_SRCDIR}/${TEST_WORKSPACE}"
tmp="${TEST_TMPDIR}"
cat > "$tmp/job.textproto" <<'JOB'
model { n_layer: 2 n_head: 2 n_embd: 32 block_size: 32 }
train { steps: 20 batch_size: 8 eval_interval: 0 sample_tokens: 0 }
JOB
"$root/launcher/lmps_local" --job="$tmp/job.textproto" --run_dir="$tmp/run" --quiet >"$tmp/launch.log" 2>&1 ||
  { cat "$tmp/launch.log"; exit 1; }
head -c 3000 /usr/share/common-licenses/GPL-3 | tail -c 1000 > "$tmp/text.txt"
ours=$("$root/worker/lmps_eval" --model="$tmp/run/model.safetensors" --text_file="$tmp/text.txt" | sed -n 's/^loss: //p')
theirs=$(/usr/bin/python3 "$root/tests/torch_load.py" "$tmp/run/model.safetensors" "$tmp/text.txt" | sed -n 's/^loss: //p')
echo "lmps loss: $ours   PyTorch loss: $theirs"
/usr/bin/python3 - "$ours" "$theirs" <<'PY'
import sys
a, b = float(sys.argv[1]), float(sys.argv[2])
assert 1.0 < a < 6.0, a
assert abs(a - b) <= 1e-4, (a, b)
PY
"$root/worker/lmps_eval" --model="$tmp/run/model.safetensors" --prompt="The " --generate=20 | head -c 200
echo
echo "PASS"
