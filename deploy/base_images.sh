#!/usr/bin/env bash
# Makes the base images the Dockerfiles and the compose check need, on a host that cannot pull them.
#   bash deploy/base_images.sh        # prints three lines: PYTHON_IMAGE=... GPU_BASE_IMAGE=... PROMETHEUS_IMAGE=...
# For each image: the public one when it is here or can be pulled (python:3.11-slim, prom/prometheus:v3.5.0);
# else one made here from Debian's package registry, which is what a machine that reaches no image registry has:
#   nmt-local/python:bookworm      debootstrap (minbase + python3, python3-venv), `docker import`ed; the host pip's
#                                  certificate bundle is copied in and named in /etc/pip.conf, since pip inside the
#                                  image otherwise trusts only its own bundle and fails on this network's registry.
#   nmt-local/prometheus:bookworm  Debian's prometheus package on that base (deploy/Dockerfile.prometheus-debian).
# The GPU base (nvidia/cuda) cannot be made from Debian: GPU_BASE_IMAGE is the CUDA image when present, else the
# Debian base (the GPU image then builds and its size is measured, but it carries no CUDA libraries).
# Needs a running docker daemon; debootstrap is installed from Debian when missing. Idempotent: made images are kept.
set -euo pipefail
cd "$(dirname "$0")/.."
log() { echo "base_images: $*" >&2; }
have() { docker image inspect "$1" >/dev/null 2>&1; }
pull() { have "$1" || timeout 60 docker pull -q "$1" >/dev/null 2>&1; }

PY_PUBLIC=python:3.11-slim PY_LOCAL=nmt-local/python:bookworm
PROM_PUBLIC=prom/prometheus:v3.5.0 PROM_LOCAL=nmt-local/prometheus:bookworm
CUDA_PUBLIC=nvidia/cuda:13.0.0-cudnn-runtime-ubuntu24.04

host_pip_cert() {
  # The bundle the host's pip trusts (pip config's cert, PIP_CERT, else the system bundle).
  local cert="${PIP_CERT:-}"
  [ -n "$cert" ] || cert=$(python3 -m pip config list 2>/dev/null | sed -n "s/^global\.cert='\(.*\)'$/\1/p" | head -1)
  [ -n "$cert" ] || cert=/etc/ssl/certs/ca-certificates.crt
  echo "$cert"
}

make_python_base() {
  command -v debootstrap >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >&2
  local root; root=$(mktemp -d /var/tmp/nmt-rootfs.XXXXXX)
  log "debootstrap bookworm into $root (about a minute)"
  debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$root" \
    http://deb.debian.org/debian >/dev/null
  install -D -m 644 "$(host_pip_cert)" "$root/usr/local/share/ca-certificates-pip/bundle.crt"
  printf '[global]\ncert = /usr/local/share/ca-certificates-pip/bundle.crt\n' > "$root/etc/pip.conf"
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
  chmod 755 "$root"  # mktemp made it 0700: the image's / would shut out every user but root
  tar -C "$root" -c . | docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8' \
    --change 'CMD ["python3"]' - "$PY_LOCAL" >/dev/null
  rm -rf "$root"
}

if pull "$PY_PUBLIC"; then py=$PY_PUBLIC
else
  have "$PY_LOCAL" || make_python_base
  py=$PY_LOCAL
fi
if pull "$PROM_PUBLIC"; then prom=$PROM_PUBLIC
else
  if ! have "$PROM_LOCAL"; then
    log "building $PROM_LOCAL (Debian's prometheus)"
    docker build -q --network host --build-arg BASE_IMAGE="$py" -t "$PROM_LOCAL" \
      -f deploy/Dockerfile.prometheus-debian deploy >/dev/null
  fi
  prom=$PROM_LOCAL
fi
if have "$CUDA_PUBLIC"; then gpu=$CUDA_PUBLIC; else gpu=$py; fi
echo "PYTHON_IMAGE=$py"
echo "GPU_BASE_IMAGE=$gpu"
echo "PROMETHEUS_IMAGE=$prom"
