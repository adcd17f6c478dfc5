# Sourced by scripts/gpu/check.sh (and usable alone, from the repository root, for one GPU script): unpacks
# ONNX Runtime's CUDA build from scripts/gpu/pack.sh's parts once, then puts it first on PYTHONPATH (shadowing the
# image's CPU-only onnxruntime) and the CUDA 13 libraries of the image's nvidia-* packages on LD_LIBRARY_PATH.
# Returns 3 when parts are missing or broken.
(cd .gpu/parts && sha256sum --quiet -c SHA256SUMS) || { echo "parts missing or broken: see scripts/gpu/pack.sh"; return 3; }
if [ ! -d .gpu/site/onnxruntime ]; then
    # Python's tarfile rather than the xz tool, which an image may lack.
    cat .gpu/parts/ort.tar.xz.part* | python3 -c 'import sys, tarfile
tarfile.open(fileobj=sys.stdin.buffer, mode="r|xz").extractall(".gpu/site")' || return 3
fi
# Ours first, so the image's CPU-only onnxruntime is shadowed; the CUDA 13 libraries of the nvidia-* packages.
export PYTHONPATH="$PWD/.gpu/site:$PWD" PYTHONUNBUFFERED=1
nvidia_libs=$(python3 -c 'import glob, site; print(":".join(sorted(glob.glob(site.getsitepackages()[0] + "/nvidia/*/lib"))))')
export LD_LIBRARY_PATH="$nvidia_libs:${LD_LIBRARY_PATH:-}"
