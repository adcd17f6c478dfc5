"""The ONNX Runtime engine on the bundled model: greedy == beam 1, batch invariance, input rules, options."""

import math
from pathlib import Path

import pytest

from engine.errors import InputTooLongError, InvalidRequestError
from engine.options import DecodingOptions
from engine.core import CoreStats, EngineCore
from engine.search import BeamSearch

from conftest import SENTENCES


def test_device_cuda_without_a_working_cuda_provider_is_a_clear_error(artifact):
    """onnxruntime-gpu falls back to the CPU silently when CUDA cannot load; the engine reads the provider that
    really runs and refuses device "cuda" instead of pretending; where CUDA works, "cuda" gets it."""
    import onnxruntime as ort

    from engine.errors import EngineUnavailableError
    from engine.runtime import EngineConfig
    from engine.translator import Translator

    auto = Translator(artifact, EngineConfig(device="auto"))
    probe = ort.InferenceSession(str(Path(artifact) / "decoder_step.onnx"),
                                 providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert auto.provider == probe.get_providers()[0]
    assert "CUDAExecutionProvider" in ort.get_available_providers()  # the GPU build is what the project installs
    if auto.provider == "CUDAExecutionProvider":  # a machine where CUDA works: "cuda" gets it
        assert Translator(artifact, EngineConfig(device="cuda")).provider == "CUDAExecutionProvider"
        return
    with pytest.raises(EngineUnavailableError, match="device 'cuda' requested"):
        Translator(artifact, EngineConfig(device="cuda"))


def decode_with(core: EngineCore, src: list[list[int]], options: DecodingOptions):
    """Decodes every source in ``core``; returns each one's hypotheses, in order."""
    handles = [core.submit(ids, options) for ids in src]
    results = {}
    while core.has_work:
        for done in core.step():
            assert done.error is None
            results[done.handle] = done.hypotheses
    return [results[h] for h in handles]


def test_greedy_equals_beam_size_one(translator):
    src = [translator.tokenize(s) for s in SENTENCES]
    greedy = translator.translate_ids(src, DecodingOptions(beam_size=1))

    class BeamOneCore(EngineCore):  # beam_size 1 through the beam search strategy (the core picks greedy)
        def _search(self, src_len, options, prefix):
            return BeamSearch(options.length_limit(src_len, self.max_positions), self.bos_id, self.eos_id, 1,
                              options.length_penalty, 1)

    beam = decode_with(BeamOneCore(translator.model, bos_id=translator.bos_id, eos_id=translator.eos_id,
                                   pad_id=translator.pad_id, max_positions=translator.max_positions),
                       src, DecodingOptions(beam_size=1))
    for g, b in zip(greedy, beam):
        assert b[0].tokens == g[0].tokens
        assert b[0].score == pytest.approx(g[0].score, abs=1e-6)


@pytest.mark.parametrize("beam_size", [1, 4])
def test_batch_invariance(translator, beam_size):
    """Same tokens and score alone, in a batch of mixed lengths, and in reversed order."""
    options = DecodingOptions(beam_size=beam_size, n_best=beam_size)
    src = [translator.tokenize(s) for s in SENTENCES]
    alone = [translator.translate_ids([ids], options)[0] for ids in src]
    batched = translator.translate_ids(src, options)
    reversed_ = translator.translate_ids(src[::-1], options)[::-1]
    for a, b, r in zip(alone, batched, reversed_):
        assert [h.tokens for h in a] == [h.tokens for h in b] == [h.tokens for h in r]
        for ha, hb, hr in zip(a, b, r):
            assert hb.score == pytest.approx(ha.score, abs=1e-4)
            assert hr.score == pytest.approx(ha.score, abs=1e-4)


@pytest.mark.parametrize("length_penalty, n_best", [(0.0, 1), (0.6, 2)])
def test_beam_search_stops_early_only_where_that_changes_nothing(translator, monkeypatch, length_penalty, n_best):
    """engine/search.py's settled stop against the full rule (beam_size finished hypotheses or the limit) on real
    sentences: the same hypotheses in the same order, in fewer decoder rows."""
    options = DecodingOptions(beam_size=4, length_penalty=length_penalty, n_best=n_best)
    src = [translator.tokenize(s) for s in SENTENCES]
    early, full = CoreStats(), CoreStats()
    got = translator.translate_ids(src, options, early)
    monkeypatch.setattr(BeamSearch, "settled", lambda self, live_scores: False)
    want = translator.translate_ids(src, options, full)
    for g, w in zip(got, want):
        assert [h.tokens for h in g] == [h.tokens for h in w]
        assert [h.score for h in g] == pytest.approx([h.score for h in w], abs=1e-4)  # batches differ as rows leave
    assert early.rows < full.rows


def test_batch_invariance_across_token_budget_chunks(artifact):
    """A tiny max_batch_tokens cuts the batch into many chunks; outputs must not change."""
    from engine.runtime import EngineConfig
    from engine.translator import Translator

    small = Translator(artifact, EngineConfig(device="cpu", max_batch_tokens=20))
    big = Translator(artifact, EngineConfig(device="cpu"))
    options = DecodingOptions(beam_size=2)
    assert [t.text for t in small.translate(SENTENCES, options)] == [t.text for t in big.translate(SENTENCES, options)]


def test_max_batches_reaches_the_core_from_the_config_and_the_service_args(artifact):
    import pydantic

    from engine.runtime import EngineConfig
    from engine.translator import Translator
    from service.config import AppArgs

    one = Translator(artifact, EngineConfig(device="cpu", max_batches=1))
    assert one.new_core().max_batches == 1 and one.new_core(policy="static").max_batches == 1
    assert Translator(artifact, EngineConfig(device="cpu", max_batches=3)).new_core().max_batches == 3
    assert AppArgs(max_batches=3).max_batches == 3
    with pytest.raises(ValueError, match="max_batches"):
        EngineConfig(max_batches=0)
    with pytest.raises(pydantic.ValidationError, match="max_batches"):
        AppArgs(max_batches=0)


def test_intra_op_threads_spin_only_when_asked(artifact):
    """ONNX Runtime's intra-op threads busy-wait between kernels by default; the engine's sessions (decoder step,
    encoder, top-k) turn that off unless EngineConfig.intra_op_spinning asks for it (a replica shares its cores)."""
    from engine.runtime import EngineConfig
    from engine.translator import Translator

    key = "session.intra_op.allow_spinning"
    quiet = Translator(artifact, EngineConfig(device="cpu", intra_op_threads=2)).model
    spinning = Translator(artifact, EngineConfig(device="cpu", intra_op_threads=2, intra_op_spinning=True)).model
    for session in (quiet.decoder, quiet.encoder, quiet.top_k.session):
        options = session.get_session_options()
        assert options.get_session_config_entry(key) == "0" and options.intra_op_num_threads == 2
    assert spinning.decoder.get_session_options().get_session_config_entry(key) == "1"


def test_a_replica_takes_as_many_threads_as_ray_reserved_cpus():
    """service.app.engine_threads: intra_op_threads 0 in the service means the replica's reserved CPUs (at least
    1), not ONNX Runtime's every physical core of the host; a count given is kept; no reservation, ONNX Runtime's
    choice."""
    from service.app import engine_threads

    assert engine_threads(0, {"CPU": 2.0}) == 2
    assert engine_threads(0, {"CPU": 0.5, "memory": 1e9}) == 1
    assert engine_threads(3, {"CPU": 1.0}) == 3
    assert engine_threads(0, {}) == 0


def test_empty_and_whitespace_input_translate_to_empty_without_decoding(translator):
    stats = CoreStats()
    out = translator.translate(["", "   \n\t", "\u200b\u200b\ufeff "], DecodingOptions(), stats=stats)
    assert [t.text for t in out] == ["", "", ""]
    assert stats.steps == 0


def test_too_long_input_is_a_clear_error(translator):
    text = " ".join(["document"] * (translator.max_src_tokens + 5))
    with pytest.raises(InputTooLongError, match=f"limit {translator.max_src_tokens}"):
        translator.translate([text])


def test_n_best_is_sorted_distinct_and_bounded(translator):
    (t,) = translator.translate([SENTENCES[1]], DecodingOptions(beam_size=4, n_best=4, length_penalty=0.6))
    assert len(t.n_best) == 4
    texts = [text for text, _ in t.n_best]
    assert len(set(texts)) == 4
    ranking = [score / ((5 + n) / 6) ** 0.6 for (_, score), n in
               zip(t.n_best, [len(translator.tokenizer.encode_target(x)) + 1 for x in texts])]
    assert t.text == texts[0] and t.score == t.n_best[0][1]
    # Ranking scores are non-increasing (token counts re-derived from text are exact for sentencepiece ids
    # only approximately, so allow a small slack).
    assert all(a >= b - 0.05 for a, b in zip(ranking, ranking[1:]))


def test_max_length_caps_generated_tokens(translator):
    src = [translator.tokenize(SENTENCES[3])]
    (hyps,) = translator.translate_ids(src, DecodingOptions(beam_size=4, max_length=3))
    assert len(hyps[0].tokens) <= 3


def test_finished_rows_leave_the_batch(translator):
    """Greedy: a sentence computes one row per step until its eos (or its length limit), never after: the rows
    computed are exactly the sum of the sentences' own steps, far fewer than steps x batch."""
    stats = CoreStats()
    src = [translator.tokenize(s) for s in SENTENCES]
    options = DecodingOptions(beam_size=1)
    out = translator.translate_ids(src, options, stats)
    limits = [options.length_limit(len(ids), translator.max_positions) for ids in src]
    own_steps = [len(h[0].tokens) + (len(h[0].tokens) < limit) for h, limit in zip(out, limits)]
    assert stats.rows == sum(own_steps) < stats.steps * len(src)


@pytest.mark.parametrize("kwargs", [dict(beam_size=0), dict(beam_size=99), dict(beam_size=2, n_best=3),
                                    dict(length_penalty=-1.0), dict(length_penalty=math.nan), dict(max_length=0),
                                    dict(min_length=-1)])
def test_invalid_options_raise_with_a_message(kwargs):
    with pytest.raises(InvalidRequestError, match="must be"):
        DecodingOptions(**kwargs)


def test_an_artifact_of_another_format_version_is_refused_with_a_message(artifact, tmp_path):
    import json
    import shutil

    from engine.runtime import EngineConfig
    from engine.translator import Translator

    old = tmp_path / "old"
    shutil.copytree(artifact, old)
    manifest = json.loads((old / "manifest.json").read_text())
    (old / "manifest.json").write_text(json.dumps(dict(manifest, format_version=1)))
    with pytest.raises(ValueError, match="artifact format 1.*re-export"):
        Translator(old, EngineConfig(device="cpu"))


@pytest.mark.parametrize("kwargs", [dict(beam_size=1), dict(beam_size=4, n_best=4), dict(beam_size=4, min_length=12),
                                    dict(beam_size=1, min_length=12)])
def test_top_k_scores_give_the_full_vocabulary_result(translator, kwargs):
    """The engine can read each row's top-k only (engine/top_k.py); the result must be the one of the full
    log-probs, n-best lists and scores included."""
    options = DecodingOptions(**kwargs)
    src = [translator.tokenize(s) for s in SENTENCES]
    top_k_core = translator.new_core()
    assert top_k_core.has_top_k
    top_k_core.device_top_k = True  # the CPU default is an argmax over full rows for greedy; test top-k here
    full_core = translator.new_core()
    full_core.has_top_k = False
    for a, b in zip(decode_with(top_k_core, src, options), decode_with(full_core, src, options)):
        assert [(h.tokens, h.score) for h in a] == [(h.tokens, h.score) for h in b]


def test_token_id_sources_longer_than_the_model_allows_are_refused(translator):
    """translate() checks lengths when it tokenizes; callers that pass ids directly get the same error."""
    too_long = [5] * translator.max_src_tokens + [translator.eos_id]
    with pytest.raises(InputTooLongError, match="limit"):
        translator.translate_ids([too_long], DecodingOptions())


def test_greedy_without_scores_skips_the_log_softmax_and_chooses_the_same_tokens(translator, monkeypatch):
    """Format 7: the step gives logits and the engine applies the log-softmax itself; a step whose rows all take a
    plain argmax and report no score skips it (a row's log-softmax moves all its logits by one number). Beside a
    beam-4 sentence, which reads log-probs, it runs, and the scoreless sentence still decodes as alone."""
    calls = []
    log_softmax = translator.model.log_softmax
    monkeypatch.setattr(translator.model, "log_softmax", lambda x: calls.append(len(x)) or log_softmax(x))
    src = [translator.tokenize(s) for s in SENTENCES]
    for extra in (dict(), dict(min_length=12)):  # min_length bans eos in the logits as in the log-probs
        scored = translator.translate_ids(src, DecodingOptions(beam_size=1, **extra))
        assert calls and all(math.isfinite(h[0].score) for h in scored)
        calls.clear()
        scoreless = translator.translate_ids(src, DecodingOptions(beam_size=1, return_scores=False, **extra))
        assert calls == []
        assert [h[0].tokens for h in scoreless] == [h[0].tokens for h in scored]
        assert all(math.isnan(h[0].score) for h in scoreless)
    core = translator.new_core()
    greedy, beam = DecodingOptions(beam_size=1, return_scores=False), DecodingOptions(beam_size=4)
    handles = [(core.submit(ids, greedy), core.submit(ids, beam)) for ids in src]
    results = {}
    while core.has_work:
        results.update((done.handle, done.hypotheses) for done in core.step())
    assert calls  # the beam rows' steps
    alone_greedy, alone_beam = translator.translate_ids(src, DecodingOptions(beam_size=1)), translator.translate_ids(
        src, beam)
    for (g, b), s, a in zip(handles, alone_greedy, alone_beam):
        assert results[g][0].tokens == s[0].tokens and math.isnan(results[g][0].score)
        assert [(h.tokens, h.score) for h in results[b]] == [(h.tokens, h.score) for h in a]
    # The device path (I/O binding; CUDA's, here on the CPU provider): greedy reads each row's top-1 where the
    # step ran, of the logits when no score is asked for.
    from engine.runtime import EngineConfig
    from engine.translator import Translator

    device = Translator(translator.artifact_dir, EngineConfig(device="cpu", io_binding=True))
    assert device.new_core().device_top_k
    device_calls = []
    device_log_softmax = device.model.log_softmax
    monkeypatch.setattr(device.model, "log_softmax", lambda x: device_calls.append(1) or device_log_softmax(x))
    scoreless = device.translate_ids(src, DecodingOptions(beam_size=1, return_scores=False))
    assert device_calls == [] and [h[0].tokens for h in scoreless] == [h[0].tokens for h in alone_greedy]
    scored = device.translate_ids(src, DecodingOptions(beam_size=1))
    assert device_calls and [(h[0].tokens, h[0].score) for h in scored] == [(h[0].tokens, h[0].score)
                                                                            for h in alone_greedy]
