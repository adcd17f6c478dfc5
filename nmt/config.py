"""Model configuration: one frozen dataclass shared by training, export and the engine (as JSON)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path


ACTIVATIONS = ("relu", "swish", "gelu")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Hyper-parameters of the encoder-decoder Transformer (Vaswani et al. 2017, table 3 names).

    Token ids follow the sentencepiece model trained by :mod:`nmt.data`: pad 0, unk 1, bos 2, eos 3. ``bos_id`` is
    the decoder's start token (Marian checkpoints start from pad, so bos_id may equal pad_id).
    ``max_positions`` bounds src_len and tgt_len (in tokens, bos/eos included).

    Departures from the paper, as named flags: ``activation`` of the FFN ("relu" in the paper; Marian / OPUS-MT
    use "swish"), ``scale_embedding`` (the paper multiplies embeddings by sqrt(d_model): True).
    ``tokenizer`` names the artifact's tokenizer ("sentencepiece": one joint model; "marian": source.spm,
    target.spm and vocab.json).

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
    activation: str = "relu"
    scale_embedding: bool = True
    tokenizer: str = "sentencepiece"
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
        ids = {self.pad_id, self.unk_id, self.eos_id}
        if len(ids) != 3 or self.bos_id in (self.unk_id, self.eos_id):
            raise ValueError("pad/unk/eos ids must be distinct, and bos_id differ from unk_id and eos_id")
        if max(ids | {self.bos_id}) >= self.vocab_size or min(ids | {self.bos_id}) < 0:
            raise ValueError(f"special token ids must be in [0, vocab_size={self.vocab_size})")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_heads

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(dataclasses.asdict(self), indent=2) + "\n")

    @classmethod
    def from_json(cls, path: str | Path) -> "ModelConfig":
        return cls(**json.loads(Path(path).read_text()))
