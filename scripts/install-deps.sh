#!/usr/bin/env bash
# Installs every build and test dependency from Debian packages. Idempotent: a
# second run only checks. Works on a bare Debian 12 machine as root (or with sudo).
set -euo pipefail

packages=(
  build-essential cmake pkg-config git
  libtorch-dev libopenblas0-pthread     # LibTorch (CPU); OpenBLAS instead of the reference BLAS
  libboost-dev                          # Asio, Beast
  nlohmann-json3-dev libspdlog-dev libcli11-dev
  libgtest-dev libgmock-dev
  libpcre2-dev                          # pre-tokenizer regexes of tokenizer.json
  libssl-dev                            # SHA-256 of model chunks
  python3 python3-yaml                  # tests/docker_offline_check.py
  clang libclang-rt-14-dev              # scripts/fuzz.sh: libFuzzer targets (clang 14 and its fuzzer runtime)
)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done

if [ ${#missing[@]} -eq 0 ]; then
  echo "install-deps: all ${#packages[@]} packages present"
  exit 0
fi

sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
echo "install-deps: installing ${missing[*]}"
$sudo apt-get update -q
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends "${missing[@]}"
