#!/usr/bin/env bash
# The main job: installs what is missing, builds, prepares the corpus (the
# King James Bible as GPT-2 token shards, scripts/prepare_kjv.sh), and trains
# a GPT on this machine with a scheduler, 2 parameter-server shards and 4
# workers (2 data-parallel replicas x 2 pipeline stages) as separate
# processes on loopback (examples/main.textproto). Extra flags go to
# lmps_local and win (e.g. --steps=50, --job=examples/gpl3.textproto for the
# byte-level example, --resume).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install_deps.sh build
bazel build //launcher:lmps_local
scripts/prepare_kjv.sh
status=0
.bazel/bin/launcher/lmps_local --job=examples/main.textproto --run_dir=lmps_run "$@" || status=$?
bazel shutdown >/dev/null 2>&1 || true
exit $status
