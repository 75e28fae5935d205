#!/usr/bin/env bash
# Builds and runs the tests under the sanitizers, each in its own build directory (presets in
# CMakePresets.json):
#   asan  AddressSanitizer + UndefinedBehaviorSanitizer (+ LeakSanitizer at every exit), every
#         test: units, reference, in-process gRPC end-to-end, and the out-of-process tests
#         (moe-serve under ASan: Python grpcio, startup faults, TLS/auth, soak) - build-asan/
#   tsan  ThreadSanitizer on the tests whose threads run only instrumented code: tokenizer, KV,
#         scheduler, sampling, engine (engine thread vs. submit/cancel threads), metrics -
#         build-tsan/. Not the gRPC server tests: Debian's gRPC is not built with TSan, so its
#         internal synchronisation is invisible to TSan and would show as false races.
# Two written-reason suppressions, neither in moe-serve's code: tests/lsan.supp (OpenSSL's
# per-thread error state of gRPC threads still running at exit) and tests/tsan.supp
# (Abseil-internal). TSan needs the synchronisation it cannot see to be instrumented:
# Debian's Abseil is not, so every absl::Mutex hand-off (the engine's inbox, stats, ...) shows
# as a false race. This script therefore builds TSan-instrumented copies of the few Abseil
# libraries that implement absl::Mutex (base, spinlock_wait, malloc_internal, graphcycles,
# synchronization) from the Debian source of the installed version, against the installed
# headers (same ABI, same inline namespace), into .cache/absl-tsan/lib, which the tsan test
# preset puts first on LD_LIBRARY_PATH.
#
#   scripts/sanitize.sh            # both
#   scripts/sanitize.sh tsan       # one
# Environment: MOE_SOAK_SECONDS (soak length under ASan, default 30).
set -euo pipefail
cd "$(dirname "$0")/.."

KINDS=("$@")
if ((${#KINDS[@]} == 0)); then KINDS=(asan tsan); fi

bash scripts/setup_deps.sh
VENV=.cache/test_venv
if [[ ! -x "$VENV/bin/python" ]]; then python3 -m venv "$VENV"; fi
"$VENV/bin/pip" install --quiet --disable-pip-version-check -r tests/requirements.txt

# TSan-instrumented Abseil synchronisation libraries (see above), built once.
build_tsan_abseil() {
  local out=.cache/absl-tsan/lib
  local version
  version=$(dpkg-query -W -f='${Version}' libabsl-dev | sed 's/-[^-]*$//')
  if [[ -f "$out/.version" && "$(cat "$out/.version")" == "$version" ]]; then return; fi
  local src=.cache/absl-tsan/abseil-$version
  if [[ ! -d "$src" ]]; then
    mkdir -p .cache/absl-tsan
    curl -sfL "https://deb.debian.org/debian/pool/main/a/abseil/abseil_${version}.orig.tar.gz" |
      tar xz -C .cache/absl-tsan
  fi
  mkdir -p "$out"
  local flags=(-std=c++17 -fsanitize=thread -fPIC -O1 -g -shared)
  local libs=(-L"$PWD/$out" -L/usr/lib/x86_64-linux-gnu)
  (
    cd "$src/absl"
    local o="$OLDPWD/$out" so=".so.${version%%.*}"
    g++ "${flags[@]}" -Wl,-soname,libabsl_spinlock_wait$so -o "$o/libabsl_spinlock_wait$so" \
      base/internal/spinlock_wait.cc
    g++ "${flags[@]}" -Wl,-soname,libabsl_base$so -o "$o/libabsl_base$so" \
      base/internal/cycleclock.cc base/internal/spinlock.cc base/internal/sysinfo.cc \
      base/internal/thread_identity.cc base/internal/unscaledcycleclock.cc \
      "${libs[@]}" -labsl_spinlock_wait -labsl_raw_logging_internal
    g++ "${flags[@]}" -Wl,-soname,libabsl_malloc_internal$so -o "$o/libabsl_malloc_internal$so" \
      base/internal/low_level_alloc.cc \
      "${libs[@]}" -labsl_base -labsl_spinlock_wait -labsl_raw_logging_internal
    g++ "${flags[@]}" -Wl,-soname,libabsl_graphcycles_internal$so \
      -o "$o/libabsl_graphcycles_internal$so" synchronization/internal/graphcycles.cc \
      "${libs[@]}" -labsl_base -labsl_malloc_internal -labsl_spinlock_wait \
      -labsl_raw_logging_internal
    g++ "${flags[@]}" -Wl,-soname,libabsl_synchronization$so \
      -o "$o/libabsl_synchronization$so" synchronization/barrier.cc \
      synchronization/blocking_counter.cc synchronization/internal/create_thread_identity.cc \
      synchronization/internal/per_thread_sem.cc synchronization/internal/waiter.cc \
      synchronization/notification.cc synchronization/mutex.cc \
      "${libs[@]}" -labsl_graphcycles_internal -labsl_stacktrace -labsl_symbolize -labsl_time \
      -labsl_malloc_internal -labsl_base -labsl_spinlock_wait -labsl_raw_logging_internal
  )
  echo "$version" > "$out/.version"
}

JOBS="$(nproc)"
for kind in "${KINDS[@]}"; do
  case "$kind" in
    asan | tsan) ;;
    *) echo "sanitize: unknown kind '$kind' (asan, tsan)"; exit 2 ;;
  esac
  t0=$(date +%s)
  if [[ "$kind" == tsan ]]; then build_tsan_abseil; fi
  cmake --preset "$kind" -DPython3_EXECUTABLE="$PWD/$VENV/bin/python" > /dev/null
  cmake --build --preset "$kind" -j "$JOBS"
  t1=$(date +%s)
  echo "sanitize: $kind build took $((t1 - t0)) s"
  ctest --preset "$kind" -j "$JOBS"
  echo "sanitize: $kind tests took $(($(date +%s) - t1)) s"
done
