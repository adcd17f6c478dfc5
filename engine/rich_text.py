"""Real-world text around the model: a text (plain, HTML or XML) -> the sentences the model translates, and the
model's hypotheses -> the translated text with its markup, protected spans and casing restored.

- Markup (engine/markup.py): only text is translated; each block's inline content is one *run*, split into
  sentences; its inline elements are put back around the target tokens that attend to their source tokens (the
  argmax of each target token's cross-attention row: the last decoder layer, mean over heads), hulled, then clamped
  so that nesting and sibling order are the source's, which keeps the output well-formed.
- Protected spans (engine/protect.py): masked before translation, each restored exactly once.
- Casing (engine/casing.py): a sentence in all capitals is translated in sentence case and upper-cased back.

Plain text with nothing to protect and no capitals takes exactly the path it took before (segmentation.split and
the tokenizer's decode), so its output does not change.
"""

from __future__ import annotations

import bisect
import dataclasses
import re
from typing import Callable, Literal

import numpy as np

from engine import casing, markup, protect, segmentation
from engine.errors import InvalidRequestError
from engine.search import Hypothesis
from engine.tokenizer import UNK_TEXT

Format = Literal["text", "html", "xml"]
UnknownSpans = Callable[[str], list[tuple[int, int]]]  # text -> character ranges the model's vocabulary lacks
# An element copied verbatim inside a run stands in its text as one private-use character that the text lacks.
_ITEM_CHARS = range(0xE000, 0xF900)
_PUNCTUATION = ",.;:!?"


@dataclasses.dataclass
class InlineSpan:
    """An inline element over run characters [start, end) (of the run's plain text), and those inside it."""

    element: markup.Element
    start: int
    end: int
    children: list["InlineSpan"] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class _Sentence:
    text: str  # masked, as in the run's masked text (its offset there: ``offset``)
    offset: int
    model_input: str  # what the model translates (sentence-cased when all capitals)
    all_caps: bool
    masks: list[tuple[str, tuple[int, int]]]  # the masks in this sentence and their ranges in the masked run
    # Emoji masks (and their spaces) at the sentence's start and end, kept out of the model's input and put back
    # around its translation: a mask at the start changed the words after it (chrF of the rest against the
    # sentence's own translation 81.6 with the unk token, 72.9 masked, over 33 test sentences).
    lead: str = ""
    trail: str = ""

    @property
    def boundaries(self) -> tuple[int, ...]:
        """Where the masks end in ``model_input``: the tokenizer keeps a mask's digits apart from what follows
        ("X1." as "X1", "."), so that the model copies the mask and not the punctuation with it."""
        if len(self.model_input) != len(self.text):
            return ()
        return tuple(end - self.offset for _, (_, end) in self.masks)


@dataclasses.dataclass
class _Run:
    """One stretch of text translated as sentences: the whole text (format text) or a block's inline content."""

    masked: str
    layout: segmentation.Segmented
    sentences: list[_Sentence]
    originals: dict[str, str]  # mask -> what it stands for, escaped for the output format
    spans: list[InlineSpan]
    to_masked: list[int]  # plain-text offset -> masked-text offset (len(plain) + 1 entries)
    plain_path: bool  # nothing masked, no capitals, no markup: rendered exactly as before


@dataclasses.dataclass
class Prepared:
    """A text ready to translate: ``sentences`` (the model's inputs, in order) and how to put the translations
    back (:meth:`render`)."""

    format: Format
    parts: list  # str (markup copied as is) | _Run
    references: dict[str, str]
    needs_attention: bool

    @property
    def sentences(self) -> list[str]:
        return [s.model_input for run in self.runs for s in run.sentences]

    @property
    def boundaries(self) -> list[tuple[int, ...]]:
        """Per sentence (in :attr:`sentences` order), the offsets where its masks end: the ``boundaries`` of
        Translator.tokenize and of the tokenizer's source_pieces."""
        return [s.boundaries for run in self.runs for s in run.sentences]

    @property
    def runs(self) -> list[_Run]:
        return [p for p in self.parts if isinstance(p, _Run)]

    def render(self, hyps: list[Hypothesis], tokenizer, unknowns: list[list[str] | None]) -> str:
        """The translated text from one hypothesis per sentence (in :attr:`sentences` order); ``unknowns[j]``: the
        source substrings the vocabulary lacks in sentence j (copied for unk tokens), or None."""
        out, j = [], 0
        for part in self.parts:
            if isinstance(part, str):
                out.append(part)
                continue
            n = len(part.sentences)
            out.append(self._render_run(part, hyps[j:j + n], tokenizer, unknowns[j:j + n]))
            j += n
        return "".join(out)

    def render_sentence(self, j: int, hyp: Hypothesis, tokenizer, unknowns: list[str] | None) -> str:
        """Sentence j's translation as plain text (masks restored, no markup): a streamed sentence record."""
        k = 0
        for run in self.runs:
            if j < k + len(run.sentences):
                sentence = run.sentences[j - k]
                target = self._target(run, sentence, hyp, tokenizer, unknowns)
                return protect.unmask(sentence.lead + target.text + sentence.trail, run.originals)
            k += len(run.sentences)
        raise IndexError(j)

    def _target(self, run: _Run, sentence: _Sentence, hyp: Hypothesis, tokenizer,
                unknowns: list[str] | None) -> protect.Target:
        queue = iter(unknowns or [])
        # an unk with no unknown left to copy shows as sentencepiece decodes it (its piece reads "<unk>")
        pieces = [next(queue, UNK_TEXT) if i == tokenizer.unk_id else p
                  for i, p in zip(hyp.tokens, tokenizer.target_pieces(hyp.tokens))]
        target = protect.Target.from_pieces(pieces)
        attention = np.asarray(hyp.attention, dtype=np.float32) if hyp.attention else None
        source_ranges = _source_ranges(sentence, tokenizer)
        protect.restore_masks(sentence.masks, target, attention, source_ranges, run.masked)
        if sentence.all_caps:
            _upper(target, run.originals)
        return target

    def _render_run(self, run: _Run, hyps: list[Hypothesis], tokenizer, unknowns: list) -> str:
        if run.plain_path:
            text = run.layout.join([tokenizer.decode_target(h.tokens, u) for h, u in zip(hyps, unknowns)])
            # markup's text comes back as markup: "&lt;b&gt;" was decoded to "<b>" for the model
            return text if self.format == "text" else markup.escape_text(text, self.references)
        pieces, tokens = [], []  # tokens: (start, end) in the run's output, aligned source range
        position = 0
        for part in run.layout.layout:
            if isinstance(part, str):
                pieces.append(part)
                position += len(part)
                continue
            sentence, hyp = run.sentences[part], hyps[part]
            target = self._target(run, sentence, hyp, tokenizer, unknowns[part])
            pieces.append(sentence.lead)
            position += len(sentence.lead)
            attention = np.asarray(hyp.attention, dtype=np.float32) if hyp.attention else None
            source_ranges = _source_ranges(sentence, tokenizer)
            for k, (start, end) in enumerate(target.token_ranges):
                aligned = None
                if attention is not None and k < len(attention) and source_ranges:
                    aligned = source_ranges[int(np.argmax(attention[k, :len(source_ranges)]))]
                tokens.append((position + start, position + end, aligned, attention[k] if aligned else None,
                               source_ranges))
            pieces.append(target.text + sentence.trail)
            position += len(target.text) + len(sentence.trail)
        text = "".join(pieces)
        if self.format == "text":
            return protect.unmask(text, run.originals)
        masks = ([(m.start(), m.end()) for m in re.finditer(
            "(?:" + "|".join(re.escape(k) for k in sorted(run.originals, key=len, reverse=True)) + r")(?!\d)", text)]
            if run.originals else [])
        alignment = _Alignment(tokens)
        spans = [_place(span, run, alignment, text, masks) for span in run.spans]
        _order(spans, (0, len(text)))
        rendered = _emit(text, spans, 0, len(text), self.references)
        return protect.unmask(rendered, run.originals)


def _source_ranges(sentence: _Sentence, tokenizer) -> list[tuple[int, int]]:
    """Character ranges, in the masked run, of the sentence's source pieces (eos excluded); [] when casing
    changed the sentence's length (no alignment then)."""
    if len(sentence.model_input) != len(sentence.text):
        return []
    return [(sentence.offset + s, sentence.offset + e)
            for s, e in tokenizer.source_char_spans(sentence.model_input, sentence.boundaries)]


def _upper(target: protect.Target, originals: dict[str, str]) -> None:
    """Upper-cases a target token by token (keeping each token's range; ß -> SS changes lengths), masks kept."""
    keep = re.compile("(?:" + "|".join(re.escape(m) for m in originals) + r")(?!\d)") if originals else None
    text, ranges, cursor = "", [], 0
    for start, end in target.token_ranges:
        text += casing.to_upper(target.text[cursor:start], keep)
        upper = casing.to_upper(target.text[start:end], keep)
        ranges.append((len(text), len(text) + len(upper)))
        text += upper
        cursor = end
    text += casing.to_upper(target.text[cursor:], keep)
    target.text, target.token_ranges = text, ranges


@dataclasses.dataclass
class _Placed:
    span: InlineSpan
    start: int
    end: int
    children: list["_Placed"]


class _Alignment:
    """A run's target tokens as arrays, grouped by sentence, so that placing an inline element looks only at the
    sentences whose source it overlaps, with numpy passes over their tokens: with Python loops over every token of
    the run, and over each token's source pieces, per element, a block of 800 inline elements took 15.7 s to render
    on the event loop (a replica failed its health checks); now 0.05 s.

    ``tokens``: per target token of the run, in output order, (start, end) in the run's output, the source range
    (of the masked run) its attention's argmax falls on or None, its attention row float32 [>= n source pieces]
    (None when unaligned), and its sentence's source piece ranges (ascending, disjoint; one list per sentence)."""

    def __init__(self, tokens: list) -> None:
        n = len(tokens)
        self.out_start = np.asarray([t[0] for t in tokens], dtype=np.int64).reshape(n)
        self.out_end = np.asarray([t[1] for t in tokens], dtype=np.int64).reshape(n)
        self.aligned = np.asarray([t[2] is not None for t in tokens], dtype=bool).reshape(n)
        self.al_start = np.asarray([t[2][0] if t[2] else 0 for t in tokens], dtype=np.int64).reshape(n)
        self.al_end = np.asarray([t[2][1] if t[2] else 0 for t in tokens], dtype=np.int64).reshape(n)
        # Per sentence with aligned tokens, in run order (so in source and output order): its tokens [lo, hi), its
        # source [src_lo, src_hi), the attention rows of its aligned tokens [k, n_src] and their indices, its
        # pieces' starts and ends; and the furthest output end of an aligned token up to each such sentence.
        self.groups, self.src_lo, self.src_hi, self.end_upto = [], [], [], []
        k, furthest = 0, -1
        while k < n:
            ranges = tokens[k][4]
            j = k
            while j < n and tokens[j][4] is ranges:
                j += 1
            rows = [i for i in range(k, j) if tokens[i][2] is not None]
            if rows:
                furthest = max(furthest, int(self.out_end[rows].max()))
                self.groups.append((k, j, np.asarray(rows), np.stack([tokens[i][3][:len(ranges)] for i in rows]),
                                    np.asarray([r[0] for r in ranges]), np.asarray([r[1] for r in ranges])))
                self.src_lo.append(ranges[0][0])
                self.src_hi.append(ranges[-1][1])
                self.end_upto.append(furthest)
            k = j

    def hull(self, a: int, b: int) -> tuple[int, int] | None:
        """(start, end) in the output spanning the tokens aligned into source [a, b) (a < b); else the token that
        gives the pieces overlapping [a, b) the most attention (the first of equal ones; summed in token order in
        float32, as Python's sum of the row's values did); None when no token attends to them."""
        first = bisect.bisect_right(self.src_hi, a)  # sentences whose source reaches past a ...
        last = bisect.bisect_left(self.src_lo, b)  # ... and starts before b
        if first >= last:
            return None
        lo, hi = self.groups[first][0], self.groups[last - 1][1]
        hit = self.aligned[lo:hi] & (self.al_start[lo:hi] < b) & (a < self.al_end[lo:hi])
        if hit.any():
            return int(self.out_start[lo:hi][hit].min()), int(self.out_end[lo:hi][hit].max())
        best, best_mass = None, np.float32(0.0)
        for _, _, rows_at, rows, starts, ends in self.groups[first:last]:
            pieces = np.flatnonzero((starts < b) & (a < ends))
            if not len(pieces):
                continue
            masses = np.cumsum(rows[:, pieces], axis=1, dtype=np.float32)[:, -1]
            i = int(masses.argmax())
            if masses[i] > best_mass:
                best, best_mass = int(rows_at[i]), masses[i]
        return None if best is None else (int(self.out_start[best]), int(self.out_end[best]))

    def end_before(self, a: int) -> int | None:
        """The furthest output end of a token aligned to source before ``a`` (None: none is)."""
        g = bisect.bisect_right(self.src_hi, a)  # sentences wholly before a: all their aligned tokens count
        furthest = self.end_upto[g - 1] if g else -1
        while g < len(self.groups) and self.src_lo[g] <= a:  # a sentence a falls in: its tokens aligned before a
            lo, hi = self.groups[g][:2]
            before = self.aligned[lo:hi] & (self.al_end[lo:hi] <= a)
            if before.any():
                furthest = max(furthest, int(self.out_end[lo:hi][before].max()))
            g += 1
        return furthest if furthest >= 0 else None


def _whole_words(text: str, start: int, end: int) -> tuple[int, int]:
    """``[start, end)`` of ``text`` with an edge that falls inside a word (subword tokens: "Dan" + "n") moved to the
    word's start or end, whichever keeps the span holding the word's larger part ("Dan<i>n schließen</i>" was
    output); a span inside one word takes the whole word."""
    def word(i: int) -> tuple[int, int] | None:  # the word that i splits, if it splits one
        if not (0 < i < len(text) and text[i - 1].isalnum() and text[i].isalnum()):
            return None
        lo, hi = i, i
        while lo > 0 and text[lo - 1].isalnum():
            lo -= 1
        while hi < len(text) and text[hi].isalnum():
            hi += 1
        return lo, hi

    first, last = word(start), word(end)
    if first is not None and first == last:  # both edges inside one word
        return first
    new_start = start if first is None else (
        first[0] if 2 * (first[1] - start) > first[1] - first[0] else first[1])
    new_end = end if last is None else (last[1] if 2 * (end - last[0]) > last[1] - last[0] else last[0])
    if (first or last) and not any(c.isalnum() for c in text[new_start:new_end]):
        # Less than half of each word it touched, and nothing between: the word it held the larger share of.
        share_first = (first[1] - start) / (first[1] - first[0]) if first else -1.0
        share_last = (end - last[0]) / (last[1] - last[0]) if last else -1.0
        return first if share_first >= share_last else last
    return new_start, new_end


def _place(span: InlineSpan, run: _Run, alignment: _Alignment, text: str, masks: list[tuple[int, int]]) -> _Placed:
    """Where an inline element goes in the run's output: the hull of the target tokens aligned to its source
    characters; else the token giving them the most attention; else an empty element at the end. Never inside a
    mask (``masks``: their ranges in ``text``), which a tag would split."""
    a, b = run.to_masked[span.start], run.to_masked[span.end]
    hull = alignment.hull(a, b) if a < b else None
    if hull is not None:
        start, end = _whole_words(text, *hull)
    else:  # an empty element, or no attention: after the token aligned before it, else at the end
        before = alignment.end_before(a)
        start = end = before if before is not None else (0 if a == 0 else len(text))
    while start < end and text[start].isspace():  # the tag hugs the words, not the space before them
        start += 1
    source = run.masked[a:b].rstrip()
    while start < end and (text[end - 1].isspace() or (text[end - 1] in _PUNCTUATION and
                                                       not source.endswith(tuple(_PUNCTUATION)))):
        end -= 1  # nor the punctuation after them, unless the source element ends with some
    for mask_start, mask_end in masks:
        if mask_start < start < mask_end:
            start = mask_start
        if mask_start < end < mask_end:
            end = mask_end
    return _Placed(span, start, end, [_place(c, run, alignment, text, masks) for c in span.children])


def _order(placed: list[_Placed], bounds: tuple[int, int]) -> None:
    """Clamps elements into their parent and after their previous sibling (source order), recursively: the output
    nests as the source does, so it is well-formed."""
    lo, hi = bounds
    cursor = lo
    for p in placed:
        p.start = min(max(p.start, cursor), hi)
        p.end = min(max(p.end, p.start), hi)
        cursor = p.end
        _order(p.children, (p.start, p.end))


def _emit(text: str, placed: list[_Placed], lo: int, hi: int, references: dict[str, str]) -> str:
    out, cursor = [], lo
    for p in placed:
        out.append(markup.escape_text(text[cursor:p.start], references))
        out.append(p.span.element.start_tag)
        out.append(_emit(text, p.children, p.start, p.end, references))
        out.append(p.span.element.end_tag)
        cursor = p.end
    out.append(markup.escape_text(text[cursor:hi], references))
    return "".join(out)


def _edges(sentence: str, masks: set[str]) -> tuple[str, str, str]:
    """``sentence`` as (lead, middle, trail): the lead and trail are its runs of ``masks`` at the start and end, each
    mask set apart by whitespace from the middle, which is never empty. Linear in the sentence (a regex with a lazy
    middle backtracked over long runs of spaces: 11.5 s for one of 99,000)."""
    by_length = sorted(masks, key=len, reverse=True)  # "X12" before "X1"
    longest = len(by_length[0])
    start = 0
    while True:
        token = next((m for m in by_length if sentence.startswith(m, start)), None)
        after = start + len(token) if token else start
        rest = after
        while rest < len(sentence) and sentence[rest].isspace():
            rest += 1
        if not token or rest == after or rest == len(sentence) or sentence[after].isdigit():
            break
        start = rest
    end = len(sentence)
    while True:
        tail = sentence[max(start, end - longest):end]
        token = next((m for m in by_length if tail.endswith(m)), None)
        before = end - len(token) if token else end
        rest = before
        while rest > start and sentence[rest - 1].isspace():
            rest -= 1
        if not token or rest == before or rest == start:
            break
        end = rest
    return sentence[:start], sentence[start:end], sentence[end:]


def _make_run(plain: str, spans: list[InlineSpan], items: list[str], split_sentences: bool, terms: tuple[str, ...],
              prefix: str, counter: list[int], escape, item_char: str | None = None,
              unknown_spans: UnknownSpans | None = None) -> _Run:
    """A run from its plain text (``item_char`` where ``items`` go, in order), inline spans over it, and masks
    numbered from ``counter[0]`` (advanced)."""
    unknown = []
    # (the tokenizer's pass only where an emoji may be: 0.14 s for 100,000 characters, the check 0.005 s)
    for start, end in unknown_spans(plain) if unknown_spans and protect.holds_emoji(plain) else ():
        # an item's character (itself unknown to the model) is masked as markup: an unknown run is cut around it
        for i in range(start, end + 1):
            if i == end or plain[i] == item_char:
                if i > start:
                    unknown.append((start, i))
                start = i + 1
    found = protect.find_spans(plain, terms, unknown)
    item_spans = ([protect.Span(m.start(), m.end(), "markup") for m in re.finditer(item_char, plain)]
                  if item_char else [])
    spans_to_mask = sorted(item_spans + [s for s in found if not item_char or item_char not in s.text(plain)],
                           key=lambda s: s.start)
    masked = protect.mask(plain, spans_to_mask, prefix, counter[0])
    counter[0] += len(spans_to_mask)
    to_masked, cursor, shift = [], 0, 0
    for span, (ms, me) in zip(spans_to_mask, masked.mask_offsets):
        while cursor < span.start:
            to_masked.append(cursor + shift)
            cursor += 1
        while cursor < span.end:  # inside a protected span: its mask's start
            to_masked.append(ms)
            cursor += 1
        shift = me - span.end
    while cursor <= len(plain):
        to_masked.append(cursor + shift)
        cursor += 1
    items_iter = iter(items)
    originals = {}
    for i, span in enumerate(spans_to_mask):
        originals[masked.mask(i)] = next(items_iter) if span.kind == "markup" else escape(span.text(plain))
    layout = segmentation.split(masked.text, split_sentences)
    keep = re.compile(re.escape(prefix) + r"\d+") if spans_to_mask else None
    emoji = [masked.mask(i) for i, span in enumerate(spans_to_mask) if span.kind == "emoji"]
    edge_masks = set(emoji) if emoji and not spans else set()  # (inline elements are placed by alignment: not here)
    sentences, position, next_mask = [], 0, 0
    for part in layout.layout:
        if isinstance(part, str):
            position += len(part)
            continue
        whole = layout.sentences[part]
        offset = masked.text.find(whole, position)
        offset = position if offset < 0 else offset
        lead, text, trail = _edges(whole, edge_masks) if edge_masks else ("", whole, "")
        offset += len(lead)
        caps = casing.is_all_caps(text, keep)
        masks = []  # masks and sentences are both in text order: one pass over the masks
        while next_mask < len(masked.mask_offsets) and masked.mask_offsets[next_mask][1] <= offset + len(text):
            r = masked.mask_offsets[next_mask]
            if r[0] >= offset:
                masks.append((masked.mask(next_mask), r))
            next_mask += 1
        sentences.append(_Sentence(text, offset, casing.to_sentence_case(text, keep) if caps else text, caps, masks,
                                   lead, trail))
        position = offset + len(text) + len(trail)
    plain_path = not spans_to_mask and not spans and not any(s.all_caps for s in sentences)
    return _Run(masked.text, layout, sentences, originals, spans, to_masked, plain_path)


def prepare(text: str, format: Format = "text", split_sentences: bool = True,
            terms: tuple[str, ...] = (), unknown_spans: UnknownSpans | None = None) -> Prepared:
    """Parses ``text`` as ``format`` and makes its runs. ``unknown_spans`` (a tokenizer's
    ``unknown_source_spans``): what the model's vocabulary lacks, masked and copied like placeholders; None: left
    to the model (it writes unk for some, drops others).

    Raises:
        InvalidRequestError: malformed XML (format "xml"), with where it breaks.
    """
    if format != "html":  # HTML: its text nodes only (flatten below), so that verbatim parts come back as they came
        text = segmentation.normalize(text)
    if format == "xml":  # line breaks that XML 1.0 does not allow in a document: dropped, as other controls are
        text = re.sub("[\x0b\x0c\x1c-\x1e]", "", text)
    prefix = protect.mask_prefix(text)
    counter = [1]
    if format == "text":
        run = _make_run(text, [], [], split_sentences, terms, prefix, counter, lambda s: s,
                        unknown_spans=unknown_spans)
        return Prepared(format, [run], {}, not run.plain_path)
    root, references = markup.parse_html(text) if format == "html" else markup.parse_xml(text)
    parts: list = []
    item_char = next((chr(c) for c in _ITEM_CHARS if chr(c) not in text), None)
    if item_char is None:
        raise InvalidRequestError("the text uses every private-use character from U+E000 to U+F8FF; this service "
                                  "needs one of them free to mark verbatim elements")

    def escape(s: str) -> str:
        return markup.escape_text(s, references)

    def flush(nodes: list) -> None:
        plain, items, spans = [], [], []
        size = [0]  # len("".join(plain)), kept as it grows (summing it per element was quadratic in elements)

        def add(piece: str) -> None:
            plain.append(piece)
            size[0] += len(piece)

        def flatten(node_list, into):
            for node in node_list:
                if isinstance(node, markup.Text):
                    add(segmentation.normalize(node.text) if format == "html" else node.text)
                elif isinstance(node, markup.Raw) or node.verbatim or not node.children and node.end_tag == "":
                    add(item_char)
                    items.append(node.markup if isinstance(node, markup.Raw) else markup.serialize(node, references))
                else:
                    span = InlineSpan(node, size[0], size[0])
                    flatten(node.children, span.children)
                    span.end = size[0]
                    into.append(span)

        flatten(nodes, spans)
        joined = "".join(plain)
        if segmentation.is_blank(joined.replace(item_char, "")):
            parts.append("".join(markup.serialize(n, references) for n in nodes))
        else:
            parts.append(_make_run(joined, spans, items, True, terms, prefix, counter, escape, item_char,
                                   unknown_spans))
        nodes.clear()

    def walk(element: markup.Element) -> None:
        pending: list = []
        for child in element.children:
            if isinstance(child, markup.Text) or (isinstance(child, markup.Element) and child.inline):
                pending.append(child)
                continue
            if pending:
                flush(pending)
            if isinstance(child, markup.Raw) or child.verbatim:
                parts.append(markup.serialize(child, references))
            else:
                parts.append(child.start_tag)
                walk(child)
                parts.append(child.end_tag)
        if pending:
            flush(pending)

    walk(root)
    merged: list = []
    for part in parts:  # adjacent literal markup as one string
        if isinstance(part, str) and merged and isinstance(merged[-1], str):
            merged[-1] += part
        else:
            merged.append(part)
    return Prepared(format, merged, references, True)


def translate(translator, texts: list[str], options=None, format: Format = "text",
              terms: tuple[str, ...] = ()) -> list[str]:
    """Translates whole texts offline (no service): each parsed as ``format`` (emoji masked, as the service's
    replace_unknowns does), its sentences decoded together with attention, put back by :meth:`Prepared.render`.
    ``translator``: engine.translator.Translator; ``options``: its DecodingOptions (default: the model's).

    Raises:
        InvalidRequestError: malformed XML; InputTooLongError: an over-long sentence.
    """
    options = dataclasses.replace(options or translator.default_options, return_attention=True)
    prepared = [prepare(t, format, True, terms, translator.tokenizer.unknown_source_spans) for t in texts]
    sentences = [(s, b) for p in prepared for s, b in zip(p.sentences, p.boundaries)]
    hyps = translator.translate_ids([translator.tokenize(s, b) for s, b in sentences], options)
    out, j = [], 0
    for p in prepared:
        n = len(p.sentences)
        best = [h[0] if h else Hypothesis([], 0.0, 0.0, []) for h in hyps[j:j + n]]
        unknowns = [translator.unknown_pieces(s) for s in p.sentences[:n]]
        out.append(p.render(best, translator.tokenizer, unknowns))
        j += n
    return out
