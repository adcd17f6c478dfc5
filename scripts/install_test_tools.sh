#!/usr/bin/env bash
# Installs the Debian packages the tests use besides Python's: prometheus (the operations tests scrape the service
# with a real Prometheus), iproute2 (`ss -ltnp`: which address each port of the stack listens on), and chromium with
# its chromedriver (tests/test_page.py drives the web page in a real browser; selenium is pointed at them, so it
# downloads no browser).
set -euo pipefail
missing=()
command -v prometheus >/dev/null 2>&1 || missing+=(prometheus)
command -v ss >/dev/null 2>&1 || missing+=(iproute2)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v chromedriver >/dev/null 2>&1 || missing+=(chromium-driver)
[ ${#missing[@]} -eq 0 ] && exit 0
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
