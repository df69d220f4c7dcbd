#!/usr/bin/env bash
# The main job on one machine: a 3-node ring (starter + 2 secondaries) on
# loopback generating stories with stories260K from ../shared, or, in a fresh
# clone without ../shared, with random weights of the same shape (gibberish).
#   scripts/demo.sh [extra starter flags, e.g. --n-samples 6 --temperature 0]
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

bash scripts/install-deps.sh
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build build -j "$(nproc)" --target starter secondary prepare_model

model=models/stories260K
if [ -f ../shared/models/stories260K/stories260K.bin ]; then
  echo "demo: stories260K from ../shared/models"
  build/bin/prepare_model ../shared/models/stories260K/stories260K.bin --n-nodes 3 --out "$model"
else
  model=models/random-stories260K
  echo "demo: ../shared is absent, so this runs a RANDOM-WEIGHT model of stories260K's shape: expect gibberish"
  build/bin/prepare_model random:stories260K --n-nodes 3 --out "$model"
fi

mkdir -p out
config=configs/loopback-3nodes.json
logs=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT
for i in 0 1; do
  build/bin/secondary --nodes-config "$config" "$i" >"$logs/secondary$i.log" 2>&1 &
  pids+=($!)
done
echo "demo: secondaries started (logs in $logs)"

build/bin/starter --nodes-config "$config" --ckpt "$model" --n-samples 3 --n-tokens 200 \
  --prompt "Once upon a time" --out "$root/out/demo.json" --time-run "$root/out/demo-time.csv" -p "$@"
echo "demo: samples and per-node stats in out/demo.json, time per token in out/demo-time.csv and out/demo-time.svg"
