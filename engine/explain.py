"""Every layer's and head's attention for one sentence and its translation: the explain path.

The serving graphs return only what decoding needs (the last decoder layer's cross-attention, mean over heads, and
only when asked). The web page's attention view wants all of it: encoder self-attention, masked decoder
self-attention and encoder-decoder attention per layer and head (the three uses of attention, "Attention Is All You
Need" section 3.2.3). The artifact's explain.onnx (engine/contract.py) computes them in one teacher-forced pass over
the source and a given target, so that serving pays nothing for the view and the view shows the served weights.
"""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path

import numpy as np
import onnxruntime as ort

from engine import contract
from engine.errors import NotAvailableError


@dataclasses.dataclass
class AttentionMaps:
    """float32 weights of one sentence pair; every row sums to 1.

    encoder: [n_encoder_layers, n_heads, src_len, src_len]; decoder: [n_decoder_layers, n_heads, tgt_len, tgt_len]
    (masked: a target position attends to itself and earlier ones); cross: [n_decoder_layers, n_heads, tgt_len,
    src_len]. Target positions are the decoder's inputs, bos then the target tokens: position i is where target
    token i was predicted (the last position predicted eos), as in the step-by-step decode.
    """

    encoder: np.ndarray
    decoder: np.ndarray
    cross: np.ndarray


class Explainer:
    """Runs an artifact's explain.onnx, on the CPU (a request for a picture, not for throughput), loaded on first
    use.

    Raises:
        NotAvailableError: (explain) the artifact has no explain.onnx (exported before it existed, or made
            elsewhere); the message says how to re-export.
    """

    def __init__(self, artifact_dir: str | Path, bos_id: int, intra_op_threads: int = 1) -> None:
        self.path = Path(artifact_dir) / contract.EXPLAIN_FILE
        self.bos_id = bos_id
        self.intra_op_threads = intra_op_threads
        self._session: ort.InferenceSession | None = None
        self._lock = threading.Lock()

    @property
    def available(self) -> bool:
        return self.path.is_file()

    def check_available(self) -> None:
        """Raises NotAvailableError, with how to re-export, when the artifact has no explain graph."""
        if not self.available:
            raise NotAvailableError(f"this model's artifact has no {contract.EXPLAIN_FILE}: re-export it with "
                                    f"`python -m export.onnx_export` to get the attention view")

    def _load(self) -> ort.InferenceSession:
        with self._lock:
            if self._session is None:
                self.check_available()
                options = ort.SessionOptions()
                options.intra_op_num_threads = self.intra_op_threads
                options.log_severity_level = 3
                self._session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
            return self._session

    def explain(self, src_ids: list[int], tgt_ids: list[int]) -> AttentionMaps:
        """Attention of source ids (eos last, as Translator.tokenize gives them) and target ids (the translation,
        eos excluded): the decoder reads bos + tgt_ids, so tgt_len = len(tgt_ids) + 1.

        Raises:
            NotAvailableError: no explain graph in the artifact.
            ValueError: an empty source or target.
        """
        if not src_ids:
            raise ValueError("explain needs a non-empty source")
        session = self._load()
        src = np.asarray([src_ids], dtype=np.int64)
        tgt_in = np.asarray([[self.bos_id] + list(tgt_ids)], dtype=np.int64)
        encoder, decoder, cross = session.run(list(contract.EXPLAIN_OUTPUTS), {
            "src_ids": src, "src_mask": np.ones_like(src, dtype=bool), "tgt_in": tgt_in})
        return AttentionMaps(encoder[0], decoder[0], cross[0])
