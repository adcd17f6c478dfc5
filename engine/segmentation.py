"""Input text -> sentences to translate, and the translations -> output text with the original layout.

Line breaks split first (each line is translated on its own); within a line, pysbd (a rule-based sentence
boundary detector; Sadvilkar & Neumann 2020) finds sentences, so "Dr. Smith" or "3.5" do not split. Whitespace
between and around sentences, and every line break, are kept verbatim in the output.
"""

from __future__ import annotations

import dataclasses
import re
import threading
import unicodedata

import pysbd

# C0/C1 control characters except tab and the line breaks (layout, kept).
_CONTROL = re.compile(r"[\x00-\x08\x0e-\x1b\x1f\x7f-\x84\x86-\x9f]")
# What str.splitlines breaks at, but U+2028/U+2029, which pysbd already takes as sentence ends: a form feed or
# vertical tab between two sentences was dropped, and the two were translated as one ("aus.Click die").
_LINE_BREAK = re.compile(r"(\r\n|[\n\r\x0b\x0c\x1c-\x1e\x85])")
# Invisible format characters (zero-width space/joiners, word joiner, byte order mark, soft hyphen): a text of only
# these and whitespace is blank, not a sentence (the model turned "\u200b\u200b\ufeff" into ".").
_INVISIBLE = re.compile("[\u00ad\u200b-\u200f\u2060-\u2064\ufeff]")


def is_blank(text: str) -> bool:
    """True for text of only whitespace and invisible format characters."""
    return not _INVISIBLE.sub("", text).strip()


def normalize(text: str) -> str:
    """NFC-normalizes and drops control characters; line breaks and tabs stay."""
    return _CONTROL.sub("", unicodedata.normalize("NFC", text))


# pysbd compiles its patterns through the re module's cache (512 entries in CPython 3.11), and builds many of them
# from the text itself (the abbreviations and quotes it finds), so on a long text those evict its fixed patterns,
# which it then compiles again window after window: with room for REGEX_CACHE a 300-sentence text of the test split
# is split in 54 ms instead of 93 ms here (docs/performance.md, Continuous batching). re._MAXCACHE is private, but every
# CPython since 3.7 reads it at each call; where it is missing this does nothing.
REGEX_CACHE = 2048
if 0 < getattr(re, "_MAXCACHE", 0) < REGEX_CACHE:
    re._MAXCACHE = REGEX_CACHE

# pysbd's time grows faster than linearly with the length of what it is given (2,000 characters of "a) b) c) "
# took 3.2 s): it sees windows of at most this many characters, cut after whitespace that follows a sentence-final
# mark where possible, so the cost stays linear in the input.
WINDOW = 400
_CUT = re.compile(r"(?<=[.!?;:])\s+")


def _windows(line: str) -> list[str]:
    if len(line) <= WINDOW:
        return [line]
    windows, start = [], 0
    while len(line) - start > WINDOW:
        cuts = [m.end() for m in _CUT.finditer(line, start, start + WINDOW)]
        end = cuts[-1] if cuts and cuts[-1] > start else line.rfind(" ", start, start + WINDOW) + 1
        if end <= start:  # no whitespace at all in the window: a hard cut
            end = start + WINDOW
        windows.append(line[start:end])
        start = end
    windows.append(line[start:])
    return windows


_per_thread = threading.local()


def _segmenter() -> pysbd.Segmenter:
    """This thread's segmenter. One per thread: a pysbd Segmenter keeps the text it is splitting on itself, so two
    threads splitting at once through one segmenter mixed their texts up (the service splits long texts on worker
    threads: under a burst of 60-sentence requests, sentences were merged into runs of several that the model
    returned untranslated, in 39 of 100 answers)."""
    segmenter = getattr(_per_thread, "segmenter", None)
    if segmenter is None:
        segmenter = _per_thread.segmenter = pysbd.Segmenter(language="en", clean=False, char_span=True)
    return segmenter


# Sentences whose splitting compiles most of pysbd's fixed patterns (abbreviations, numbers, quotes, lists,
# parentheses, ellipses), for :func:`warmup`.
_WARMUP_TEXT = (
    "Dr. Smith arrived at 5 p.m. on Jan. 3, 2024, with Mr. Jones and Mrs. Brown. The price rose by 3.5% to "
    "$12.50 (approx. 10 EUR), i.e. more than expected, e.g. in the U.S. and the U.K. \"Is it ready?\" she asked. "
    "\"No!\" he said... Then he left. See www.example.com or write to info@example.com for details. "
    "Step 1. Open the file. Step 2. Click \"Save\". a) the first item, b) the second item; c) the third one. "
    "Fig. 4 shows the results (see Sect. 2.1, p. 7). It works, etc. What now? Nothing. Version 2.0.1 is out! "
    "St. Louis, Calif., and Washington D.C. are cities. He said 'hello' and left. The U.N. met on Mon. at 9 a.m. "
    "Prof. Müller et al. wrote it in vol. 3, no. 12. Call ext. 42 at the dept. The ratio was 1:2. (It was late.) "
    "[Optional] Enter a value - then press OK. Items: apples, pears & plums. Mt. Everest is 8,849 m high. "
    "Select Format > Cells... and choose a style. Don't stop; it's fine. Q&A: Who? When? Where?")


def warmup() -> None:
    """Splits a built-in paragraph, so that a replica's first long text does not pay for compiling pysbd's fixed
    patterns (the first 100-sentence text of the test split took 38 ms cold and 31 ms after this here; 18 ms once
    its own patterns are cached)."""
    split(_WARMUP_TEXT)


@dataclasses.dataclass(frozen=True)
class Segmented:
    """``sentences`` to translate, and ``layout``: literal strings and sentence indices, in output order."""

    sentences: list[str]
    layout: list[str | int]

    def join(self, translations: list[str]) -> str:
        """Puts translations (one per sentence) back into the layout."""
        return "".join(translations[part] if isinstance(part, int) else part for part in self.layout)


def split(text: str, split_sentences: bool = True) -> Segmented:
    """Splits text into sentences (after :func:`normalize`). Whitespace-only text gives no sentences."""
    sentences: list[str] = []
    layout: list[str | int] = []
    for chunk in _LINE_BREAK.split(normalize(text)):
        if is_blank(chunk) or _LINE_BREAK.fullmatch(chunk):
            layout.append(chunk)
            continue
        pieces = [s.sent for w in _windows(chunk) for s in _segmenter().segment(w)] if split_sentences else [chunk]
        cursor = 0
        for piece in pieces:
            stripped = piece.strip()
            if is_blank(stripped):
                continue
            start = chunk.find(stripped, cursor)
            if start < 0:  # pysbd altered the text: the rest of the line becomes one sentence
                stripped = chunk[cursor:].strip()
                if not stripped:
                    break
                start = chunk.find(stripped, cursor)
            layout.append(chunk[cursor:start])
            layout.append(len(sentences))
            sentences.append(stripped)
            cursor = start + len(stripped)
        layout.append(chunk[cursor:])
    return Segmented(sentences, [part for part in layout if part != ""])
