"""Each row's k best tokens, computed where the log-probs are (ONNX TopK in graphs of our own).

The decoder step leaves its log-probs [rows, vocab] where it ran; a beam search needs only each row's 2 x beam_size
best (engine/search.py shows why that is exact). On a GPU this keeps the [rows, vocab] copy to the host off the
critical path (at 1024 rows and 8000 tokens, 32 MB per step becomes 74 kB); on the CPU, ONNX Runtime's TopK over
[rows, vocab] is faster than the search's numpy partition over [sentences, beams x vocab] (256 rows: 3.1 vs 12 ms).
It is a graph of its own, not an output of the decoder graph, because ONNX Runtime runs every node of a graph
whatever outputs are asked for: greedy search on the CPU, which needs only an argmax (0.07 ms at 64 rows), would
pay for TopK (1.2 ms, 12% of a 64-row step) on every step.

On the CPU the top-k runs in two stages over blocks of BLOCK consecutive tokens (:func:`_blocked_top_k_graph`):
ONNX Runtime's CPU TopK visits elements one at a time (about 4.5 us for a row of 8000 here), while a ReduceMax
over blocks is vectorized; the k best tokens then lie in the k blocks with the best maxima, and a TopK over those
k x BLOCK candidates finds them (exact, ties included: below). 40 rows x 8000, k 8, 1 thread: 0.20 -> 0.10 ms.
CUDA keeps the one-node graph (its TopK is one kernel; the stages would add launches).
"""

from __future__ import annotations

import threading

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from engine.candidates import TopCandidates
from engine.kept_binding import KeptBinding
from engine.state_ops import serialized_model

BLOCK = 32  # tokens per block of the two-stage top-k: 16-64 measured alike at 40-160 rows, k 2-8


def _kept(local: threading.local, session) -> KeptBinding:
    """The calling thread's kept binding of ``session`` (made on first use)."""
    kept = getattr(local, "bindings", None)
    if kept is None:
        kept = local.bindings = {}
    binding = kept.get(id(session))
    if binding is None:
        binding = kept[id(session)] = KeptBinding(session.io_binding())
    return binding


_K_ARRAYS: dict[int, np.ndarray] = {}  # the TopK graph's "k" input per k, bound by address, so never freed


def _k_array(k: int) -> np.ndarray:
    array = _K_ARRAYS.get(k)
    if array is None:
        array = _K_ARRAYS[k] = np.asarray([k], dtype=np.int64)
        array.flags.writeable = False
    return array


def _io(vocab: int | str) -> tuple[list, list]:
    inputs = [helper.make_tensor_value_info("log_probs", TensorProto.FLOAT, ["rows", vocab]),
              helper.make_tensor_value_info("k", TensorProto.INT64, [1])]
    outputs = [helper.make_tensor_value_info("top_log_probs", TensorProto.FLOAT, ["rows", "k"]),
               helper.make_tensor_value_info("top_ids", TensorProto.INT64, ["rows", "k"])]
    return inputs, outputs


def _top_k_graph() -> bytes:
    """ONNX graph: top_log_probs, top_ids = TopK(log_probs [rows, vocab] float32, k int64 [1]), largest first,
    ties by lower index (the ONNX TopK specification)."""
    graph = helper.make_graph(
        [helper.make_node("TopK", ["log_probs", "k"], ["top_log_probs", "top_ids"], axis=-1, largest=1, sorted=1)],
        "top_k", *_io("vocab"))
    return serialized_model(graph)


def _blocked_top_k_graph(vocab: int, block: int = BLOCK) -> bytes:
    """ONNX graph with the inputs and outputs of :func:`_top_k_graph` (the same values and ids, ties by lower
    index) for a fixed ``vocab``, in two stages, for k <= ceil(vocab / block):

    1. the row is cut into blocks of ``block`` consecutive tokens (the last padded with -inf), each block's maximum
       taken (ReduceMax), and the k blocks with the best maxima chosen (TopK, ties by lower block), then put in
       ascending order;
    2. TopK over those blocks' k x block tokens, laid out in ascending token order, so ties still go to the lower id.

    Exact: a token e of the true top k lies in a chosen block. Were its block b not chosen, k chosen blocks would
    each have a maximum m that ranks ahead of e: m > e, or m = max(b) >= e with a block (so every token) before b,
    or m = e's value at a lower index; k tokens ahead of e contradicts e being in the top k.
    """
    n_blocks = -(-vocab // block)
    pad = n_blocks * block - vocab
    constants = [numpy_helper.from_array(np.asarray(value), name) for name, value in (
        ("pads", np.array([0, 0, 0, pad], np.int64)), ("minus_inf", np.array(-np.inf, np.float32)),
        ("blocks_shape", np.array([0, n_blocks, block], np.int64)), ("last_axis", np.array([-1], np.int64)),
        ("block", np.array(block, np.int64)), ("offsets", np.arange(block, dtype=np.int64)),
        ("flat", np.array([0, -1], np.int64)))]
    row = "log_probs"
    nodes = []
    if pad:
        nodes.append(helper.make_node("Pad", ["log_probs", "pads", "minus_inf"], ["padded"], mode="constant"))
        row = "padded"
    nodes += [
        helper.make_node("Reshape", [row, "blocks_shape"], ["blocks"]),
        helper.make_node("ReduceMax", ["blocks", "last_axis"], ["block_max"], keepdims=0),
        helper.make_node("TopK", ["block_max", "k"], ["_", "best_blocks"], axis=-1, largest=1, sorted=0),
        helper.make_node("TopK", ["best_blocks", "k"], ["chosen", "__"], axis=-1, largest=0, sorted=1),
        helper.make_node("Mul", ["chosen", "block"], ["starts"]),
        helper.make_node("Unsqueeze", ["starts", "last_axis"], ["starts_"]),
        helper.make_node("Add", ["starts_", "offsets"], ["block_ids"]),
        helper.make_node("Reshape", ["block_ids", "flat"], ["candidate_ids"]),  # [rows, k x block], ascending
        helper.make_node("GatherElements", [row, "candidate_ids"], ["candidates"], axis=1),
        helper.make_node("TopK", ["candidates", "k"], ["top_log_probs", "best"], axis=-1, largest=1, sorted=1),
        helper.make_node("GatherElements", ["candidate_ids", "best"], ["top_ids"], axis=1),
    ]
    return serialized_model(helper.make_graph(nodes, "blocked_top_k", *_io(vocab), initializer=constants))


class TopK:
    """Runs TopK on the providers of the model's sessions; results come to the host.

    Args:
        providers, options: those of the decoder session, so the top-k runs where the log-probs are.
        vocab: the vocabulary size; given (and on the CPU), k up to vocab / (8 x BLOCK) runs the two-stage graph.
    """

    def __init__(self, providers: list, options: ort.SessionOptions, vocab: int | None = None) -> None:
        self.session = ort.InferenceSession(_top_k_graph(), options, providers=providers)
        on_cpu = self.session.get_providers()[0] == "CPUExecutionProvider"
        # Past an eighth of the vocabulary in candidates the second stage costs what it saves (k 32 of 8000: none).
        self.blocked_max_k = vocab // (8 * BLOCK) if vocab and on_cpu else 0
        self.blocked = (ort.InferenceSession(_blocked_top_k_graph(vocab), options, providers=providers)
                        if self.blocked_max_k else None)
        self._thread = threading.local()  # this thread's kept bindings (KeptBinding), per session

    def __call__(self, log_probs: np.ndarray | ort.OrtValue, k: int) -> TopCandidates:
        """log_probs float32 [rows, vocab] (numpy, or an OrtValue on the device) -> the k best per row. From numpy,
        the result's arrays are buffers kept for this thread's next call of the same shape, which rewrites them
        (the core reads them within its step); from an OrtValue, new arrays.

        Raises:
            ValueError: k > vocab.
        """
        vocab = log_probs.shape[1] if isinstance(log_probs, np.ndarray) else log_probs.shape()[1]
        if k > vocab:
            raise ValueError(f"top-k of {k} > vocabulary of {vocab}")
        session = self.blocked if k <= self.blocked_max_k else self.session
        if isinstance(log_probs, np.ndarray):
            kept = _kept(self._thread, session)
            rows = np.ascontiguousarray(log_probs, dtype=np.float32)  # alive through the run: bound by address
            kept.bind("log_probs", rows)
            kept.bind("k", _k_array(k))
            values = kept.output("top_log_probs", (rows.shape[0], k))
            ids = kept.output("top_ids", (rows.shape[0], k), np.int64)
            session.run_with_iobinding(kept.binding)
            return TopCandidates(values, ids, vocab)
        binding = session.io_binding()
        binding.bind_ortvalue_input("log_probs", log_probs)
        binding.bind_cpu_input("k", np.asarray([k], dtype=np.int64))
        binding.bind_output("top_log_probs", "cpu")
        binding.bind_output("top_ids", "cpu")
        session.run_with_iobinding(binding)
        values, ids = (o.numpy() for o in binding.get_outputs())
        return TopCandidates(values, ids, vocab)


def _log_softmax_graph() -> bytes:
    """ONNX graph: log_probs = LogSoftmax(logits [rows, vocab] float32) over the vocabulary."""
    graph = helper.make_graph(
        [helper.make_node("LogSoftmax", ["logits"], ["log_probs"], axis=-1)], "log_softmax",
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["rows", "vocab"])],
        [helper.make_tensor_value_info("log_probs", TensorProto.FLOAT, ["rows", "vocab"])])
    return serialized_model(graph)


class LogSoftmax:
    """The decoder step's log-softmax, run apart from its graph (engine/contract.py, format 7) where the logits are:
    the same ONNX Runtime kernel the graph ran before, so the log-probs are the same bit for bit. A numpy array is
    rewritten in place (one buffer bound as input and output: the kernel reads a row before writing it); an OrtValue
    on a device gets a new OrtValue there. About 14 us at 1 row and 100 us at 40 rows of 8000 on one core here.

    Args:
        providers, options: those of the decoder session (a device's OrtValues stay on it).
        device_type: where that session runs ("cpu", "cuda"), where an OrtValue's log-probs are put.
    """

    def __init__(self, providers: list, options: ort.SessionOptions, device_type: str) -> None:
        self.device_type = device_type
        self.session = ort.InferenceSession(_log_softmax_graph(), options, providers=providers)
        self.host = self.session if device_type == "cpu" else ort.InferenceSession(
            _log_softmax_graph(), options, providers=["CPUExecutionProvider"])
        self._thread = threading.local()  # this thread's kept binding of the host session (KeptBinding)

    def __call__(self, logits: np.ndarray | ort.OrtValue) -> np.ndarray | ort.OrtValue:
        """logits float32 [rows, vocab] -> log_probs, same shape: the same numpy array (C-contiguous, written in
        place) or a new OrtValue on the device of ``logits``.

        Raises:
            ValueError: a numpy array that is not a writable C-contiguous float32 one.
        """
        if isinstance(logits, np.ndarray):
            if logits.dtype != np.float32 or not logits.flags.c_contiguous or not logits.flags.writeable:
                raise ValueError("the log-softmax rewrites a writable C-contiguous float32 array in place")
            kept = _kept(self._thread, self.host)
            kept.bind("logits", logits, "log_probs")
            self.host.run_with_iobinding(kept.binding)
            return logits
        binding = self.session.io_binding()
        binding.bind_ortvalue_input("logits", logits)
        binding.bind_output("log_probs", self.device_type)
        self.session.run_with_iobinding(binding)
        return binding.get_outputs()[0]
