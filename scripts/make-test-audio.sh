#!/usr/bin/env bash
# Regenerates the speech fixtures in tests/audio with espeak-ng and sox (16 kHz mono s16le WAV).
set -euo pipefail
cd "$(dirname "$0")/../tests/audio"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
make() { # name text pad-before pad-after
  espeak-ng -v en-us -s 165 -w "$tmp/$1.wav" "$2"
  sox "$tmp/$1.wav" -r 16000 -c 1 -b 16 "$1_16k.wav" pad "$3" "$4"
}
make question "What is the weather like in Paris today?" 0.3 1.2
make interrupt "Please tell me about Rome instead" 0.1 1.2
