#!/usr/bin/env bash
# Builds the project (Release, build/) and runs the whole test suite with ctest.
# Tests that need ../shared skip with a message where it is absent.
set -euo pipefail
cd "$(dirname "$0")/.."
jobs=${JOBS:-$(nproc)}
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build build -j "$jobs"
cd build && ctest --output-on-failure -j "$jobs" --timeout 600 "$@"
