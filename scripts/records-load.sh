#!/usr/bin/env bash
# Records under load: SESSIONS idle clients held HOLD_S seconds by a server checkpointing
# every second into PostgreSQL behind a proxy that delays each request DELAY_MS; the server
# is then stopped (SIGTERM: drain) while the sessions are still open. Afterwards every session
# must have exactly one row, none with ended_at null, and the spool must be empty.
# Usage: scripts/records-load.sh [SESSIONS] [DELAY_MS] [HOLD_S]   (defaults 200 50 20;
#        needs PostgreSQL on 127.0.0.1:5432, user postgres; loopback only; stops by itself)
set -euo pipefail
cd "$(dirname "$0")/.."
n="${1:-200}"
delay="${2:-50}"
hold="${3:-20}"
. scripts/lib/load.sh
# ATLAS_VOICE_BIN=path/to/atlas-voice skips the build (e.g. a debug build made for the tests).
if [ -z "${ATLAS_VOICE_BIN:-}" ]; then
  cargo build --release --locked -p atlas-voice >&2
fi
bin="${ATLAS_VOICE_BIN:-$CARGO_TARGET_DIR/release/atlas-voice}"
unset ATLAS_VOICE_BIN
fakes_port=19091
proxy_port=15433
server_port=18081
db="atlas_records_load_$$"
data=$(mktemp -d)
psql -h 127.0.0.1 -U postgres -d postgres -qc "create database $db"
RUST_LOG=warn "$bin" fakes --listen "127.0.0.1:$fakes_port" \
  --db-proxy "127.0.0.1:$proxy_port=127.0.0.1:5432" --db-delay-ms "$delay" >/dev/null &
fakes_pid=$!
export_fake_providers "$fakes_port"
export ATLAS_LISTEN="127.0.0.1:$server_port" ATLAS_CHECKPOINT_INTERVAL_S=1 \
  ATLAS_IDLE_TIMEOUT_S=600 ATLAS_SPOOL_DIR="$data/spool" \
  DATABASE_URL="postgres://postgres@127.0.0.1:$proxy_port/$db"
cleanup() {
  kill "$server_pid" "$fakes_pid" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$data"
  psql -h 127.0.0.1 -U postgres -d postgres -qc "drop database if exists $db with (force)" || true
}
sleep 0.5
RUST_LOG=warn "$bin" serve >"$data/server.log" 2>&1 &
server_pid=$!
trap cleanup EXIT
for _ in $(seq 100); do
  curl -sf "http://127.0.0.1:$server_port/readyz" >/dev/null 2>&1 && break
  sleep 0.1
done
echo "== one query through the proxy: $( { /usr/bin/time -f '%e s' psql -h 127.0.0.1 -p "$proxy_port" -U postgres -d "$db" -Atc 'select 1' >/dev/null; } 2>&1 )"
token=$("$bin" token --user loadtest)
# Hold the sessions; stop the server while they are still open.
"$bin" loadtest --url "ws://127.0.0.1:$server_port/v1/voice" --token "$token" \
  --idle "$n" --hold-s "$((hold + 30))" --server-pid "$server_pid" >"$data/loadtest.log" 2>&1 &
load_pid=$!
sleep "$hold"
echo "== after ${hold} s: $(curl -s "http://127.0.0.1:$server_port/readyz")"
curl -s "http://127.0.0.1:$server_port/metrics" | grep -E '^atlas_(records|spool|database)' || true
started=$(date +%s.%N)
kill -TERM "$server_pid"
wait "$server_pid" || true
stopped=$(date +%s.%N)
kill "$load_pid" 2>/dev/null || true
wait "$load_pid" 2>/dev/null || true
echo "== drain took $(echo "$stopped - $started" | bc) s"
count_json() { if [ -d "$1" ]; then find "$1" -maxdepth 1 -name '*.json' | wc -l; else echo 0; fi; }
spooled=$(count_json "$data/spool")
quarantined=$(count_json "$data/spool/quarantine")
q() { psql -h 127.0.0.1 -U postgres -d "$db" -Atc "$1"; }
rows=$(q "select count(*) from voice_sessions")
distinct=$(q "select count(distinct id) from voice_sessions")
open=$(q "select count(*) from voice_sessions where ended_at is null")
reasons=$(q "select coalesce(end_reason, 'none') || ' ' || n from (select end_reason, count(*) n from voice_sessions group by 1) c order by 1" | tr '\n' ' ')
echo "== sessions $n, rows $rows (distinct ids $distinct), ended_at null $open, spooled $spooled, quarantined $quarantined; end reasons: $reasons"
if [ "$rows" = "$n" ] && [ "$distinct" = "$n" ] && [ "$open" = 0 ] && [ "$spooled" = 0 ] && [ "$quarantined" = 0 ]; then
  echo "OK: nothing lost"
else
  echo "FAILED"; tail -20 "$data/server.log"; exit 1
fi
