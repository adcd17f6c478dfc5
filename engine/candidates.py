"""Each row's k best next tokens: what the top-k graph (engine/top_k.py) produces and the search (engine/search.py)
reads. Its own module so that the pure-numpy search does not import ONNX Runtime and the runtime does not import
the search."""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class TopCandidates:
    """Each row's k best next tokens, which a decoder step returns instead of log-probs when asked for top_k.

    Attributes:
        log_probs: float32 [rows, k], best first, ties ordered by lower token id (ONNX TopK's rule).
        ids: int64 [rows, k], the tokens.
        vocab: the vocabulary size (a candidate's flat index is beam x vocab + token).
    """

    log_probs: np.ndarray
    ids: np.ndarray
    vocab: int
