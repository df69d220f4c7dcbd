#!/usr/bin/env bash
# AddressSanitizer + UndefinedBehaviorSanitizer build (-DMDI_SANITIZE=ON, in
# build-sanitize/) of the unit tests that need no LibTorch, run with ctest; the
# first sanitizer report fails the run (halt_on_error, LeakSanitizer on).
#
# Which tests: every tests/test_*.cpp whose name does not match
# MDI_TORCH_TEST_PATTERN in tests/CMakeLists.txt, i.e. those linking only mdi_base
# (frame, nodes_config, transport and bounded queue, control_plane, sha256,
# tokenizer, safetensors, sampling, ...); a new torch-free test is picked up alone.
# Only mdi_base and those executables are compiled. The LibTorch tests are left out:
# Debian's libtorch is not built with ASan (its allocations and threads make
# false reports), and compiling the model code and binaries a second time would
# double CI time for little gain. Configuring still finds LibTorch, as the top-level
# CMakeLists.txt requires it, but nothing of it is built.
#
# Compiler: the project's default (gcc); float-cast-overflow is added, which gcc
# leaves out of -fsanitize=undefined. Debug with -O1: asserts on, bearable speed.
#
#   scripts/sanitize.sh [ctest args...]      env: SANITIZE_BUILD_DIR (default build-sanitize), JOBS
set -euo pipefail
cd "$(dirname "$0")/.."
build=${SANITIZE_BUILD_DIR:-build-sanitize}
jobs=${JOBS:-$(nproc)}

pattern=$(sed -n 's/^set(MDI_TORCH_TEST_PATTERN "\(.*\)")$/\1/p' tests/CMakeLists.txt)
[ -n "$pattern" ] || { echo "sanitize: MDI_TORCH_TEST_PATTERN not found in tests/CMakeLists.txt" >&2; exit 1; }
targets=()
for src in tests/test_*.cpp; do
  name=$(basename "$src" .cpp)
  [[ $name =~ $pattern ]] || targets+=("$name")
done
echo "sanitize: ${targets[*]}"

cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=Debug -DCMAKE_CXX_FLAGS_DEBUG="-g -O1" \
  -DCMAKE_CXX_FLAGS="-fsanitize=float-cast-overflow" -DMDI_SANITIZE=ON -DMDI_BUILD_TESTS=ON >/dev/null
cmake --build "$build" -j "$jobs" --target "${targets[@]}"

export ASAN_OPTIONS=${ASAN_OPTIONS:-halt_on_error=1:abort_on_error=1:detect_leaks=1:strict_string_checks=1:detect_stack_use_after_return=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-halt_on_error=1:abort_on_error=1:print_stacktrace=1}
# gtest_discover_tests names tests by suite, not by executable; the executables not
# built above (the LibTorch ones) appear as <name>_NOT_BUILT, and docker_offline_check
# is Python: run everything else, i.e. exactly the tests of the targets above.
cd "$build" && ctest --output-on-failure -j "$jobs" --timeout 600 -E '(_NOT_BUILT$|^docker_offline_check$)' "$@"
