"""GPU-only tests: the CUDA provider really runs, the device-resident state and float16 agree with the CPU.

Deselected on CI and by scripts/test.sh (marker "gpu": this machine class has no GPU); scripts/gpu/check.sh runs
them on a machine that has one. They fail, never skip, when CUDA does not work there.
"""

import numpy as np
import onnxruntime as ort
import pytest

from engine.options import DecodingOptions
from engine.runtime import EngineConfig
from engine.translator import Translator
from export.fp16 import fp16_artifact
from export.onnx_export import export_checkpoint

from conftest import CHECKPOINT, PARITY_SENTENCES, SENTENCES

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def cuda(artifact):
    return Translator(artifact, EngineConfig(device="cuda", max_batch_tokens=16384))


@pytest.fixture(scope="module")
def cpu(artifact):
    return Translator(artifact, EngineConfig(device="cpu"))


def test_the_cuda_provider_really_runs_and_the_state_stays_on_the_gpu(cuda):
    assert cuda.provider == "CUDAExecutionProvider"
    src = np.asarray([cuda.tokenize(SENTENCES[0])]), np.ones((1, len(cuda.tokenize(SENTENCES[0]))), dtype=bool)
    cross_k, _ = cuda.model.encode(*src)
    assert isinstance(cross_k[0], ort.OrtValue) and cross_k[0].device_name().lower() == "cuda"


@pytest.mark.parametrize("beam_size", [1, 4])
def test_cuda_float32_translates_like_the_cpu(cuda, cpu, beam_size):
    """Different GEMM kernels round differently, so scores agree to 1e-3 and outputs may differ only where two
    candidates tie within that: at most one sentence of 24."""
    options = DecodingOptions(beam_size=beam_size)
    src = [cpu.tokenize(s) for s in PARITY_SENTENCES]
    got, want = cuda.translate_ids(src, options), cpu.translate_ids(src, options)
    same = [g[0].tokens == w[0].tokens for g, w in zip(got, want)]
    assert sum(same) >= len(src) - 1
    for g, w, s in zip(got, want, same):
        if s:
            assert g[0].score == pytest.approx(w[0].score, abs=1e-3)


@pytest.fixture(scope="module")
def standard(tmp_path_factory):
    """The bundled checkpoint exported with the standard-ops decoder step (what CUDA serves, in both precisions)."""
    out = tmp_path_factory.mktemp("standard") / "en-de"
    export_checkpoint(CHECKPOINT, out, PARITY_SENTENCES[:4], self_attention="standard")
    return out


def test_the_standard_ops_step_runs_on_cuda_in_float32_and_translates_like_the_cpu(cpu, standard):
    """ONNX Runtime's CUDA GroupQueryAttention takes float16 only (in float32 that node would run on the CPU, the
    cache crossing every step): float32 on CUDA uses the artifact exported with --self-attention standard."""
    on_cuda = Translator(standard, EngineConfig(device="cuda"))
    assert on_cuda.provider == "CUDAExecutionProvider"
    options = DecodingOptions(beam_size=4)
    src = [cpu.tokenize(s) for s in PARITY_SENTENCES]
    got, want = on_cuda.translate_ids(src, options), cpu.translate_ids(src, options)
    assert sum(g[0].tokens == w[0].tokens for g, w in zip(got, want)) >= len(src) - 1


def test_cuda_batch_invariance(cuda):
    options = DecodingOptions(beam_size=4)
    src = [cuda.tokenize(s) for s in SENTENCES]
    batched = cuda.translate_ids(src, options)
    for ids, hyps in zip(src, batched):
        (alone,) = cuda.translate_ids([ids], options)
        assert alone[0].tokens == hyps[0].tokens


def test_greedy_without_scores_on_cuda_takes_the_top_1_of_the_logits(cuda, monkeypatch):
    """Format 7 on the device: a greedy step whose sentences report no score skips the log-softmax and reads each
    row's top-1 of the logits where the step ran; the tokens are those of the scored search."""
    calls = []
    log_softmax = cuda.model.log_softmax
    monkeypatch.setattr(cuda.model, "log_softmax", lambda x: calls.append(1) or log_softmax(x))
    src = [cuda.tokenize(s) for s in PARITY_SENTENCES]
    scored = cuda.translate_ids(src, DecodingOptions(beam_size=1))
    assert calls
    calls.clear()
    scoreless = cuda.translate_ids(src, DecodingOptions(beam_size=1, return_scores=False))
    assert calls == [] and [h[0].tokens for h in scoreless] == [h[0].tokens for h in scored]


def test_float16_on_cuda_agrees_with_float32(standard, cpu, tmp_path):
    """The float16 copy of the standard-ops step (on an H200, 2026-12-04, the same check in
    scripts/gpu/fp16_paths.py: 24 of 24 parity sentences identical under greedy search)."""
    manifest = fp16_artifact(standard, tmp_path / "fp16", PARITY_SENTENCES, device="cuda")
    assert manifest["parity"]["measured_on"] == "CUDAExecutionProvider"
    assert manifest["parity"]["greedy_identical_to_float32"] >= len(PARITY_SENTENCES) - 2
    half = Translator(tmp_path / "fp16", EngineConfig(device="cuda"))
    options = DecodingOptions(beam_size=4)
    for a, b in zip(half.translate(PARITY_SENTENCES, options), cpu.translate(PARITY_SENTENCES, options)):
        assert np.isfinite(a.score) and abs(a.score - b.score) < 0.2


def test_cuda_refuses_a_float16_step_with_group_query_attention(artifact, tmp_path):
    """Measured on an H200 (onnxruntime-gpu 1.31.1): that step agreed with float32 on 0 of 24 parity sentences with
    each of ONNX Runtime's attention kernels; the engine refuses it there instead of translating garbage."""
    half = fp16_artifact(artifact, tmp_path / "fp16", PARITY_SENTENCES)  # made and measured on the CPU
    assert half["self_attention"] == "gqa"
    with pytest.raises(ValueError, match="--self-attention standard"):
        Translator(tmp_path / "fp16", EngineConfig(device="cuda"))


def test_the_engine_process_decodes_on_cuda_like_the_engine_in_this_process(artifact, cuda):
    """The shipped CPU configs run the engine core in a child process (engine_process: true; device auto takes
    CUDA where it works): the child's model reports the CUDA provider and its translations are the in-process CUDA
    engine's, token for token, beam 4 and greedy side by side."""
    import asyncio

    from engine.process_engine import CoreSpec, ProcessEngine

    engine = ProcessEngine(CoreSpec(str(artifact), EngineConfig(device="cuda", max_batch_tokens=16384), warmup=False),
                           "gpu-test")
    try:
        src = [cuda.tokenize(s) for s in SENTENCES]
        options = [DecodingOptions(beam_size=4), DecodingOptions(beam_size=1)]

        async def main():
            futures = [engine.submit(s, o, group=i) for i, s in enumerate(src) for o in options]
            return await asyncio.wait_for(asyncio.gather(*futures), 120)

        got = iter(asyncio.run(main()))
        for s in src:
            for o in options:
                done = next(got)
                assert done.error is None
                assert [h.tokens for h in done.hypotheses] == [h.tokens for h in cuda.translate_ids([s], o)[0]]
        assert engine.model.provider == "CUDAExecutionProvider"  # last: the CPU dry run checks the rest
    finally:
        engine.close()
