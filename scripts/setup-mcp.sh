#!/usr/bin/env bash
# Installs the MCP servers the integration tests talk to (tests/mcp/requirements.txt: the
# official Python SDK and the reference time server, pinned) into a virtual environment
# outside the clone, and prints its python. A no-op when the pinned versions are there.
# Usage: scripts/setup-mcp.sh   (ATLAS_MCP_VENV overrides the place)
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${ATLAS_MCP_VENV:-$HOME/.cache/atlas-voice/mcp-venv}"
requirements=tests/mcp/requirements.txt
stamp="$venv/.requirements"
if ! [ -x "$venv/bin/python" ] || ! cmp -s "$requirements" "$stamp"; then
  if ! python3 -m venv --help >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
      echo "== installing python3-venv" >&2
      apt-get update -qq
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
    else
      echo "the MCP tests need Python 3 with venv (python3-venv)" >&2
      exit 1
    fi
  fi
  echo "== MCP test servers ($venv)" >&2
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$requirements" >&2
  cp "$requirements" "$stamp"
fi
echo "$venv/bin/python"
