#!/usr/bin/env bash
# Builds atlas-voice and starts it for a first try: no accounts, no API keys.
# Until the local speech engines land, the server runs against the built-in provider fakes
# (in-process fake Deepgram, Anthropic and OpenAI servers), which hear real audio but answer
# with canned text and synthetic speech.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/atlas-voice/target}"
if ! command -v cargo >/dev/null 2>&1; then
  echo "cargo is required: install Rust with rustup (https://rustup.rs)" >&2
  exit 1
fi
cargo build --release --locked -p atlas-voice
exec "$CARGO_TARGET_DIR/release/atlas-voice" serve --fakes "$@"
