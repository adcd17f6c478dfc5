#!/usr/bin/env bash
# Installs Debian's prometheus package (the operations tests scrape the service with a real Prometheus).
set -euo pipefail
command -v prometheus >/dev/null 2>&1 && exit 0
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends prometheus >/dev/null
