#!/usr/bin/env bash
# Installs what lmps needs from Debian 12's packages, and only what is
# missing. Usage: scripts/install_deps.sh [build|bench|stress|all]   (default build)
#   build: Bazel, gRPC, protobuf, Abseil, GoogleTest, prometheus-cpp, OpenBLAS,
#          nlohmann-json,
#          and what the tests use (Prometheus, Python grpcio)
#   bench: build + iperf3 and PyTorch (python3-torch) for the baselines
#   stress: build + stress-ng (load for scripts/stress_tests.sh)
set -euo pipefail
what="${1:-build}"
pkgs=(bazel-bootstrap g++ pkg-config libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev
      protobuf-compiler libabsl-dev libgtest-dev libgmock-dev prometheus-cpp-dev libcivetweb-dev
      libopenblas-dev python3
      # the safetensors header's JSON parser (header-only)
      nlohmann-json3-dev
      # used by the tests: Prometheus (promtool), Python gRPC clients
      prometheus python3-grpcio python3-grpc-tools grpc-proto curl iproute2
      # PyTorch: the exported model is checked by loading it in PyTorch
      python3-torch
      # the browser tests of the run report and the live status page
      chromium
      # fuzz tests (libFuzzer) and the test certificates
      clang libclang-rt-14-dev openssl)
case "$what" in
  build) ;;
  bench) pkgs+=(iperf3) ;;
  stress) pkgs+=(stress-ng) ;;
  all) pkgs+=(iperf3 stress-ng) ;;
  *) echo "usage: $0 [build|bench|stress|all]" >&2; exit 2 ;;
esac
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "install_deps: everything for '$what' is installed"
  exit 0
fi
echo "install_deps: installing ${missing[*]}"
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
