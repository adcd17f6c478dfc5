"""The float16 copy (export/fp16.py): float16 state, float32 where float16 is unsafe, close to float32 output.

It runs on the CPU here (ONNX Runtime has float16 CPU kernels), so the conversion is tested on CI; its speed on
CUDA is the GPU script's business (scripts/gpu/check.sh).
"""

import json
import shutil

import numpy as np
import onnx
import pytest
from onnx import TensorProto, shape_inference

import export.fp16
from engine import contract
from engine.options import DecodingOptions
from engine.runtime import EngineConfig
from engine.translator import Translator
from export.fp16 import FLOAT32_OPS, fp16_artifact

from conftest import PARITY_SENTENCES


@pytest.fixture(scope="module")
def fp16(artifact, tmp_path_factory):
    out = tmp_path_factory.mktemp("fp16") / "artifact"
    return out, fp16_artifact(artifact, out, PARITY_SENTENCES)


def _input_types(path) -> dict[str, list[int]]:
    """op_type -> element types of its first inputs, over the whole graph."""
    model = shape_inference.infer_shapes(onnx.load(str(path)))
    types = {v.name: v.type.tensor_type.elem_type for v in
             list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output)}
    found: dict[str, list[int]] = {}
    for node in model.graph.node:
        if node.input and node.input[0] in types:
            found.setdefault(node.op_type, []).append(types[node.input[0]])
    return found


def test_state_is_float16_and_the_outputs_float32(fp16):
    folder, manifest = fp16
    assert manifest["precision"] == "float16"
    decoder = onnx.load(str(folder / "decoder_step.onnx"))
    types = {v.name: v.type.tensor_type.elem_type for v in list(decoder.graph.input) + list(decoder.graph.output)}
    assert types["self_k_0"] == types["cross_v_0"] == types["new_self_v_0"] == TensorProto.FLOAT16
    assert types["logits"] == types["attention"] == TensorProto.FLOAT
    matmuls = _input_types(folder / "decoder_step.onnx")["MatMul"]
    assert matmuls.count(TensorProto.FLOAT16) == len(matmuls)


@pytest.mark.parametrize("graph", ["encoder.onnx", "decoder_step.onnx"])
def test_layer_norm_softmax_and_positions_stay_float32(fp16, graph):
    found = _input_types(fp16[0] / graph)
    for op in FLOAT32_OPS + ["Sin", "Cos"]:
        assert set(found.get(op, [TensorProto.FLOAT])) == {TensorProto.FLOAT}, (op, found.get(op))
    assert "LayerNormalization" in found
    if graph == "encoder.onnx":  # computes its positions
        assert "Sin" in found
    else:  # looks them up in the model's table, which stays float32
        model = onnx.load(str(fp16[0] / graph))
        table = [t for t in model.graph.initializer if t.name.endswith("position_table")]
        assert [t.data_type for t in table] == [TensorProto.FLOAT]
        reads = [n for n in model.graph.node if table[0].name in n.input]
        # The converter puts a Cast to float32 before a blocked node's initializer even when it stayed float32.
        while [n.op_type for n in reads] == ["Cast"] and reads[0].attribute[0].i == TensorProto.FLOAT:
            reads = [n for n in model.graph.node if reads[0].output[0] in n.input]
        assert [n.op_type for n in reads] == ["Gather"]


def test_float16_translates_close_to_float32(artifact, fp16):
    folder, manifest = fp16
    # Measured on this machine's CPU: 24 of 24 greedy outputs identical, max log-prob diff 0.013.
    assert manifest["parity"]["greedy_identical_to_float32"] >= len(PARITY_SENTENCES) - 2
    assert manifest["parity"]["max_abs_log_prob_diff"] < 0.1
    half = Translator(folder, EngineConfig(device="cpu"))
    full = Translator(artifact, EngineConfig(device="cpu"))
    options = DecodingOptions(beam_size=4, n_best=2)
    for a, b in zip(half.translate(PARITY_SENTENCES, options), full.translate(PARITY_SENTENCES, options)):
        assert np.isfinite(a.score) and abs(a.score - b.score) < 0.2
    assert half.translate(["The file could not be opened."])[0].text == "Die Datei konnte nicht geöffnet werden."


def test_a_float16_overflow_is_an_error_not_a_translation(fp16, tmp_path):
    """float16 output must be checked for NaN/inf (its largest value is 65504). Weights scaled past its range make the
    decoder overflow; the engine must raise NumericalError instead of decoding garbage."""

    from onnx import numpy_helper

    from engine.errors import NumericalError

    broken = tmp_path / "broken"
    shutil.copytree(fp16[0], broken)
    decoder = onnx.load(str(broken / "decoder_step.onnx"))
    weights = [t for t in decoder.graph.initializer if t.data_type == TensorProto.FLOAT16 and len(t.dims) == 2]
    for tensor in weights:
        tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor) * np.float16(3e3), tensor.name))
    onnx.save(decoder, str(broken / "decoder_step.onnx"))
    translator = Translator(broken, EngineConfig(device="cpu"))
    with pytest.raises(NumericalError, match="NaN"):
        translator.translate(["The file could not be opened."])


class _StepOn:
    """Stands in for OnnxModel where only the provider matters: Translator checks the provider it reports."""

    def __init__(self, provider: str, float16: bool) -> None:
        self.provider, self.float16, self.ops = provider, float16, None


@pytest.mark.parametrize("provider, float16, refused", [
    ("CUDAExecutionProvider", True, True),     # GroupQueryAttention in float16 on CUDA: measured wrong on an H200
    ("CUDAExecutionProvider", False, False),   # float32: the node runs on the CPU there, and translates right
    ("CPUExecutionProvider", True, False),     # the CPU kernel in float16: 24 of 24 parity sentences
])
def test_cuda_refuses_a_float16_step_with_group_query_attention(fp16, provider, float16, refused, caplog):
    folder, manifest = fp16
    assert manifest["self_attention"] == "gqa"
    if refused:
        with pytest.raises(ValueError, match="--self-attention standard"):
            Translator(folder, model=_StepOn(provider, float16))
    else:
        Translator(folder, model=_StepOn(provider, float16))  # accepted: no ValueError
        # Accepted in float32 on CUDA, with a warning that the node runs on the CPU there; on the CPU, silently.
        assert len(_cpu_node_warnings(caplog)) == (provider == "CUDAExecutionProvider")


def _cpu_node_warnings(caplog) -> list:
    return [r for r in caplog.records if "runs on the CPU under CUDA" in r.getMessage()]


def test_a_float16_copy_of_the_standard_ops_step_is_accepted_on_cuda(fp16, tmp_path, caplog):
    folder, manifest = fp16
    standard = tmp_path / "standard"
    shutil.copytree(folder, standard)
    (standard / contract.MANIFEST).write_text(json.dumps({**manifest, "self_attention": "standard"}))
    Translator(standard, model=_StepOn("CUDAExecutionProvider", True))  # accepted: no ValueError
    assert _cpu_node_warnings(caplog) == []  # its self-attention runs on CUDA: nothing to warn about


def test_the_float16_copy_for_cuda_refuses_a_group_query_attention_source_before_converting(artifact, tmp_path,
                                                                                             monkeypatch):
    converted = []
    monkeypatch.setattr(export.fp16, "fp16_graph", lambda *args: converted.append(args))
    with pytest.raises(ValueError, match="--self-attention standard"):
        fp16_artifact(artifact, tmp_path / "fp16", PARITY_SENTENCES, device="cuda")
    assert converted == []  # refused up front, not after seconds of conversion
