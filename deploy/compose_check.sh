#!/usr/bin/env bash
# The whole deployment, for real, in one command (docs/compose.md):
#   sudo bash deploy/compose_check.sh            # as root on a Debian machine like the CI's
# 1. installs what is missing from Debian (docker.io, docker-compose; debootstrap when base images must be made),
#    starts a docker daemon if none runs (vfs storage, no iptables: what works in this sandbox) and stops it at the
#    end; makes the base images locally when no image registry answers (deploy/base_images.sh);
# 2. exports the bundled model to artifacts/en-de when missing or stale (the images ship the artifact, not torch),
#    makes the secrets (deploy/make_secrets.sh) and builds nmt-serve:cpu (and nmt-serve:gpu with --gpu-image);
# 3. runs the repository's docker-compose.yml (ray-head, ray-worker, prometheus; Grafana's image cannot be had
#    here, its dashboard is checked statically by tests/test_deploy_static.py) and checks it
#    (deploy/compose_check.py: health and the README's curl, Prometheus, scaling to 3 workers and back, a worker
#    killed mid-load);
# 4. `down -v`, then checks that no container, network or volume of the project is left.
# Prints each image's size and each step's time. Exit status 0 only when every check passed.
# Options: --gpu-image (also build the GPU image, for its size), --keep (leave the project up; no down -v).
# Environment: COMPOSE_PROJECT_NAME (default nmt-serve).
set -euo pipefail
cd "$(dirname "$0")/.."
export COMPOSE_PROJECT_NAME=${COMPOSE_PROJECT_NAME:-nmt-serve}
GPU_IMAGE=0 KEEP=0
for arg in "$@"; do
  case $arg in
    --gpu-image) GPU_IMAGE=1 ;;
    --keep) KEEP=1 ;;
    *) echo "usage: $0 [--gpu-image] [--keep]" >&2; exit 2 ;;
  esac
done
STATE=/var/tmp/nmt-compose-check
mkdir -p "$STATE"
T0=$SECONDS
say() { echo "[compose_check.sh $(date +%H:%M:%S) +$((SECONDS - T0))s] $*"; }

# --- 1. tools, daemon, base images -------------------------------------------------------------------------------
missing=()
command -v dockerd >/dev/null || missing+=(docker.io)
docker compose version >/dev/null 2>&1 || command -v docker-compose >/dev/null || missing+=(docker-compose)
if [ ${#missing[@]} -gt 0 ]; then
  [ "$(id -u)" = 0 ] || { echo "installing ${missing[*]} needs root" >&2; exit 1; }
  say "installing ${missing[*]} from Debian"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
# Compose v2 (the docker CLI plugin) when it is there, else Debian's docker-compose 1.29 (v1).
if docker compose version >/dev/null 2>&1; then export COMPOSE="docker compose"; else export COMPOSE=docker-compose; fi

STARTED_DOCKERD=""
stop_dockerd() {
  if [ -n "$STARTED_DOCKERD" ] && kill -0 "$STARTED_DOCKERD" 2>/dev/null; then
    say "stopping the docker daemon this script started (pid $STARTED_DOCKERD)"
    kill -TERM "$STARTED_DOCKERD"
    for _ in $(seq 60); do kill -0 "$STARTED_DOCKERD" 2>/dev/null || break; sleep 1; done
  fi
}
cleanup() {
  local rc=$?
  if [ "$KEEP" = 0 ] && docker info >/dev/null 2>&1; then
    $COMPOSE down -v --remove-orphans >/dev/null 2>&1 || true
  fi
  stop_dockerd
  exit $rc
}
trap cleanup EXIT
if ! docker info >/dev/null 2>&1; then
  [ "$(id -u)" = 0 ] || { echo "no docker daemon runs, and starting one needs root" >&2; exit 1; }
  say "starting dockerd (vfs storage, no iptables), log $STATE/dockerd.log"
  dockerd --storage-driver=vfs --iptables=false --pidfile "$STATE/dockerd.pid" >"$STATE/dockerd.log" 2>&1 &
  STARTED_DOCKERD=$!
  for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
  docker info >/dev/null 2>&1 || { tail -20 "$STATE/dockerd.log"; exit 1; }
fi
say "docker $(docker version --format '{{.Server.Version}}'), compose: $COMPOSE ($($COMPOSE version --short 2>/dev/null || true))"
eval "$(bash deploy/base_images.sh)"
export PROMETHEUS_IMAGE
say "base images: python $PYTHON_IMAGE, GPU $GPU_BASE_IMAGE, prometheus $PROMETHEUS_IMAGE"

# --- 2. artifact, secrets, images --------------------------------------------------------------------------------
current_format() {  # current_format DIR: an artifact there of the format this engine reads
  .venv/bin/python -c 'import json, sys; from engine import contract
try: m = json.load(open(sys.argv[1] + "/manifest.json")); sys.exit(m["format_version"] != contract.FORMAT_VERSION
                                                         or contract.EXPLAIN_FILE not in m["files"])
except (OSError, KeyError, ValueError): sys.exit(1)' "$1"
}
[ -x .venv/bin/python ] || bash scripts/setup.sh
if ! current_format artifacts/en-de; then
  say "exporting the bundled model to artifacts/en-de"
  nice .venv/bin/python -m export.onnx_export --checkpoint models/en-de --out artifacts/en-de >/dev/null
fi
# The GPU image's copy: float32 on CUDA wants the standard-ops step (deploy/Dockerfile.gpu).
if [ "$GPU_IMAGE" = 1 ] && ! current_format artifacts/en-de-cuda; then
  say "exporting the bundled model to artifacts/en-de-cuda (standard-ops self-attention)"
  nice .venv/bin/python -m export.onnx_export --checkpoint models/en-de --out artifacts/en-de-cuda \
    --self-attention standard >/dev/null
fi
bash deploy/make_secrets.sh >/dev/null
build() {  # build TAG DOCKERFILE BUILD-ARG
  local started=$SECONDS before
  before=$(docker image inspect -f '{{.Id}}' "$1" 2>/dev/null || true)
  nice docker build -q --network host --build-arg "$3" -f "$2" -t "$1" . >/dev/null
  say "built $1 in $((SECONDS - started)) s: $(docker image inspect -f '{{.Size}}' "$1" | awk '{printf "%.0f MB", $1/1e6}')"
  # The image the tag named before, now untagged: removed with its layers, or every run leaves one more behind
  # (under vfs, a whole filesystem copy per layer; they once filled the disk).
  if [ -n "$before" ] && [ "$before" != "$(docker image inspect -f '{{.Id}}' "$1")" ]; then
    docker rmi "$before" >/dev/null 2>&1 && say "removed the image $1 named before (${before:7:12})" || true
  fi
}
# vfs keeps a whole filesystem copy per layer: a build and the three containers take several GB.
root_dir=$(docker info -f '{{.DockerRootDir}}')
free_gb=$(df -Pk "$root_dir" | awk 'NR == 2 {printf "%d", $4 / 1048576}')
say "$free_gb GB free under $root_dir"
[ "$free_gb" -ge 8 ] || { echo "under 8 GB free under $root_dir: free some (docker image prune) and rerun" >&2; exit 1; }
build nmt-serve:cpu deploy/Dockerfile.cpu "PYTHON_IMAGE=$PYTHON_IMAGE"
[ "$GPU_IMAGE" = 0 ] || build nmt-serve:gpu deploy/Dockerfile.gpu "GPU_BASE_IMAGE=$GPU_BASE_IMAGE"
docker run --rm --entrypoint sh nmt-serve:cpu -c \
  '! command -v gcc cc g++ >/dev/null && ! python -c "import torch" 2>/dev/null && test "$(id -u)" = 1000' \
  || { echo "nmt-serve:cpu has a compiler or torch, or does not run as uid 1000" >&2; exit 1; }
say "nmt-serve:cpu: runs as uid 1000, no compiler, no torch"

# --- 3. up and the checks ----------------------------------------------------------------------------------------
$COMPOSE down -v --remove-orphans >/dev/null 2>&1 || true
say "$COMPOSE up -d ray-head ray-worker prometheus (project $COMPOSE_PROJECT_NAME)"
$COMPOSE up -d --no-build ray-head ray-worker prometheus
if ! python3 deploy/compose_check.py | tee "$STATE/check.log"; then
  say "a check failed; the containers' last log lines:"
  for c in $($COMPOSE ps -q); do echo "--- $(docker inspect -f '{{.Name}}' "$c")"; docker logs --tail 30 "$c" 2>&1; done
  say "the check that failed: $(grep FAILED "$STATE/check.log" || echo '(no FAILED line)')"
  exit 1
fi
[ "$KEEP" = 0 ] || { trap - EXIT; say "left running (--keep)"; exit 0; }

# --- 4. down -v leaves nothing ---------------------------------------------------------------------------------
$COMPOSE down -v --remove-orphans
label="label=com.docker.compose.project=$COMPOSE_PROJECT_NAME"
left="$(docker ps -aq --filter "$label") $(docker network ls -q --filter "$label") $(docker volume ls -q --filter "$label")"
if [ -n "${left// /}" ]; then echo "down -v left: $left" >&2; exit 1; fi
say "5. down -v: no container, network or volume of project $COMPOSE_PROJECT_NAME is left"
for image in nmt-serve:cpu nmt-serve:gpu "$PROMETHEUS_IMAGE" "$PYTHON_IMAGE"; do
  docker image inspect "$image" >/dev/null 2>&1 \
    && say "image $image: $(docker image inspect -f '{{.Size}}' "$image" | awk '{printf "%.0f MB", $1/1e6}')"
done
say "compose check passed in $((SECONDS - T0)) s"
