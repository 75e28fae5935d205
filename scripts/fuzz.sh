#!/usr/bin/env bash
# Builds the libFuzzer targets (clang, ASan + UBSan + libFuzzer, every library instrumented: the
# fuzz preset of CMakePresets.json) in build-fuzz/ and runs each for a bounded time from its
# committed seed corpus (fuzz/corpus/<target>/, never written to: new inputs go to
# $BUILD_DIR/corpus/<target>/).
# Exit status non-zero when a target finds a crash, leak or failed check; the reproducer is in
# $BUILD_DIR/artifacts/<target>/ (turn it into a GoogleTest regression test).
#
# FUZZ_SEED fixes libFuzzer's random seed: the same commit then tries the same inputs in the
# same order (up to how far FUZZ_SECONDS gets on the machine), so a gate does not pass or fail
# by luck. Unset (a fresh seed each run) is how long campaigns find new bugs.
#
#   scripts/fuzz.sh                      # all targets, FUZZ_SECONDS (default 25) each
#   FUZZ_SECONDS=300 scripts/fuzz.sh safetensors generate_request
#   FUZZ_SEED=1 FUZZ_SECONDS=20 scripts/fuzz.sh   # what CI runs
set -euo pipefail
cd "$(dirname "$0")/.."

BUILD_DIR=build-fuzz  # the binaryDir of the fuzz preset (CMakePresets.json)
SECONDS_EACH="${FUZZ_SECONDS:-25}"
SEED_FLAG=()
if [[ -n "${FUZZ_SEED:-}" ]]; then SEED_FLAG=(-seed="$FUZZ_SEED"); fi
TARGETS=("$@")
if ((${#TARGETS[@]} == 0)); then
  TARGETS=(tokenizer tokenizer_json model_config safetensors generate_request chat_template
           completion_text)
fi

bash scripts/setup_deps.sh
start=$(date +%s)
mkdir -p "$BUILD_DIR"
cmake --preset fuzz > "$BUILD_DIR/configure.log" 2>&1 || { cat "$BUILD_DIR/configure.log"; exit 1; }
cmake --build --preset fuzz -j "$(nproc)" --target "${TARGETS[@]/%/_fuzzer}"
echo "fuzz: build took $(($(date +%s) - start)) s"

export ASAN_OPTIONS="detect_leaks=1:abort_on_error=1:symbolize=1"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
failed=()
for target in "${TARGETS[@]}"; do
  corpus="$BUILD_DIR/corpus/$target"
  artifacts="$BUILD_DIR/artifacts/$target"
  mkdir -p "$corpus" "$artifacts"
  log="$BUILD_DIR/fuzz-$target.log"
  t0=$(date +%s)
  if "$BUILD_DIR/fuzz/${target}_fuzzer" "${SEED_FLAG[@]}" -max_total_time="$SECONDS_EACH" -timeout=10 \
      -rss_limit_mb=2048 -max_len=65536 -print_final_stats=1 \
      -artifact_prefix="$artifacts/" "$corpus" "fuzz/corpus/$target" > "$log" 2>&1; then
    runs=$(grep -m1 -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$')
    cov=$(grep -o 'cov: [0-9]*' "$log" | tail -1)
    echo "fuzz: $target ok: ${runs:-?} runs in $(($(date +%s) - t0)) s, $cov"
  else
    echo "fuzz: $target FAILED (log $log, reproducer in $artifacts/):"
    grep -E "ERROR|check failed|runtime error|SUMMARY" "$log" | head -20 || tail -30 "$log"
    failed+=("$target")
  fi
done
echo "fuzz: total $(($(date +%s) - start)) s"
if ((${#failed[@]})); then
  echo "fuzz: findings in ${failed[*]}"
  exit 1
fi
