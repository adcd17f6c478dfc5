#!/usr/bin/env bash
# The GPU check in one go, on a machine with an NVIDIA GPU and no network: the GPU-only tests (tests/gpu, marker
# gpu) and the GPU benchmark (engine float32 and float16 on CUDA with the state on the device, PyTorch eager on
# CUDA), then scripts/gpu/fp16_paths.py (SKIP_FP16_PATHS=1 skips it). Figures and logs go to $OUT (the device
# tool's output folder), else .gpu/out. On the H200, 2026-12-04: tests 85 s, benchmark about 4 min, fp16_paths 2 min.
#
# Made for the device tool's H200 image: its python3 (3.12) has torch 2.11+cu130 with the CUDA 13 libraries as
# nvidia-* packages, onnx, onnxscript, sentencepiece, safetensors, sacrebleu, matplotlib and pytest; ONNX Runtime's
# CUDA build comes from scripts/gpu/pack.sh's parts. Exits 3 when parts are missing (carry them, then rerun).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-.gpu/out}
mkdir -p "$OUT"
source scripts/gpu/env.sh || exit 3
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
python3 -c 'import onnxruntime as o, torch; print("onnxruntime", o.__version__, o.get_available_providers(), "torch", torch.__version__, torch.cuda.is_available())' | tee -a "$OUT/gpu.txt"
# The engine's C loops (engine/_kernels.c) for this machine's python3, where it has a C compiler and Python's headers
# (deploy/build_kernels.sh; with no network it cannot install them); else the engine runs the same loops in numpy.
sh deploy/build_kernels.sh engine/_kernels.c engine 2>&1 | tail -1 | tee -a "$OUT/gpu.txt" \
  || echo "engine/_kernels.c not built: the engine's numpy loops" | tee -a "$OUT/gpu.txt"
started=$SECONDS
python3 -m pytest -p no:cacheprovider -m gpu tests/gpu -q 2>&1 | tee "$OUT/gpu_tests.log"
tests_rc=${PIPESTATUS[0]}
echo "gpu tests: exit $tests_rc after $((SECONDS - started)) s"
python3 -m loadtests.benchmark --device cuda --corpus .gpu/corpus --work .gpu/bench --out "$OUT/benchmark_gpu" \
    ${BENCH_ARGS:-} 2>&1 | tee "$OUT/benchmark_gpu.log"
bench_rc=${PIPESTATUS[0]}
# Last, as it is a diagnosis rather than a check: which float16 attention path agrees with float32 (1.5-2 min).
[ -n "${SKIP_FP16_PATHS:-}" ] || python3 scripts/gpu/fp16_paths.py --out "$OUT/fp16_paths.json" 2>&1 \
    | grep -v "Warning\|rename_mapping" | tee "$OUT/fp16_paths.log"
echo "gpu tests exit $tests_rc, benchmark exit $bench_rc, $((SECONDS - started)) s in all"
exit $((tests_rc || bench_rc))
