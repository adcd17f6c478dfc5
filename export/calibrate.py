"""Static activation scales for the int8 copy: measured while decoding calibration sentences, then fixed in the graphs.

ONNX Runtime's dynamic quantization (export/quantize.py's first pass, ``DynamicQuantizeLinear`` before each integer
MatMul) scales a linear layer's input by its range over the whole call, that is over every row of the batch. A
sentence's int8 translation then depends on the sentences decoded beside it: on the test split at beam 4, 20 of the
first 120 sentences translated differently alone than in their batch, and sentence 66 ran to the 255-token limit
only inside its batch (41 tokens alone), 171 steps that its batch-mates did not need. CTranslate2 scales each row
by its own range; ONNX Runtime's integer MatMuls take one activation scale per call (``MatMulIntegerToFloat``'s
a_scale is a scalar), so this module fixes each layer's scale instead, from the ranges its input takes while the
dynamic copy decodes calibration sentences. Every row is then quantized the same whatever its batch-mates (int8
output is batch-invariant, as float32's is) and the step computes no range per call.

1. :func:`calibrate`: each ``DynamicQuantizeLinear`` input also feeds a ReduceMin and a ReduceMax made graph
   outputs; the engine decodes the sentences greedy and at beam 4 with those graphs, and every call's extremes
   are kept (per graph, per quantized tensor).
2. :func:`static_graph`: each ``DynamicQuantizeLinear(x) -> (q, scale, zero_point)`` becomes ``QuantizeLinear(x,
   scale, zero_point)`` with the scale and zero point constants: uint8 over [lo, hi], lo and hi the PERCENTILE-th
   percentiles of the calls' minima (low end) and maxima (high end), widened to hold 0 (the ONNX
   DynamicQuantizeLinear formula, with fixed extremes). Values past them saturate. Then each ``MatMulInteger ->
   Cast -> Mul(Mul(a_scale, b_scale)) [-> Add(bias)]`` chain becomes one ``MatMulIntegerToFloat`` (com.microsoft):
   ONNX Runtime fuses that chain itself only when the scales come from ``DynamicQuantizeLinear``, and unfused it
   writes and reads the [rows, N] output three more times.

PERCENTILE 99.9 was chosen on the dev split (BLEU of greedy and beam-4 decoding, against the maximum, 99 and 95;
docs/performance.md); the calibration sentences are 300 English sides of the training split
(export/calibration_sentences.txt, ``random.Random(0).sample``).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from engine import contract
from engine.options import DecodingOptions

CALIBRATION_SENTENCES = Path(__file__).with_name("calibration_sentences.txt")
PERCENTILE = 99.9
GRAPHS = (contract.ENCODER_FILE, contract.DECODER_STEP_FILE)


def dynamic_quantizers(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """The graph's DynamicQuantizeLinear nodes, in graph order (the order :func:`calibrate`'s ranges follow)."""
    return [n for n in model.graph.node if n.op_type == "DynamicQuantizeLinear"]


def with_range_outputs(model: onnx.ModelProto) -> list[tuple[str, str]]:
    """Adds to ``model``, in place, per DynamicQuantizeLinear input x: float32 scalar outputs ReduceMin(x) and
    ReduceMax(x). Returns their names, (min, max) per quantizer in :func:`dynamic_quantizers` order."""
    names = []
    for i, node in enumerate(dynamic_quantizers(model)):
        pair = (f"calibration_min_{i}", f"calibration_max_{i}")
        for op, name in zip(("ReduceMin", "ReduceMax"), pair):
            model.graph.node.append(helper.make_node(op, [node.input[0]], [name], keepdims=0))
            model.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, []))
        names.append(pair)
    return names


class _RangeRecorder:
    """An InferenceSession whose runs also write the range outputs (:func:`with_range_outputs`) and keep them:
    ``calls[i]`` lists (min, max) of quantizer i per run. The engine's model runs it as its own session."""

    def __init__(self, session, names: list[tuple[str, str]]) -> None:
        self.session, self.names = session, names
        self.flat = [name for pair in names for name in pair]
        self.buffers = {name: np.zeros((), np.float32) for name in self.flat}
        self.calls: list[list[tuple[float, float]]] = [[] for _ in names]

    def __getattr__(self, attribute):
        return getattr(self.session, attribute)

    def _keep(self, values: dict) -> None:
        for i, (low, high) in enumerate(self.names):
            self.calls[i].append((float(values[low]), float(values[high])))

    def run(self, output_names, feeds, *args):
        outputs = self.session.run(list(output_names) + self.flat, feeds, *args)
        self._keep(dict(zip(self.flat, outputs[len(output_names):])))
        return outputs[:len(output_names)]

    def run_with_iobinding(self, binding, *args):
        for name, buffer in self.buffers.items():
            binding.bind_output(name, "cpu", 0, np.float32, [], buffer.ctypes.data)
        self.session.run_with_iobinding(binding, *args)
        self._keep(self.buffers)


def calibrate(artifact: Path, scratch: Path, sentences: list[str],
              beam_sizes: tuple[int, ...] = (1, 4)) -> dict[str, list[np.ndarray]]:
    """Decodes ``sentences`` (greedy, then beam 4) with the graphs of ``artifact`` (dynamically quantized) and
    returns, per graph file, per DynamicQuantizeLinear in graph order, float32 [calls, 2]: the (min, max) of its
    input at each call. ``scratch``: an empty folder for the graphs with range outputs.

    Raises:
        ValueError: a graph without DynamicQuantizeLinear nodes (not a dynamic int8 graph).
    """
    from engine.runtime import EngineConfig
    from engine.translator import Translator

    shutil.copytree(artifact, scratch, dirs_exist_ok=True)
    names = {}
    for graph in GRAPHS:
        model = onnx.load(str(artifact / graph))
        names[graph] = with_range_outputs(model)
        if not names[graph]:
            raise ValueError(f"{artifact / graph} has no DynamicQuantizeLinear node to calibrate")
        onnx.save(model, str(scratch / graph))
    translator = Translator(scratch, EngineConfig(device="cpu", intra_op_threads=1))
    model = translator.model
    model.encoder = _RangeRecorder(model.encoder, names[contract.ENCODER_FILE])
    model.decoder = _RangeRecorder(model.decoder, names[contract.DECODER_STEP_FILE])
    for beam_size in beam_sizes:
        translator.translate(sentences, DecodingOptions(beam_size=beam_size))
    return {graph: [np.asarray(calls, dtype=np.float32) for calls in recorder.calls]
            for graph, recorder in ((contract.ENCODER_FILE, model.encoder),
                                    (contract.DECODER_STEP_FILE, model.decoder))}


def static_scale(calls: np.ndarray, percentile: float = PERCENTILE) -> tuple[np.float32, np.uint8]:
    """(scale, zero_point) of uint8 quantization over the calls' ranges (float32 [calls, 2] of (min, max)): the low
    end the (100 - percentile)-th percentile of the minima, the high end the percentile-th of the maxima, each
    widened to 0 (DynamicQuantizeLinear's formula: scale = (hi - lo) / 255, zero_point = round(-lo / scale))."""
    low = min(float(np.percentile(calls[:, 0], 100 - percentile)), 0.0)
    high = max(float(np.percentile(calls[:, 1], percentile)), 0.0)
    scale = np.float32((high - low) / 255.0) if high > low else np.float32(1.0)
    return scale, np.uint8(np.clip(np.round(-low / scale), 0, 255))


def static_graph(model: onnx.ModelProto, ranges: list[np.ndarray], percentile: float = PERCENTILE) -> onnx.ModelProto:
    """``model`` (dynamically quantized) with each DynamicQuantizeLinear made a QuantizeLinear of fixed scale and
    zero point (:func:`static_scale` of its calls in ``ranges``) and each integer MatMul chain made one
    MatMulIntegerToFloat (module docstring). Edits and returns ``model``.

    Raises:
        ValueError: ``ranges`` does not hold one entry per DynamicQuantizeLinear node.
    """
    return fused_integer_matmuls(with_static_scales(model, ranges, percentile))


def with_static_scales(model: onnx.ModelProto, ranges: list[np.ndarray], percentile: float = PERCENTILE
                       ) -> onnx.ModelProto:
    """``model`` with each DynamicQuantizeLinear made a QuantizeLinear of fixed scale and zero point
    (:func:`static_scale` of its calls in ``ranges``), its integer MatMul chains as they were. Edits and returns
    ``model``.

    Raises:
        ValueError: ``ranges`` does not hold one entry per DynamicQuantizeLinear node.
    """
    quantizers = dynamic_quantizers(model)
    if len(quantizers) != len(ranges):
        raise ValueError(f"{len(ranges)} calibrated ranges for {len(quantizers)} DynamicQuantizeLinear nodes")
    for node, calls in zip(quantizers, ranges):
        scale, zero_point = static_scale(calls, percentile)
        x, (q, scale_name, zero_point_name) = node.input[0], node.output
        model.graph.initializer.extend([numpy_helper.from_array(np.asarray(scale, np.float32), scale_name),
                                        numpy_helper.from_array(np.asarray(zero_point, np.uint8), zero_point_name)])
        node.op_type = "QuantizeLinear"
        del node.input[:], node.output[:]
        node.input.extend([x, scale_name, zero_point_name])
        node.output.append(q)
    return model


def fused_integer_matmuls(model: onnx.ModelProto) -> onnx.ModelProto:
    """Each ``QuantizeLinear(x, a_scale, a_zero_point) -> a``, ``MatMulInteger(a, b, a_zero_point, b_zero_point) ->
    Cast -> Mul(Mul(a_scale, b_scale))`` chain, and
    the ``Add`` of a constant bias after it where there is one, as one com.microsoft ``MatMulIntegerToFloat(a, b,
    a_scale, b_scale, a_zero_point, b_zero_point, bias)``: what ONNX Runtime's own fusion gives a dynamically
    quantized MatMul (inside its DynamicQuantizeMatMul), for constant scales. Edits and returns ``model``.

    Raises:
        ValueError: a MatMulInteger not followed by that chain (a graph this export did not make).
    """
    graph = model.graph
    constants = {i.name for i in graph.initializer}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    producer = {name: node for node in graph.node for name in node.output}
    removed, replaced = set(), {}
    for matmul in (n for n in graph.node if n.op_type == "MatMulInteger"):
        cast = consumers.get(matmul.output[0], [None])[0]
        mul = consumers.get(cast.output[0], [None])[0] if cast is not None and cast.op_type == "Cast" else None
        if mul is None or mul.op_type != "Mul" or len(consumers[matmul.output[0]]) != 1:
            raise ValueError(f"{matmul.name}: not MatMulInteger -> Cast -> Mul")
        scales = producer.get(next(i for i in mul.input if i != cast.output[0]))
        if scales is None or scales.op_type != "Mul":
            raise ValueError(f"{matmul.name}: its output scale is not a product of two scales")
        bias, output = "", mul.output[0]
        after = consumers.get(mul.output[0], [])
        if len(after) == 1 and after[0].op_type == "Add":
            other = [i for i in after[0].input if i != mul.output[0]]
            if len(other) == 1 and other[0] in constants:
                bias, output = other[0], after[0].output[0]
                removed.add(id(after[0]))
        removed.update({id(cast), id(mul)})
        if len(consumers[scales.output[0]]) == 1:
            removed.add(id(scales))
        a, b, a_zero_point, b_zero_point = matmul.input
        quantizer = producer.get(a)
        if quantizer is None or quantizer.op_type != "QuantizeLinear" or quantizer.input[1] not in scales.input:
            raise ValueError(f"{matmul.name}: its input is not quantized with one of its output's scales")
        a_scale = quantizer.input[1]
        b_scale = next(i for i in scales.input if i != a_scale)
        replaced[id(matmul)] = helper.make_node(
            "MatMulIntegerToFloat", [a, b, a_scale, b_scale, a_zero_point, b_zero_point, bias], [output],
            name=f"{matmul.name}_to_float", domain="com.microsoft")
    nodes = [replaced.get(id(n), n) for n in graph.node if id(n) not in removed]
    del graph.node[:]
    graph.node.extend(nodes)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return model
