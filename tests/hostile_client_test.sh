#!/usr/bin/env bash
# Runs tests/hostile_client_test.py (random and malformed requests, learnt
# through server reflection, to every RPC of every daemon while a job runs;
# the job must end bit-identical to a plain run and no daemon may crash) with
# Debian's /usr/bin/python3, which has python3-grpcio and python3-grpc-tools
# (the pyenv python3 that may come first on PATH has neither). A hard timeout
# bounds it; on SIGTERM the script stops every process it started.
# Extra arguments go to the script: --seed=N replays a run's requests.
set -euo pipefail

PY=/usr/bin/python3
if ! "$PY" -c 'import grpc, grpc_tools.protoc, google.protobuf' 2>/dev/null; then
  echo "FAIL: $PY lacks grpcio/grpc_tools (apt-get install python3-grpcio python3-grpc-tools)" >&2
  exit 1
fi
[ -f /usr/share/grpc-proto/grpc/health/v1/health.proto ] ||
  { echo "FAIL: /usr/share/grpc-proto missing (apt-get install grpc-proto)" >&2; exit 1; }

runfiles="${TEST_SRCDIR:-}/${TEST_WORKSPACE:-lmps}"
if [ -x "$runfiles/launcher/lmps_local" ]; then
  bin_dir="$runfiles"
  script="$runfiles/tests/hostile_client_test.py"
else
  root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
  bin_dir="$root/.bazel/bin"
  script="$root/tests/hostile_client_test.py"
fi
exec timeout -k 10 280 "$PY" "$script" --bin_dir="$bin_dir" "$@"
