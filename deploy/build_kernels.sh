#!/bin/sh
# Compiles engine/_kernels.c for the Python on PATH (python3), as setup.py does on a development machine. Used by the
# Dockerfiles' kernels stage (a Debian or Ubuntu base) and by scripts/gpu/check.sh (a machine with no network): what
# is missing of gcc and Python's headers is installed with apt-get (Debian's python3 keeps the headers in
# python3-dev; the python:3.11-slim image ships its own), nothing when both are there.
#   sh deploy/build_kernels.sh SOURCE OUT_DIR      # writes OUT_DIR/_kernels<the interpreter's extension suffix>
set -eu
src=$1 out=$2
export DEBIAN_FRONTEND=noninteractive
include=$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
packages=""
command -v cc >/dev/null || packages="gcc libc6-dev"
[ -f "$include/Python.h" ] || packages="$packages python3-dev"
if [ -n "$packages" ]; then
  apt-get update -qq
  # shellcheck disable=SC2086
  apt-get install -y -qq --no-install-recommends $packages >/dev/null
fi
suffix=$(python3 -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
mkdir -p "$out"
# -O2 and nothing that changes float arithmetic (no -ffast-math): the tests hold the module to numpy bit for bit.
cc -O2 -fPIC -shared -I"$include" "$src" -o "$out/_kernels$suffix"
python3 -c "import sys; sys.path.insert(0, '$out'); import _kernels" 2>/dev/null || {
  # The module's name is engine._kernels; imported bare, its init function is still found.
  echo "build_kernels: $out/_kernels$suffix does not import" >&2; exit 1; }
echo "build_kernels: $out/_kernels$suffix"
