"""ONNX Runtime sessions for the artifact's two graphs, on CUDA when it really works, else on the CPU."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np
import onnxruntime as ort

from engine import contract
from engine.errors import EngineUnavailableError

log = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "cuda")


@dataclasses.dataclass(frozen=True, kw_only=True)
class EngineConfig:
    """Runtime settings of one engine instance.

    Attributes:
        device: "auto" (CUDA when its provider really loads, else CPU), "cpu" or "cuda" (fail if unavailable).
        intra_op_threads: ONNX Runtime intra-op threads; 0 lets ONNX Runtime choose (all physical cores).
        max_batch_tokens: upper bound on padded source tokens (batch x src_len) per encoder call; larger batches
            are split. Bounds peak memory independently of how many requests the server batched. On the CPU
            smaller chunks also run faster, their KV cache staying in the processor's caches (200 test sentences,
            1 thread: 8192 -> 1024 made greedy 33% and beam 4 22% faster); GPUs want large ones (32768).

    Raises:
        ValueError: an unknown device or a negative count.
    """

    device: str = "auto"
    intra_op_threads: int = 0
    max_batch_tokens: int = 1024

    def __post_init__(self) -> None:
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {DEVICES}, got {self.device!r}")
        if self.intra_op_threads < 0 or self.max_batch_tokens < 1:
            raise ValueError("intra_op_threads must be >= 0 and max_batch_tokens >= 1")


def _session_options(cfg: EngineConfig) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = cfg.intra_op_threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    # The CPU arena keeps the largest batch's memory forever (RSS grew 255 -> 735 MB after a few huge requests);
    # plain allocation returns it.
    options.enable_cpu_mem_arena = False
    return options


def _providers(cfg: EngineConfig) -> list[str]:
    available = ort.get_available_providers()
    if cfg.device == "cpu" or "CUDAExecutionProvider" not in available:
        return ["CPUExecutionProvider"]
    return ["CUDAExecutionProvider", "CPUExecutionProvider"]


class OnnxModel:
    """The encoder and decoder-step sessions of one artifact folder.

    ``provider`` is the provider that really runs (ONNX Runtime silently falls back to the CPU when the CUDA
    libraries cannot load; we read ``get_providers()`` instead of trusting the request).

    Raises:
        FileNotFoundError: a graph file is missing.
        EngineUnavailableError: device "cuda" was asked for and CUDA does not work.
    """

    def __init__(self, artifact_dir: str | Path, cfg: EngineConfig, n_layers: int) -> None:
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
        log.info("ONNX Runtime %s on %s", ort.__version__, self.provider)

    def encode(self, src_ids: np.ndarray, src_mask: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """src_ids int64 [batch, src_len], src_mask bool -> cross_k, cross_v: per decoder layer, float32
        [batch, n_heads, src_len, d_head]."""
        outputs = self.encoder.run(self.encoder_outputs, {"src_ids": src_ids, "src_mask": src_mask})
        return outputs[:self.n_layers], outputs[self.n_layers:]

    def step(self, tokens, self_k, self_v, cross_k, cross_v, src_mask):
        """One decoder step; per-layer lists of arrays, shapes in engine/contract.py.

        Returns log_probs float32 [rows, vocab], new self_k and self_v (lists), attention float32 [rows, src_len].
        """
        feeds = dict(zip(self.decoder_inputs, (tokens, src_mask, *self_k, *self_v, *cross_k, *cross_v)))
        outputs = self.decoder.run(self.decoder_outputs, feeds)
        n = self.n_layers
        return outputs[0], outputs[2:2 + n], outputs[2 + n:], outputs[1]
