"""The issue-12 measuring tools compute what they claim: the attention levers equal today's attention, and the step
profile's shares cover the step."""

from __future__ import annotations

import onnxruntime as ort
import pytest

from loadtests.bench_attention import bench_cross, bench_self
from loadtests.bench_int8_gemm import matmul_graph, quantize_int8
from loadtests.bench_step_graph import run_step, step_inputs
from loadtests.profile_step import profile
from tests.conftest import SENTENCES


@pytest.fixture(scope="module")
def options():
    o = ort.SessionOptions()
    o.intra_op_num_threads = 1
    o.log_severity_level = 3
    return o


@pytest.mark.parametrize("rows,past", [(1, 0), (3, 5), (8, 17)])
def test_group_query_attention_in_place_equals_concat_attention_and_writes_the_cache(options, rows, past):
    r = bench_self(options, rows, past, capacity=32)
    assert r["max_abs_diff"] < 1e-5 and r["written_in_place"]


@pytest.mark.parametrize("sentences,beam,src_len", [(1, 4, 3), (5, 2, 11)])
def test_cross_attention_per_sentence_equals_per_beam_row(options, sentences, beam, src_len):
    assert bench_cross(options, sentences, beam, src_len)["max_abs_diff"] < 1e-5


def test_step_profile_accounts_for_the_whole_step(artifact):
    r = profile(artifact, SENTENCES, batch=2, beam_size=4, threads=1, target_steps=20)
    # Two sentences of beam 4 hold at most 8 rows; more than 1 on average, as beams widen after the first step.
    assert r["rows_per_step"] > 1 and r["rows_per_step"] <= 2 * 4
    shares = r["share"]
    # host is the rest of the wall time: >= 0 only if the graph timers do not overlap or count outside the wall.
    assert shares["host"] >= 0 and all(0 < shares[g] < 1 for g in ("decoder", "encoder"))
    assert shares["decoder"] > 0.3 and shares["top_k"] > 0  # beam 4 reads each row's top-k from the TopK graph
    assert shares["log_softmax"] > 0  # of the logits, which beam search reads as log-probs (format 7)
    greedy = profile(artifact, SENTENCES, batch=2, beam_size=1, threads=1, target_steps=20)["share"]
    assert greedy["log_softmax"] == 0 and greedy["top_k"] == 0  # an argmax of the logits, no score asked for
    # The linear layers and the output projection run as Gemm kernels (the step is 2-D): the largest share, and
    # most of the decoder's kernel time.
    assert max(r["decoder_kernels"], key=r["decoder_kernels"].get) == "Gemm"
    assert r["decoder_kernels"]["Gemm"] > 0.3


def test_the_int8_gemm_benchmark_times_the_kernel_of_the_int8_copy(artifact, tmp_path):
    """Its int8 graph, once ONNX Runtime has optimized it, runs QuantizeLinear and MatMulIntegerToFloat, as the int8
    artifact does; its dynamic one DynamicQuantizeMatMul, as an artifact quantized with --activations dynamic."""
    import onnx

    from export.quantize import quantize_artifact

    matmul_graph(tmp_path / "mm.onnx", 256, 512)
    quantize_int8(tmp_path / "mm.onnx", tmp_path / "mm8.onnx")
    quantize_int8(tmp_path / "mm.onnx", tmp_path / "mm8-dynamic.onnx", "dynamic")
    quantize_artifact(artifact, tmp_path / "int8", ["The file could not be opened."])

    def kernels(path):
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return {n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node}

    bench = kernels(tmp_path / "mm8.onnx")
    assert bench == {"QuantizeLinear", "MatMulIntegerToFloat"}
    assert bench <= kernels(tmp_path / "int8" / "decoder_step.onnx")
    assert kernels(tmp_path / "mm8-dynamic.onnx") == {"DynamicQuantizeMatMul"}


def test_the_step_graph_benchmark_binds_the_cache_as_the_engine_does(artifact, options):
    """Each call writes the new key/value of every row at its position, in the bound buffers, and nothing else."""
    import json

    import numpy as np

    config = json.loads((artifact / "config.json").read_text())
    session = ort.InferenceSession(str(artifact / "decoder_step.onnx"), options, providers=["CPUExecutionProvider"])
    feed = step_inputs(config, sentences=2, beam=2, positions=5, rng=np.random.default_rng(0))
    before = {name: feed[name].copy() for name in ("self_k_0", "self_v_2")}
    run_step(session, feed)
    for name, old in before.items():
        written = (feed[name] != old).any(axis=(1, 3))  # [rows, capacity]
        assert written[:, 5].all() and not written[:, :5].any() and not written[:, 6:].any()
