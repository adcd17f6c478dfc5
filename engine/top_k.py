"""Each row's k best tokens, computed where the log-probs are (ONNX TopK in a one-node graph of our own).

The decoder step leaves its log-probs [rows, vocab] where it ran; a beam search needs only each row's 2 x beam_size
best (engine/search.py shows why that is exact). On a GPU this keeps the [rows, vocab] copy to the host off the
critical path (at 1024 rows and 8000 tokens, 32 MB per step becomes 74 kB); on the CPU, ONNX Runtime's TopK over
[rows, vocab] is faster than the search's numpy partition over [sentences, beams x vocab] (256 rows: 3.1 vs 12 ms).
It is a graph of its own, not an output of the decoder graph, because ONNX Runtime runs every node of a graph
whatever outputs are asked for: greedy search on the CPU, which needs only an argmax (0.07 ms at 64 rows), would
pay for TopK (1.2 ms, 12% of a 64-row step) on every step.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

from engine.candidates import TopCandidates
from engine.state_ops import serialized_model


def _top_k_graph() -> bytes:
    """ONNX graph: top_log_probs, top_ids = TopK(log_probs [rows, vocab] float32, k int64 [1]), largest first,
    ties by lower index (the ONNX TopK specification)."""
    graph = helper.make_graph(
        [helper.make_node("TopK", ["log_probs", "k"], ["top_log_probs", "top_ids"], axis=-1, largest=1, sorted=1)],
        "top_k",
        [helper.make_tensor_value_info("log_probs", TensorProto.FLOAT, ["rows", "vocab"]),
         helper.make_tensor_value_info("k", TensorProto.INT64, [1])],
        [helper.make_tensor_value_info("top_log_probs", TensorProto.FLOAT, ["rows", "k"]),
         helper.make_tensor_value_info("top_ids", TensorProto.INT64, ["rows", "k"])])
    return serialized_model(graph)


class TopK:
    """Runs TopK on the providers of the model's sessions; results come to the host.

    Args:
        providers, options: those of the decoder session, so the top-k runs where the log-probs are.
    """

    def __init__(self, providers: list, options: ort.SessionOptions) -> None:
        self.session = ort.InferenceSession(_top_k_graph(), options, providers=providers)

    def __call__(self, log_probs: np.ndarray | ort.OrtValue, k: int) -> TopCandidates:
        """log_probs float32 [rows, vocab] (numpy, or an OrtValue on the device) -> the k best per row.

        Raises:
            ValueError: k > vocab.
        """
        vocab = log_probs.shape[1] if isinstance(log_probs, np.ndarray) else log_probs.shape()[1]
        if k > vocab:
            raise ValueError(f"top-k of {k} > vocabulary of {vocab}")
        binding = self.session.io_binding()
        if isinstance(log_probs, np.ndarray):
            binding.bind_cpu_input("log_probs", log_probs)
        else:
            binding.bind_ortvalue_input("log_probs", log_probs)
        binding.bind_cpu_input("k", np.asarray([k], dtype=np.int64))
        binding.bind_output("top_log_probs", "cpu")
        binding.bind_output("top_ids", "cpu")
        self.session.run_with_iobinding(binding)
        values, ids = (o.numpy() for o in binding.get_outputs())
        return TopCandidates(values, ids, vocab)
