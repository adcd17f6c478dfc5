"""ONNX Runtime's int8 GEMM against its float32 GEMM on this processor, at the decoder's shapes and large ones.

    .venv/bin/python -m loadtests.bench_int8_gemm [--threads 1]

Answers "which int8 kernel really runs": one MatMul graph with a constant weight, and its copies made as
export/quantize.py makes them: static activation scales (QuantizeLinear and MatMulIntegerToFloat: the input
quantized to uint8 with a fixed scale, here that of the benchmark's standard normal input, weights int8) and
dynamic ones (DynamicQuantizeMatMul: a range per call). Prints GFLOP/s (float32) and GOP/s (int8, a multiply-add
counted as 2) per shape, and the
processor's int8 instruction sets as the kernel reports them (/proc/cpuinfo): an AMX kernel would run several
times the AVX-512 VNNI rate, which is about 4x float32 per core.
"""

from __future__ import annotations

import argparse
import re
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import QuantType, quantize_dynamic

from export.calibrate import dynamic_quantizers, static_graph

SHAPES = [(40, 256, 8000), (160, 256, 8000), (160, 256, 768), (160, 1024, 256), (1024, 1024, 1024)]


def matmul_graph(path: Path, k: int, n: int) -> None:
    """One MatMul of a float32 input [m, k] by a constant weight [k, n] (seeded), saved at ``path``."""
    weight = (np.random.default_rng(0).standard_normal((k, n)) * 0.05).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["a", "w"], ["y"])], "matmul",
                              [helper.make_tensor_value_info("a", TensorProto.FLOAT, [None, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, n])],
                              [numpy_helper.from_array(weight, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.save(model, str(path))


INPUT_RANGE = (-4.5, 4.5)  # the static scale's range: about every value of the standard normal input


def quantize_int8(source: Path, destination: Path, activations: str = "static") -> None:
    """The int8 copy as export/quantize.py makes it (int8 weights, per-channel scales), with static activation
    scales (export/calibrate.py, over INPUT_RANGE) or dynamic ones."""
    quantize_dynamic(str(source), str(destination), per_channel=True, weight_type=QuantType.QInt8,
                     op_types_to_quantize=["MatMul", "Gemm"])
    if activations == "static":
        model = onnx.load(str(destination))
        calls = [np.asarray([INPUT_RANGE], dtype=np.float32)] * len(dynamic_quantizers(model))
        onnx.save(static_graph(model, calls), str(destination))


def ops_per_second(path: Path, m: int, k: int, n: int, threads: int, seconds: float = 0.5) -> float:
    """2 m k n / (seconds per run), the best of runs over about ``seconds``."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    a = np.random.default_rng(1).standard_normal((m, k)).astype(np.float32)
    for _ in range(3):
        session.run(None, {"a": a})
    best, deadline = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        started = time.perf_counter()
        session.run(None, {"a": a})
        best = min(best, time.perf_counter() - started)
    return 2 * m * k * n / best


def int8_instruction_sets() -> list[str]:
    flags = set(re.findall(r"\b(amx_\w+|avx512_vnni|avx_vnni)\b", Path("/proc/cpuinfo").read_text()))
    return sorted(flags)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    print(f"int8 instruction sets: {', '.join(int8_instruction_sets()) or 'none'}; ONNX Runtime {ort.__version__}, "
          f"{args.threads} thread(s)")
    with tempfile.TemporaryDirectory() as tmp:
        for m, k, n in SHAPES:
            fp32, int8, dynamic = (Path(tmp) / f"{k}x{n}{kind}.onnx" for kind in ("", "-int8", "-dynamic"))
            if not fp32.exists():
                matmul_graph(fp32, k, n)
                quantize_int8(fp32, int8)
                quantize_int8(fp32, dynamic, "dynamic")
            f, q, d = (ops_per_second(path, m, k, n, args.threads) / 1e9 for path in (fp32, int8, dynamic))
            print(f"[{m} x {k}] x [{k} x {n}]: float32 {f:.0f} GFLOP/s, int8 {q:.0f} GOP/s (dynamic {d:.0f}), "
                  f"int8/float32 {q / f:.2f}", flush=True)


if __name__ == "__main__":
    main()
