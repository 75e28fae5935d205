#!/usr/bin/env bash
# Installs every Debian package moe-serve needs to build, test and serve.
# Idempotent: only runs apt-get when something is missing.
set -euo pipefail

PACKAGES=(
  build-essential cmake ninja-build pkg-config git
  libprotobuf-dev protobuf-compiler libgrpc++-dev protobuf-compiler-grpc
  libabsl-dev prometheus-cpp-dev libgtest-dev libgmock-dev libhwy-dev
  nlohmann-json3-dev libpcre2-dev libutf8proc-dev
  python3 python3-venv
  prometheus  # promtool and a real Prometheus server for the metrics tests (not started)
  curl        # the Abseil source for the TSan build (scripts/sanitize.sh)
  openssl     # test certificates of the TLS tests (tests/security)
  clang libclang-rt-14-dev  # libFuzzer and its sanitizer runtimes (scripts/fuzz.sh)
)

missing=()
for pkg in "${PACKAGES[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$pkg")
  fi
done

if ((${#missing[@]})); then
  echo "setup_deps: installing ${missing[*]}"
  SUDO=""
  if [[ $(id -u) -ne 0 ]]; then SUDO="sudo"; fi
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
else
  echo "setup_deps: all packages present"
fi
