"""Engine search on a scripted step function whose probabilities are a hand-written table (fairseq-style)."""

import math

import numpy as np
import pytest

from engine.core import EngineCore
from engine.options import DecodingOptions
from engine.rules import Rules, Sampling
from engine.candidates import TopCandidates
from engine.search import BeamSearch, GreedySearch, Hypothesis, _candidates_from_top, gnmt_length_penalty, top_k_for
from engine.state_ops import NumpyOps

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


def table_step(table):
    """A step function: log_probs [rows, VOCAB] from ``table`` {last token: {next token: P}} (eos after a token the
    table does not name)."""
    def step(tokens, positions):
        log_probs = np.full((tokens.shape[0], VOCAB), np.log(1e-12), dtype=np.float32)
        for r, last in enumerate(tokens):
            for tok, p in table.get(int(last), {EOS: 1.0}).items():
                log_probs[r, tok] = np.log(p)
        return log_probs
    return step


scripted_step = table_step(TABLE)


class ScriptedModel:
    """The engine core's model interface over ``fn(last tokens int64 [rows], positions int64 [rows]) -> log_probs
    [rows, vocab]``: one layer, one head, d_head 2; full log-probs only (no top_k)."""

    ops = NumpyOps()

    def __init__(self, fn) -> None:
        self.fn, self.calls = fn, 0

    def encode(self, src_ids, src_mask):
        cross = [np.zeros((src_ids.shape[0], 1, src_ids.shape[1], 2), dtype=np.float32)]
        return cross, cross

    def step(self, tokens, self_k, self_v, cross_k, cross_v, src_mask, top_k=None, *, positions, row_sentence,
             check_nan=True):
        self.calls += 1
        # Format 5: a preallocated cache, one buffer per tensor, with room for every row's next key/value.
        assert all(c.shape[0] == tokens.shape[0] for c in self_k + self_v)
        assert positions.shape == (tokens.shape[0],) and positions.max() < self_k[0].shape[2]
        assert len({id(c) for c in self_k + self_v}) == len(self_k + self_v)
        # Cross K/V and the source mask once per sentence, every row assigned to one of them (format 4).
        # A sentence's rows may be anywhere in the buffers (the core moves as few as it can), each sentence has one.
        row_sentence = np.arange(tokens.shape[0]) if row_sentence is None else row_sentence  # row i: sentence i
        assert row_sentence.shape == (tokens.shape[0],)
        assert cross_k[0].shape[0] == src_mask.shape[0] == row_sentence.max() + 1 == len(np.unique(row_sentence))
        return (self.fn(tokens[:, 0], positions), self_k, self_v,
                np.zeros((tokens.shape[0], src_mask.shape[1]), dtype=np.float32))


class ScriptedTopKModel(ScriptedModel):
    """As ScriptedModel, plus each row's top k (ties by lower id, as ONNX TopK): the core then reads top-k."""

    def top_k(self, log_probs, k):
        order = np.argsort(-log_probs, axis=1, kind="stable")[:, :k]
        return TopCandidates(np.take_along_axis(log_probs, order, 1), order, log_probs.shape[1])


def options(beam_size=1, limit=10, **kwargs):
    """DecodingOptions whose length limit is ``limit`` steps whatever the source."""
    return DecodingOptions(beam_size=beam_size, max_length=limit, max_length_a=0.0, max_length_b=limit,
                           length_penalty=kwargs.pop("length_penalty", 0.0), **kwargs)


def decode(model, *sentence_options, banned=(PAD,), stats=None, abort_after=None):
    """Decodes one sentence per DecodingOptions in one engine core; returns their hypotheses lists in order.
    ``abort_after``: (sentence index, step) to abort that sentence after that many steps."""
    core = EngineCore(model, bos_id=BOS, eos_id=EOS, pad_id=PAD, max_positions=64, banned_ids=banned)
    handles = [core.submit([A, EOS], o) for o in sentence_options]
    results = {}
    while core.has_work:
        if abort_after is not None and core.stats.steps == abort_after[1]:
            core.abort(handles[abort_after[0]])
        for done in core.step():
            assert done.error is None
            results[done.handle] = done.hypotheses
    if stats is not None:
        stats.append(core.stats)
    return [results[h] for h in handles]


def test_greedy_follows_the_argmax_path():
    ((hyp,),) = decode(ScriptedModel(scripted_step), options())
    assert hyp.tokens == [A, B]
    assert math.isclose(hyp.score, math.log(0.5 * 0.6 * 0.9), rel_tol=1e-5)


def test_beam_finds_the_better_hypothesis_greedy_misses():
    (hyps,) = decode(ScriptedModel(scripted_step), options(beam_size=2, n_best=2))
    # Step 2's "a eos" (.15) ranks 3rd of the candidates, below beam_size: dropped. Step 3 finishes "a b" (.27).
    assert [h.tokens for h in hyps] == [[B], [A, B]]
    assert math.isclose(hyps[0].score, math.log(0.36), rel_tol=1e-5)
    assert math.isclose(hyps[1].score, math.log(0.27), rel_tol=1e-5)


def test_length_penalty_is_gnmt_and_ranks_by_normalized_score():
    assert math.isclose(gnmt_length_penalty(7, 0.6), (12 / 6) ** 0.6)
    (hyps,) = decode(ScriptedModel(scripted_step), options(beam_size=2, n_best=2, length_penalty=1.0))
    for h in hyps:
        assert math.isclose(h.ranking_score, h.score / ((5 + len(h.tokens) + 1) / 6), rel_tol=1e-6)
    assert hyps[0].ranking_score >= hyps[1].ranking_score


def test_max_length_finalizes_live_beams():
    (hyps,) = decode(ScriptedModel(scripted_step), options(beam_size=2, n_best=2, limit=1))
    assert [h.tokens for h in hyps] == [[A], [B]]
    ((greedy,),) = decode(ScriptedModel(scripted_step), options(limit=1))
    assert greedy.tokens == [A]


@pytest.mark.parametrize("beam_size", [1, 2, 3])
def test_min_length_forbids_early_eos(beam_size):
    (hyps,) = decode(ScriptedModel(scripted_step), options(beam_size=beam_size, n_best=beam_size, min_length=3))
    assert hyps and all(len(h.tokens) >= 3 for h in hyps)


def test_finished_sentences_leave_the_batch():
    # Sentence 0 may run 1 step, sentence 1 ten: after step 1 only sentence 1's rows are computed.
    stats = []
    out = decode(ScriptedModel(scripted_step), options(limit=1), options(limit=10), stats=stats)
    assert [h[0].tokens for h in out] == [[A], [A, B]]
    assert stats[0].steps == 3 and stats[0].rows == 2 + 1 + 1


@pytest.mark.parametrize("beam_size", [1, 2])
def test_aborted_sentences_leave_the_batch_and_others_are_unharmed(beam_size):
    stats = []
    out = decode(ScriptedModel(scripted_step), options(beam_size=beam_size), options(beam_size=beam_size),
                 stats=stats, abort_after=(0, 1))
    assert out[0] == [] and out[1] == decode(ScriptedModel(scripted_step), options(beam_size=beam_size))[0]
    # Step 1 computed both sentences; every later step only sentence 1's rows.
    assert stats[0].rows == 2 + (stats[0].steps - 1) * beam_size


def endless_step(tokens, positions):
    """Always C, never eos: a sentence runs to its length limit."""
    log_probs = np.full((tokens.shape[0], VOCAB), np.log(1e-12), dtype=np.float32)
    log_probs[:, C] = 0.0
    return log_probs


class CostedModel(ScriptedModel):
    """ScriptedModel whose step costs rows x (width + 1) units of a scripted clock (width: the oldest row's cached
    positions; the cache a step reads), and that records (rows, width) per call."""

    def __init__(self, fn) -> None:
        super().__init__(fn)
        self.now, self.log = 0.0, []

    def step(self, tokens, self_k, *args, **kwargs):
        rows, width = tokens.shape[0], int(kwargs["positions"].max())
        self.now += rows * (width + 1)
        self.log.append((rows, width))
        return super().step(tokens, self_k, *args, **kwargs)


def costed_core(model, **kwargs):
    """An engine core on ``model``'s clock; a batch expected to outlive its joiners by more than 8 steps makes them
    start their own (64 in the engine: the scripted positions are 64)."""
    return EngineCore(model, bos_id=BOS, eos_id=EOS, pad_id=PAD, max_positions=64, clock=lambda: model.now,
                      **{"outlive_steps": 8, **kwargs})


def test_a_late_sentence_starts_its_own_batch_and_takes_its_share_of_time():
    model = CostedModel(endless_step)
    core = costed_core(model)
    old = core.submit([A, EOS], options(limit=40, min_length=40))  # expected to run 40 steps, the late one 2
    for _ in range(12):
        core.step()
    late = core.submit([A, EOS], options(limit=5))
    finished, calls = {}, len(model.log)
    while late not in finished:
        finished.update({d.handle: d for d in core.step()})
    mine = model.log[calls:]
    # Its own batch: one row, its own cache width (0..4), never padded to the old sentence's 12+ positions; and
    # equal shares of decoder time: its five cheap steps (1+2+3+4+5 units) run beside one old step (13 units).
    assert [w for r, w in mine if w < 12] == [0, 1, 2, 3, 4] and all(r == 1 for r, _ in mine)
    assert len([w for _, w in mine if w >= 12]) == 1
    assert [h.tokens for h in finished[late].hypotheses] == [[C] * 5]
    while core.has_work:
        finished.update({d.handle: d for d in core.step()})
    assert [h.tokens for h in finished[old].hypotheses] == [[C] * 40]


def test_a_sentence_joins_a_batch_that_will_not_outlive_it_by_much_and_with_max_batches_1_any_batch():
    # The old sentence is expected to run 30 steps, the late one 2: at step 20 the batch outlives it by 8 (joins),
    # at step 19 by 9 (a batch of its own); with max_batches 1 it joins whenever it comes.
    for max_batches, late_step, want_rows in ((2, 20, 2), (2, 19, 1), (1, 5, 2)):
        model = CostedModel(endless_step)
        core = costed_core(model, max_batches=max_batches)
        core.submit([A, EOS], options(limit=30, min_length=30))
        for _ in range(late_step):
            core.step()
        core.submit([A, EOS], options(limit=30))
        core.step()
        assert model.log[-1][0] == want_rows, (max_batches, late_step)
        while core.has_work:
            core.step()
        assert core.stats.left == core.stats.joined == 2 and not core._by_handle


def test_sentences_of_like_lengths_share_one_batch_whenever_they_arrive():
    model = CostedModel(endless_step)
    core = costed_core(model, max_batches=2)
    for arrival in range(3):  # each expected to run as long as the first still will
        core.submit([A, EOS], options(limit=60, min_length=60 - 20 * arrival))
        for _ in range(20):
            core.step()
    assert len(core._batches) == 1 and model.log[-1][0] == 3


def test_a_third_batch_is_not_started_past_max_batches():
    model = CostedModel(endless_step)
    core = costed_core(model, max_batches=2)
    # Expected lengths 60, 30 (20 steps later: 40 steps left of the first), 2 (10 later: 20 left of the second):
    # each would start a batch of its own, the third joins the youngest of the two.
    for min_length, wait in ((60, 20), (30, 10), (0, 3)):
        core.submit([A, EOS], options(limit=60, min_length=min_length))
        for _ in range(wait):
            core.step()
    assert sorted({rows for rows, _ in model.log[-4:]}) == [1, 2]
    assert len(core._batches) == 2


def test_a_small_request_decodes_apart_from_bulk_batches_however_many_run():
    model = CostedModel(endless_step)
    core = costed_core(model, max_batches=2)
    for bulk in range(2):  # two bulk requests 20 steps apart: two batches of 6 rows
        for _ in range(6):
            core.submit([A, EOS], options(limit=60, min_length=60 - 30 * bulk), group=f"bulk {bulk}")
        for _ in range(20):
            core.step()
    probe = core.submit([A, EOS], options(limit=5), group="probe")
    core.step()
    for _ in range(6):  # a third bulk request arrives with the probe's batch young: it joins a bulk batch
        core.submit([A, EOS], options(limit=60), group="bulk 2")
    finished, calls = set(), len(model.log)
    while probe not in finished:
        finished.update(d.handle for d in core.step())
    assert {rows for rows, width in model.log[calls:] if width < 5} == {1}  # the probe's own batch, alone
    assert len([1 for _, width in model.log[calls:] if width >= 5]) <= 2  # beside at most one step of each
    while core.has_work:
        core.step()
    assert core.stats.left == core.stats.joined and not core._by_handle


def test_a_step_that_fails_fails_its_own_batch_only():
    class FailsOnItsOwnBatch(CostedModel):
        def step(self, tokens, self_k, *args, **kwargs):
            # The late batch's 3rd step.
            if kwargs["positions"].max() == 2 and tokens.shape[0] == 1 and len(self.log) > 20:
                raise RuntimeError("device lost")
            return super().step(tokens, self_k, *args, **kwargs)

    model = FailsOnItsOwnBatch(endless_step)
    core = costed_core(model)
    old = core.submit([A, EOS], options(limit=40, min_length=40), group="old")
    for _ in range(20):
        core.step()
    late = core.submit([A, EOS], options(limit=10), group="late")
    finished = {}
    while core.has_work:
        finished.update({d.handle: d for d in core.step()})
    assert "device lost" in str(finished[late].error) and finished[late].hypotheses == []
    assert finished[old].error is None and [h.tokens for h in finished[old].hypotheses] == [[C] * 40]
    assert core.stats.left == core.stats.joined and not core._by_handle


def test_aborts_leave_whichever_batch_they_are_in():
    model = CostedModel(endless_step)
    core = costed_core(model)
    handles = []
    for arrival in range(3):  # three batches' worth of arrivals (two of each kind at most)
        handles.append(core.submit([A, EOS], options(limit=50), group=arrival))
        for _ in range(12):
            core.step()
    for h in handles[:2]:
        core.abort(h)
    finished = {}
    while core.has_work:
        finished.update({d.handle: d for d in core.step()})
    assert [finished[h].aborted for h in handles] == [True, True, False]
    assert [h.tokens for h in finished[handles[2]].hypotheses] == [[C] * 50]
    assert core.stats.left == core.stats.joined == 3 and not core._by_handle


def test_eos_ranked_below_beam_size_is_not_finalized():
    # After bos: a .5, b .3, eos .2 -> with beam 2 the eos candidate ranks 3rd (>= beam_size): dropped, not finished.
    table = {BOS: {A: 0.5, B: 0.3, EOS: 0.2}, A: {EOS: 1.0}, B: {EOS: 1.0}}

    step = table_step(table)

    (hyps,) = decode(ScriptedModel(step), options(beam_size=2, n_best=2))
    assert [h.tokens for h in hyps] == [[A], [B]]


def full_rule(monkeypatch):
    """Beam search without the settled stop (engine/search.py): only the beam_size-finished rule and the limit."""
    monkeypatch.setattr(BeamSearch, "settled", lambda self, live_scores: False)


def test_a_sentence_stops_once_no_live_beam_can_outrank_its_best(monkeypatch):
    # Step 2 finishes "b" (.36) while the best live beam "a b" has .3: with alpha 0 no descendant of it can reach
    # .36, so the sentence stops there; the full rule spends step 3 finishing "a b" (.27) and returns the same "b".
    early, full = [], []
    want = decode(ScriptedModel(scripted_step), options(beam_size=2), stats=early)
    full_rule(monkeypatch)
    assert decode(ScriptedModel(scripted_step), options(beam_size=2), stats=full) == want
    assert [h.tokens for h in want[0]] == [[B]]
    assert (early[0].steps, full[0].steps) == (2, 3)


def test_a_live_beam_that_can_still_win_keeps_the_sentence_going():
    # Step 2 finishes "b" (.5 x .8 = .40) while "a c" (.45 x .99 = .4455) lives on and then ends with p 1: the
    # sentence must not stop at step 2, and returns "a c".
    table = {BOS: {B: 0.5, A: 0.45, C: 0.05}, B: {EOS: 0.8, A: 0.2}, A: {C: 0.99, B: 0.01}, C: {EOS: 1.0}}

    step = table_step(table)

    ((hyp,),) = decode(ScriptedModel(step), options(beam_size=2))
    assert hyp.tokens == [A, C] and math.isclose(hyp.score, math.log(0.4455), rel_tol=1e-5)


def test_the_settled_stop_bounds_live_beams_by_the_length_penalty_at_the_limit():
    # alpha 1, limit 10: "a b" (.3) could still rank log(.3) / lp(10) = -0.48 > "b"'s log(.36) / lp(2) = -0.88.
    stats = []
    (hyps,) = decode(ScriptedModel(scripted_step), options(beam_size=2, length_penalty=1.0), stats=stats)
    assert stats[0].steps == 3
    search = BeamSearch(10, BOS, EOS, beam_size=2, length_penalty=1.0)
    search.finished = [Hypothesis([B], math.log(0.36), math.log(0.36) / gnmt_length_penalty(2, 1.0))]
    assert not search.settled([math.log(0.3)])
    assert search.settled([math.log(0.3) * 4])  # a live score this low cannot catch up even at the limit
    assert not search.settled([0.5])  # scores above 0 are not summed log-probs: no bound, no stop
    assert not search.settled([float("nan")])


def _random_step(vocab: int, seed: int, levels: int = 6):
    """A step whose log-probs depend on (last token, position) through a fixed random table with few distinct
    values, so that ties are common."""
    table = np.log(np.random.default_rng(seed).integers(1, levels + 1, size=(vocab, 64, vocab)) / levels)
    table = (table - np.logaddexp.reduce(table, axis=2, keepdims=True)).astype(np.float32)
    return lambda tokens, positions: table[tokens, positions].copy()


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("beam_size", [1, 2, 4])
@pytest.mark.parametrize("banned, min_length", [((), 0), ((PAD,), 0), ((PAD, UNK), 3)])
def test_top_k_steps_give_exactly_the_full_vocabulary_result(seed, beam_size, banned, min_length):
    """Module docstring of engine/search.py: the search over each row's top k equals the one over all tokens,
    tie order included; three sentences of different length limits, so rows leave mid-batch."""
    step = _random_step(vocab=12, seed=seed)
    sentences = [options(beam_size=beam_size, n_best=beam_size, limit=limit, min_length=min(min_length, limit),
                         length_penalty=0.6) for limit in (3, 9, 6)]
    want = decode(ScriptedModel(step), *sentences, banned=banned)
    assert decode(ScriptedTopKModel(step), *sentences, banned=banned) == want


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("beam_size, n_best", [(2, 1), (4, 1), (4, 3), (5, 5)])
@pytest.mark.parametrize("length_penalty", [0.0, 0.6, 2.0])
def test_the_settled_stop_returns_exactly_the_full_rules_hypotheses(monkeypatch, seed, beam_size, n_best,
                                                                      length_penalty):
    """Random tables with frequent ties, three sentences of different limits: the same hypotheses, scores and
    order as the full rule, in no more decoder rows."""
    step = _random_step(vocab=12, seed=seed)
    sentences = [options(beam_size=beam_size, n_best=n_best, limit=limit, length_penalty=length_penalty)
                 for limit in (3, 12, 7)]
    early, full = [], []
    got = decode(ScriptedTopKModel(step), *sentences, stats=early)
    full_rule(monkeypatch)
    assert got == decode(ScriptedTopKModel(step), *sentences, stats=full)
    assert early[0].rows <= full[0].rows


def test_top_k_is_not_used_when_a_rule_needs_the_whole_row():
    assert top_k_for(Rules(banned_ids=(PAD,), min_length=2), 8) == 8 + 1 + 1
    for rules in (Rules(repetition_penalty=1.2), Rules(no_repeat_ngram_size=2), Rules(prefixes=((A,),))):
        assert top_k_for(rules, 8) is None
    assert top_k_for(Rules(), 1, Sampling(topk=5, seed=0)) is None


def test_top_k_breaks_ties_made_by_float32_rounding_like_the_full_search():
    """A beam score plus three different log-probs (-1e-7, -1.5e-7, -2e-7) round to the same float32 sum (-20): the
    full search ranks them by lower flat index (eos, id 3, first); the top-k search must too, not by log-prob."""
    vocab = 10

    def step(tokens, positions):
        log_probs = np.full((tokens.shape[0], vocab), -30.0, dtype=np.float32)
        for r, (last, position) in enumerate(zip(tokens, positions)):
            if position == 0:
                log_probs[r, 4], log_probs[r, 5] = -20.0, -20.5
            elif position == 1 and last == 4:
                log_probs[r, 6], log_probs[r, 7], log_probs[r, EOS] = -1e-7, -1.5e-7, -2e-7
            else:
                log_probs[r, EOS] = -0.01
        return log_probs

    assert np.float32(-20.0) + np.float32(-1e-7) == np.float32(-20.0) + np.float32(-2e-7)
    want = decode(ScriptedModel(step), options(beam_size=2, n_best=2))
    assert want[0][0].tokens == [4]  # eos won the rounding tie
    assert decode(ScriptedTopKModel(step), options(beam_size=2, n_best=2)) == want


def test_candidates_from_top_rank_by_score_then_lower_flat_index():
    """_candidates_from_top against a plain Python sort of every candidate by (score best first, NaN last; then
    flat index), on small random tables with many ties, -inf and NaN."""
    rng = np.random.default_rng(5)
    for _ in range(300):
        sentences, n, width = (int(x) for x in rng.integers(1, 5, 3))
        live = np.round(rng.standard_normal((sentences, n)), 1).astype(np.float32)
        values = np.round(rng.standard_normal((sentences, n, width)), 0).astype(np.float32)
        draw = rng.random(values.shape)
        values[draw < 0.15], values[draw > 0.95] = -np.inf, np.nan
        ids = np.stack([np.stack([rng.permutation(20)[:width] for _ in range(n)]) for _ in range(sentences)])
        k = int(rng.integers(1, n * width + 1))
        scores, flats = _candidates_from_top(live, values, ids, 20, k)
        for j in range(sentences):
            every = [(float(live[j, b] + values[j, b, c]), b * 20 + int(ids[j, b, c]))
                     for b in range(n) for c in range(width)]
            want = sorted(every, key=lambda e: (np.isnan(e[0]), 0.0 if np.isnan(e[0]) else -e[0], e[1]))[:k]
            assert flats[j].tolist() == [f for _, f in want]
            np.testing.assert_array_equal(scores[j], np.asarray([v for v, _ in want], np.float32))


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("banned", [(), (PAD,), (PAD, UNK)])
def test_a_batch_of_plain_greedy_sentences_steps_as_the_general_step_does(monkeypatch, seed, banned):
    """EngineCore._greedy_step (every sentence of the batch a plain argmax) against the general _decode_step: the
    same tokens and scores on a table with frequent ties, for sentences of different limits and min_length (rows
    leave mid-batch and rows past the new count move into theirs), with and without scores."""
    step = _random_step(vocab=12, seed=seed)
    sentences = [options(limit=9), options(limit=4, min_length=3), options(limit=7, min_length=6),
                 options(limit=8, return_scores=False), options(limit=2), options(limit=9, min_length=2)]
    lean = []
    greedy_step = EngineCore._greedy_step
    monkeypatch.setattr(EngineCore, "_greedy_step",
                        lambda self, batch: lean.append(len(batch.live)) or greedy_step(self, batch))
    stats = []
    got = decode(ScriptedModel(step), *sentences, banned=banned, stats=stats)
    assert len(lean) == stats[0].steps and lean[0] == len(sentences) > lean[-1]  # every step, rows leaving
    monkeypatch.setattr(EngineCore, "_greedy_rows", lambda self, batch: False)
    assert decode(ScriptedModel(step), *sentences, banned=banned) == got
    assert len(lean) == stats[0].steps  # the general step's run did not take it


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("banned", [(), (PAD,), (PAD, UNK)])
def test_greedy_choices_made_for_the_whole_step_are_each_sentences_own(monkeypatch, seed, banned):
    """GreedySearch.batch_choose (the plain greedy sentences' choices, made for the whole step) against each
    sentence's own advance: the same tokens and scores on a table with frequent ties, for plain sentences of
    different limits and min_length beside ones it must leave alone (sampling, a repetition penalty) and a beam
    search, in one batch."""
    step = _random_step(vocab=12, seed=seed)
    sentences = [options(limit=9), options(limit=4, min_length=3), options(limit=7, min_length=6),
                 options(limit=8, sampling_topk=4, seed=seed), options(limit=6, repetition_penalty=1.3),
                 options(beam_size=2, limit=5), options(limit=9, min_length=2)]
    chosen = []
    batch_choose = GreedySearch.batch_choose
    monkeypatch.setattr(GreedySearch, "batch_choose", staticmethod(
        lambda searches, log_probs: chosen.append(len(searches)) or batch_choose(searches, log_probs)))
    got = decode(ScriptedModel(step), *sentences, banned=banned)
    assert max(chosen) == 4  # the four plain greedy sentences, chosen together
    monkeypatch.setattr(GreedySearch, "batch_choose", staticmethod(lambda searches, log_probs: {}))
    assert got == decode(ScriptedModel(step), *sentences, banned=banned)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("banned", [(PAD,), (PAD, UNK)])
@pytest.mark.parametrize("length_penalty", [0.0, 1.0])
def test_a_batch_of_beam_searches_advanced_together_steps_as_the_general_step_does(monkeypatch, seed, banned,
                                                                                   length_penalty):
    """EngineCore._beam_step (every sentence a top-k beam search, advanced together by BeamSearch.batch_advance)
    against the general _decode_step: the same hypotheses, scores and order on a table with frequent ties, for
    beam sizes 2-5, n_best up to the beam, min_length and limits that differ (so hypotheses finish and rows leave
    mid-batch, and searches fall back to their own advance), and a beam search that decodes alone."""
    step = _random_step(vocab=12, seed=seed)
    sentences = [options(beam_size=2, limit=9, length_penalty=length_penalty),
                 options(beam_size=4, n_best=3, limit=7, min_length=5, length_penalty=length_penalty),
                 options(beam_size=3, limit=4, length_penalty=length_penalty),
                 options(beam_size=5, n_best=5, limit=8, min_length=2, length_penalty=length_penalty),
                 options(beam_size=4, limit=12, length_penalty=length_penalty)]
    lean, together = [], []
    beam_step, batch_advance = EngineCore._beam_step, BeamSearch.batch_advance
    monkeypatch.setattr(EngineCore, "_beam_step", lambda self, batch: lean.append(1) or beam_step(self, batch))

    def counted(searches, top, top_row):
        advanced, others = batch_advance(searches, top, top_row)
        together.append((len(advanced), len(others)))
        return advanced, others

    monkeypatch.setattr(BeamSearch, "batch_advance", staticmethod(counted))
    stats = []
    got = decode(ScriptedTopKModel(step), *sentences, banned=banned, stats=stats)
    assert len(lean) == stats[0].steps
    assert sum(a for a, _ in together) > 0 and sum(o for _, o in together) > 0  # both ways taken
    for alone in sentences:
        assert decode(ScriptedTopKModel(step), alone, banned=banned) == [got[sentences.index(alone)]]
    monkeypatch.setattr(EngineCore, "_beam_rows", lambda self, batch: False)
    lean.clear()
    assert decode(ScriptedTopKModel(step), *sentences, banned=banned) == got
    assert not lean  # the general step's run did not take it


@pytest.mark.parametrize("seed", range(4))
def test_beam_searches_advanced_together_match_their_own_advance_at_every_step(seed):
    """BeamSearch.batch_advance against each search's own advance, state by state: random searches (beam sizes,
    n_best, limits, min_length, length penalties) fed the same random top-k rows with ties and frequent eos, step
    after step, end in the same live beams, scores, finished hypotheses and results. Searches that stop through
    the settled rule at a step where no hypothesis finishes (one finished earlier) are among them."""
    import copy

    rng = np.random.default_rng(seed)
    vocab, k = 10, 8
    searches = [BeamSearch(int(rng.integers(2, 24)), BOS, EOS, beam, float(rng.choice([0.0, 0.6, 1.5])),
                           int(rng.integers(1, beam + 1)), Rules(min_length=int(rng.integers(0, 4))))
                for beam in rng.integers(2, 5, size=80)]
    own = copy.deepcopy(searches)
    settled_late = 0
    for _ in range(24):
        live = [j for j, s in enumerate(own) if not s.done]
        if not live:
            break
        n_rows = [own[j].n_rows for j in live]
        rows = sum(n_rows)
        values = -rng.integers(1, 6, size=(rows, k)).astype(np.float32) / 2  # < 0: live scores fall
        # Every other step without eos among the rows' best: hypotheses that finished earlier then face beams
        # whose scores only fall (the settled rule's case).
        tokens = np.arange(vocab) if rng.random() < 0.5 else np.delete(np.arange(vocab), EOS)
        ids = np.stack([rng.permutation(tokens)[:k] for _ in range(rows)]).astype(np.int64)
        order = np.lexsort((ids, -values), axis=1)  # best first, ties by lower id (ONNX TopK)
        top = TopCandidates(np.take_along_axis(values, order, 1), np.take_along_axis(ids, order, 1), vocab)
        starts = np.cumsum([0] + n_rows)
        advanced, others = BeamSearch.batch_advance([(j, searches[j]) for j in live], top,
                                                    {j: int(s) for j, s in zip(live, starts)})
        for j, start in zip(live, starts):
            mine = TopCandidates(top.log_probs[start:start + own[j].n_rows], top.ids[start:start + own[j].n_rows],
                                 vocab)
            finished_before = len(own[j].finished)
            want = own[j].advance(own[j].steps_done, None, mine, None)
            got = advanced[j] if j in advanced else searches[j].advance(searches[j].steps_done, None, None, None,
                                                                       others[j])
            settled_late += own[j].done and 0 < finished_before == len(own[j].finished) and j not in advanced
            assert got.tolist() == want.tolist()
            a, b = searches[j], own[j]
            assert (a.done, a.n_rows, a.steps_done, a.live_tokens, a.live_scores.tolist(), a.last_tokens.tolist(),
                    a.finished, a.hypotheses) == (b.done, b.n_rows, b.steps_done, b.live_tokens,
                                                  b.live_scores.tolist(), b.last_tokens.tolist(), b.finished,
                                                  b.hypotheses)
    assert all(s.done for s in own) and settled_late
