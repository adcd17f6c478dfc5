"""Engine search on a scripted step function whose probabilities are a hand-written table (fairseq-style)."""

import math

import numpy as np
import pytest

from engine.rules import Rules, Sampling
from engine.search import StepStats, TopCandidates, beam_search, gnmt_length_penalty, greedy_search, top_k_for

PAD, UNK, BOS, EOS, A, B, C = range(7)
VOCAB = 7
# P(next | last token). Greedy follows a (.5) -> b (.6) -> eos (.9): "a b", p = .27.
# Beam 2 finds "b" (p = .4 * .9 = .36), better than greedy's path.
TABLE = {
    BOS: {A: 0.5, B: 0.4, C: 0.1},
    A: {EOS: 0.3, B: 0.6, C: 0.1},
    B: {EOS: 0.9, A: 0.1},
    C: {EOS: 1.0},
}


def scripted_step(tokens, self_k, self_v, cross_k, cross_v, src_mask):
    rows = tokens.shape[0]
    log_probs = np.full((rows, VOCAB), np.log(1e-12), dtype=np.float32)
    for r, last in enumerate(tokens[:, 0]):
        for tok, p in TABLE.get(int(last), {EOS: 1.0}).items():
            log_probs[r, tok] = np.log(p)
    return log_probs, grown(self_k), grown(self_v)


def grown(cache):
    """A per-layer cache [rows, heads, past_len, d_head] one position longer, as a real decoder step returns."""
    return [np.concatenate([c, np.zeros(c.shape[:2] + (1,) + c.shape[3:], dtype=np.float32)], axis=2)
            for c in cache]


def encoder_outputs(batch: int):
    cross = [np.zeros((batch, 1, 3, 2), dtype=np.float32)]  # one layer, one head, src_len 3, d_head 2
    return cross, cross, np.ones((batch, 3), dtype=bool)


def test_greedy_follows_the_argmax_path():
    (hyp,) = greedy_search(scripted_step, *encoder_outputs(1), [10], BOS, EOS)
    assert hyp.tokens == [A, B]
    assert math.isclose(hyp.score, math.log(0.5 * 0.6 * 0.9), rel_tol=1e-5)


def test_beam_finds_the_better_hypothesis_greedy_misses():
    (hyps,) = beam_search(scripted_step, *encoder_outputs(1), [10], BOS, EOS, beam_size=2, length_penalty=0.0,
                          n_best=2)
    # Step 2's "a eos" (.15) ranks 3rd of the candidates, below beam_size: dropped. Step 3 finishes "a b" (.27).
    assert [h.tokens for h in hyps] == [[B], [A, B]]
    assert math.isclose(hyps[0].score, math.log(0.36), rel_tol=1e-5)
    assert math.isclose(hyps[1].score, math.log(0.27), rel_tol=1e-5)


def test_length_penalty_is_gnmt_and_ranks_by_normalized_score():
    assert math.isclose(gnmt_length_penalty(7, 0.6), (12 / 6) ** 0.6)
    (hyps,) = beam_search(scripted_step, *encoder_outputs(1), [10], BOS, EOS, beam_size=2, length_penalty=1.0,
                          n_best=2)
    for h in hyps:
        assert math.isclose(h.ranking_score, h.score / ((5 + len(h.tokens) + 1) / 6), rel_tol=1e-6)
    assert hyps[0].ranking_score >= hyps[1].ranking_score


def test_max_length_finalizes_live_beams():
    (hyps,) = beam_search(scripted_step, *encoder_outputs(1), [1], BOS, EOS, beam_size=2, length_penalty=0.0,
                          n_best=2)
    assert [h.tokens for h in hyps] == [[A], [B]]
    (greedy,) = greedy_search(scripted_step, *encoder_outputs(1), [1], BOS, EOS)
    assert greedy.tokens == [A]


@pytest.mark.parametrize("beam_size", [1, 2, 3])
def test_min_length_forbids_early_eos(beam_size):
    if beam_size == 1:
        hyps = [greedy_search(scripted_step, *encoder_outputs(1), [10], BOS, EOS, rules=Rules(min_length=3))[0]]
    else:
        hyps = beam_search(scripted_step, *encoder_outputs(1), [10], BOS, EOS, beam_size=beam_size,
                           length_penalty=0.0, n_best=beam_size,
                           rules=Rules(min_length=3))[0]
    assert hyps and all(len(h.tokens) >= 3 for h in hyps)


def test_finished_sentences_leave_the_batch():
    # Sentence 0 may run 1 step, sentence 1 ten: after step 1 only sentence 1's rows are computed.
    stats = StepStats()
    out = greedy_search(scripted_step, *encoder_outputs(2), [1, 10], BOS, EOS, stats=stats)
    assert [h.tokens for h in out] == [[A], [A, B]]
    assert stats.steps == 3 and stats.rows == 2 + 1 + 1


@pytest.mark.parametrize("beam_size", [1, 2])
def test_cancelled_sentences_leave_the_batch_and_others_are_unharmed(beam_size):
    stats = StepStats()
    cancel_after_first_step = {"steps": 0}

    def step(*args):
        cancel_after_first_step["steps"] += 1
        return scripted_step(*args)

    def is_cancelled(sentence):  # sentence 0 is abandoned once decoding has started
        return sentence == 0 and cancel_after_first_step["steps"] >= 1

    if beam_size == 1:
        out = greedy_search(step, *encoder_outputs(2), [10, 10], BOS, EOS, stats=stats, is_cancelled=is_cancelled)
        assert out[0] is None and out[1].tokens == [A, B]
    else:
        out = beam_search(step, *encoder_outputs(2), [10, 10], BOS, EOS, beam_size=2, length_penalty=0.0,
                          stats=stats, is_cancelled=is_cancelled)
        assert out[0] == [] and [h.tokens for h in out[1]] == [[B]]
    # Step 1 computed both sentences; every later step only sentence 1's rows.
    assert stats.rows == 2 + (stats.steps - 1) * beam_size


def test_eos_ranked_below_beam_size_is_not_finalized():
    # After bos: a .5, b .3, eos .2 -> with beam 2 the eos candidate ranks 3rd (>= beam_size): dropped, not finished.
    table = {BOS: {A: 0.5, B: 0.3, EOS: 0.2}, A: {EOS: 1.0}, B: {EOS: 1.0}}

    def step(tokens, self_k, self_v, cross_k, cross_v, src_mask):
        log_probs = np.full((tokens.shape[0], VOCAB), np.log(1e-12), dtype=np.float32)
        for r, last in enumerate(tokens[:, 0]):
            for tok, p in table[int(last)].items():
                log_probs[r, tok] = np.log(p)
        return log_probs, grown(self_k), grown(self_v)

    (hyps,) = beam_search(step, *encoder_outputs(1), [10], BOS, EOS, beam_size=2, length_penalty=0.0, n_best=2)
    assert [h.tokens for h in hyps] == [[A], [B]]


def _random_step(vocab: int, seed: int, levels: int = 6):
    """A step whose log-probs depend on (last token, past length) through a fixed random table with few distinct
    values, so that ties are common; returns it and its top-k twin (ties by lower id, as ONNX TopK)."""
    table = np.log(np.random.default_rng(seed).integers(1, levels + 1, size=(vocab, 64, vocab)) / levels)
    table = (table - np.logaddexp.reduce(table, axis=2, keepdims=True)).astype(np.float32)

    def full(tokens, self_k, self_v, cross_k, cross_v, src_mask):
        past = self_k[0].shape[2]
        return table[tokens[:, 0], past].copy(), grown(self_k), grown(self_v)

    def top(tokens, self_k, self_v, cross_k, cross_v, src_mask, top_k):
        log_probs, k, v = full(tokens, self_k, self_v, cross_k, cross_v, src_mask)
        order = np.argsort(-log_probs, axis=1, kind="stable")[:, :top_k]
        return TopCandidates(np.take_along_axis(log_probs, order, 1), order, vocab), k, v

    return full, top


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("beam_size", [1, 2, 4])
@pytest.mark.parametrize("rules", [Rules(), Rules(banned_ids=(PAD,)), Rules(banned_ids=(PAD, UNK), min_length=3)])
def test_top_k_steps_give_exactly_the_full_vocabulary_result(seed, beam_size, rules):
    """Module docstring of engine/search.py: the search over each row's top k equals the one over all tokens,
    tie order included; three sentences of different length limits, so rows leave mid-batch."""
    full, top = _random_step(vocab=12, seed=seed)
    limits = [3, 9, 6]
    if beam_size == 1:
        want = greedy_search(full, *encoder_outputs(3), limits, BOS, EOS, rules=rules)
        got = greedy_search(top, *encoder_outputs(3), limits, BOS, EOS, rules=rules, use_top_k=True)
    else:
        want = beam_search(full, *encoder_outputs(3), limits, BOS, EOS, beam_size=beam_size, length_penalty=0.6,
                           n_best=beam_size, rules=rules)
        got = beam_search(top, *encoder_outputs(3), limits, BOS, EOS, beam_size=beam_size, length_penalty=0.6,
                          n_best=beam_size, rules=rules, use_top_k=True)
    assert got == want


def test_top_k_is_not_used_when_a_rule_needs_the_whole_row():
    assert top_k_for(Rules(banned_ids=(PAD,), min_length=2), 8) == 8 + 1 + 1
    for rules in (Rules(repetition_penalty=1.2), Rules(no_repeat_ngram_size=2), Rules(prefixes=((A,),))):
        assert top_k_for(rules, 8) is None
    assert top_k_for(Rules(), 1, Sampling(topk=5, seed=0)) is None


def test_top_k_breaks_ties_made_by_float32_rounding_like_the_full_search():
    """A beam score plus three different log-probs (-1e-7, -1.5e-7, -2e-7) round to the same float32 sum (-20): the
    full search ranks them by lower flat index (eos, id 3, first); the top-k search must too, not by log-prob."""
    vocab = 10

    def full(tokens, self_k, self_v, cross_k, cross_v, src_mask):
        past = self_k[0].shape[2]
        log_probs = np.full((tokens.shape[0], vocab), -30.0, dtype=np.float32)
        for r, last in enumerate(tokens[:, 0]):
            if past == 0:
                log_probs[r, 4], log_probs[r, 5] = -20.0, -20.5
            elif past == 1 and last == 4:
                log_probs[r, 6], log_probs[r, 7], log_probs[r, EOS] = -1e-7, -1.5e-7, -2e-7
            else:
                log_probs[r, EOS] = -0.01
        return log_probs, grown(self_k), grown(self_v)

    def top(tokens, self_k, self_v, cross_k, cross_v, src_mask, top_k):
        log_probs, k, v = full(tokens, self_k, self_v, cross_k, cross_v, src_mask)
        order = np.argsort(-log_probs, axis=1, kind="stable")[:, :top_k]
        return TopCandidates(np.take_along_axis(log_probs, order, 1), order, vocab), k, v

    assert np.float32(-20.0) + np.float32(-1e-7) == np.float32(-20.0) + np.float32(-2e-7)
    options = dict(beam_size=2, length_penalty=0.0, n_best=2)
    want = beam_search(full, *encoder_outputs(1), [10], BOS, EOS, **options)
    assert want[0][0].tokens == [4]  # eos won the rounding tie
    assert beam_search(top, *encoder_outputs(1), [10], BOS, EOS, use_top_k=True, **options) == want
