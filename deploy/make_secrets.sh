#!/usr/bin/env bash
# Makes the secrets docker-compose.yml mounts, in deploy/secrets/ (git-ignored, never committed), unless they exist:
#   ray_auth_token           Ray's cluster token (token authentication: every node and driver needs it)
#   grafana_admin_password   Grafana's admin password (no anonymous access)
# Then prints where they are. Run once before `docker compose up`; delete a file and rerun to rotate it.
set -euo pipefail
dir="$(cd "$(dirname "$0")" && pwd)/secrets"
mkdir -p "$dir" && chmod 700 "$dir" && cd "$dir"
for name in ray_auth_token grafana_admin_password; do
  if [ ! -s "$name" ]; then
    python3 -c 'import secrets; print(secrets.token_hex(32), end="")' > "$name"
  fi
  # Readable inside the containers (uid 1000, Grafana's 472) through the bind mount; the folder (0700) keeps other
  # users of this host out.
  chmod 644 "$name"
  echo "secret $name: $(pwd)/$name"
done
