#!/usr/bin/env bash
# Packs what the GPU check (scripts/gpu/check.sh) needs on a machine with no network, under .gpu/ (git-ignored):
#   .gpu/parts/ort.tar.xz.partNN  ONNX Runtime's CUDA build (onnxruntime-gpu, for that machine's Python 3.12) and
#                                 pysbd (the engine's sentence splitter, which the GPU image lacks) as an xz tarball
#                                 cut into parts small enough to travel one per device call
#   .gpu/parts/SHA256SUMS         their checksums (check.sh refuses to start until every part has arrived)
#   .gpu/corpus/test.tsv.gz       the test split (../shared/ does not travel)
# The CUDA provider library alone is 284 MB (186 MB xz) and a device call carries 64 MiB including the 30.7 MiB
# tracked tree, hence the parts. Prints the device calls to make.
set -euo pipefail
cd "$(dirname "$0")/../.."
ORT_VERSION=1.31.1   # links CUDA 13 (libcublas.so.13), as the GPU image's torch 2.11+cu130 does
PYSBD_VERSION=$(.venv/bin/python -c 'import importlib.metadata as m; print(m.version("pysbd"))')
# A call carries 64 MiB: the tracked tree (30.7 MiB on 2026-12-04) travels every time, so a part is what is left,
# less 0.5 MiB for the corpus, the checksums and any untracked file (33 MiB parts with a 30.65 MiB tree travelled).
tracked_kib=$(git ls-files -z | xargs -0 stat -c %s | awk '{s += $1} END {print int(s / 1024)}')
PART_KIB=${PART_KIB:-$((65024 - tracked_kib))}
[ "$PART_KIB" -ge 8192 ] || { echo "the tracked tree leaves under 8 MiB per device call"; exit 1; }
rm -rf .gpu/parts .gpu/tmp && mkdir -p .gpu/parts .gpu/corpus .gpu/tmp/site
.venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    -d .gpu/tmp "onnxruntime-gpu==$ORT_VERSION"
.venv/bin/python -m pip download -q --no-deps --only-binary=:all: -d .gpu/tmp "pysbd==$PYSBD_VERSION"
# The package and its metadata; not the TensorRT provider (no TensorRT there).
(cd .gpu/tmp/site && unzip -q ../onnxruntime_gpu-*.whl 'onnxruntime/*' 'onnxruntime_gpu-*.dist-info/*' \
    -x 'onnxruntime/capi/libonnxruntime_providers_tensorrt.so' && unzip -q ../pysbd-*.whl 'pysbd/*' 'pysbd-*.dist-info/*')
tar -C .gpu/tmp/site -cf - . | xz -T0 -6 > .gpu/tmp/ort.tar.xz
split -b "${PART_KIB}K" -d -a 2 .gpu/tmp/ort.tar.xz .gpu/parts/ort.tar.xz.part
(cd .gpu/parts && sha256sum ort.tar.xz.part* > SHA256SUMS)
cp ../shared/corpus/test.tsv.gz .gpu/corpus/
rm -rf .gpu/tmp
parts=(.gpu/parts/ort.tar.xz.part*)
echo "packed ${#parts[@]} parts. Device calls, back to back (a machine goes back after 30 s idle):"
for ((i = 0; i < ${#parts[@]} - 1; i++)); do
    extra=""; [ "$i" = 0 ] && extra=', ".gpu/parts/SHA256SUMS", ".gpu/corpus"'
    echo "  run(command=\"ls -l .gpu/parts\", carry=[\"${parts[$i]}\"$extra], timeout_s=60)"
done
echo "  run(command=\"bash scripts/gpu/check.sh\", carry=[\"${parts[-1]}\"], timeout_s=600)"
