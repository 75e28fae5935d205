#!/usr/bin/env bash
# Builds moe-serve, writes the built-in demo model (a small random Mixtral-architecture
# checkpoint with a byte-level BPE tokenizer and Qwen2-MoE's ChatML chat template) to
# build/demo_model, and serves it on 0.0.0.0:50051 (metrics on :9400). Extra arguments go to
# moe-serve.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/build.sh
BUILD_DIR="${MOE_BUILD_DIR:-build}"
DEMO_DIR="$BUILD_DIR/demo_model"
if [[ ! -f "$DEMO_DIR/model.safetensors" || ! -f "$DEMO_DIR/chat_template.jinja" ]]; then
  "$BUILD_DIR/tools/moe-make-model" --preset=demo --out="$DEMO_DIR" \
    --tokenizer=tests/fixtures/tokenizers/qwen2_split/tokenizer.json \
    --chat_template=tests/fixtures/chat_templates/qwen2_moe_chatml.jinja
fi
exec "$BUILD_DIR/server/moe-serve" --model="$DEMO_DIR" "$@"
