"""engine/_kernels.c against the numpy code it stands in for: the beam search's selection (engine/search.py,
_select) and the cache's row copies (engine/state_ops.py, NumpyOps.move_rows), bit for bit, on random cases with
ties, -inf, NaN and rows out of order; its errors; and that the install built it (CI has a C compiler, so the
engine's tests run the compiled loops, and these tests the numpy ones beside them)."""

from __future__ import annotations

import numpy as np
import pytest

import engine.search as search_module
import engine.state_ops as state_ops
from engine.candidates import TopCandidates
from engine.rules import Rules
from engine.search import BeamSearch, _select
from engine.state_ops import NumpyOps

EOS = 3


def test_the_install_built_the_kernels():
    """setup.py builds engine/_kernels.c where a C compiler is found (scripts/setup.sh installs the project); the
    engine then takes it for both loops."""
    from engine import _kernels

    assert search_module._kernels is _kernels and state_ops._kernels is _kernels


def _bits(a: np.ndarray) -> list:
    """Exact contents, NaN and -0.0 included."""
    return (a.view(np.int32) if a.dtype == np.float32 else a).tolist()


def _random_group(rng: np.random.Generator):
    """A top-k table of a few searches' rows, in some order, and a group of searches with n live rows each."""
    beam_size = int(rng.integers(1, 6))
    vocab = int(rng.integers(2 * beam_size + 4, 40))
    n = int(rng.integers(1, beam_size + 1))
    width = int(rng.integers(max(1, -(-2 * beam_size // n)), min(vocab, 2 * beam_size + 3) + 1))
    m = int(rng.integers(1, 7))
    rows = m * n + int(rng.integers(0, 4))
    # Few distinct values: ties within and across rows; some -inf (bans) and, rarely, NaN.
    values = -rng.integers(0, 4, size=(rows, width)).astype(np.float32) / 4
    values[rng.random((rows, width)) < 0.1] = -np.inf
    values[rng.random((rows, width)) < 0.02] = np.nan
    ids = np.stack([rng.permutation(vocab)[:width] for _ in range(rows)]).astype(np.int64)
    starts = rng.permutation(rows // n)[:m] * n if rng.random() < 0.5 else np.arange(m) * n + rows - m * n
    members = []
    for j in range(m):
        s = BeamSearch(30, 1, EOS, beam_size, 0.0, rules=Rules(min_length=int(rng.integers(0, 3))))
        s.n_rows, s.steps_done = n, int(rng.integers(0, 4))
        s.live_scores = (-rng.integers(0, 3, size=n).astype(np.float32) / 4)
        members.append((j, s))
    top = TopCandidates(values, ids, vocab)
    return members, top, {j: int(start) for j, start in enumerate(starts)}, n, beam_size


@pytest.mark.parametrize("seed", range(4))
def test_select_in_c_is_the_numpy_selection_bit_for_bit(monkeypatch, seed):
    """_select's six outputs (candidates, flat indices, continuations, their scores, the plain-step flag) from the
    compiled loop and from numpy, over 500 random groups each: ties, -inf, NaN, eos banned before min_length, one
    or several rows per search, searches' rows consecutive or scattered."""
    from engine import _kernels

    rng = np.random.default_rng(seed)
    common_seen = set()
    for _ in range(500):
        case = _random_group(rng)
        monkeypatch.setattr(search_module, "_kernels", _kernels)
        compiled = _select(*case)
        monkeypatch.setattr(search_module, "_kernels", None)
        plain = _select(*case)
        assert [_bits(np.asarray(a)) for a in compiled] == [_bits(np.asarray(a)) for a in plain]
        assert [a.dtype for a in compiled] == [a.dtype for a in plain]
        common_seen.update(plain[5].tolist())
    assert common_seen == {True, False}


@pytest.mark.parametrize("compiled", [True, False])
@pytest.mark.parametrize("seed", range(2))
def test_batch_advance_matches_each_search_advancing_alone_either_way(monkeypatch, compiled, seed):
    """BeamSearch.batch_advance, on the compiled selection and on numpy's, against each search's own advance
    (its per-sentence numpy candidates): the same parents, live beams and scores, step after step."""
    import copy

    from engine import _kernels

    monkeypatch.setattr(search_module, "_kernels", _kernels if compiled else None)
    rng = np.random.default_rng(seed)
    vocab, k = 10, 9
    searches = [BeamSearch(int(rng.integers(2, 20)), 1, EOS, int(beam), 0.0, rules=Rules(min_length=2))
                for beam in rng.integers(2, 5, size=40)]
    own = copy.deepcopy(searches)
    advanced_any = False
    for _ in range(20):
        live = [j for j, s in enumerate(own) if not s.done]
        if not live:
            break
        n_rows = [own[j].n_rows for j in live]
        values = -rng.integers(1, 6, size=(sum(n_rows), k)).astype(np.float32) / 2
        ids = np.stack([rng.permutation(vocab)[:k] for _ in range(sum(n_rows))]).astype(np.int64)
        order = np.lexsort((ids, -values), axis=1)  # best first, ties by lower id (ONNX TopK)
        top = TopCandidates(np.take_along_axis(values, order, 1), np.take_along_axis(ids, order, 1), vocab)
        starts = np.cumsum([0] + n_rows)
        advanced, others = BeamSearch.batch_advance([(j, searches[j]) for j in live], top,
                                                    {j: int(s) for j, s in zip(live, starts)})
        advanced_any |= bool(advanced)
        for j, start in zip(live, starts):
            mine = TopCandidates(top.log_probs[start:start + n_rows[live.index(j)]],
                                 top.ids[start:start + n_rows[live.index(j)]], vocab)
            want = own[j].advance(own[j].steps_done, None, mine, None)
            got = advanced[j] if j in advanced else searches[j].advance(searches[j].steps_done, None, None, None,
                                                                       others[j])
            assert got.tolist() == want.tolist()
            assert searches[j].live_tokens == own[j].live_tokens
            assert searches[j].live_scores.tolist() == own[j].live_scores.tolist()
            assert searches[j].hypotheses == own[j].hypotheses
    assert advanced_any and all(s.done for s in own)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("seed", range(3))
def test_move_rows_in_c_copies_what_numpy_copies(monkeypatch, dtype, seed):
    """NumpyOps.move_rows with disjoint source and destination rows (the core's moves), each with its own length
    and first position, lengths past the capacity included: the compiled copy leaves every tensor as numpy's
    slice assignments do, position for position, and touches nothing else."""
    from engine import _kernels

    rng = np.random.default_rng(seed)
    for _ in range(50):
        rows, heads, capacity, d = int(rng.integers(2, 24)), int(rng.integers(1, 4)), int(rng.integers(1, 12)), 8
        xs = [rng.standard_normal((rows, heads, capacity, d)).astype(dtype) for _ in range(int(rng.integers(1, 7)))]
        picked = rng.permutation(rows)
        moves = int(rng.integers(1, rows // 2 + 1))
        dst, src = picked[:moves].astype(np.int64), picked[moves:2 * moves].astype(np.int64)
        lengths = rng.integers(0, capacity + 3, size=moves).tolist()
        start = [int(rng.integers(0, n + 1)) for n in lengths]
        monkeypatch.setattr(state_ops, "_kernels", _kernels)
        compiled = NumpyOps.move_rows([x.copy() for x in xs], dst, src, lengths, start=start)
        monkeypatch.setattr(state_ops, "_kernels", None)
        plain = NumpyOps.move_rows([x.copy() for x in xs], dst, src, lengths, start=start)
        for a, b in zip(compiled, plain):
            assert a.tobytes() == b.tobytes()


def test_the_kernels_refuse_bad_buffers_with_value_errors():
    """Sizes that do not fit, and rows out of range, raise ValueError before anything is written."""
    from engine import _kernels

    x = np.zeros((4, 2, 3, 8), np.float32)
    one = np.asarray([0], np.int64)
    with pytest.raises(ValueError, match="row 9"):
        _kernels.move_rows([x], np.asarray([9], np.int64), one, np.asarray([3], np.int64), one * 0, 2, 3, 32)
    with pytest.raises(ValueError, match="not rows"):
        _kernels.move_rows([x], one, np.asarray([1], np.int64), np.asarray([3], np.int64), one * 0, 2, 5, 32)
    x.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        _kernels.move_rows([x], one, np.asarray([1], np.int64), np.asarray([3], np.int64), one * 0, 2, 3, 32)
    values, ids = np.zeros((4, 3), np.float32), np.zeros((4, 3), np.int64)
    out = [np.empty((1, 2), np.float32), np.empty((1, 2), np.int64), np.empty((1, 1), np.int64),
           np.empty((1, 1), np.int64), np.empty((1, 1), np.float32), np.empty(1, bool)]
    args = (np.zeros((1, 1), np.float32), np.zeros(1, bool), np.asarray([EOS], np.int64), 1, 10, 1)
    _kernels.select(values, ids, 4, 3, np.asarray([3], np.int64), *args, *out)
    with pytest.raises(ValueError, match="past"):
        _kernels.select(values, ids, 4, 3, np.asarray([4], np.int64), *args, *out)
    with pytest.raises(ValueError, match="values"):
        _kernels.select(values, ids, 5, 3, np.asarray([0], np.int64), *args, *out)


@pytest.mark.parametrize("beam_size", [2, 4])
def test_the_engine_translates_alike_with_and_without_the_kernels(monkeypatch, translator, beam_size):
    """The bundled model's engine, end to end, with the compiled loops and with the numpy ones (an install without
    a C compiler): the same hypotheses, tokens and scores, for a batch of sentences of mixed lengths at n_best 2
    (rows that reorder, hypotheses that finish mid-batch, sentences that leave)."""
    from engine import _kernels
    from engine.options import DecodingOptions
    from conftest import PARITY_SENTENCES, SENTENCES

    options = DecodingOptions(beam_size=beam_size, n_best=2, return_scores=True)
    texts = SENTENCES + PARITY_SENTENCES[:12]
    got = {}
    for compiled in (True, False):
        monkeypatch.setattr(search_module, "_kernels", _kernels if compiled else None)
        monkeypatch.setattr(state_ops, "_kernels", _kernels if compiled else None)
        ids = [translator.tokenize(t) for t in texts]
        got[compiled] = [[(h.tokens, h.score) for h in hyps] for hyps in translator.translate_ids(ids, options)]
    assert got[True] == got[False]
    assert len({len(h[0][0]) for h in got[True]}) > 3  # mixed lengths
