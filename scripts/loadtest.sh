#!/usr/bin/env bash
# Concurrency: SESSIONS simulated clients (started RAMP_MS apart) speak the test question in
# CHUNK_MS frames at real-time pace to a server in its own process, wired to the provider
# fakes in a third process, all on loopback. Prints latency, late/dropped frames, reply-audio
# gaps and each process's CPU; extra arguments go to `atlas-voice loadtest` (e.g. --json).
# Usage: [LOADTEST_BIN=path] [LOADTEST_PIN=1] scripts/loadtest.sh [SESSIONS] [CHUNK_MS] [RAMP_MS] [loadtest args...]
#        (defaults 1000 20 5; loopback only; stops by itself)
# LOADTEST_PIN=1 runs the server on the first CPU and the fakes and the generator on the
# others (taskset), so that a generator falling behind does not show up as server latency.
# LOADTEST_FAKES_BIN runs the provider fakes from another build (A/B comparisons of servers
# against the same fakes); LOADTEST_FAKES_ARGS adds flags to them (`--stt-stable-ms 20`, say).
# LOADTEST_METRICS=REGEX prints the server's /metrics lines matching REGEX after the run
# (e.g. 'atlas_turn_decision' with ATLAS_TURN_POLICY=smart in the environment), after
# LOADTEST_METRICS_DELAY_S seconds (default 0; e.g. 6 for the trace exporter's 5 s batches,
# with OTEL_EXPORTER_OTLP_TRACES_ENDPOINT=http://127.0.0.1:19090/v1/traces: the fakes take
# OTLP exports too).
# LOADTEST_TWILIO=1 places SESSIONS phone calls through the fake Twilio instead (signed
# webhook, TwiML, a media stream of 20 ms mu-law frames at real-time pace; CHUNK_MS is unused).
set -euo pipefail
cd "$(dirname "$0")/.."
n="${1:-1000}"
chunk="${2:-20}"
ramp="${3:-5}"
shift $(($# < 3 ? $# : 3))
. scripts/lib/load.sh
# LOADTEST_BIN runs a given build instead (A/B comparisons of two builds on the same machine).
if [ -n "${LOADTEST_BIN:-}" ]; then
  bin="$LOADTEST_BIN"
else
  cargo build --release --locked -p atlas-voice >&2
  bin="$CARGO_TARGET_DIR/release/atlas-voice"
fi
server_cpu=() client_cpu=()
if [ -n "${LOADTEST_PIN:-}" ]; then
  last=$(($(nproc) - 1))
  [ "$last" -ge 1 ] || { echo "LOADTEST_PIN needs at least two CPUs" >&2; exit 1; }
  server_cpu=(taskset -c 0) client_cpu=(taskset -c "1-$last")
fi
fakes_port=19090
server_port=18080
data=$(mktemp -d)
# shellcheck disable=SC2086 # LOADTEST_FAKES_ARGS is a list of flags
RUST_LOG=warn "${client_cpu[@]}" "${LOADTEST_FAKES_BIN:-$bin}" fakes --listen "127.0.0.1:$fakes_port" ${LOADTEST_FAKES_ARGS:-} >/dev/null &
fakes_pid=$!
export_fake_providers "$fakes_port"
export ATLAS_LISTEN="127.0.0.1:$server_port" DATABASE_URL="sqlite://$data/atlas-voice.db"
twilio_token=loadtest-twilio-auth-token-0123456789
if [ -n "${LOADTEST_TWILIO:-}" ]; then
  printf '[[twilio_numbers]]\nnumber = "+12025550199"\nuser_id = "loadtest"\n' >"$data/atlas.toml"
  export ATLAS_CONFIG="$data/atlas.toml" ATLAS_TWILIO_AUTH_TOKEN="$twilio_token" \
    ATLAS_PUBLIC_URL=https://voice.example.com
fi
RUST_LOG=warn "${server_cpu[@]}" "$bin" serve >/dev/null &
server_pid=$!
trap 'kill "$server_pid" "$fakes_pid" 2>/dev/null; wait 2>/dev/null; rm -rf "$data"' EXIT
for _ in $(seq 100); do
  curl -sf "http://127.0.0.1:$server_port/healthz" >/dev/null 2>&1 && break
  sleep 0.1
done
if [ -n "${LOADTEST_TWILIO:-}" ]; then
  "${client_cpu[@]}" "$bin" loadtest --twilio --url "http://127.0.0.1:$server_port" \
    --public-url https://voice.example.com --twilio-auth-token "$twilio_token" \
    --sessions "$n" --ramp-ms "$ramp" --server-pid "$server_pid" --fakes-pid "$fakes_pid" "$@"
  exit 0
fi
token=$("$bin" token --user loadtest)
"${client_cpu[@]}" "$bin" loadtest --url "ws://127.0.0.1:$server_port/v1/voice" --token "$token" \
  --sessions "$n" --chunk-ms "$chunk" --ramp-ms "$ramp" \
  --server-pid "$server_pid" --fakes-pid "$fakes_pid" "$@"
if [ -n "${LOADTEST_METRICS:-}" ]; then
  sleep "${LOADTEST_METRICS_DELAY_S:-0}"
  curl -s "http://127.0.0.1:$server_port/metrics" | grep -E "$LOADTEST_METRICS" >&2 || true
fi
