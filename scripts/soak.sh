#!/usr/bin/env bash
# Soak: N sequential short sessions against a server running in its own process (wired to
# the provider fakes in a third process), sampling the server's RSS and live-session count.
# Usage: scripts/soak.sh [SESSIONS]   (default 10000; loopback only; stops by itself)
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/atlas-voice/target}"
n="${1:-10000}"
cargo build --release --locked -p atlas-voice
bin="$CARGO_TARGET_DIR/release/atlas-voice"
fakes_port=19090
server_port=18080
RUST_LOG=warn "$bin" fakes --listen "127.0.0.1:$fakes_port" >/dev/null &
fakes_pid=$!
export ATLAS_LISTEN="127.0.0.1:$server_port" ATLAS_DEV=true \
  ATLAS_STT=deepgram ATLAS_LLM=anthropic ATLAS_TTS=openai \
  DEEPGRAM_API_KEY=fake ANTHROPIC_API_KEY=fake OPENAI_API_KEY=fake \
  ATLAS_DEEPGRAM_URL="ws://127.0.0.1:$fakes_port" ATLAS_ANTHROPIC_URL="http://127.0.0.1:$fakes_port" \
  ATLAS_OPENAI_URL="http://127.0.0.1:$fakes_port/v1" \
  ATLAS_CONNECT_RATE_PER_S=1000000 ATLAS_CONNECT_BURST=1000000
RUST_LOG=warn "$bin" serve >/dev/null &
server_pid=$!
trap 'kill "$server_pid" "$fakes_pid" 2>/dev/null; wait 2>/dev/null' EXIT
for _ in $(seq 50); do
  curl -sf "http://127.0.0.1:$server_port/healthz" >/dev/null 2>&1 && break
  sleep 0.1
done
token=$("$bin" token --user soak)
"$bin" loadtest --url "ws://127.0.0.1:$server_port/v1/voice" --token "$token" \
  --soak "$n" --server-pid "$server_pid"
