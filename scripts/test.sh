#!/usr/bin/env bash
# Builds everything (CUDA backend included when nvcc is present), runs the whole test suite,
# then validates the deployment files offline. On a machine without a GPU the CUDA parity
# tests report themselves skipped.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/build.sh
BUILD_DIR="${MOE_BUILD_DIR:-build}"
ctest --test-dir "$BUILD_DIR" --output-on-failure -j "$(nproc)" --timeout 600
# Deployment files: Dockerfile lint, manifests against Kubernetes schemas, alert rule tests.
bash scripts/check_deploy.sh
