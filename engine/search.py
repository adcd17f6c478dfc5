"""Per-sentence search strategies (greedy, sampling, beam) over the log-probs a decoder step gives each row.

Each sentence owns one strategy object: the engine core (engine/core.py) runs a decoder step over every live row of
every sentence, hands each strategy its own rows' scores, and gets back which of its rows continue (parents) with
which next tokens. The strategy knows nothing of models, caches or other sentences (fairseq's search.step, but per
sentence), so sentences with different options decode side by side and join or leave the batch at any step.

Semantics are those of the PyTorch reference (nmt/search.py), which is the oracle in the tests:
- tokens returned exclude bos and eos; scores are summed natural-log probabilities, eos included;
- beam hypotheses are ranked by score / lp(len), lp(len) = ((5 + len) / 6) ** alpha (GNMT, Wu et al. 2016 eq. 14);
- each step takes the best 2 * beam_size candidates of the sentence (ties: lower flat index first); eos candidates
  ranked among the best beam_size become finished hypotheses (lower-ranked ones are dropped), the others fill
  beam_size live beams; a sentence stops with beam_size finished hypotheses (fairseq's and Hugging Face's
  early-stopping rule) or at its length limit, where the live beams are finalized as they are.
- A sentence also stops as soon as that rule can no longer change its n_best result (:meth:`BeamSearch.settled`):
  every token's log-prob is <= 0, so a live beam's score only falls as it grows, and with alpha >= 0 the best ranking
  any of its descendants can reach is its score / lp(length limit). Once the n_best-th finished hypothesis ranks at
  least that for every live beam, the hypotheses returned (and their order: ties go to the earlier-finished) are
  the full rule's. The reference runs the full rule, so the parity tests check this. It is how CTranslate2's beam
  search ends a sentence when its top beam finishes, and saves the steps the full rule spends on beams that cannot
  win (on the test split at beam 4 and length_penalty 0, the rows of README.md's Performance section).
- greedy search is beam search with one beam, written apart because it is the common case.

With :attr:`top_k` set, a strategy reads each row's k best tokens (:class:`TopCandidates`; the ONNX engine computes
them with TopK, engine/top_k.py) instead of full log-probs. The result is exactly the full-vocabulary search's: a
sentence's 2 x beam_size best candidates over all its beams are among its rows' own 2 x beam_size best (a
candidate's rank in its row is at most its rank in the sentence, the row's score being shared), k also covers the
tokens a rule bans (pad; eos before min_length), and ties order by lower token id in both, including sums that only
tie after float32 rounding. Rules that rewrite whole rows (repetition penalty, no_repeat_ngram, forced prefixes) and
sampling need the full log-probs (``top_k`` None).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from engine.candidates import TopCandidates
from engine.errors import NumericalError
from engine.rules import NEG_INF, Rules, Sampling, apply_rules

try:
    from engine import _kernels  # built by setup.py where a C compiler was found
except ImportError:
    _kernels = None

# What a greedy advance returns (its one row continues; it ended), shared and read-only: no allocation per
# sentence and step.
_FIRST_ROW = np.zeros(1, dtype=np.int64)
_NO_ROWS = np.zeros(0, dtype=np.int64)
_FIRST_ROW.flags.writeable = _NO_ROWS.flags.writeable = False


@dataclasses.dataclass(frozen=True)
class Hypothesis:
    """One output: token ids (no bos/eos), summed log-prob ``score``, length-normalized ``ranking_score``, and
    with return_attention, per output token the cross-attention over the sentence's source tokens
    (float32 [src_len] each, summing to 1)."""

    tokens: list[int]
    score: float
    ranking_score: float
    attention: list[np.ndarray] | None = None


def top_k_for(rules: Rules, width: int, sampling: Sampling | None = None) -> int | None:
    """The k a top-k step needs so that a search keeping ``width`` candidates per row (1 greedy, 2 x beam_size beam)
    gets exactly the full-vocabulary result under ``rules``; None when the rules or sampling need full log-probs."""
    if (rules.repetition_penalty != 1.0 or rules.no_repeat_ngram_size or (rules.prefixes and any(rules.prefixes))
            or (sampling is not None and not sampling.greedy)):
        return None
    return width + len(rules.banned_ids) + (1 if rules.min_length else 0)


def _banned_values(top: TopCandidates, rules: Rules, step: int, eos_id: int) -> np.ndarray:
    """top.log_probs with eos set to -inf before min_length. ``rules.banned_ids`` are already -inf in ``top``: the
    engine core bans them for every row of a step at once (:func:`ban`), which is what apply_rules does to full
    log-probs when only bans are active."""
    if step >= rules.min_length:
        return top.log_probs
    return np.where(top.ids == eos_id, np.float32(-np.inf), top.log_probs)


def ban(top: TopCandidates, banned_ids: tuple[int, ...]) -> TopCandidates:
    """``top`` with the log-probs of ``banned_ids`` set to -inf (all rows at once)."""
    if not banned_ids:
        return top
    hit = top.ids == banned_ids[0]  # a comparison per id: np.isin sorts, 3-5x slower on [rows, k] (pad alone)
    for token in banned_ids[1:]:
        hit |= top.ids == token
    if not hit.any():
        return top
    return TopCandidates(np.where(hit, np.float32(-np.inf), top.log_probs), top.ids, top.vocab)


def gnmt_length_penalty(length: int, alpha: float) -> float:
    """lp(len) = ((5 + len) / 6) ** alpha (Wu et al. 2016, eq. 14)."""
    return ((5.0 + length) / 6.0) ** alpha


def _top_candidates(cand: np.ndarray, k: int) -> np.ndarray:
    """Flat indices of the k best entries of cand [n], best first, ties broken by lower index."""
    k = min(k, cand.shape[0])
    top = np.argpartition(-cand, k - 1)[:k]
    return top[np.lexsort((top, -cand[top]))]


def _candidates_from_top(live_scores: np.ndarray, values: np.ndarray, ids: np.ndarray, vocab: int, k: int):
    """(scores, flat indices), each [sentences, k]: the k best candidates of each of several sentences with the
    same number n of live beams, from their rows' top tokens (live_scores [sentences, n]; values, ids [sentences,
    n, width], banned at -inf), best first, ties by lower flat index (flat = beam x vocab + token)."""
    sentences, n, _ = values.shape
    cand = (live_scores[:, :, None] + values).reshape(sentences, -1)
    flats = (np.arange(n)[None, :, None] * vocab + ids).reshape(sentences, -1)
    # Lower flat index first among equal scores: one lexicographic sort, by score, then by flat. (Rows are in beam
    # order and each row's equal log-probs in id order, but a beam score plus two different log-probs can round to
    # the same float32 sum, and those must tie-break by id too.) It replaced a stable sort by flat and then by
    # score, with the same order, NaN last included (3,000 random cases with ties, -inf and NaN): 22.1 -> 12.8 us
    # for 1 sentence of 4 beams x 9, 56.6 -> 34.9 us for 50.
    order = np.lexsort((flats, -cand), axis=1)[:, :k]
    return np.take_along_axis(cand, order, 1), np.take_along_axis(flats, order, 1)


def _select(members: list[tuple[int, "BeamSearch"]], top: TopCandidates, top_row: dict[int, int], n: int,
            beam_size: int):
    """One group's step (``members``, each with ``n`` live rows and ``beam_size`` beams, its rows of ``top`` from
    ``top_row[key]``): (cand, flats, parents, tokens, scores, common).

    cand float32 and flats int64 [m, k], k = min(2 x beam_size, n x top width): each member's k best candidates,
    best first, ties by lower flat index, eos at -inf before its min_length (:meth:`BeamSearch._candidates`).
    parents, tokens int64 and scores float32 [m, beam_size]: its first beam_size continuations (neither eos nor
    -inf) in rank order, then its other candidates in rank order; common bool [m]: the step is a plain beam step, all
    beam_size beams continuing and no eos among the first beam_size candidates (one would finish a hypothesis).

    It runs in the compiled engine/_kernels.c, one call per group, where setup.py built it (at beam 4 numpy's
    cost per call outweighs the work), and in numpy otherwise, with the same results bit for bit (tests)."""
    m, width, vocab = len(members), top.log_probs.shape[1], top.vocab
    k = min(2 * beam_size, n * width)
    starts = np.fromiter((top_row[key] for key, _ in members), np.int64, m)
    live = np.stack([search.live_scores for _, search in members]).astype(np.float32, copy=False)
    eos = np.fromiter((search.eos_id for _, search in members), np.int64, m)
    # Before min_length eos is banned (_banned_values), per sentence: a fixed-length request (min_length =
    # max_length) is in this case at every step.
    early = np.fromiter((search.steps_done < search.rules.min_length for _, search in members), bool, m)
    kernels = _kernels
    if kernels is not None:
        values = np.ascontiguousarray(top.log_probs, dtype=np.float32)
        ids = np.ascontiguousarray(top.ids, dtype=np.int64)
        cand, flats = np.empty((m, k), np.float32), np.empty((m, k), np.int64)
        parents, tokens = np.empty((m, beam_size), np.int64), np.empty((m, beam_size), np.int64)
        scores, common = np.empty((m, beam_size), np.float32), np.empty(m, bool)
        kernels.select(values, ids, values.shape[0], width, starts, live, early, eos, n, vocab, beam_size,
                       cand, flats, parents, tokens, scores, common)
        return cand, flats, parents, tokens, scores, common
    if (starts == starts[0] + n * np.arange(m)).all():  # one run of rows (most steps): views, no copy
        values = top.log_probs[starts[0]:starts[0] + n * m].reshape(m, n, width)
        ids = top.ids[starts[0]:starts[0] + n * m].reshape(m, n, width)
    else:
        rows = (starts[:, None] + np.arange(n)).reshape(-1)
        values = top.log_probs[rows].reshape(m, n, width)
        ids = top.ids[rows].reshape(m, n, width)
    if early.any():
        values = np.where(early[:, None, None] & (ids == eos[:, None, None]), np.float32(-np.inf), values)
    cand, flats = _candidates_from_top(live, values, ids, vocab, k)
    parent, token = np.divmod(flats, vocab)
    is_eos = token == eos[:, None]
    valid = cand != -np.inf  # best first: -inf (a rule's ban) only after every other candidate
    beams = valid & ~is_eos
    common = (beams.sum(axis=1) >= beam_size) & ~(is_eos & valid)[:, :beam_size].any(axis=1)
    first = np.argsort(~beams, axis=1, kind="stable")[:, :beam_size]  # the continuations, in rank order
    return (cand, flats, np.take_along_axis(parent, first, 1), np.take_along_axis(token, first, 1),
            np.take_along_axis(cand, first, 1), common)


class SentenceSearch:
    """One sentence's search state; the engine core drives it step by step.

    Attributes:
        n_rows: decoder rows the sentence holds now (its live beams).
        last_tokens: int64 [n_rows], each row's last token, the next step's input.
        top_k: how many best tokens per row the strategy needs (None: full log-probs).
        done: True once the sentence is finished; ``hypotheses`` is then its result, best first.
        max_rows: the most rows it can ever hold (what the scheduler budgets for it).
        reads_logits: its choice is the same from logits as from log-probs, and it reports no score (a step whose
            sentences all are so may skip the log-softmax, engine/core.py).
    """

    n_rows: int
    last_tokens: np.ndarray
    top_k: int | None
    done: bool = False
    reads_logits: bool = False
    hypotheses: list[Hypothesis]
    max_rows: int

    def advance(self, step: int, log_probs: np.ndarray | None, top: TopCandidates | None,
                attention: np.ndarray | None, candidates=None) -> np.ndarray:
        """Consumes step ``step``'s scores of this sentence's rows: log_probs float32 [n_rows, vocab] (may be
        edited in place) or, when :attr:`top_k` is set, ``top`` restricted to its rows; attention float32
        [n_rows, src_len] when return_attention; ``candidates``: what :meth:`BeamSearch.batch_candidates` or
        :meth:`GreedySearch.batch_choose` computed for it, if one did. Returns the parents: int64 [new n_rows], the
        rows that continue, in the order of the new rows (empty when done)."""
        raise NotImplementedError


class GreedySearch(SentenceSearch):
    """Greedy search, or random sampling when ``sampling`` is given and not greedy (its own generator, seeded
    with ``sampling.seed``, so the output does not depend on the other sentences of the batch). With ``scores``
    False its hypothesis's score is NaN, and a :attr:`plain` search reads logits where the step gives them
    (:attr:`reads_logits`): the same choice, since a row's log-softmax subtracts one number from all its logits."""

    max_rows = 1

    def __init__(self, limit: int, bos_id: int, eos_id: int, rules: Rules = Rules(),
                 sampling: Sampling | None = None, return_attention: bool = False, scores: bool = True) -> None:
        self.limit, self.eos_id, self.rules, self.scores = limit, eos_id, rules, scores
        self.sampling = sampling if sampling is not None and not sampling.greedy else None
        self.rng = np.random.default_rng(sampling.seed) if self.sampling is not None else None
        self.return_attention = return_attention
        self.top_k = top_k_for(rules, 1, self.sampling)
        self.reads_logits = not scores and self.plain  # an argmax, no score: logits do
        self.tokens: list[int] = []
        self.score = np.float32(0.0)
        self.attention: list[np.ndarray] = []
        self.n_rows, self.last_tokens = 1, np.asarray([bos_id], dtype=np.int64)
        self.hypotheses = []

    @property
    def plain(self) -> bool:
        """No sampling and no rule but bans and min_length: its choice is the argmax of its banned row, which
        :meth:`batch_choose` makes for many sentences at once."""
        return self.top_k is not None  # what top_k_for gives such a search, and only such a one


    @staticmethod
    def batch_choose(searches: list[tuple[int, "GreedySearch", int, int]],
                     log_probs: np.ndarray) -> dict[int, tuple[int, np.float32]]:
        """The next token of many :attr:`plain` greedy searches at once: ``searches`` holds (key, search, step, row)
        with ``row`` the search's row of log_probs float32 [rows, vocab] (the searches' rows are distinct, in any
        order; edited in place: eos before min_length, and the bans of a row whose best token is banned). Returns
        {key: (token, its log-prob)}, what :meth:`advance` would pick from the row (the first of equal maxima, as
        argmax), without its rules pass over the row (host time per step: docs/performance.md,
        loadtests/bench_host_step.py)."""
        out = {}
        for key, search, step, row in searches:
            scores = log_probs[row]  # a view: the edits below are the row's
            if step < search.rules.min_length:
                scores[search.eos_id] = NEG_INF
            token = int(scores.argmax())
            # Bans after the argmax: a best token that is allowed stays (a banned token that ties it lies after it,
            # or argmax would have returned that one), so only a row whose best is banned is banned and chosen
            # again; pad, the engine's ban, is hardly ever a row's best. An argmax per row, in a Python loop, beat
            # one argmax over all rows and its fancy indexing at every batch size measured (1-40 rows: 1.1 against
            # 7.4 us at 1, 47 against 53 at 40).
            banned = search.rules.banned_ids
            if token in banned:
                scores[list(banned)] = NEG_INF
                token = int(scores.argmax())
            out[key] = (token, scores[token])
        return out

    def advance(self, step, log_probs, top, attention, candidates=None):
        if candidates is not None:  # chosen by batch_choose
            token, token_log_prob = candidates
        elif top is not None:  # best first with ties by lower id, so argmax picks what argmax over the vocabulary would
            values = _banned_values(top, self.rules, step, self.eos_id)[0]
            best = int(values.argmax())
            token, token_log_prob = int(top.ids[0, best]), values[best]
        else:
            apply_rules(log_probs, step, [self.tokens], np.zeros(1, dtype=np.int64), self.rules, self.eos_id)
            token = (int(log_probs[0].argmax()) if self.sampling is None
                     else int(self.sampling.choose(log_probs, self.rng)[0]))
            token_log_prob = log_probs[0, token]
        if math.isnan(token_log_prob):  # argmax returns a NaN if the row has one; the core checks top-k rows itself
            raise NumericalError()
        if self.scores:  # else token_log_prob may be a logit (reads_logits)
            self.score += token_log_prob
        if token != self.eos_id:
            self.tokens.append(token)
            if self.return_attention:
                self.attention.append(np.array(attention[0], dtype=np.float32))
        if token == self.eos_id or step + 1 >= self.limit:
            score = float(self.score) if self.scores else math.nan
            self.hypotheses = [Hypothesis(self.tokens, score, score, self.attention if self.return_attention
                                          else None)]
            self.done, self.n_rows = True, 0
            return _NO_ROWS
        self.last_tokens[0] = token  # its own array (the core copies it into the step's tokens)
        return _FIRST_ROW


class BeamSearch(SentenceSearch):
    """Beam search of one sentence (semantics in the module docstring): ``beam_size`` beams, GNMT length penalty
    alpha ``length_penalty``, ``n_best`` (<= beam_size) hypotheses returned."""

    def __init__(self, limit: int, bos_id: int, eos_id: int, beam_size: int, length_penalty: float, n_best: int = 1,
                 rules: Rules = Rules(), return_attention: bool = False) -> None:
        self.limit, self.eos_id, self.rules = limit, eos_id, rules
        self.beam_size, self.length_penalty, self.n_best = beam_size, length_penalty, n_best
        self.return_attention = return_attention
        self.max_rows = beam_size
        self.top_k = top_k_for(rules, 2 * beam_size)
        # The live beams' tokens, scores and attention; one live beam (bos) to start.
        self.live_tokens: list[list[int]] = [[]]
        self._advanced_from = self.live_tokens  # the rows' tokens before the last advance (cached_alike)
        self.live_scores = np.zeros(1, dtype=np.float32)
        self.live_attention: list[list[np.ndarray]] = [[]]
        self.finished: list[Hypothesis] = []
        self.steps_done = 0
        self.n_rows, self.last_tokens = 1, np.asarray([bos_id], dtype=np.int64)
        self.hypotheses = []

    def _candidates(self, step, log_probs, top):
        k = 2 * self.beam_size
        if top is not None:
            values = _banned_values(top, self.rules, step, self.eos_id)
            cand, flats = _candidates_from_top(self.live_scores[None], values[None], top.ids[None], top.vocab, k)
            return cand[0], flats[0], top.vocab
        if self.rules.active:
            apply_rules(log_probs, step, self.live_tokens, np.zeros(self.n_rows, dtype=np.int64), self.rules,
                        self.eos_id)
        cand = (self.live_scores[:, None] + log_probs).reshape(-1)
        flats = _top_candidates(cand, k)
        return cand[flats], flats, log_probs.shape[1]

    def _finish(self, hypotheses: list[Hypothesis]) -> np.ndarray:
        self.finished.extend(hypotheses)
        self.hypotheses = sorted(self.finished, key=lambda h: -h.ranking_score)[:self.n_best]
        self.done, self.n_rows = True, 0
        return np.zeros(0, dtype=np.int64)

    def settled(self, live_scores: list) -> bool:
        """True when no descendant of the live beams (summed log-probs ``live_scores``, float32) can rank above the
        n_best-th finished hypothesis, so that stopping now returns what the full rule would (module docstring).
        False while any live score is > 0 (log-probs that are not log-probabilities: the bound would not hold)."""
        if len(self.finished) < self.n_best or not live_scores:
            return False
        best_live = float(max(live_scores))
        if not best_live <= 0.0:  # also False for NaN
            return False
        bound = best_live / gnmt_length_penalty(self.limit, self.length_penalty)
        nth = sorted((h.ranking_score for h in self.finished), reverse=True)[self.n_best - 1]
        return nth >= bound

    @staticmethod
    def _grouped_selections(searches: list[tuple[int, "BeamSearch"]], top: TopCandidates, top_row: dict[int, int]):
        """Yields (members, cand, flats, parents, tokens, scores, common) per group of ``searches`` with the same
        beam count and live rows: the members' candidates [len(members), 2 x beam_size] (float32 scores and int64
        flat indices, as :meth:`batch_candidates` documents) and their continuations [len(members), beam_size]
        (parents and tokens int64, scores float32; common bool [len(members)]), as :func:`_select` documents."""
        groups: dict[tuple[int, int], list[tuple[int, BeamSearch]]] = {}
        for key, search in searches:
            groups.setdefault((search.n_rows, search.beam_size), []).append((key, search))
        for (n, beam_size), members in groups.items():
            yield (members, *_select(members, top, top_row, n, beam_size))

    @staticmethod
    def batch_candidates(searches: list[tuple[int, "BeamSearch"]], top: TopCandidates,
                         top_row: dict[int, int]) -> dict[int, tuple[np.ndarray, np.ndarray, int]]:
        """Candidates of many beam searches at once, grouped by beam count and live rows (the per-sentence numpy
        calls were the search's largest host cost): {key: (scores, flats, vocab)} for each (key, search). ``top``
        holds the rows of every search, the rows of ``key`` starting at ``top_row[key]``; exactly
        :meth:`_candidates`'s result at the search's next step (``steps_done``), ties and min_length's eos ban
        included."""
        out = {}
        for members, cand, flats, *_ in BeamSearch._grouped_selections(searches, top, top_row):
            for j, (key, _) in enumerate(members):
                out[key] = (cand[j], flats[j], top.vocab)
        return out

    @staticmethod
    def batch_advance(searches: list[tuple[int, "BeamSearch"]], top: TopCandidates, top_row: dict[int, int]
                      ) -> tuple[dict[int, np.ndarray], dict[int, tuple[np.ndarray, np.ndarray, int]]]:
        """:meth:`advance` of many beam searches at their next step (``steps_done``) at once, for the step where
        each goes on with beam_size live beams and no hypothesis finishes (none has finished before, no eos ranks
        among its best beam_size candidates, its limit is not reached): most steps of a sentence. ``searches``,
        ``top`` and ``top_row`` as :meth:`batch_candidates` takes them; no search with return_attention.

        Returns ({key: parents}, {key: candidates}): the searches advanced here, each with the rows that continue
        (int64 [beam_size], :meth:`advance`'s result), and the others, not advanced, with the candidates their own
        :meth:`advance` takes (``candidates=``), the same as :meth:`batch_candidates` gives them. Together the
        exact result of :meth:`advance` on each, which this skips for the common step: a loop over its candidates
        in Python, per sentence and step (about 8 us each, 8,000 a run of the test split at beam 4)."""
        advanced, others = {}, {}
        vocab = top.vocab
        for members, cand, flats, parents, tokens, scores, common in BeamSearch._grouped_selections(
                searches, top, top_row):
            beam_size = members[0][1].beam_size
            parent_lists, token_lists = parents.tolist(), tokens.tolist()
            for j, (key, search) in enumerate(members):
                if (not common[j] or search.finished or search.steps_done + 1 >= search.limit
                        or search.return_attention):
                    others[key] = (cand[j], flats[j], vocab)
                    continue
                live = search._advanced_from = search.live_tokens
                search.live_tokens = [live[p] + [t] for p, t in zip(parent_lists[j], token_lists[j])]
                search.steps_done += 1
                search.live_scores, search.last_tokens, search.n_rows = scores[j], tokens[j], beam_size
                search.live_attention = []
                advanced[key] = parents[j]
        return advanced, others

    def cached_alike(self, a: int, b: int) -> int:
        """How many leading cache positions its rows ``a`` and ``b`` (beam indices at the step last advanced) hold
        alike: bos and the tokens of their common prefix. A key/value depends only on the tokens up to its position,
        and beams that share a prefix were one row until it ended (their caches are copies of it), so these positions
        are equal bit for bit (the engine core copies only the others when a beam takes a sibling's row)."""
        shared = 0
        for x, y in zip(self._advanced_from[a], self._advanced_from[b]):
            if x != y:
                break
            shared += 1
        return shared + 1

    def advance(self, step, log_probs, top, attention, candidates=None):
        self._advanced_from = self.live_tokens  # each row's tokens, for cached_alike (advance makes new lists)
        cand_scores, flats, vocab = candidates or self._candidates(step, log_probs, top)
        self.steps_done = step + 1
        new_tokens, new_scores, parents, new_attention = [], [], [], []
        # Python ints and floats (each float32 score exactly): numpy scalars made this loop 2x slower.
        for rank, (flat, score) in enumerate(zip(flats.tolist(), cand_scores.tolist())):
            parent, token = divmod(flat, vocab)
            if score == -np.inf:  # forbidden by a rule: never a hypothesis (fewer live beams instead)
                break
            attn = self.live_attention[parent] if self.return_attention else None
            if token == self.eos_id:
                if rank < self.beam_size:
                    self.finished.append(Hypothesis(self.live_tokens[parent], score,
                                                    score / gnmt_length_penalty(step + 1, self.length_penalty), attn))
                continue
            parents.append(parent)
            new_tokens.append(self.live_tokens[parent] + [token])
            new_scores.append(score)
            if self.return_attention:
                new_attention.append(attn + [np.array(attention[parent], dtype=np.float32)])
            if len(parents) == self.beam_size:
                break
        if not parents and not self.finished:  # every continuation forbidden: keep what we have
            penalty = gnmt_length_penalty(step, self.length_penalty)
            return self._finish([Hypothesis(t, float(s), float(s) / penalty, a) for t, s, a in zip(
                self.live_tokens, self.live_scores,
                self.live_attention if self.return_attention else [None] * self.n_rows)])
        if len(self.finished) >= self.beam_size or not parents:
            return self._finish([])
        if step + 1 >= self.limit:
            penalty = gnmt_length_penalty(step + 1, self.length_penalty)
            return self._finish([Hypothesis(t, float(s), float(s) / penalty, a) for t, s, a in zip(
                new_tokens, new_scores, new_attention or [None] * len(new_tokens))])
        if self.settled(new_scores):
            return self._finish([])
        self.live_tokens, self.live_attention = new_tokens, new_attention
        self.live_scores = np.asarray(new_scores, dtype=np.float32)
        self.n_rows = len(parents)
        self.last_tokens = np.asarray([t[-1] for t in new_tokens], dtype=np.int64)
        return np.asarray(parents, dtype=np.int64)
