# Sourced by scripts/serve.sh: Ray's token authentication on (RAY_AUTH_MODE=token), so that
# nobody who reaches the cluster's ports (GCS, dashboard, Jobs API) can run code on it without the token
# (CVE-2023-48022, "ShadowRay"). The token comes from RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH when set, else from
# Ray's default file ~/.ray/auth_token, generated on first use, outside the repository and readable by its owner
# only. Ray's CLI, `serve run` and drivers on this machine read that file by themselves.
export RAY_AUTH_MODE=token
if [ -z "${RAY_AUTH_TOKEN:-}" ] && [ -z "${RAY_AUTH_TOKEN_PATH:-}" ]; then
  RAY_TOKEN_FILE="$HOME/.ray/auth_token"
  if [ ! -s "$RAY_TOKEN_FILE" ]; then
    (umask 077 && .venv/bin/ray get-auth-token --generate >/dev/null)
  fi
  chmod 600 "$RAY_TOKEN_FILE"
else
  RAY_TOKEN_FILE="${RAY_AUTH_TOKEN_PATH:-(RAY_AUTH_TOKEN)}"
fi
export RAY_TOKEN_FILE
