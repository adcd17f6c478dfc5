"""Tokenizers of the artifact formats: our joint sentencepiece model, and Marian's source/target sentencepiece
models with a shared vocab.json (the Hugging Face MarianMTModel folder layout)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import sentencepiece as spm

# Files each tokenizer type reads from the artifact folder (export copies them).
TOKENIZER_FILES = {"sentencepiece": ("spm.model",), "marian": ("source.spm", "target.spm", "vocab.json")}
# An output unk with no unknown source substring left to copy (the model wrote more unks than the source had
# unknowns): shown as sentencepiece shows unk, not dropped, so that the text says a word is missing.
UNK_TEXT = "\u2047"  # ⁇


def _pieces_with_spans(sp: spm.SentencePieceProcessor, text: str) -> list[tuple[str, tuple[int, int]]]:
    """Each source piece with its character range in ``text`` (sentencepiece reports UTF-8 byte offsets into the
    text as given, before its own normalization), for aligning markup and protected spans with attention columns.
    One pass: each stretch of bytes is decoded once (decoding every piece's whole prefix was quadratic: 9.9 s for
    100,000 accented characters)."""
    encoded = text.encode("utf-8")
    out, chars, at = [], 0, 0
    for piece in sp.encode(text, return_type="proto").pieces:
        chars += len(encoded[at:piece.begin].decode("utf-8", "ignore"))
        start = chars
        chars += len(encoded[piece.begin:piece.end].decode("utf-8", "ignore"))
        at = piece.end
        out.append((piece.piece, (start, chars)))
    return out


def _strip_spaces(text: str, spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """``spans`` without the whitespace at their ends (a piece's range may hold the space its "▁" stands for);
    empty ones dropped."""
    out = []
    for start, end in spans:
        while start < end and text[start].isspace():
            start += 1
        while end > start and text[end - 1].isspace():
            end -= 1
        if start < end:
            out.append((start, end))
    return out


def split_at_boundaries(pieces: list[tuple[str, tuple[int, int]]], text: str, boundaries: tuple[int, ...],
                        known: Callable[[str], bool]) -> list[tuple[str, tuple[int, int]]]:
    """Pieces (with their character ranges in ``text``) cut where a piece runs across one of ``boundaries``
    (character offsets in ``text``), when the piece and both parts are in the vocabulary (``known``); otherwise
    left whole.

    Why: a protected span's mask ends in digits, and the vocabulary has pieces such as "1." and "2,", so "open X1."
    reaches the model as "▁X", "1." and the model can carry the period along with the mask ("X1. konnte nicht
    geöffnet werden"). Cut as "▁X", "1", "." the mask is the letter-digit pair the model copies and the period
    stays at the sentence's end (engine/protect.py).
    """
    if not boundaries:
        return pieces
    out = []
    for piece, (begin, end) in pieces:
        tail = []
        for b in sorted((b for b in boundaries if begin < b < end), reverse=True):
            right = text[b:end]
            left = piece[:len(piece) - len(right)]
            if (not right.strip() or right != right.strip() or not piece.endswith(right) or not left
                    or not (known(piece) and known(left) and known(right))):
                continue
            tail.append((right, (b, end)))
            piece, end = left, b
        out.append((piece, (begin, end)))
        out.extend(reversed(tail))
    return out


class SentencePieceTokenizer:
    """One sentencepiece model shared by source and target; token ids are the model's piece ids."""

    def __init__(self, folder: Path) -> None:
        self.sp = spm.SentencePieceProcessor(model_file=str(folder / "spm.model"))
        self.unk_id = self.sp.unk_id()

    def encode_source(self, text: str, boundaries: tuple[int, ...] = ()) -> list[int]:
        """Source ids, eos not appended; pieces cut at ``boundaries`` (:func:`split_at_boundaries`)."""
        if not boundaries:
            return self.sp.encode(text)
        return [self.sp.piece_to_id(p) for p, _ in self._split(text, boundaries)]

    def _split(self, text: str, boundaries: tuple[int, ...]) -> list[tuple[str, tuple[int, int]]]:
        return split_at_boundaries(_pieces_with_spans(self.sp, text), text, boundaries,
                                   lambda p: self.sp.piece_to_id(p) != self.unk_id)

    def encode_target(self, text: str) -> list[int]:
        """Target ids (for a forced target prefix)."""
        return self.sp.encode(text)

    def source_pieces(self, text: str, boundaries: tuple[int, ...] = ()) -> list[str]:
        if not boundaries:
            return self.sp.encode(text, out_type=str)
        return [p for p, _ in self._split(text, boundaries)]

    def source_char_spans(self, text: str, boundaries: tuple[int, ...] = ()) -> list[tuple[int, int]]:
        """Character range of each source piece in ``text`` (eos excluded)."""
        return [span for _, span in self._split(text, boundaries)]

    def target_pieces(self, ids: list[int]) -> list[str]:
        return [self.sp.id_to_piece(i) for i in ids]

    def unknown_source_pieces(self, text: str) -> list[str]:
        """Source substrings the vocabulary maps to unk, in order."""
        return [p.surface for p in self.sp.encode(text, return_type="proto").pieces if p.id == self.unk_id]

    def unknown_target_pieces(self, text: str) -> list[str]:
        """Target-side substrings the vocabulary maps to unk, in order (a forced target prefix's)."""
        return self.unknown_source_pieces(text)

    def unknown_source_spans(self, text: str) -> list[tuple[int, int]]:
        """Character ranges of ``text`` that the vocabulary maps to unk, in order; sentencepiece keeps a run of
        unknown characters in one piece ("😀🙈", "中文", "Русский")."""
        return _strip_spaces(text, [span for piece, span in _pieces_with_spans(self.sp, text)
                                    if self.sp.piece_to_id(piece) == self.unk_id])

    def decode_target(self, ids: list[int], unknowns: list[str] | None = None) -> str:
        """Ids -> text; with ``unknowns``, the k-th unk becomes the k-th unknown source substring (UNK_TEXT past
        the last)."""
        if unknowns is None or self.unk_id not in ids:
            return self.sp.decode(ids)
        queue = iter(unknowns)
        return self.sp.decode_pieces([next(queue, UNK_TEXT) if i == self.unk_id else self.sp.id_to_piece(i) for i in ids])


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

    def encode_source(self, text: str, boundaries: tuple[int, ...] = ()) -> list[int]:
        """Source ids, eos not appended; pieces cut at ``boundaries`` (:func:`split_at_boundaries`)."""
        return self._ids(self.source_pieces(text, boundaries))

    def _split(self, text: str, boundaries: tuple[int, ...]) -> list[tuple[str, tuple[int, int]]]:
        return split_at_boundaries(_pieces_with_spans(self.source, text), text, boundaries, self.vocab.__contains__)

    def encode_target(self, text: str) -> list[int]:
        return self._ids(self.target.encode(text, out_type=str))

    def source_pieces(self, text: str, boundaries: tuple[int, ...] = ()) -> list[str]:
        if not boundaries:
            return self.source.encode(text, out_type=str)
        return [p for p, _ in self._split(text, boundaries)]

    def source_char_spans(self, text: str, boundaries: tuple[int, ...] = ()) -> list[tuple[int, int]]:
        """Character range of each source piece in ``text`` (eos excluded)."""
        return [span for _, span in self._split(text, boundaries)]

    def target_pieces(self, ids: list[int]) -> list[str]:
        return [self.pieces.get(i, "<unk>") for i in ids]

    def unknown_source_pieces(self, text: str) -> list[str]:
        return [p.surface for p in self.source.encode(text, return_type="proto").pieces if p.piece not in self.vocab]

    def unknown_source_spans(self, text: str) -> list[tuple[int, int]]:
        """Character ranges of ``text`` whose source pieces vocab.json lacks, in order."""
        return _strip_spaces(text, [span for piece, span in _pieces_with_spans(self.source, text)
                                    if piece not in self.vocab])

    def unknown_target_pieces(self, text: str) -> list[str]:
        """Target-side substrings (target.spm) that vocab.json lacks, in order (a forced target prefix's)."""
        return [p.surface for p in self.target.encode(text, return_type="proto").pieces if p.piece not in self.vocab]

    def decode_target(self, ids: list[int], unknowns: list[str] | None = None) -> str:
        queue = iter(unknowns or [])
        pieces = []
        for i in ids:
            if i == self.unk_id:
                pieces.append(next(queue, UNK_TEXT) if unknowns is not None else "<unk>")
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
