#!/usr/bin/env bash
# One command for the llama.cpp comparison on a fresh machine: installs llama.cpp (PyPI
# llama-cpp-python, compiled from source for this CPU; about 15 minutes on 2 cores, once) and
# gguf into .cache/bench_venv, builds moe-serve (scripts/build.sh), then runs compare.py
# with every argument passed through, e.g.
#   bench/llama_cpp/run.sh --repeats=2 --extra
set -euo pipefail
cd "$(dirname "$0")/../.."

bash scripts/setup_deps.sh
VENV=.cache/bench_venv
if [[ ! -x "$VENV/bin/python" ]]; then python3 -m venv "$VENV"; fi
CMAKE_ARGS="-DGGML_NATIVE=ON" "$VENV/bin/pip" install --quiet --disable-pip-version-check \
  -r bench/llama_cpp/requirements.txt

BUILD_DIR="${MOE_BUILD_DIR:-build}"
bash scripts/build.sh
exec "$VENV/bin/python" bench/llama_cpp/compare.py --build="$BUILD_DIR" "$@"
