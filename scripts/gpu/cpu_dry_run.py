"""The GPU check's code paths on a machine without a GPU: device "cuda" becomes the CPU provider with the device
code path (I/O binding: decoder state as OrtValues, row gather/concat graphs, top-k where the log-probs are), so
a change to the graphs or the artifact format can be checked before a GPU is lent.

    .venv/bin/python scripts/gpu/cpu_dry_run.py tests       # tests/gpu; the five that need CUDA itself must fail
    .venv/bin/python scripts/gpu/cpu_dry_run.py benchmark --quick --skip-base --artifact artifacts/en-de

The benchmark's figures go to .gpu/dry_run/ unless --out says otherwise, never over loadtests/results/ (the CPU
benchmark's, which the README quotes).

What it cannot check: CUDA kernels, float16 numerics on a GPU, timings.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import engine.runtime as runtime  # noqa: E402

_config = runtime.EngineConfig


class _CudaOnTheCpu(_config):
    """EngineConfig whose device "cuda" is the CPU with I/O binding. Named and placed as EngineConfig, so that a
    config pickled for an engine process (engine/process_engine.py) unpickles there as a plain one, already
    rewritten."""

    def __init__(self, *args, **kwargs):
        if kwargs.get("device") == "cuda":
            kwargs.update(device="cpu", io_binding=True)
        super().__init__(*args, **kwargs)


_CudaOnTheCpu.__name__ = _CudaOnTheCpu.__qualname__ = _config.__qualname__
_CudaOnTheCpu.__module__ = _config.__module__
runtime.EngineConfig = _CudaOnTheCpu  # before the modules below import it

if sys.argv[1] == "tests":
    import pytest

    sys.exit(pytest.main(["-p", "no:cacheprovider", "-m", "gpu", "tests/gpu", "-q", *sys.argv[2:]]))

import loadtests.baselines.torch_eager as torch_eager  # noqa: E402
import loadtests.benchmark as benchmark  # noqa: E402
from loadtests import flops  # noqa: E402

benchmark.EngineConfig = runtime.EngineConfig
benchmark.cuda_gemm_flops = lambda: flops.gemm_flops(1)
benchmark.torch_translator = lambda artifact, checkpoint, threads, device="cpu", *rest: torch_eager.torch_translator(
    artifact, checkpoint, threads, "cpu", *rest)
out = [] if "--out" in sys.argv else ["--out", ".gpu/dry_run/benchmark"]
Path(".gpu/dry_run").mkdir(parents=True, exist_ok=True)
benchmark.main(["--device", "cuda", *out, *sys.argv[2:]])
