#!/usr/bin/env bash
# MCP tools under load: SESSIONS sessions (started RAMP_MS apart) whose every turn makes the
# model call one MCP tool, the test server's `hang` (it sleeps TOOL_MS), over Streamable HTTP
# through the server's one shared connection; then the same turns with a webhook tool of the
# same delay. The server and the provider fakes run in the load generator's process
# (`loadtest --spawn`), the MCP server (Python, tests/mcp/test_server.py) in its own. Prints
# both summaries and the MCP server's own time per call (p50/p95), to set against the
# server-reported tool wait. Loopback only; stops by itself.
# Usage: scripts/mcp-load.sh [SESSIONS] [TOOL_MS] [RAMP_MS] [loadtest args...]
#        (defaults 100 100 20; e.g. --llm-tokens-per-s 100000 --turns 3)
set -euo pipefail
cd "$(dirname "$0")/.."
n="${1:-100}"
tool_ms="${2:-100}"
ramp="${3:-20}"
shift $(($# < 3 ? $# : 3))
. scripts/lib/load.sh
python=$(scripts/setup-mcp.sh)
cargo build --release --locked -p atlas-voice >&2
bin="$CARGO_TARGET_DIR/release/atlas-voice"
work=$(mktemp -d)
MCP_TEST_TIMES="$work/times" "$python" tests/mcp/test_server.py http 0 >"$work/out" 2>/dev/null &
mcp_pid=$!
trap 'kill "$mcp_pid" 2>/dev/null; wait 2>/dev/null; rm -rf "$work"' EXIT
for _ in $(seq 200); do grep -q '^listening on ' "$work/out" 2>/dev/null && break; sleep 0.1; done
addr=$(sed -n 's/^listening on //p' "$work/out")
[ -n "$addr" ] || { echo "the MCP test server did not start" >&2; exit 1; }
echo "== MCP tool (hang ${tool_ms} ms) via http://$addr/mcp, $n sessions"
"$bin" loadtest --spawn --sessions "$n" --ramp-ms "$ramp" --tool-ms "$tool_ms" \
  --mcp-url "http://$addr/mcp" "$@"
sort -n "$work/times" | awk '{ v[NR] = $1 } END {
  if (NR) printf "MCP server own time per call: %d calls, p50 %.1f ms, p95 %.1f ms\n",
    NR, v[int(NR * 0.5) + 1], v[int(NR * 0.95) + 1] }'
echo "== webhook tool (${tool_ms} ms), $n sessions"
"$bin" loadtest --spawn --sessions "$n" --ramp-ms "$ramp" --tool-ms "$tool_ms" "$@"
