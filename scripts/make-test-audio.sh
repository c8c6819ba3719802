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

# paused_flight_16k.wav is the neural voice, not espeak-ng (the end-of-turn model is erratic on
# espeak-ng's speech): a sentence said in one go with 700 ms of silence cut in after "to",
# saved by the evaluation from a one-item prompt set, against a server on the local engines:
#   printf '[[prompt]]\nid = "flight"\nkind = "request"\ntext = "I am looking for a flight to | London."\npause_ms = 700\n' > one.toml
#   atlas-voice eval --prompts one.toml --voices piper --rates 16000 --until-final --save-clips .
#   mv piper-16000-flight.wav paused_flight_16k.wav
# The voice samples noise, so every run gives another recording: keep one that the silence
# policy cuts off at the pause and the smart policy does not (the local_engines test checks both).
