"""Protected spans: what a translation must copy exactly (placeholders, URLs, numbers, a client's terms), masked
before the model sees the sentence and restored after, placed by the model's own cross-attention when the model
drops a mask.

The bundled model was trained on text whose format specifiers and markup the corpus cleaning removed, so it cannot
learn to copy them; it does copy short letter-digit tokens such as ``X1`` (measured on the bundled model: "Deleted
X1 files from X2." -> "X1-Dateien aus X2. gelöscht"). Each span becomes such a mask, chosen so that no mask occurs in
the text; after translation each mask is put back exactly once: extra copies are dropped, a missing one is inserted
after the target token that attends most to the mask's source tokens (the "detag and project" placement of
Hanneman & Dinu, WMT 2020, applied to placeholders).
"""

from __future__ import annotations

import dataclasses
import itertools
import re
import string

import numpy as np

from engine.errors import InvalidRequestError


# Kinds of span, most specific first: an earlier kind wins where two overlap.
PATTERNS: list[tuple[str, str]] = [
    ("url", r"\b(?:https?|ftp)://[^\s<>\"']*[^\s<>\"'.,;:!?)\]]|\bwww\.[\w-]+(?:\.[\w-]+)+(?:/[^\s<>\"']*[^\s<>\"'.,;:!?)\]])?"),
    ("email", r"\b[\w.+-]+@[\w-]+(?:\.[\w-]+)+\b"),
    # printf: %s %d %5.2f %1$s %-10s %lld; %(name)s; %% ; Qt/Windows %1. No space flag: "100% sure" is no "% s".
    ("printf", r"%\([A-Za-z_]\w*\)[-+#0]*\d*(?:\.\d+)?[diouxXeEfFgGcrsa]"
               r"|%(?:\d+\$)?[-+#0]*(?:\d+|\*)?(?:\.(?:\d+|\*))?(?:hh|h|ll|l|L|q|j|z|t)?[diouxXeEfFgGaAcspn%]"
               r"|%\d+"),
    ("braces", r"\{\{[^{}\n]{0,64}\}\}|\{[^{}\s]{0,64}\}"),
    ("variable", r"\$\{[A-Za-z_]\w*\}|\$[A-Z_][A-Z0-9_]*\b"),
    ("path", r"(?<![\w/.~])(?:~|\.{1,2})?/[\w.-]+(?:/[\w.-]+)*/?|\b[A-Za-z]:\\(?:[\w.-]+\\)*[\w.-]*"),
    ("date", r"\b\d{4}-\d{2}-\d{2}(?:[T ]\d{2}:\d{2}(?::\d{2})?)?\b|\b\d{1,2}[./]\d{1,2}[./]\d{2,4}\b"
             r"|\b\d{1,2}:\d{2}(?::\d{2})?\b"),
    ("version", r"\bv?\d+(?:\.\d+){2,3}(?:[-+][\w.]+)?\b"),
    ("number", r"(?<![\w.,])\d+(?:[.,]\d+)*(?![\w])"),
]
_SPANS = re.compile("|".join(f"(?P<{kind}>{pattern})" for kind, pattern in PATTERNS))
# Emoji: pictographs (U+1F000-U+1FAFF), the BMP's symbol and dingbat blocks, and what joins or modifies them (ZWJ,
# variation selector 16, keycap, tags, skin tones: inside the first range).
_EMOJI_JOINERS = re.compile("[\u200d\ufe0f\u20e3\U000e0020-\U000e007f]")
_EMOJI = re.compile("[\U0001f000-\U0001faff\u2600-\u27bf\u2b00-\u2bff\u200d\ufe0f\u20e3\U000e0020-\U000e007f]+")
_MASK_PREFIXES = ("X", "Y", "Z", "Q", "XQ", "QX", "ZX", "XZ")
_WORD_RUN = re.compile(r"\w*")
_CAPITALS = string.ascii_uppercase


@dataclasses.dataclass(frozen=True)
class Span:
    start: int  # character offsets in the text
    end: int
    kind: str  # a PATTERNS kind or "term"

    def text(self, source: str) -> str:
        return source[self.start:self.end]


def holds_emoji(text: str) -> bool:
    """Whether ``text`` has a character of the emoji ranges (find_spans masks emoji only)."""
    return _EMOJI.search(text) is not None


def find_spans(text: str, terms: tuple[str, ...] = (), unknown: list[tuple[int, int]] = ()) -> list[Span]:
    """Non-overlapping protected spans of ``text``, in order: the client's ``terms`` (exact, case-sensitive, longest
    first, as whole words: a term that starts or ends with a letter or digit does not match inside a longer word,
    so "pass" leaves "password" alone), then PATTERNS, then the emoji (kind "emoji") within the ``unknown``
    character ranges (a tokenizer's unknown_source_spans: what the model's vocabulary lacks) that none of those
    took, with the digits right after one ("🥇1st": a digit after a mask would read as its number).

    Only emoji of the unknown ranges: the bundled model drops many of them (an emoji put at the start, middle or end
    of 100 test sentences: 20 lost through its unk token, 13 of them in the middle; 0 masked; with the masks at a
    sentence's edges kept out of the model's input, engine/rich_text.py, the words around moved less than with the
    unk token: chrF against the sentence's own translation without the emoji 86.6 -> 92.0, BLEU 26.3 -> 28.2, 28.9
    without the emoji; in the middle 83.4 -> 78.6), while it copies the other unknowns (accents, other scripts,
    typographic quotes) through its unk token well enough that masking them was worse (150 training sentences with
    such characters: BLEU 38.72 -> 36.17, 41 sentences worse and 32 better by chrF)."""
    term_spans: list[Span] = []
    covered = bytearray(len(text))  # characters a term took: an overlap test per match in O(its length)
    for term in sorted({t for t in terms if t.strip()}, key=len, reverse=True):
        pattern = ((r"(?<!\w)" if term[0].isalnum() or term[0] == "_" else "") + re.escape(term)
                   + (r"(?!\w)" if term[-1].isalnum() or term[-1] == "_" else ""))
        for m in re.finditer(pattern, text):
            if not any(covered[m.start():m.end()]):
                term_spans.append(Span(m.start(), m.end(), "term"))
                covered[m.start():m.end()] = b"\x01" * (m.end() - m.start())
    taken, last_end = list(term_spans), 0
    for m in _SPANS.finditer(text):  # in order and apart from each other: only terms and a widened span can clash
        start, end = m.start(), m.end()
        if end < len(text) and text[end].isdigit():  # "%%0A": a digit after a mask would read as its number
            end = _WORD_RUN.match(text, end).end()
        if start >= last_end and not any(covered[start:end]):
            taken.append(Span(start, end, m.lastgroup))
            covered[start:end] = b"\x01" * (end - start)
            last_end = end
    # Emoji last: one inside a URL or placeholder stays part of it ("https://example.com/🎁/card" is one span).
    for emoji in (m for start, end in unknown for m in _EMOJI.finditer(text, start, end)):
        start, end = emoji.start(), emoji.end()
        if end < len(text) and text[end].isdigit() and not covered[end]:  # "🥇1st": the digits go with the mask
            end = _WORD_RUN.match(text, end).end()
        if not any(covered[start:end]) and _EMOJI_JOINERS.sub("", emoji.group()):
            taken.append(Span(start, end, "emoji"))
            covered[start:end] = b"\x01" * (end - start)
    return sorted(taken, key=lambda s: s.start)


def mask_prefix(text: str) -> str:
    """A mask prefix P such that no "P<digit>" occurs in ``text``: the short ones the model copies best first,
    then any two or three capitals.

    Raises:
        InvalidRequestError: a text holding every such prefix followed by a digit (tens of thousands of them).
    """
    used = set(re.findall(r"([A-Z]{1,3})(?=\d)", text))
    for prefix in itertools.chain(_MASK_PREFIXES, (a + b for a in _CAPITALS for b in _CAPITALS),
                                  (a + b + c for a in _CAPITALS for b in _CAPITALS for c in _CAPITALS)):
        if prefix not in used and not any(u.endswith(prefix) for u in used):
            return prefix
    raise InvalidRequestError("the text uses every mask prefix (capitals followed by a digit) this service has")


@dataclasses.dataclass
class Masked:
    """A sentence with its protected spans replaced by masks ``<prefix><number>``, numbered through the whole
    text (so that masks are unique in it)."""

    text: str  # what the model translates
    originals: list[str]  # originals[i] is what the i-th mask of this sentence stands for
    prefix: str
    first: int  # the number of this sentence's first mask
    mask_offsets: list[tuple[int, int]]  # each mask's character range in ``text``

    def mask(self, i: int) -> str:
        return f"{self.prefix}{self.first + i}"


def mask(sentence: str, spans: list[Span], prefix: str, first: int = 1) -> Masked:
    """Replaces ``spans`` (from :func:`find_spans` on ``sentence``) by masks numbered from ``first``."""
    parts, originals, offsets, cursor, length = [], [], [], 0, 0
    for i, span in enumerate(spans):
        parts.append(sentence[cursor:span.start])
        length += span.start - cursor
        token = f"{prefix}{first + i}"
        offsets.append((length, length + len(token)))
        parts.append(token)
        length += len(token)
        originals.append(span.text(sentence))
        cursor = span.end
    parts.append(sentence[cursor:])
    return Masked("".join(parts), originals, prefix, first, offsets)


@dataclasses.dataclass
class Target:
    """A sentence's translation as text, with each target token's character range in it (for alignment), edited in
    place by :meth:`insert` and :meth:`delete`, which keep the ranges in step."""

    text: str
    token_ranges: list[tuple[int, int]]

    @classmethod
    def from_pieces(cls, pieces: list[str]) -> "Target":
        """Sentencepiece pieces ("▁" starts a word) -> text without leading space, and each piece's range."""
        text, ranges = "", []
        for piece in pieces:
            surface = piece.replace("▁", " ")
            if not text:
                surface = surface.lstrip()
            ranges.append((len(text), len(text) + len(surface)))
            text += surface
        return cls(text, ranges)

    def insert(self, at: int, value: str) -> None:
        """Inserts ``value`` at a token boundary ``at``: tokens from there on move right."""
        n = len(value)
        self.text = self.text[:at] + value + self.text[at:]
        self.token_ranges = [(s + n, e + n) if s >= at else (s, e) for s, e in self.token_ranges]

    def delete(self, start: int, end: int) -> None:
        """Deletes characters [start, end): ranges inside shrink to ``start``, later ones move left."""
        n = end - start
        self.text = self.text[:start] + self.text[end:]

        def shift(x: int) -> int:
            return x if x <= start else max(start, x - n)

        self.token_ranges = [(shift(s), shift(e)) for s, e in self.token_ranges]


def source_piece_ranges(pieces: list[str]) -> list[tuple[int, int]]:
    """Character ranges of source pieces in the sentence they were encoded from (sentencepiece drops no character
    but maps the leading "▁" of the first piece to nothing)."""
    ranges, cursor = [], 0
    for k, piece in enumerate(pieces):
        surface = piece.replace("▁", " ")
        if k == 0:
            surface = surface.lstrip()
        ranges.append((cursor, cursor + len(surface)))
        cursor += len(surface)
    return ranges


def aligned_token(attention: np.ndarray, source_ranges: list[tuple[int, int]], start: int, end: int) -> int | None:
    """The target token that gives the source characters [start, end) the most attention mass; None without
    attention. ``attention``: float32 [tgt_len, src_len] (rows: target tokens; the last source column is eos)."""
    columns = [j for j, (s, e) in enumerate(source_ranges) if s < end and start < e]
    if attention is None or not len(attention) or not columns:
        return None
    return int(np.argmax(attention[:, columns].sum(axis=1)))


def restore_masks(masks: list[tuple[str, tuple[int, int]]], target: Target, attention: np.ndarray | None,
                  source_ranges: list[tuple[int, int]], source: str = "") -> None:
    """Makes every mask (its text, and its character range in ``source``, the text the ``source_ranges`` refer
    to) occur exactly once in ``target`` (edited in place): later copies are dropped, a missing mask is inserted
    after its aligned target token (before the final punctuation without attention). A mask the model joined to
    the next word with a hyphen ("X1-Dateien", as German compounds a number) is separated again when the source
    had a space there: "%d files" is "%d Dateien", not "%d-Dateien"."""
    for token, (start, end) in masks:
        pattern = re.compile(re.escape(token) + r"(?!\d)")
        found = list(pattern.finditer(target.text))
        if found and source[end:end + 1].isspace():
            joined = re.compile(re.escape(token) + r"-(?=[^\W\d_])").search(target.text)
            if joined:
                target.text = target.text[:joined.end() - 1] + " " + target.text[joined.end():]
        for m in reversed(found[1:]):
            cut = m.start() - (1 if m.start() > 0 and target.text[m.start() - 1] == " " else 0)
            target.delete(cut, m.end())
        if found:
            continue
        k = aligned_token(attention, source_ranges, start, end)
        if k is None or k >= len(target.token_ranges):
            at = len(target.text.rstrip(".!?:;"))
        else:
            at = target.token_ranges[k][1]
        for m in re.finditer(re.escape(token.rstrip("0123456789")) + r"\d+", target.text):
            if m.start() < at < m.end():  # not inside another mask ("X" of "X2" aligned)
                at = m.end()
        target.insert(at, (" " if at > 0 and target.text[at - 1] != " " else "") + token)
    if masks:  # what the model made up in the masks' shape ("X777", another sentence's mask) goes
        prefix = masks[0][0].rstrip("0123456789")
        mine = {token for token, _ in masks}
        for m in reversed(list(re.finditer(r"(?<![A-Za-z])" + re.escape(prefix) + r"\d+", target.text))):
            if m.group() not in mine:
                target.delete(m.start() - (1 if m.start() > 0 and target.text[m.start() - 1] == " " else 0), m.end())


def unmask(text: str, originals: dict[str, str]) -> str:
    """Every mask of ``originals`` (mask -> what to write instead) in ``text`` replaced. Masks are unique in the
    whole input (one prefix per text, numbered through it), so a plain replacement is exact."""
    if not originals:
        return text
    pattern = re.compile("(?:" + "|".join(re.escape(m) for m in sorted(originals, key=len, reverse=True)) + r")(?!\d)")
    return pattern.sub(lambda m: originals[m.group()], text)
