#!/usr/bin/env bash
# Sets up the project (scripts/setup.sh, and Debian's prometheus for the metrics tests) and runs the whole test
# suite on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/install_prometheus.sh
export RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE=disabled
exec .venv/bin/python -m pytest -p no:cacheprovider tests "$@"
