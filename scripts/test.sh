#!/usr/bin/env bash
# Sets up the project (scripts/setup.sh, and Debian's prometheus and iproute2 for the operations tests) and runs
# the whole test suite on the CPU. Tests marked gpu (tests/gpu/) are deselected here, and counted as such in pytest's summary:
# they need a CUDA GPU and run through scripts/gpu/check.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/install_test_tools.sh
export RAY_USAGE_STATS_ENABLED=0
# The test clusters run with Ray's token authentication, on a token of their own (tests/conftest.py makes one in a
# temporary folder), not the quick start's ~/.ray/auth_token.
export RAY_AUTH_MODE=token
exec .venv/bin/python -m pytest -p no:cacheprovider -m "not gpu" tests "$@"
