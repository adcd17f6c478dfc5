#!/bin/sh
# Image entrypoint. The image runs Ray with token authentication (RAY_AUTH_MODE=token). A cluster of containers
# shares one token given as RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH (compose: the ray_auth_token secret made by
# deploy/make_secrets.sh; KubeRay: authOptions). A single container started with neither makes its own token
# (~/.ray/auth_token in the container), so Ray is never open; a worker without the cluster's token cannot join.
set -e
if [ "${RAY_AUTH_MODE:-}" = token ] && [ -z "${RAY_AUTH_TOKEN:-}" ] && [ -z "${RAY_AUTH_TOKEN_PATH:-}" ]; then
  (umask 077 && ray get-auth-token --generate >/dev/null)
  echo "Ray token authentication: this container's token is in $HOME/.ray/auth_token" >&2
fi
exec "$@"
