# What the load scripts (scripts/loadtest.sh, scripts/records-load.sh) share; sourced from
# the repository's root.

# One shared build directory outside the clone.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/atlas-voice/target}"

# export_fake_providers PORT: points the server's recogniser, model and voice at the provider
# fakes listening on 127.0.0.1:PORT (`atlas-voice fakes`), in development mode, with the
# per-address and per-user connection limits lifted so that one machine can open every session.
export_fake_providers() {
  local port="$1"
  export ATLAS_DEV=true \
    ATLAS_STT=deepgram ATLAS_LLM=anthropic ATLAS_TTS=openai \
    DEEPGRAM_API_KEY=fake ANTHROPIC_API_KEY=fake OPENAI_API_KEY=fake \
    ATLAS_DEEPGRAM_URL="ws://127.0.0.1:$port" ATLAS_ANTHROPIC_URL="http://127.0.0.1:$port" \
    ATLAS_OPENAI_URL="http://127.0.0.1:$port/v1" \
    ATLAS_CONNECT_RATE_PER_S=1000000 ATLAS_CONNECT_BURST=1000000 \
    ATLAS_MAX_SESSIONS_PER_USER=100000
}
