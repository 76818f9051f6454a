#!/bin/bash
# lmps_worker_cuda loads the CUDA backend as a plugin (worker/backend/cuda/
# cuda_plugin.h): the binary itself links no CUDA library, its /metrics
# endpoint comes up (it did not while cuBLAS 13 was linked at start: its
# static TLS left civetweb's small thread stacks no room), and
# --backend=cuda loads the plugin -- on a machine without a GPU it then
# fails with the CUDA runtime's reason, never with a loading error.
set -euo pipefail
bin="$1"
fail() { echo "FAIL: $*" >&2; exit 1; }

if ldd "$bin" | grep -q 'libcublas\|libcudart'; then
  fail "$bin links CUDA libraries at start: $(ldd "$bin" | grep cu)"
fi

port=$(/usr/bin/python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
log="${TEST_TMPDIR:-/tmp}/worker.log"
# An unreachable scheduler: the worker keeps retrying its registration.
"$bin" --metrics_listen=127.0.0.1:$port --scheduler=127.0.0.1:1 \
  --backend=cpu --assemble_timeout_s=20 >"$log" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null || true' EXIT
body=""
for _ in $(seq 50); do
  body=$(/usr/bin/python3 -c "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:$port/metrics', timeout=1).read().decode())" 2>/dev/null || true)
  [ -n "$body" ] && break
  sleep 0.1
done
grep -q '# TYPE' <<<"$body" || fail "no metrics on /metrics: $(head -5 "$log")"
kill $pid; wait $pid 2>/dev/null || true

out=$("$bin" --scheduler=127.0.0.1:1 --backend=cuda:0 --assemble_timeout_s=2 2>&1 || true)
if grep -q 'cannot load the CUDA backend' <<<"$out"; then
  fail "the plugin did not load: $out"
fi
# The backend the worker reports must be CUDA where there is a GPU; without
# one the worker must fail with the runtime's reason before choosing any
# backend (never fall back to the CPU).
if ls /dev/nvidia[0-9]* >/dev/null 2>&1; then
  grep -q '^\[worker\] backend cuda (--backend=cuda:0)' <<<"$out" ||
    fail "with a GPU, --backend=cuda:0 did not report the CUDA backend: $out"
else
  grep -q "error: FAILED_PRECONDITION: backend 'cuda:0': no CUDA device" <<<"$out" ||
    fail "without a GPU, --backend=cuda:0 did not fail naming the missing device: $out"
  if grep -q '^\[worker\] backend ' <<<"$out"; then
    fail "without a GPU, the worker chose a backend anyway: $out"
  fi
fi
out=$("$bin" --scheduler=127.0.0.1:1 --backend=cpu --assemble_timeout_s=1 2>&1 || true)
grep -q '^\[worker\] backend cpu (--backend=cpu)' <<<"$out" ||
  fail "--backend=cpu did not report the CPU backend: $out"
# A copy of the binary inside another target's runfiles tree (as when it is
# that target's data) with no runfiles of its own finds the plugin there.
tree="${TEST_TMPDIR:-/tmp}/other.runfiles/lmps/worker"
mkdir -p "$tree/backend/cuda"
cp "$bin" "$tree/lmps_worker_cuda"
plugin=$(dirname "$bin")/backend/cuda/liblmps_cuda_backend.so
[ -f "$plugin" ] || plugin=$(find -L . -name liblmps_cuda_backend.so | head -1)
[ -f "$plugin" ] || fail "liblmps_cuda_backend.so not found in the test's runfiles"
ln -sf "$(readlink -f "$plugin")" "$tree/backend/cuda/liblmps_cuda_backend.so"
out=$("$tree/lmps_worker_cuda" --scheduler=127.0.0.1:1 --backend=cuda:0 --assemble_timeout_s=2 2>&1 || true)
if grep -q 'cannot load the CUDA backend' <<<"$out"; then
  fail "the plugin was not found in the enclosing runfiles tree: $out"
fi
out=$("$bin" --scheduler=127.0.0.1:1 --backend=cuda:0 --cuda_backend_lib=/nonexistent/lib.so 2>&1 || true)
grep -q 'cannot load the CUDA backend liblmps_cuda_backend.so (looked at /nonexistent/lib.so' <<<"$out" ||
  fail "a missing plugin is not named: $out"
echo "PASS: no CUDA library linked at start, /metrics up, the plugin loads"
