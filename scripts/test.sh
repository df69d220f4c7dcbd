#!/usr/bin/env bash
# Installs what the build needs (Debian packages; a no-op when present), builds the
# project (Release, build/) and runs the whole test suite with ctest. Tests that
# need ../shared skip with a message where it is absent.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
jobs=${JOBS:-$(nproc)}
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build build -j "$jobs"
cd build && ctest --output-on-failure -j "$jobs" --timeout 600 "$@"
