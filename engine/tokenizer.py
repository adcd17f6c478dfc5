"""Tokenizers of the artifact formats: our joint sentencepiece model, and Marian's source/target sentencepiece
models with a shared vocab.json (the Hugging Face MarianMTModel folder layout)."""

from __future__ import annotations

import json
from pathlib import Path

import sentencepiece as spm

# Files each tokenizer type reads from the artifact folder (export copies them).
TOKENIZER_FILES = {"sentencepiece": ("spm.model",), "marian": ("source.spm", "target.spm", "vocab.json")}


def char_spans(sp: spm.SentencePieceProcessor, text: str) -> list[tuple[int, int]]:
    """Each source piece's character range in ``text`` (sentencepiece reports UTF-8 byte offsets into the text as
    given, before its own normalization), for aligning markup and protected spans with attention columns."""
    encoded = text.encode("utf-8")
    spans = []
    for piece in sp.encode(text, return_type="proto").pieces:
        spans.append((len(encoded[:piece.begin].decode("utf-8", "ignore")),
                      len(encoded[:piece.end].decode("utf-8", "ignore"))))
    return spans


class SentencePieceTokenizer:
    """One sentencepiece model shared by source and target; token ids are the model's piece ids."""

    def __init__(self, folder: Path) -> None:
        self.sp = spm.SentencePieceProcessor(model_file=str(folder / "spm.model"))
        self.unk_id = self.sp.unk_id()

    def encode_source(self, text: str) -> list[int]:
        """Source ids, eos not appended."""
        return self.sp.encode(text)

    def encode_target(self, text: str) -> list[int]:
        """Target ids (for a forced target prefix)."""
        return self.sp.encode(text)

    def source_pieces(self, text: str) -> list[str]:
        return self.sp.encode(text, out_type=str)

    def source_char_spans(self, text: str) -> list[tuple[int, int]]:
        """Character range of each source piece in ``text`` (eos excluded)."""
        return char_spans(self.sp, text)

    def target_pieces(self, ids: list[int]) -> list[str]:
        return [self.sp.id_to_piece(i) for i in ids]

    def unknown_source_pieces(self, text: str) -> list[str]:
        """Source substrings the vocabulary maps to unk, in order."""
        return [p.surface for p in self.sp.encode(text, return_type="proto").pieces if p.id == self.unk_id]

    def decode_target(self, ids: list[int], unknowns: list[str] | None = None) -> str:
        """Ids -> text; with ``unknowns``, the k-th unk becomes the k-th unknown source substring."""
        if unknowns is None or self.unk_id not in ids:
            return self.sp.decode(ids)
        queue = iter(unknowns)
        return self.sp.decode_pieces([next(queue, "") if i == self.unk_id else self.sp.id_to_piece(i) for i in ids])


class MarianTokenizer:
    """Marian / OPUS-MT: source.spm and target.spm segment text, vocab.json maps pieces to the model's ids.

    Pieces missing from vocab.json map to unk_id (as Hugging Face's MarianTokenizer does); special tokens are not
    produced by the segmenters.
    """

    def __init__(self, folder: Path, unk_id: int) -> None:
        self.source = spm.SentencePieceProcessor(model_file=str(folder / "source.spm"))
        self.target = spm.SentencePieceProcessor(model_file=str(folder / "target.spm"))
        self.vocab: dict[str, int] = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
        self.pieces = {i: p for p, i in self.vocab.items()}
        self.unk_id = unk_id

    def _ids(self, pieces: list[str]) -> list[int]:
        return [self.vocab.get(p, self.unk_id) for p in pieces]

    def encode_source(self, text: str) -> list[int]:
        return self._ids(self.source.encode(text, out_type=str))

    def encode_target(self, text: str) -> list[int]:
        return self._ids(self.target.encode(text, out_type=str))

    def source_pieces(self, text: str) -> list[str]:
        return self.source.encode(text, out_type=str)

    def source_char_spans(self, text: str) -> list[tuple[int, int]]:
        """Character range of each source piece in ``text`` (eos excluded)."""
        return char_spans(self.source, text)

    def target_pieces(self, ids: list[int]) -> list[str]:
        return [self.pieces.get(i, "<unk>") for i in ids]

    def unknown_source_pieces(self, text: str) -> list[str]:
        return [p.surface for p in self.source.encode(text, return_type="proto").pieces if p.piece not in self.vocab]

    def decode_target(self, ids: list[int], unknowns: list[str] | None = None) -> str:
        queue = iter(unknowns or [])
        pieces = []
        for i in ids:
            if i == self.unk_id:
                pieces.append(next(queue, "") if unknowns is not None else "<unk>")
            else:
                pieces.append(self.pieces[i])
        # As Hugging Face's MarianTokenizer: pieces the target model lacks keep their "▁", which marks a space.
        return self.target.decode_pieces(pieces).replace("\u2581", " ").strip()


def load_tokenizer(folder: Path, model_config: dict) -> SentencePieceTokenizer | MarianTokenizer:
    """The tokenizer named by ``model_config["tokenizer"]`` ("sentencepiece" by default, or "marian").

    Raises:
        ValueError: an unknown tokenizer type. FileNotFoundError: a tokenizer file is missing.
    """
    kind = model_config.get("tokenizer", "sentencepiece")
    if kind not in TOKENIZER_FILES:
        raise ValueError(f"unknown tokenizer {kind!r}; known: {sorted(TOKENIZER_FILES)}")
    for name in TOKENIZER_FILES[kind]:
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder / name} is missing (tokenizer {kind!r})")
    if kind == "marian":
        return MarianTokenizer(folder, model_config["unk_id"])
    return SentencePieceTokenizer(folder)
