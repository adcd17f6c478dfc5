"""Model configuration: one frozen dataclass shared by training, export and the engine (as JSON)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Hyper-parameters of the encoder-decoder Transformer (Vaswani et al. 2017, table 3 names).

    Token ids follow the sentencepiece model trained by :mod:`nmt.tokenizer`: pad 0, unk 1, bos 2, eos 3.
    ``max_positions`` bounds src_len and tgt_len (in tokens, bos/eos included).

    Raises:
        ValueError: a value is out of range, or d_model is not divisible by n_heads.
    """

    vocab_size: int = 8000
    d_model: int = 256
    n_heads: int = 4
    d_ff: int = 1024
    n_encoder_layers: int = 3
    n_decoder_layers: int = 3
    dropout: float = 0.0  # the corpus notes: no dropout trained best for a compute-bound CPU budget
    max_positions: int = 256
    pad_id: int = 0
    unk_id: int = 1
    bos_id: int = 2
    eos_id: int = 3
    # Decoding defaults served with this model (DecodingOptions field names); requests override them.
    decoding_defaults: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model {self.d_model} is not divisible by n_heads {self.n_heads}")
        for name in ("vocab_size", "d_model", "n_heads", "d_ff", "n_encoder_layers", "n_decoder_layers",
                     "max_positions"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        ids = {self.pad_id, self.unk_id, self.bos_id, self.eos_id}
        if len(ids) != 4 or max(ids) >= self.vocab_size or min(ids) < 0:
            raise ValueError("pad/unk/bos/eos ids must be distinct and < vocab_size")

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_heads

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(dataclasses.asdict(self), indent=2) + "\n")

    @classmethod
    def from_json(cls, path: str | Path) -> "ModelConfig":
        return cls(**json.loads(Path(path).read_text()))
