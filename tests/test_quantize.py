"""The int8 copy with static activation scales (export/calibrate.py, export/quantize.py)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from engine import contract
from engine.options import DecodingOptions
from engine.runtime import EngineConfig
from engine.translator import Translator
from export.calibrate import (calibrate, dynamic_quantizers, fused_integer_matmuls, static_scale,
                              with_static_scales)
from export.quantize import conversion_method, default_calibration, quantize_artifact, quantize_graph
from tests.conftest import PARITY_SENTENCES


@pytest.fixture(scope="module")
def dynamic(artifact, tmp_path_factory):
    """The dynamically quantized graphs of the bundled artifact (the calibration's input)."""
    import shutil

    out = tmp_path_factory.mktemp("dynamic") / "artifact"
    shutil.copytree(artifact, out)
    for graph in (contract.ENCODER_FILE, contract.DECODER_STEP_FILE):
        quantize_graph(artifact / graph, out / graph, out.parent)
    return out


@pytest.fixture(scope="module")
def ranges(dynamic, tmp_path_factory):
    return calibrate(dynamic, tmp_path_factory.mktemp("calibration") / "artifact", default_calibration()[:60])


@pytest.fixture(scope="module")
def static(artifact, tmp_path_factory):
    out = tmp_path_factory.mktemp("int8") / "static"
    quantize_artifact(artifact, out, PARITY_SENTENCES)
    return out


def kernels(path, tmp_path) -> set[str]:
    """The op types of a graph once ONNX Runtime has optimized it for the CPU."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return {n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node}


def test_calibration_keeps_every_calls_range_of_every_quantized_tensor(dynamic, ranges):
    for graph in (contract.ENCODER_FILE, contract.DECODER_STEP_FILE):
        quantizers = dynamic_quantizers(onnx.load(str(dynamic / graph)))
        assert len(ranges[graph]) == len(quantizers) > 0
        for calls in ranges[graph]:
            assert calls.shape[1] == 2 and len(calls) >= 2 and (calls[:, 0] <= calls[:, 1]).all()
    # Every decoder step is a call: greedy and beam 4 over 60 sentences take more steps than the encoder's calls.
    assert len(ranges[contract.DECODER_STEP_FILE][0]) > len(ranges[contract.ENCODER_FILE][0])


def test_a_static_scale_is_dynamic_quantizations_formula_on_the_percentile_extremes():
    calls = np.asarray([[-1.0, 3.0]] * 999 + [[-100.0, 100.0]], dtype=np.float32)  # one outlier call
    scale, zero_point = static_scale(calls, 99.0)
    assert scale == np.float32(4.0 / 255) and zero_point == round(1.0 / (4.0 / 255))
    scale, zero_point = static_scale(calls, 100.0)  # the outlier is the range
    assert scale == np.float32(200.0 / 255) and zero_point == 128
    scale, zero_point = static_scale(np.asarray([[0.5, 2.0]], np.float32), 100.0)  # widened to hold 0
    assert scale == np.float32(2.0 / 255) and zero_point == 0
    assert static_scale(np.zeros((3, 2), np.float32))[0] == 1.0  # all zeros: any scale


def test_fused_integer_matmuls_compute_what_the_unfused_chain_does(dynamic, ranges, tmp_path):
    """MatMulIntegerToFloat in place of MatMulInteger -> Cast -> Mul -> Add: the encoder's outputs agree to float32
    rounding, with as many kernels as ONNX Runtime's own fusion of the dynamic graph runs."""
    unfused = with_static_scales(onnx.load(str(dynamic / contract.ENCODER_FILE)), ranges[contract.ENCODER_FILE])
    onnx.save(unfused, str(tmp_path / "unfused.onnx"))
    fused = fused_integer_matmuls(onnx.load(str(tmp_path / "unfused.onnx")))
    onnx.save(fused, str(tmp_path / "fused.onnx"))
    ops = {n.op_type for n in fused.graph.node}
    assert "MatMulIntegerToFloat" in ops and not ops & {"MatMulInteger", "DynamicQuantizeLinear"}
    assert kernels(tmp_path / "fused.onnx", tmp_path) >= {"QuantizeLinear", "MatMulIntegerToFloat"}
    src_ids = np.random.default_rng(0).integers(4, 8000, size=(3, 11)).astype(np.int64)
    src_mask = np.ones_like(src_ids, dtype=bool)
    src_mask[1, 7:] = False
    feeds = {"src_ids": src_ids, "src_mask": src_mask}
    outs = [ort.InferenceSession(str(tmp_path / f"{name}.onnx"), providers=["CPUExecutionProvider"]).run(None, feeds)
            for name in ("unfused", "fused")]
    for a, b in zip(*outs):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_the_static_copy_is_int8_close_to_float32_and_records_how_it_was_made(artifact, static, tmp_path):
    manifest = json.loads((static / contract.MANIFEST).read_text())
    assert manifest["precision"] == "int8" and manifest["conversion"]["method"] == conversion_method()
    assert "static" in conversion_method() and conversion_method("dynamic") != conversion_method()
    for graph in (contract.ENCODER_FILE, contract.DECODER_STEP_FILE):
        ops = {n.op_type for n in onnx.load(str(static / graph)).graph.node}
        assert "MatMulIntegerToFloat" in ops and "DynamicQuantizeLinear" not in ops
        assert (static / graph).stat().st_size < 0.7 * (artifact / graph).stat().st_size
    # Measured 18 of the 24 parity sentences identical to float32 under greedy search (dynamic: 16).
    assert manifest["parity"]["greedy_identical_to_float32"] >= len(PARITY_SENTENCES) // 2


@pytest.mark.parametrize("beam_size", [1, 4])
def test_the_static_copy_translates_a_sentence_the_same_whatever_its_batch_mates(static, beam_size):
    """Fixed activation scales: a sentence's int8 output is the same alone and in a batch, as float32's is, where
    dynamic quantization scales every row by the whole batch's range (measured on these 24 sentences: 8 greedy and 3
    beam-4 translations moved with the batch). The scores agree to 1%, not to float32 rounding as float32's do: a
    float32 difference of one rounding (the attention's sums over a batch's padded width) moves a value that sits on
    a quantization step to the next (measured: at most 0.41%)."""
    int8 = Translator(static, EngineConfig(device="cpu"))
    options = DecodingOptions(beam_size=beam_size, return_scores=True)
    batched = int8.translate(PARITY_SENTENCES, options)
    for sentence, together in zip(PARITY_SENTENCES, batched):
        alone = int8.translate([sentence], options)[0]
        assert alone.text == together.text
        assert alone.score == pytest.approx(together.score, rel=1e-2)
    assert int8.translate(["The file could not be opened."])[0].text == "Die Datei konnte nicht geöffnet werden."


def test_quantize_refuses_an_unknown_activation_kind(artifact, tmp_path):
    with pytest.raises(ValueError, match="activations"):
        quantize_artifact(artifact, tmp_path / "int8", PARITY_SENTENCES[:1], activations="per-row")


def test_quantize_refuses_static_scales_without_calibration_sentences(artifact, tmp_path):
    with pytest.raises(ValueError, match="calibration sentence"):
        quantize_artifact(artifact, tmp_path / "int8", PARITY_SENTENCES[:1], calibration=[])
    assert not (tmp_path / "int8").exists()


def test_the_quantize_command_reports_bad_input_as_a_usage_error(tmp_path, capsys):
    from export.quantize import main

    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    for argv in (["--calibration-sentences", str(empty)], ["--artifact", str(tmp_path / "missing")],
                 ["--parity-sentences", str(empty), "--activations", "dynamic"]):
        with pytest.raises(SystemExit) as exit_:
            main(argv + ["--out", str(tmp_path / "int8")])
        assert exit_.value.code == 2 and "error:" in capsys.readouterr().err
    assert not (tmp_path / "int8").exists()
