"""Each decoding option shows its effect on the bundled model through the ONNX engine."""

import json
import shutil

import pytest

from engine.errors import InvalidRequestError
from engine.options import DecodingOptions
from engine.segmentation import split
from service.schemas import TranslateRequest

from conftest import SENTENCES

# Forces long outputs, where a small model starts repeating itself.
LONG = {"min_length": 40, "max_length": 40, "max_length_a": 10.0}


def ngrams(tokens, n):
    return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def decode(translator, text, **options):
    return translator.translate_ids([translator.tokenize(text)], DecodingOptions(**options))[0]


@pytest.mark.parametrize("beam_size", [1, 4])
def test_no_repeat_ngram_size_forbids_repeated_ngrams(translator, beam_size):
    free = decode(translator, SENTENCES[1], beam_size=beam_size, **LONG)[0].tokens
    assert len(set(ngrams(free, 2))) < len(ngrams(free, 2)), "precondition: the free output repeats a bigram"
    for n in (2, 3):
        out = decode(translator, SENTENCES[1], beam_size=beam_size, no_repeat_ngram_size=n, **LONG)[0].tokens
        assert len(out) == 40
        assert len(set(ngrams(out, n))) == len(ngrams(out, n))


def test_repetition_penalty_reduces_repeated_tokens(translator):
    def repeats(tokens):
        return len(tokens) - len(set(tokens))

    free = decode(translator, SENTENCES[1], beam_size=1, **LONG)[0].tokens
    penalized = decode(translator, SENTENCES[1], beam_size=1, repetition_penalty=3.0, **LONG)[0].tokens
    assert repeats(penalized) < repeats(free)


def test_min_length_and_max_length(translator):
    assert len(decode(translator, SENTENCES[4], beam_size=2, min_length=12)[0].tokens) >= 12
    assert len(decode(translator, SENTENCES[3], beam_size=2, max_length=5)[0].tokens) <= 5


def test_sampling_same_seed_same_output_and_seeds_differ(translator):
    options = dict(beam_size=1, sampling_topk=0, sampling_temperature=1.5)
    first = decode(translator, SENTENCES[3], seed=7, **options)[0].tokens
    assert decode(translator, SENTENCES[3], seed=7, **options)[0].tokens == first
    others = {tuple(decode(translator, SENTENCES[3], seed=s, **options)[0].tokens) for s in range(1, 6)}
    assert len(others | {tuple(first)}) > 1
    # In a batch with other sentences, a seeded sentence still gets the same output.
    src = [translator.tokenize(s) for s in (SENTENCES[3], SENTENCES[0], SENTENCES[5])]
    batched = translator.translate_ids(src, DecodingOptions(seed=7, **options))
    assert batched[0][0].tokens == first


def test_sampling_topk_one_is_greedy_and_topp_restricts(translator):
    greedy = decode(translator, SENTENCES[0], beam_size=1)[0].tokens
    assert decode(translator, SENTENCES[0], beam_size=1, sampling_topk=1, seed=3)[0].tokens == greedy
    # A nucleus this small holds only the most likely token: sampling degenerates to greedy.
    nucleus = decode(translator, SENTENCES[0], beam_size=1, sampling_topk=0, sampling_topp=1e-6, seed=3)
    assert nucleus[0].tokens == greedy


def test_sampling_needs_beam_size_one():
    with pytest.raises(InvalidRequestError, match="needs beam_size 1"):
        DecodingOptions(beam_size=4, sampling_topk=10)


@pytest.mark.parametrize("beam_size", [1, 3])
def test_target_prefix_forces_the_start(translator, beam_size):
    prefix = translator.tokenizer.encode_target("Bitte")
    src = [translator.tokenize(SENTENCES[0]), translator.tokenize(SENTENCES[2])]
    out = translator.translate_ids(src, DecodingOptions(beam_size=beam_size, n_best=beam_size),
                                   target_prefixes=[prefix, []])
    for hyp in out[0]:
        assert hyp.tokens[: len(prefix)] == prefix
    free = translator.translate_ids(src[1:], DecodingOptions(beam_size=beam_size, n_best=beam_size))
    assert [h.tokens for h in out[1]] == [h.tokens for h in free[0]]  # the unprefixed neighbour is unaffected


@pytest.mark.parametrize("beam_size", [1, 3])
def test_a_target_prefix_fits_in_max_length_or_is_refused(translator, beam_size):
    """A prefix of max_length tokens gives the prefix alone (it got one token more, past max_length); a longer one
    is refused, as the service's 422, instead of overrunning max_length."""
    prefix = translator.tokenizer.encode_target("Bitte klicken Sie auf die Schaltfläche")
    n, src = len(prefix), [translator.tokenize(SENTENCES[0])]
    (out,) = translator.translate_ids(src, DecodingOptions(beam_size=beam_size, max_length=n),
                                      target_prefixes=[prefix])
    assert out[0].tokens[:n] == prefix and len(out[0].tokens) == n
    with pytest.raises(InvalidRequestError, match=f"target_prefix has {n} tokens > max_length={n - 1}"):
        translator.translate_ids(src, DecodingOptions(beam_size=beam_size, max_length=n - 1),
                                 target_prefixes=[prefix])


def test_a_min_length_the_model_cannot_reach_is_refused(translator):
    """The model generates at most max_positions - 1 tokens: a min_length past that is an error, not silently
    lowered; at that limit it is met."""
    most, src = translator.max_positions - 1, [translator.tokenize(SENTENCES[0])]
    with pytest.raises(InvalidRequestError, match=f"min_length={most + 1} > {most}"):
        translator.translate_ids(src, DecodingOptions(beam_size=1, min_length=most + 1, max_length=4096))
    (out,) = translator.translate_ids(src, DecodingOptions(beam_size=1, min_length=most, max_length=4096))
    assert len(out[0].tokens) == most


def test_length_penalty_changes_the_ranking_by_length(translator):
    src = [translator.tokenize(s) for s in SENTENCES]
    short = translator.translate_ids(src, DecodingOptions(beam_size=4, length_penalty=0.0))
    long = translator.translate_ids(src, DecodingOptions(beam_size=4, length_penalty=2.0))
    assert sum(len(h[0].tokens) for h in long) >= sum(len(h[0].tokens) for h in short)


def test_unknown_characters_are_copied_or_shown_as_unk(translator):
    text = "Click 😀 to save the file."
    assert "😀" in translator.unknown_pieces(text)
    (hyp,) = decode(translator, text, beam_size=2)
    if translator.tokenizer.unk_id in hyp.tokens:
        assert "😀" in translator.detokenize(hyp.tokens, translator.unknown_pieces(text))
        assert "⁇" in translator.detokenize(hyp.tokens)
    assert "⁇" not in translator.detokenize(hyp.tokens, translator.unknown_pieces(text))


def test_an_unk_past_the_source_unknowns_shows_as_unk(translator):
    """The model may write more unks than the source has unknown substrings: the extra one shows as "⁇" (it was
    dropped on the plain-text path and shown on the markup path)."""
    tok = translator.tokenizer
    words = tok.encode_target("Klicken Sie hier")
    ids = words[:1] + [tok.unk_id] + words[1:] + [tok.unk_id, translator.eos_id]
    text = translator.detokenize(ids, ["😀"])
    assert text.count("😀") == 1 and text.count("⁇") == 1 and text.index("😀") < text.index("⁇"), text
    assert text.replace("😀", "").replace("⁇", "").split() == translator.detokenize(words).split()


def test_model_config_supplies_per_request_defaults(artifact, tmp_path):
    from engine.runtime import EngineConfig
    from engine.translator import Translator

    copy = tmp_path / "art"
    shutil.copytree(artifact, copy)
    config = json.loads((copy / "config.json").read_text())
    config["decoding_defaults"] = {"beam_size": 2, "length_penalty": 1.0}
    (copy / "config.json").write_text(json.dumps(config))
    translator = Translator(copy, EngineConfig(device="cpu"))
    assert translator.default_options == DecodingOptions(beam_size=2, length_penalty=1.0)
    # Only the fields a client sends override the model's defaults.
    options = TranslateRequest(text="x", n_best=2).decoding_options(translator.default_options)
    assert (options.beam_size, options.length_penalty, options.n_best) == (2, 1.0, 2)


def test_sentence_splitting_keeps_the_layout():
    text = "  The file could not be opened. Dr. Smith clicked the button.\n\nSelect the cell.\r\n"
    seg = split(text)
    assert seg.sentences == ["The file could not be opened.", "Dr. Smith clicked the button.", "Select the cell."]
    assert seg.join(seg.sentences) == text
    assert seg.join(["A", "B", "C"]) == "  A B\n\nC\r\n"
    assert split("   \n ").sentences == []
    assert split("\u200b\u200b\ufeff \n\u200b").sentences == []  # invisible characters only: blank, kept as layout
    assert split("\u200b\u200b\ufeff \n\u200b").join([]) == "\u200b\u200b\ufeff \n\u200b"
    assert split("e\u0301\u0000x").sentences == ["\u00e9x"]  # NFC, control characters dropped


@pytest.mark.parametrize("beam_size", [1, 4])
def test_return_attention_gives_a_distribution_per_output_token(translator, beam_size):
    import numpy as np

    src = [translator.tokenize(s) for s in (SENTENCES[0], SENTENCES[3])]  # mixed lengths: padding in the batch
    out = translator.translate_ids(src, DecodingOptions(beam_size=beam_size, return_attention=True))
    plain = translator.translate_ids(src, DecodingOptions(beam_size=beam_size))
    for ids, (hyp,), (ref,) in zip(src, out, plain):
        assert hyp.tokens == ref.tokens  # asking for attention changes nothing else
        assert len(hyp.attention) == len(hyp.tokens)
        for row in hyp.attention:
            assert row.shape == (len(ids),)
            assert abs(float(row.sum()) - 1.0) < 1e-4
    # The attention of a sentence is the same alone and in the batch.
    (alone,) = translator.translate_ids(src[:1], DecodingOptions(beam_size=beam_size, return_attention=True))
    np.testing.assert_allclose(np.stack(alone[0].attention), np.stack(out[0][0].attention), atol=1e-4)


def test_forced_prefix_never_yields_infinite_scores(translator):
    """Forcing leaves one finite candidate per beam: forbidden (-inf) candidates must never become hypotheses."""
    import math

    prefix = translator.tokenizer.encode_target("Die Datei konnte nicht geöffnet werden und der Drucker")
    options = DecodingOptions(beam_size=4, n_best=4, max_length_a=0.0, max_length_b=2)
    (hyps,) = translator.translate_ids([translator.tokenize(SENTENCES[0])], options, target_prefixes=[prefix])
    assert hyps and all(math.isfinite(h.score) for h in hyps)
    assert all(h.tokens[: len(prefix)] == prefix for h in hyps)


def test_forced_prefix_keeps_scores_log_probabilities_under_other_rules(translator):
    prefix = translator.tokenizer.encode_target("Die Die Die")
    options = DecodingOptions(beam_size=1, no_repeat_ngram_size=1)
    (hyps,) = translator.translate_ids([translator.tokenize(SENTENCES[0])], options, target_prefixes=[prefix])
    assert hyps[0].tokens[: len(prefix)] == prefix
    assert -1000 < hyps[0].score < 0


def test_unseeded_sampling_differs_between_identical_sentences(translator):
    ids = translator.tokenize(SENTENCES[3])
    out = translator.translate_ids([ids] * 4, DecodingOptions(beam_size=1, sampling_topk=0,
                                                              sampling_temperature=1.5))
    assert len({tuple(h[0].tokens) for h in out}) > 1


def test_low_temperature_sampling_is_greedy_not_nan(translator):
    greedy = decode(translator, SENTENCES[0], beam_size=1)[0].tokens
    cold = decode(translator, SENTENCES[0], beam_size=1, sampling_topk=0, sampling_temperature=1e-3, seed=1)
    assert cold[0].tokens == greedy
    with pytest.raises(InvalidRequestError, match="sampling_temperature"):
        DecodingOptions(beam_size=1, sampling_topk=2, sampling_temperature=1e-40)


def test_min_length_wins_over_the_source_length_bound(translator):
    assert len(decode(translator, "Hi.", beam_size=2, min_length=30)[0].tokens) >= 30


def test_sentence_splitter_sees_bounded_windows(monkeypatch):
    """pysbd's cost grows faster than linearly: it must never be handed more than WINDOW characters."""
    from engine import segmentation

    seen = []
    real = segmentation._segmenter()

    class Recorder:
        def segment(self, text):
            seen.append(len(text))
            return real.segment(text)

    monkeypatch.setattr(segmentation, "_segmenter", lambda: Recorder())
    for text in [("a) b) c) " * 1000)[:2000], "word " * 400, "x" * 1500, "Fine. " * 300]:
        seg = segmentation.split(text)
        assert seg.join(seg.sentences) == text
    assert max(seen) <= segmentation.WINDOW


@pytest.mark.parametrize("body", [b'{"text": "Hello \\ud800 world."}', b'{"text": "\\udfff"}',
                                  b'{"text": ["x\\ud800"]}'])
def test_a_lone_surrogate_escape_is_refused_with_what_it_means(body):
    """pydantic's JSON parser refuses these with "unexpected end of hex escape" or "lone leading surrogate" (for
    a trailing one too); the 422's message says the text is not valid Unicode and what to send instead."""
    from pydantic import ValidationError

    from service.errors import validation_message

    with pytest.raises(ValidationError) as caught:
        TranslateRequest.model_validate_json(body)
    message = validation_message(caught.value.errors())
    assert "not valid Unicode" in message and "high-low pair" in message, message


def test_the_engine_refuses_text_that_is_not_valid_unicode(translator):
    with pytest.raises(InvalidRequestError, match="not valid Unicode"):
        translator.tokenize("Hello \ud800 world.")
