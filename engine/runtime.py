"""ONNX Runtime sessions for the artifact's two graphs, on CUDA when it really works, else on the CPU."""

from __future__ import annotations

import dataclasses
import logging
import threading
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx import TensorProto

from engine import contract
from engine.core import MAX_BATCHES
from engine.errors import EngineUnavailableError, NumericalError
from engine.kept_binding import KeptBinding
from engine.top_k import LogSoftmax, TopK
from engine import state_ops
from engine.state_ops import NumpyOps, OrtValueOps

log = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "cuda")
SCHEDULING = ("continuous", "refill", "static")


@dataclasses.dataclass(frozen=True, kw_only=True)
class EngineConfig:
    """Runtime settings of one engine instance.

    Attributes:
        device: "auto" (CUDA when its provider really loads, else CPU), "cpu" or "cuda" (fail if unavailable).
        intra_op_threads: ONNX Runtime intra-op threads; 0 lets ONNX Runtime choose (all physical cores).
        intra_op_spinning: whether those threads busy-wait for work between kernels (ONNX Runtime's
            ``session.intra_op.allow_spinning``, on in ONNX Runtime by default). Off by default: a replica shares
            its cores with request handling and with other replicas, and spinning threads take the CPU those need
            (measured over HTTP: README.md, Deploy and scale). It matters only with more than one thread.
        max_batch_tokens: upper bound on the padded source tokens of the sentences decoding together (sentences x
            longest source; engine/core.py). Bounds peak memory however many requests are queued. On the CPU
            smaller batches also run faster, their KV cache staying in the processor's caches
            (docs/performance.md has the measurement); GPUs want large ones (32768).
        max_batch_rows: upper bound on decoder rows per step (sentences x beams, a sentence counted at its
            beam_size).
        scheduling: "continuous" (sentences join a running decode between steps), "static" (a batch decodes to
            completion before the next forms; the former behaviour, kept to measure against) or "refill" (static,
            but the next sentences join a batch drained to its last few rows: what an offline list decodes with,
            Translator.translate_ids). engine/core.py.
        max_batches: under "continuous", batches of each kind (small requests' and larger ones') that decode side
            by side, each step running the one that has had the least decoder time (engine/core.py); 1 = one
            batch that every sentence joins (the behaviour before batches of their own).
        io_binding: keep the KV cache and cross K/V as OrtValues on the session's device between steps (ONNX
            Runtime I/O binding; beam reorder on the device, engine/state_ops.py); only the top-k scores and the
            attention come to the host. False: the state is numpy arrays, which the step writes in place (bound by
            pointer) and numpy reorders. None (default): on with CUDA, off on the CPU, where it measured slower
            (ONNX Runtime's Gather costs more than numpy's take; docs/performance.md).

    Raises:
        ValueError: an unknown device or a negative count.
    """

    device: str = "auto"
    intra_op_threads: int = 0
    intra_op_spinning: bool = False
    max_batch_tokens: int = 1024
    max_batch_rows: int = 512
    scheduling: str = "continuous"
    max_batches: int = MAX_BATCHES
    io_binding: bool | None = None

    def __post_init__(self) -> None:
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {DEVICES}, got {self.device!r}")
        if self.scheduling not in SCHEDULING:
            raise ValueError(f"scheduling must be one of {SCHEDULING}, got {self.scheduling!r}")
        if self.intra_op_threads < 0 or self.max_batch_tokens < 1 or self.max_batch_rows < 1 or self.max_batches < 1:
            raise ValueError("intra_op_threads must be >= 0, max_batch_tokens, max_batch_rows and max_batches >= 1")


def _session_options(cfg: EngineConfig) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = cfg.intra_op_threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if cfg.intra_op_spinning else "0")
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    # The CPU arena keeps the largest batch's memory forever (RSS grew 255 -> 735 MB after a few huge requests);
    # plain allocation returns it.
    options.enable_cpu_mem_arena = False
    return options


# float32 means float32 on CUDA too: ONNX Runtime's CUDA provider lets cuBLAS round float32 GEMM inputs to TF32
# (10-bit mantissa) unless told not to; on an H200 that moved beam scores by 1.4e-3 against the CPU and broke
# float32 parity. float16 graphs are unaffected.
CUDA_OPTIONS = {"use_tf32": "0"}


def _providers(cfg: EngineConfig) -> list:
    available = ort.get_available_providers()
    if cfg.device == "cpu" or "CUDAExecutionProvider" not in available:
        return ["CPUExecutionProvider"]
    return [("CUDAExecutionProvider", CUDA_OPTIONS), "CPUExecutionProvider"]


def cross_slots(row_sentence: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The decoder step's layout of rows over cross K/V kept once per sentence (engine/contract.py, format 4).
    row_sentence: int [rows], each row's sentence 0 .. sentences - 1, every sentence with a row; a sentence's rows
    may be anywhere (the engine core keeps rows where they are between steps). Returns slot_rows int64
    [sentences, slots] (slots = the most rows of one sentence): sentence s's rows in its first slots, ascending,
    row 0 as filler after them; and row_slot int64 [rows]: row r's index in slot_rows.reshape(-1). A sentence's
    beams are thus one block of queries over its own memory.
    """
    row_sentence = np.asarray(row_sentence, dtype=np.int64)
    rows = np.arange(len(row_sentence), dtype=np.int64)
    if len(rows) and int(row_sentence.max()) + 1 == len(rows):  # a row per sentence (greedy): no sort needed
        slot_rows = np.zeros_like(rows)
        slot_rows[row_sentence] = rows
        return slot_rows[:, None], row_sentence
    counts = np.bincount(row_sentence)
    slots = int(counts.max()) if len(counts) else 1
    first = np.cumsum(counts) - counts
    order = np.argsort(row_sentence, kind="stable")  # rows grouped by sentence, ascending within each
    rank = np.empty_like(rows)
    rank[order] = rows - first[row_sentence[order]]
    row_slot = row_sentence * slots + rank
    slot_rows = np.zeros(len(counts) * slots, dtype=np.int64)
    slot_rows[row_slot] = rows
    return slot_rows.reshape(len(counts), slots), row_slot


class OnnxModel:
    """The encoder and decoder-step sessions of one artifact folder.

    ``provider`` is the provider that really runs (ONNX Runtime silently falls back to the CPU when the CUDA
    libraries cannot load; we read ``get_providers()`` instead of trusting the request). ``self_attention``: the
    manifest's (engine/contract.py: "gqa" or "standard"; None when unknown, treated as "standard").

    Raises:
        FileNotFoundError: a graph file is missing.
        EngineUnavailableError: device "cuda" was asked for and CUDA does not work.
    """

    logits_on_request = True  # step(log_softmax=False) gives the graph's logits (engine/core.py reads them)

    def __init__(self, artifact_dir: str | Path, cfg: EngineConfig, n_layers: int,
                 self_attention: str | None = None) -> None:
        artifact_dir = Path(artifact_dir)
        self.n_layers = n_layers
        self.encoder_outputs = list(contract.encoder_outputs(n_layers))
        self.decoder_inputs = contract.decoder_inputs(n_layers)
        self.decoder_outputs = list(contract.decoder_outputs(n_layers))
        for name in (contract.ENCODER_FILE, contract.DECODER_STEP_FILE):
            if not (artifact_dir / name).is_file():
                raise FileNotFoundError(f"{artifact_dir / name} is missing: run `python -m export.onnx_export`")
        providers = _providers(cfg)
        options = _session_options(cfg)
        # onnxruntime-gpu logs an ERROR when the CUDA libraries are missing, then falls back to the CPU; we read
        # the outcome from get_providers() below, so silence that one expected message.
        ort.set_default_logger_severity(4 if cfg.device == "auto" and len(providers) > 1 else 2)
        try:
            self.encoder = ort.InferenceSession(str(artifact_dir / contract.ENCODER_FILE), options,
                                                providers=providers)
            self.decoder = ort.InferenceSession(str(artifact_dir / contract.DECODER_STEP_FILE), options,
                                                providers=providers)
        finally:
            ort.set_default_logger_severity(2)
        self.provider = self.decoder.get_providers()[0]
        if cfg.device == "cuda" and self.provider != "CUDAExecutionProvider":
            raise EngineUnavailableError(f"device 'cuda' requested but ONNX Runtime runs {self.provider}")
        self.device_type = "cuda" if self.provider == "CUDAExecutionProvider" else "cpu"
        cache_type = {"tensor(float)": TensorProto.FLOAT, "tensor(float16)": TensorProto.FLOAT16}[
            next(i.type for i in self.decoder.get_inputs() if i.name == "self_k_0")]
        self.float16 = cache_type == TensorProto.FLOAT16
        self.cache_dtype = np.dtype(np.float16 if self.float16 else np.float32)
        first_cache = len(contract.DECODER_STEP_INPUTS)
        self.cache_inputs = self.decoder_inputs[first_cache:first_cache + 2 * n_layers]
        self.step_inputs = self.decoder_inputs[:first_cache]  # tokens, positions, src_mask, slot_rows, row_slot
        self.cross_inputs = self.decoder_inputs[first_cache + 2 * n_layers:]
        self.vocab_size = self.decoder.get_outputs()[0].shape[1]
        self.io_binding = cfg.io_binding if cfg.io_binding is not None else self.device_type == "cuda"
        # Row operations on the state the search keeps between steps (engine/search.py passes them on).
        self.ops = (OrtValueOps(2 * n_layers, cache_type, providers, options, self.device_type)
                    if self.io_binding else NumpyOps())
        # GroupQueryAttention reads no cache position past a row's length, so the core may leave what lies past
        # the copied part of a grown cache uninitialized; the standard-ops step masks those positions with an
        # additive bias, which an uninitialized NaN would survive, so its caches stay zeroed.
        self.cache_tail_unread = self_attention == "gqa"
        self.top_k = TopK(providers, options, self.vocab_size)
        self.log_softmax = LogSoftmax(providers, options, self.device_type)
        self._thread = threading.local()  # the decoder step's kept IOBindings (_kept_binding)
        self._identity: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # _identity_slots, per row count
        log.info("ONNX Runtime %s on %s (I/O binding %s); the search's host loops %s", ort.__version__, self.provider,
                 self.io_binding, "in C (engine/_kernels.c)" if state_ops._kernels is not None
                 else "in numpy (engine/_kernels.c not built: no C compiler at install)")

    def encode(self, src_ids: np.ndarray, src_mask: np.ndarray) -> tuple[list, list]:
        """src_ids int64 [batch, src_len], src_mask bool -> cross_k, cross_v: per decoder layer, [batch, n_heads,
        src_len, d_head] in the graph's float type; OrtValues on the device with I/O binding, else numpy."""
        if not self.io_binding:
            outputs = self.encoder.run(self.encoder_outputs, {"src_ids": src_ids, "src_mask": src_mask})
        else:
            binding = self.encoder.io_binding()
            binding.bind_cpu_input("src_ids", src_ids)
            binding.bind_cpu_input("src_mask", src_mask)
            for name in self.encoder_outputs:
                binding.bind_output(name, self.device_type)
            self.encoder.run_with_iobinding(binding)
            outputs = binding.get_outputs()
        return outputs[:self.n_layers], outputs[self.n_layers:]

    def empty_cache(self, like, rows: int, capacity: int) -> tuple[list, list]:
        """A zeroed self-attention cache for ``rows`` rows: per decoder layer, keys and values [rows, n_heads,
        capacity, d_head] of ``like``'s kind, float type and device (``like``: a cross K/V tensor of
        :meth:`encode`). Each tensor is its own buffer: :meth:`step` writes into them."""
        n = self.n_layers
        caches = [self.ops.empty(like, rows, capacity) for _ in range(2 * n)]
        return caches[:n], caches[n:]

    def step(self, tokens, self_k, self_v, cross_k, cross_v, src_mask, top_k: int | None = None, *,
             positions: np.ndarray, row_sentence: np.ndarray | None = None, check_nan: bool = True,
             log_softmax: bool = True):
        """One decoder step (engine/contract.py, format 7); per-layer lists of state tensors (as :meth:`encode` and
        :meth:`empty_cache` make them); tokens int64 [rows, 1], positions int64 [rows] (each row's cached length)
        and src_mask bool [sentences, src_len] are numpy. The self-attention caches self_k, self_v [rows, n_heads,
        capacity, d_head] (capacity > every position) are bound as both input and output of the graph, so this
        step's keys/values are written into them in place: numpy arrays (C-contiguous, the graph's float type) or,
        with I/O binding, OrtValues on the session's device. cross_k, cross_v and src_mask are once per sentence;
        row_sentence int64 [rows] says whose each row is (:func:`cross_slots`), by default one row per sentence.

        Returns (scores, self_k, self_v, attention): scores are log_probs float32 [rows, vocab] (numpy), or with
        ``top_k`` each row's top_k best tokens only (:class:`TopCandidates`, engine/top_k.py; with I/O binding the
        full log-probs then never leave the device); with ``log_softmax`` False the graph's logits [rows, vocab]
        instead of log-probs (or their top-k), whose order in a row is the log-probs' (a row's log-softmax subtracts
        one number from each of its logits), without the pass over the vocabulary that gives log-probs; self_k,
        self_v the lists given, written; attention float32 [rows, src_len] (a :class:`RowAttention`, computed when
        read). On the CPU with numpy caches the log-probs (or logits) and the attention weights may be buffers this
        model keeps for those caches (KEPT_OUTPUT_BYTES: binding an output costs about 3 us, and a fresh [rows,
        vocab] array more): the next step over the same caches writes them again, so copy what must outlive it.

        Raises:
            ValueError: a position not below the caches' capacity, or a numpy cache that cannot be written in
                place (not C-contiguous, another dtype).
            NumericalError: with ``check_nan``, NaN among the scores the search reads (each row's top k; all
                log-probs of a float16 graph). The engine core checks per sentence itself (check_nan=False).
        """
        rows, capacity = tokens.shape[0], self.ops.shape(self_k[0])[2]
        positions = np.ascontiguousarray(positions, dtype=np.int64)
        if rows and int(positions.max()) >= capacity:
            raise ValueError(f"position {int(positions.max())} does not fit a cache of capacity {capacity}")
        slot_rows, row_slot = self._identity_slots(rows) if row_sentence is None else cross_slots(row_sentence)
        kept = self._kept_binding(self_k) if self.device_type == "cpu" else None
        binding = kept.binding if kept is not None else self.decoder.io_binding()
        for name, value in zip(self.step_inputs, (tokens, positions, src_mask, slot_rows, row_slot)):
            _bind_input(binding, name, value)
        bound = []  # what a kept binding holds by address only, alive until the run (a contiguous copy included)
        for name, value in zip(self.cross_inputs, (*cross_k, *cross_v)):
            if kept is not None and isinstance(value, np.ndarray):
                bound.append(np.ascontiguousarray(value))
                kept.bind(name, bound[-1])
            else:
                _bind_input(binding, name, value)
        on_device = self.io_binding and top_k  # bound first: get_outputs() lists in binding order
        if on_device:  # only the top-k leave the device
            binding.bind_output("logits", self.device_type)
        elif kept is not None:  # the logits, made log-probs in place; valid until this binding's next step
            log_probs = kept.output("logits", (rows, self.vocab_size))
        else:
            log_probs = np.empty((rows, self.vocab_size), dtype=np.float32)
            binding.bind_output("logits", "cpu", 0, np.float32, log_probs.shape, log_probs.ctypes.data)
        # Per slot, as the softmax left it: few steps have a sentence that reads it (RowAttention). On the CPU into
        # an array of ours (get_outputs() costs more); on a device it stays there unless read.
        if self.device_type == "cpu":
            shape = (slot_rows.shape[0], self.ops.shape(cross_k[0])[1], slot_rows.shape[1], src_mask.shape[1])
            if kept is not None:
                attention = kept.output("attention", shape)
            else:
                attention = np.empty(shape, np.float32)
                binding.bind_output("attention", "cpu", 0, np.float32, shape, attention.ctypes.data)
        else:
            binding.bind_output("attention", self.device_type)
        # Past and present are one buffer: GroupQueryAttention then writes one position per row instead of
        # copying the cache (contract, format 5).
        for name, out_name, cache in zip(self.cache_inputs, self.decoder_outputs[2:], (*self_k, *self_v)):
            if isinstance(cache, np.ndarray):
                if not cache.flags.c_contiguous or not cache.flags.writeable or cache.dtype != self.cache_dtype:
                    raise ValueError(f"{name} must be a writable C-contiguous {self.cache_dtype} array")
                if kept is not None:
                    kept.bind(name, cache, out_name)
                else:
                    binding.bind_input(name, "cpu", 0, cache.dtype, cache.shape, cache.ctypes.data)
                    binding.bind_output(out_name, "cpu", 0, cache.dtype, cache.shape, cache.ctypes.data)
            else:
                binding.bind_ortvalue_input(name, cache)
                binding.bind_ortvalue_output(out_name, cache)
        self.decoder.run_with_iobinding(binding)
        if on_device or self.device_type != "cpu":
            outputs = binding.get_outputs()  # in binding order: log_probs, attention, the caches
            log_probs = outputs[0] if on_device else log_probs
            attention = outputs[1] if self.device_type != "cpu" else attention
        if log_softmax:
            log_probs = self.log_softmax(log_probs)
        attention = RowAttention(attention, row_slot)
        scores = self.top_k(log_probs, top_k) if top_k else log_probs
        # NaN is how a float16 overflow shows (inf - inf in LayerNorm or softmax); -inf is a legitimate log-prob.
        # [rows, k] costs nothing to check; full float32 rows are checked for float16 graphs only (a pass over
        # [rows, vocab] is 1-3% of a greedy step, for an overflow float32 graphs do not have).
        checked = scores.log_probs if top_k else scores
        if check_nan and (top_k or self.float16) and np.isnan(checked.max(axis=1)).any():
            raise NumericalError()
        return scores, self_k, self_v, attention

    def _identity_slots(self, rows: int) -> tuple[np.ndarray, np.ndarray]:
        """cross_slots of one row per sentence, in order (read-only, made once per row count)."""
        slots = self._identity.get(rows)
        if slots is None:
            slots = self._identity[rows] = cross_slots(np.arange(rows))
            for x in slots:
                x.flags.writeable = False
        return slots

    def _kept_binding(self, self_k: list) -> KeptBinding | None:
        """The decoder step's IOBinding kept for the cache buffers of ``self_k`` (numpy, on the CPU), or None (an
        OrtValue cache: a fresh binding each step, which holds what it binds). A batch keeps its cache buffers
        between steps, so its steps bind only what is new (the per-step inputs, log_probs, attention); rebinding
        the 12 caches and 6 cross K/V of the bundled model each step cost about 50 us of a 0.8 ms one-row int8 step
        (docs/performance.md). Kept per thread (an IOBinding is not thread-safe), keyed by the first cache's
        address, the last KEPT_BINDINGS used; what a binding was given is compared by address, shape and dtype on
        every use, so a key that meets another batch's buffers only rebinds."""
        first = self_k[0] if self_k else None
        if not isinstance(first, np.ndarray):
            return None
        kept = getattr(self._thread, "bindings", None)
        if kept is None:
            kept = self._thread.bindings = {}
        key = first.ctypes.data
        binding = kept.pop(key, None)
        if binding is None:
            binding = KeptBinding(self.decoder.io_binding())
            if len(kept) >= KEPT_BINDINGS:
                del kept[next(iter(kept))]  # the least recently used: dicts keep insertion order
        kept[key] = binding
        return binding


KEPT_BINDINGS = 2 * MAX_BATCHES  # a core's batches, and their buffers' successors after a resize
class RowAttention:
    """A decoder step's alignments, float32 [rows, src_len] (each row's mean over heads of the last decoder layer's
    cross-attention weights), computed on first read from the weights per slot that the graph outputs, [sentences,
    n_heads, slots, src_len] (engine/contract.py, format 6): only steps of a sentence that asked for them
    (return_attention) pay for the mean, and with CUDA for the copy to the host. Reads as a numpy array
    (``attention[rows, :src_len]``, ``np.asarray(attention)``).

    Args:
        weights: the step's ``attention`` output, numpy or an OrtValue (on the session's device).
        row_slot: int64 [rows], each row's slot in the flattened [sentences * slots] (:func:`cross_slots`).
    """

    def __init__(self, weights, row_slot: np.ndarray) -> None:
        self._weights, self._row_slot, self._rows = weights, row_slot, None

    def rows(self) -> np.ndarray:
        """float32 [rows, src_len]; rows sum to 1."""
        if self._rows is None:
            w = self._weights if isinstance(self._weights, np.ndarray) else self._weights.numpy()
            self._rows = w.mean(axis=1, dtype=np.float32).reshape(-1, w.shape[-1])[self._row_slot]
        return self._rows

    def __getitem__(self, key) -> np.ndarray:
        return self.rows()[key]

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        return self.rows() if dtype is None else self.rows().astype(dtype)


def _bind_input(binding: ort.IOBinding, name: str, value) -> None:
    """A numpy array (made contiguous) or an OrtValue as a graph input."""
    if isinstance(value, np.ndarray):
        binding.bind_cpu_input(name, np.ascontiguousarray(value))
    else:
        binding.bind_ortvalue_input(name, value)
