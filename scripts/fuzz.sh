#!/usr/bin/env bash
# Builds the libFuzzer targets of fuzz/ with clang (ASan+UBSan, no LibTorch needed)
# and runs each for SECONDS (default 60), printing its number of executions.
# Exits non-zero when a target crashes, hits UB, leaks, exceeds the memory caps or
# times out on an input; the reproducer is left in <build>/artifacts/<target>/
# (replay it with: <build>/bin/<target> <file>).
#
#   scripts/fuzz.sh [SECONDS]        env: FUZZ_BUILD_DIR (default build-fuzz), JOBS
#
# Inputs found are kept in <build>/corpus/<target> and reused by the next run; the
# seeds in fuzz/corpus/<target> are only read.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-60}
build=${FUZZ_BUILD_DIR:-build-fuzz}
jobs=${JOBS:-$(nproc)}
targets=(fuzz_frame_decoder fuzz_nodes_config fuzz_init_request fuzz_http_server)

# Standalone configure of fuzz/ (see fuzz/CMakeLists.txt): LibTorch is not looked for.
cmake -S fuzz -B "$build" -DCMAKE_CXX_COMPILER=clang++ >/dev/null
cmake --build "$build" -j "$jobs" --target "${targets[@]}"

# One allocation over 64 MiB is a failure: every input is at most a few KiB and every
# accepted frame at most 1 KiB, so only a size taken from an unchecked field gets there.
common_flags=(-max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -malloc_limit_mb=64
              -print_final_stats=1 -detect_leaks=1)
declare -A extra=(
  [fuzz_frame_decoder]="-max_len=1100 -dict=fuzz/frame.dict"
  [fuzz_nodes_config]="-max_len=4096 -dict=fuzz/json.dict"
  [fuzz_init_request]="-max_len=4096 -dict=fuzz/json.dict"
  [fuzz_http_server]="-max_len=4096 -dict=fuzz/http.dict -detect_leaks=0"
)
# fuzz_http_server: the server frees a connection's memory on its own threads, after the
# input has returned, so libFuzzer's per-input leak check (which reruns every input whose
# mallocs and frees differ under LeakSanitizer) fires on nearly every input and costs 6x
# the executions. Leaks are still reported: ASAN_OPTIONS' detect_leaks checks at exit.
export ASAN_OPTIONS=${ASAN_OPTIONS:-halt_on_error=1:detect_leaks=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-halt_on_error=1:print_stacktrace=1}

failed=()
summary=()
for t in "${targets[@]}"; do
  corpus="$build/corpus/$t" artifacts="$build/artifacts/$t" log="$build/logs/$t.log"
  mkdir -p "$corpus" "$artifacts" "$(dirname "$log")"
  echo "fuzz: $t for ${seconds}s"
  rc=0
  # shellcheck disable=SC2086  # extra flags are split on purpose
  "$build/bin/$t" "${common_flags[@]}" ${extra[$t]} -artifact_prefix="$artifacts/" \
    "$corpus" "fuzz/corpus/${t#fuzz_}" >"$log" 2>&1 || rc=$?
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  line="$t: ${execs:-?} executions in ${seconds}s, corpus $(find "$corpus" -type f | wc -l) inputs"
  if [ "$rc" -ne 0 ]; then
    line+=" -- FAILED (exit $rc), log: $log"
    failed+=("$t")
    tail -n 60 "$log" >&2
  fi
  echo "fuzz: $line"
  summary+=("$line")
done

echo "fuzz: summary"
printf '  %s\n' "${summary[@]}"
if [ ${#failed[@]} -ne 0 ]; then
  echo "fuzz: FAILED: ${failed[*]}; reproducers in $build/artifacts/" >&2
  exit 1
fi
