#!/usr/bin/env bash
# Deploys atlas-voice to Fly.io and checks that the new release is healthy.
# Usage: deploy/deploy.sh [APP]   (needs flyctl logged in; secrets set as in docs/deployment.md)
set -euo pipefail
cd "$(dirname "$0")/.."
app="${1:-atlas-voice}"
command -v fly >/dev/null || { echo "flyctl is required (fly.io/docs/flyctl)" >&2; exit 1; }

echo "== checking the migrations"
cargo run --quiet --release -p atlas-voice -- db lint

echo "== deploying $app"
fly deploy --app "$app" --strategy rolling --wait-timeout 300

echo "== health check"
url="https://$app.fly.dev"
for attempt in $(seq 1 30); do
  if curl -fsS "$url/healthz" >/dev/null && curl -fsS "$url/readyz" >/dev/null; then
    echo "healthy: $url"
    exit 0
  fi
  sleep 5
done
echo "the new release is not healthy; roll back with: fly releases --app $app; fly deploy --image <previous image>" >&2
exit 1
