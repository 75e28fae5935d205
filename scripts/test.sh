#!/usr/bin/env bash
# Builds everything (CUDA backend included when nvcc is present), runs the whole test suite,
# then validates the deployment files offline. On a machine without a GPU the CUDA parity
# tests report themselves skipped.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup_deps.sh
# Python packages of the out-of-process tests, in a virtual environment of their own.
VENV=.cache/test_venv
if [[ ! -x "$VENV/bin/python" ]]; then python3 -m venv "$VENV"; fi
"$VENV/bin/pip" install --quiet --disable-pip-version-check -r tests/requirements.txt

bash scripts/build.sh -DPython3_EXECUTABLE="$PWD/$VENV/bin/python"
BUILD_DIR="${MOE_BUILD_DIR:-build}"
ctest --test-dir "$BUILD_DIR" --output-on-failure -j "$(nproc)" --timeout 600
# Deployment files: Dockerfile lint, manifests against Kubernetes schemas, alert rule tests;
# metric names against the live scrape the Prometheus integration test saved.
MOE_EXPORTED_METRICS="$PWD/$BUILD_DIR/metrics_scrape.txt" bash scripts/check_deploy.sh
