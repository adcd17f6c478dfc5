"""Casings the model has not seen: a sentence in all capitals is translated in sentence case and its translation
put back in capitals. The corpus is mixed-case text (software strings and documentation), and the bundled model
turns "THE FILE COULD NOT BE OPENED." into "THE DATEI COULDICHENDICHEN" (issue #14)."""

from __future__ import annotations

import re

_WORD = re.compile(r"[^\W\d_]+")


def is_all_caps(text: str, keep: re.Pattern | None = None) -> bool:
    """True when ``text`` has at least two words of letters and every cased letter is upper case; parts matching
    ``keep`` (masks) do not count."""
    if keep is not None:
        text = keep.sub(" ", text)
    words = _WORD.findall(text)
    return len(words) >= 2 and any(c.isalpha() for c in text) and text == text.upper() and text != text.lower()


def _outside(text: str, keep: re.Pattern | None, change) -> str:
    """``change`` applied to the parts of ``text`` that ``keep`` (masks) does not match."""
    parts, cursor = [], 0
    for m in (keep.finditer(text) if keep is not None else ()):
        parts.append(change(text[cursor:m.start()]))
        parts.append(m.group())
        cursor = m.end()
    parts.append(change(text[cursor:]))
    return "".join(parts)


def to_sentence_case(text: str, keep: re.Pattern | None = None) -> str:
    """Lower case with the first letter capitalized; parts matching ``keep`` (masks) are left as they are."""
    lowered = _outside(text, keep, str.lower)
    first = re.search(r"[^\W\d_]", lowered)
    if first is None or (keep is not None and any(m.start() <= first.start() < m.end() for m in keep.finditer(lowered))):
        return lowered
    return lowered[:first.start()] + lowered[first.start()].upper() + lowered[first.start() + 1:]


def to_upper(text: str, keep: re.Pattern | None = None) -> str:
    """Upper case, leaving parts matching ``keep`` (masks) as they are."""
    return _outside(text, keep, str.upper)
