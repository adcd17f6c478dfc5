"""A translation request's texts to the engine's sentences, and the engine's hypotheses back to the response.

Pure functions of a :class:`engine.translator.Translator` and a request (no Ray, no event loop), which the replica
(service/app.py) calls on either side of decoding: :func:`prepare` parses each text in its format, masks its
protected spans, splits it into sentences and tokenizes them; :func:`translations` joins each text's sentence
hypotheses back into its layout (markup, masks, case, unknown characters restored), with scores, n_best and
alignments when asked.
"""

from __future__ import annotations

import dataclasses

from engine import rich_text
from engine.options import DecodingOptions, check_target_lengths
from engine.search import Hypothesis
from engine.translator import Translator
from service import schemas


@dataclasses.dataclass
class Sentence:
    """One sentence to decode: its source ids (eos last) and, for a text's first sentence, a forced target prefix."""

    src_ids: list[int]
    prefix: list[int] | None = None  # forced target prefix ids


def prepare(translator: Translator, texts: list[str], prefixes: list[str | None], req: schemas.TranslateRequest,
            options: DecodingOptions) -> tuple[list[rich_text.Prepared], list[Sentence]]:
    """Parses texts (req.format), masks their protected spans, splits them into sentences and tokenizes them;
    ``options``: the request's (its max_length bounds a target_prefix). Returns each text's prepared form and all
    their sentences, text by text.

    Raises:
        InputTooLongError: an over-long sentence.
        InvalidRequestError: malformed XML; a target_prefix longer than max_length.
    """
    terms = tuple(req.protected_terms)
    # Emoji are masked and copied (replace_unknowns), as placeholders are; not in a text with a target_prefix,
    # which the model's input must start as the client's prefix does (an emoji kept out of the input would come
    # back before the prefix, one masked would come back beside the prefix's own).
    unknown = translator.tokenizer.unknown_source_spans if req.replace_unknowns else None
    segmented = [rich_text.prepare(text, req.format, req.split_sentences, terms,
                                   unknown if prefix is None else None) for text, prefix in zip(texts, prefixes)]
    sentences = []
    for i, (seg, prefix) in enumerate(zip(segmented, prefixes)):
        prefix_ids = translator.tokenizer.encode_target(prefix) if prefix else None
        if prefix_ids:
            check_target_lengths(options, translator.max_positions, len(prefix_ids), f"target_prefix[{i}]")
        for j, (sentence, boundaries) in enumerate(zip(seg.sentences, seg.boundaries)):
            sentences.append(Sentence(translator.tokenize(sentence, boundaries), prefix_ids if j == 0 else None))
    return segmented, sentences


def unknowns(translator: Translator, req: schemas.TranslateRequest, seg: rich_text.Prepared,
             prefix: str | None) -> list[list[str] | None]:
    """Per sentence of ``seg``, what its output's unk tokens become, in order: the source substrings the
    vocabulary lacks (``replace_unknowns``), else None (shown as "⁇"). A forced ``target_prefix`` is the first
    sentence's first tokens, and its own unknown characters (an emoji) come back as the client wrote them, first,
    whatever ``replace_unknowns`` says: the prefix is kept whole."""
    per_sentence = [translator.unknown_pieces(s) if req.replace_unknowns else None for s in seg.sentences]
    own = translator.tokenizer.unknown_target_pieces(prefix) if prefix and per_sentence else []
    if own:
        per_sentence[0] = own + (per_sentence[0] or [])  # the model's own unks then show as UNK_TEXT
    return per_sentence


def translations(translator: Translator, req: schemas.TranslateRequest, segmented: list[rich_text.Prepared],
                 outcomes: list[list[Hypothesis]]) -> list[schemas.Translation]:
    """Each text's translation from its sentences' hypotheses (``outcomes``: per sentence, best first, in the
    order :func:`prepare` gave the sentences)."""
    out, cursor = [], 0
    for seg, prefix in zip(segmented, req.prefixes()):
        per_sentence = outcomes[cursor:cursor + len(seg.sentences)]
        cursor += len(seg.sentences)
        out.append(translation(translator, req, seg, prefix, per_sentence))
    return out


def translation(translator: Translator, req: schemas.TranslateRequest, seg: rich_text.Prepared,
                prefix: str | None, hyps: list[list[Hypothesis]]) -> schemas.Translation:
    """One text's translation: :func:`render`, with per-sentence alignments when ``req.return_attention``."""
    result = render(translator, seg, hyps, unknowns(translator, req, seg, prefix), req.return_scores)
    if req.return_attention:
        result.attention = [attention(translator, sentence, boundaries, h[0])
                            for sentence, boundaries, h in zip(seg.sentences, seg.boundaries, hyps)]
    return result


def render(translator: Translator, seg: rich_text.Prepared, hyps: list[list[Hypothesis]],
           unknown_texts: list[list[str] | None], return_scores: bool) -> schemas.Translation:
    """Joins sentence translations into the text's layout (``unknown_texts``: what each sentence's unks become,
    :func:`unknowns`). n_best[k] joins each sentence's k-th hypothesis (its last one if it has fewer); its score is
    the sum over sentences."""
    if not seg.sentences:  # nothing to translate: "" for blank text, the markup as it was for markup
        text = seg.render([], translator.tokenizer, []) if seg.format != "text" else ""
        return schemas.Translation(text=text, score=0.0 if return_scores else None,
                                   n_best=[schemas.Hypothesis(text=text, score=0.0)] if return_scores else None)
    n = max(len(h) for h in hyps) if return_scores else 1
    joined = []
    for k in range(n):
        picks = [h[min(k, len(h) - 1)] for h in hyps]
        text = seg.render(picks, translator.tokenizer, unknown_texts)
        joined.append(schemas.Hypothesis(text=text, score=sum(p.score for p in picks)))
    if not return_scores:
        return schemas.Translation(text=joined[0].text)
    return schemas.Translation(text=joined[0].text, score=joined[0].score, n_best=joined)


def attention(translator: Translator, sentence: str, boundaries: tuple[int, ...],
              hyp: Hypothesis) -> schemas.SentenceAttention:
    """A sentence's alignment as the response gives it: source and target pieces, and per target token its
    cross-attention over the source pieces (rounded to 5 decimals)."""
    tokenizer = translator.tokenizer
    return schemas.SentenceAttention(
        source_tokens=tokenizer.source_pieces(sentence, boundaries) + tokenizer.target_pieces([translator.eos_id]),
        target_tokens=tokenizer.target_pieces(hyp.tokens),
        weights=[[round(float(w), 5) for w in row] for row in hyp.attention or []])
