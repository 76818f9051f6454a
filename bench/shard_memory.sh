#!/bin/bash
# Parameter-server shard memory per parameter during training (issue #12's
# target: <= 16.8 B per parameter; 16 B is the floor of this design: the
# fp32 parameter, AdamW's m and v, and one gradient accumulator).
#
# Runs a real job with lmps_local (default: GPT-2 small's shape, 12 layers
# x 768 with GPT-2's 50257-token vocabulary and a 64-token context, 123.7 M
# parameters on one shard, AdamW, dp workers pulling and pushing every
# step; about 90 s here) and samples /proc/<pid>/status of every lmps_server
# process every 50 ms: VmHWM (peak resident set) and the largest VmRSS seen.
# Prints both in MB and in bytes per parameter the shard holds, and the
# shard's RSS after its model was initialised (before the first step) for
# scale.
#
# Usage: bench/shard_memory.sh
# Environment: LAYERS (12), EMBD (768), VOCAB (50257), DP (2), STEPS (6),
#   SHARDS (1),
#   BIN_DIR (take lmps_* from here instead of building with Bazel).
set -euo pipefail
cd "$(dirname "$0")/.."

LAYERS="${LAYERS:-12}"
EMBD="${EMBD:-768}"
VOCAB="${VOCAB:-50257}"
DP="${DP:-2}"
STEPS="${STEPS:-6}"
SHARDS="${SHARDS:-1}"

tmp="$(mktemp -d /tmp/lmps_shard_memory.XXXXXX)"
cleanup() {
  rm -rf "$tmp"
  [ -n "${BIN_DIR:-}" ] || bazel shutdown >/dev/null 2>&1 || true
}
trap cleanup EXIT

if [ -z "${BIN_DIR:-}" ]; then
  targets=(//launcher:lmps_local)
  bazel build "${targets[@]}" >/dev/null 2>&1 || bazel build "${targets[@]}"
  BIN_DIR="$(bazel info bazel-bin 2>/dev/null)"
  LOCAL="$BIN_DIR/launcher/lmps_local"
  BIN_FLAG=()
else
  LOCAL="$BIN_DIR/lmps_local"
  BIN_FLAG=(--bin_dir="$BIN_DIR")
fi

cat >"$tmp/job.textproto" <<EOF
name: "shard-memory"
model { n_layer: $LAYERS n_head: 8 n_embd: $EMBD block_size: 64 vocab_size: $VOCAB }
optimizer { type: ADAMW lr: 0.0003 }
train {
  steps: $STEPS batch_size: $((2 * DP)) seed: 1
  eval_interval: $((STEPS + 1)) eval_batches: 1 checkpoint_interval: -1
  sample_tokens: 0
}
layout { dp: $DP num_shards: $SHARDS }
EOF

/usr/bin/python3 - "$LOCAL" "$tmp" "$SHARDS" "${BIN_FLAG[@]}" <<'EOF'
import os, re, subprocess, sys, time

local, tmp, shards = sys.argv[1], sys.argv[2], int(sys.argv[3])
extra = sys.argv[4:]
cmd = [local, f"--job={tmp}/job.textproto", f"--run_dir={tmp}/run", "--quiet",
       "--export_model=false"] + extra
log = open(os.path.join(tmp, "lmps_local.out"), "wb")
proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)

def servers():
    out = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            exe = os.readlink(f"/proc/{pid}/exe")
            if os.path.basename(exe) != "lmps_server":
                continue
            # Only this job's: a descendant of lmps_local.
            status = open(f"/proc/{pid}/status").read()
        except OSError:
            continue
        ppid = int(re.search(r"^PPid:\s+(\d+)", status, re.M).group(1))
        if ppid != proc.pid:
            continue
        kb = lambda k: int(re.search(rf"^{k}:\s+(\d+) kB", status, re.M).group(1))
        out[pid] = (kb("VmHWM"), kb("VmRSS"))
    return out

peak_hwm, peak_rss = {}, {}
while proc.poll() is None:
    for pid, (hwm, rss) in servers().items():
        peak_hwm[pid] = max(peak_hwm.get(pid, 0), hwm)
        peak_rss[pid] = max(peak_rss.get(pid, 0), rss)
        if os.environ.get("TRACE"): print(f"{time.time():.2f} {pid} rss {rss//1024} MB", file=sys.stderr)
    time.sleep(0.05)
if proc.returncode != 0:
    print(open(os.path.join(tmp, "lmps_local.out"), errors="replace").read())
    sys.exit(f"shard_memory: lmps_local failed ({proc.returncode})")
# Parameters per shard: from the shards' logs ("... N parameters ...").
params = []
logs = os.path.join(tmp, "run", "logs")
for name in sorted(os.listdir(logs)):
    if name.startswith("server-"):
        m = re.search(r"(\d+) parameters", open(os.path.join(logs, name)).read())
        if m:
            params.append(int(m.group(1)))
if not params or not peak_hwm:
    sys.exit("shard_memory: no shard parameters or no samples")
total = sum(params)
hwm = sum(peak_hwm.values()) * 1024
rss = sum(peak_rss.values()) * 1024
print(f"shards: {shards}, parameters on them: {total:,} ({total / 1e6:.1f} M)")
print(f"shard VmHWM: {hwm / 1e6:.0f} MB = {hwm / total:.2f} B/parameter")
print(f"shard max VmRSS: {rss / 1e6:.0f} MB = {rss / total:.2f} B/parameter")
EOF
