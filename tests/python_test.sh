#!/usr/bin/env bash
# Runs a Python test of tests/ that talks to the real daemons:
#   python_test.sh SCRIPT TIMEOUT_S [SCRIPT_ARGS...]
# with Debian's /usr/bin/python3, which has python3-grpcio and
# python3-grpc-tools (the pyenv python3 that may come first on PATH has
# neither), and --bin_dir pointing at the built binaries (Bazel runfiles, or
# .bazel/bin when run by hand). TIMEOUT_S bounds it hard; on SIGTERM the
# script stops every process it started.
set -euo pipefail
name="${1:?usage: python_test.sh SCRIPT TIMEOUT_S [ARGS...]}"
limit="${2:?usage: python_test.sh SCRIPT TIMEOUT_S [ARGS...]}"
shift 2

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
else
  bin_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/.bazel/bin"
  runfiles="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
fi
exec timeout -k 10 "$limit" "$PY" "$runfiles/tests/$name" --bin_dir="$bin_dir" "$@"
