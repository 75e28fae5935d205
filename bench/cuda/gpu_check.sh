#!/usr/bin/env bash
# The CUDA backend's GPU check, designed for one 10-minute call on a lent GPU machine, whose
# image has CUDA 13, CMake and ninja but not Debian's Abseil/Highway/GoogleTest: so the
# binaries are built here and carried with the libraries they need.
#
#   here:        bench/cuda/gpu_check.sh pack    # builds build-cuda, fills .gpu-carry/ (ignored)
#   GPU machine: bench/cuda/gpu_check.sh run     # carry: [".gpu-carry"]; logs under $OUT
#                (or `run tests`, `run bench`, `run sanitize`: one phase per call)
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

run() {  # phases, in this order: tests bench sanitize (default: all)
  local phases=" ${*:-tests bench sanitize} "
  local out="${OUT:-/tmp/gpu-check}"
  mkdir -p "$out"
  export LD_LIBRARY_PATH="$CARRY/lib:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
  export MOE_SOURCE_DIR="$ROOT"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/device.txt"
  local summary=()
  # The whole run stays within GPU_CHECK_SECONDS (default 540, for a 600 s call): each step
  # gets at most its own limit and what is left (20 s kept for the table); a step with no time
  # left is reported as skipped, to run in a second call (`run sanitize`, ...).
  local budget="${GPU_CHECK_SECONDS:-540}"
  bounded() {  # limit_seconds command...
    local limit=$1; shift
    local left=$((budget - SECONDS - 20))
    [ "$left" -lt "$limit" ] && limit=$left
    [ "$limit" -le 10 ] && return 125
    timeout "$limit" "$@"
  }
  record() {  # what, rc, seconds, detail
    local detail="$4"
    [ "$2" = 125 ] && detail="skipped: out of the time budget"
    summary+=("$(printf '%-28s rc=%-3s %4ss  %s' "$1" "$2" "$3" "$detail")")
  }
  test_binary() {  # name, gtest args...
    local name="$1"; shift
    local start=$SECONDS
    bounded 240 "$CARRY/bin/$name" "$@" >"$out/$name.log" 2>&1
    local rc=$?
    record "$name" "$rc" "$((SECONDS - start))" \
      "$(grep -E '^\[  (PASSED|FAILED|SKIPPED) ' "$out/$name.log" | tr '\n' ' ')"
    grep -E '^\[  FAILED  \]|Failure|error' "$out/$name.log" | head -20
  }
  sanitized() {  # what, tool, binary, gtest filter
    local start=$SECONDS log="$out/sanitizer_${1// /_}.log"
    bounded 150 "$sanitizer" --tool "$2" --error-exitcode 3 "$CARRY/bin/$3" --gtest_filter="$4" \
      >"$log" 2>&1
    local rc=$?
    record "$1" "$rc" "$((SECONDS - start))" \
      "$(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$log" | tail -1)"
  }
  if [[ "$phases" == *" tests "* ]]; then
    test_binary cuda_backend_test
    test_binary cuda_forward_test
    test_binary reference_test
  fi
  if [[ "$phases" == *" bench "* && -x "$CARRY/bin/moe-bench-cuda" ]]; then
    local start=$SECONDS
    bounded 200 "$CARRY/bin/moe-bench-cuda" --layers=4 --dir=/tmp/moe-cuda-bench >"$out/bench.log" 2>&1
    record "moe-bench-cuda" "$?" "$((SECONDS - start))" ""
    # The bf16 KV cache at the largest batch, beside the f32 figures above.
    start=$SECONDS
    bounded 90 "$CARRY/bin/moe-bench-cuda" --layers=4 --dir=/tmp/moe-cuda-bench --batches=64 \
      --steps=16 --prefill_tokens=256 --kv_cache_dtype=bf16 --compare_without_graphs=false \
      >"$out/bench_bf16_kv.log" 2>&1
    record "moe-bench-cuda bf16 KV" "$?" "$((SECONDS - start))" ""
  fi
  if [[ "$phases" == *" sanitize "* ]]; then
    local sanitizer=compute-sanitizer
    command -v $sanitizer >/dev/null || sanitizer=/usr/local/cuda/bin/compute-sanitizer
    local ops='Modes/CudaBackendTest.*/default:Modes/CudaBackendTest.*/tensor_cores'
    sanitized "memcheck" memcheck cuda_backend_test "$ops"
    # Graph capture and replay (decode steps of the whole forward pass).
    sanitized "memcheck graphs" memcheck cuda_forward_test 'AllArchitectures/CudaForwardTest.GraphReplay*/0'
    sanitized "racecheck" racecheck cuda_backend_test "$ops"
  fi
  echo
  echo "==== gpu_check ($(cat "$out/device.txt"), ${SECONDS}s)"
  printf '%s\n' "${summary[@]}"
  [ -f "$out/bench.log" ] && tail -16 "$out/bench.log"
  [ -f "$out/bench_bf16_kv.log" ] && tail -4 "$out/bench_bf16_kv.log"
}

case "${1:-}" in
  pack) pack ;;
  run) shift; run "$@" ;;
  *) echo "usage: $0 pack | run [tests] [bench] [sanitize]" >&2; exit 2 ;;
esac
