#!/usr/bin/env bash
# The CUDA backend's GPU check, designed for one 10-minute call on a lent GPU machine, whose
# image has CUDA 13, CMake and ninja but not Debian's Abseil/Highway/GoogleTest: so the
# binaries are built here and carried with the libraries they need.
#
#   here:        bench/cuda/gpu_check.sh pack    # builds build-cuda, fills .gpu-carry/ (ignored)
#   GPU machine: bench/cuda/gpu_check.sh run     # carry: [".gpu-carry"]; logs under $OUT
#
# `run` executes the CUDA op and forward-pass tests, compute-sanitizer memcheck and racecheck
# over the op tests, and moe-bench-cuda (f32 KV cache, decode with and without CUDA graphs, then
# a short bf16-KV run), then prints a short table last.
set -uo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
CARRY="$ROOT/.gpu-carry"
BUILD="${BUILD:-$ROOT/build-cuda}"

pack() {
  grep -qx '/.gpu-carry/' "$ROOT/.git/info/exclude" 2>/dev/null || echo '/.gpu-carry/' >>"$ROOT/.git/info/exclude"
  [ -f "$BUILD/build.ninja" ] || cmake -S "$ROOT" -B "$BUILD" -G Ninja -DMOE_TEST_AREAS="backend;ops" || exit 1
  local targets="cuda_backend_test cuda_forward_test reference_test"
  if ninja -C "$BUILD" -t targets all 2>/dev/null | grep -q '^moe_bench_cuda:'; then
    targets="$targets moe_bench_cuda"
  fi
  cmake --build "$BUILD" --target $targets -j"$(nproc)" || exit 1
  rm -rf "$CARRY" && mkdir -p "$CARRY/bin" "$CARRY/lib"
  for binary in tests/backend/cuda_backend_test tests/backend/cuda_forward_test \
                tests/ops/reference_test bench/cuda/moe-bench-cuda; do
    [ -f "$BUILD/$binary" ] || continue
    cp "$BUILD/$binary" "$CARRY/bin/"
    # Everything but glibc, the C++ runtime and CUDA's own libraries (the machine has newer
    # or matching ones).
    ldd "$BUILD/$binary" | awk '$3 ~ /^\// {print $3}' |
      grep -vE '/(libc|libm|libdl|libpthread|librt|libstdc\+\+|libgcc_s|libcuda|libcudart|libcublas|libcublasLt)\.so' |
      xargs -r -I{} cp -nL {} "$CARRY/lib/"
  done
  du -sh "$CARRY"
}

run() {
  local out="${OUT:-/tmp/gpu-check}"
  mkdir -p "$out"
  export LD_LIBRARY_PATH="$CARRY/lib:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
  export MOE_SOURCE_DIR="$ROOT"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/device.txt"
  local summary=()
  test_binary() {  # name, gtest args...
    local name="$1"; shift
    local start=$SECONDS
    timeout 240 "$CARRY/bin/$name" "$@" >"$out/$name.log" 2>&1
    local rc=$?
    summary+=("$(printf '%-28s rc=%-3s %4ss  %s' "$name" "$rc" "$((SECONDS - start))" \
      "$(grep -E '^\[  (PASSED|FAILED|SKIPPED) ' "$out/$name.log" | tr '\n' ' ')")")
    grep -E '^\[  FAILED  \]|Failure|error' "$out/$name.log" | head -20
  }
  test_binary cuda_backend_test
  test_binary cuda_forward_test
  test_binary reference_test
  local sanitizer=compute-sanitizer
  command -v $sanitizer >/dev/null || sanitizer=/usr/local/cuda/bin/compute-sanitizer
  for tool in memcheck racecheck; do
    local start=$SECONDS
    timeout 150 $sanitizer --tool $tool --error-exitcode 3 \
      "$CARRY/bin/cuda_backend_test" --gtest_filter='Modes/CudaBackendTest.*/default:Modes/CudaBackendTest.*/tensor_cores' \
      >"$out/sanitizer_$tool.log" 2>&1
    local rc=$?
    summary+=("$(printf '%-28s rc=%-3s %4ss  %s' "sanitizer $tool" "$rc" "$((SECONDS - start))" \
      "$(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$out/sanitizer_$tool.log" | tail -1)")")
  done
  # Graph capture and replay (decode steps of the whole forward pass) under memcheck.
  local start=$SECONDS
  timeout 120 $sanitizer --tool memcheck --error-exitcode 3 "$CARRY/bin/cuda_forward_test" \
    --gtest_filter='AllArchitectures/CudaForwardTest.GraphReplay*/0' \
    >"$out/sanitizer_memcheck_graphs.log" 2>&1
  local rc=$?
  summary+=("$(printf '%-28s rc=%-3s %4ss  %s' "sanitizer memcheck graphs" "$rc" \
    "$((SECONDS - start))" "$(grep -E 'ERROR SUMMARY' "$out/sanitizer_memcheck_graphs.log" | tail -1)")")
  if [ -x "$CARRY/bin/moe-bench-cuda" ]; then
    timeout 200 "$CARRY/bin/moe-bench-cuda" --layers=4 --dir=/tmp/moe-cuda-bench >"$out/bench.log" 2>&1
    summary+=("moe-bench-cuda rc=$?")
    # The bf16 KV cache at the largest batch, beside the f32 figures above.
    timeout 90 "$CARRY/bin/moe-bench-cuda" --layers=4 --dir=/tmp/moe-cuda-bench --batches=64 \
      --steps=16 --prefill_tokens=256 --kv_cache_dtype=bf16 --compare_without_graphs=false \
      >"$out/bench_bf16_kv.log" 2>&1
    summary+=("moe-bench-cuda --kv_cache_dtype=bf16 rc=$?")
  fi
  echo
  echo "==== gpu_check ($(cat "$out/device.txt"))"
  printf '%s\n' "${summary[@]}"
  [ -f "$out/bench.log" ] && tail -16 "$out/bench.log"
  [ -f "$out/bench_bf16_kv.log" ] && tail -4 "$out/bench_bf16_kv.log"
}

case "${1:-}" in
  pack) pack ;;
  run) run ;;
  *) echo "usage: $0 pack|run" >&2; exit 2 ;;
esac
