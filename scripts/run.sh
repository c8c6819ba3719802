#!/usr/bin/env bash
# Builds atlas-voice and starts it for a first try: no accounts, no API keys.
# Installs the system packages the local engines need (scripts/setup-local.sh), builds the
# server and its engine workers, fetches the pinned models into ./models (246 MB,
# checked against their sha256), and serves on the local engines in development mode:
# Whisper tiny.en, SmolLM2-135M-Instruct and the Piper voice "joe". Open the printed URL and
# press Start.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/atlas-voice/target}"
if ! command -v cargo >/dev/null 2>&1; then
  echo "cargo is required: install Rust with rustup (https://rustup.rs)" >&2
  exit 1
fi
scripts/setup-local.sh
echo "== building (the first build compiles whisper.cpp and llama.cpp: several minutes)"
cargo build --release --locked -p atlas-voice -p atlas-voice-stt -p atlas-voice-llm \
  -p atlas-voice-tts
export ATLAS_MODELS_DIR="${ATLAS_MODELS_DIR:-models}"
"$CARGO_TARGET_DIR/release/atlas-voice" models fetch
export ATLAS_DEV="${ATLAS_DEV:-true}"
exec "$CARGO_TARGET_DIR/release/atlas-voice" serve "$@"
