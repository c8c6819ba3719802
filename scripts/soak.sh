#!/usr/bin/env bash
# Soak: N sequential short sessions against a server running in its own process (wired to
# the provider fakes in a third process), sampling the server's RSS and live-session count.
# Usage: scripts/soak.sh [SESSIONS]   (default 10000; loopback only; stops by itself)
set -euo pipefail
exec "$(dirname "$0")/loadtest.sh" 1 20 5 --soak "${1:-10000}"
