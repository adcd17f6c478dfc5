"""Batched greedy and beam search over a decoder-step function with a key/value cache (numpy only).

Semantics are those of the PyTorch reference (nmt/search.py), which is the oracle in the tests:
- tokens returned exclude bos and eos; scores are summed natural-log probabilities, eos included;
- beam hypotheses are ranked by score / lp(len), lp(len) = ((5 + len) / 6) ** alpha (GNMT, Wu et al. 2016 eq. 14);
- each step takes the best 2 * beam_size candidates per sentence (ties: lower flat index first); eos candidates
  ranked among the best beam_size become finished hypotheses (lower-ranked ones are dropped), the others fill
  beam_size live beams; a sentence stops with beam_size finished hypotheses (fairseq's and Hugging Face's
  early-stopping rule) or at its length limit, where the live beams are finalized as they are.

Sentences that finish leave the batch: their rows are dropped from the cache, so long sentences do not make short
ones pay, and every step only computes live rows.

With ``use_top_k`` the step function is asked for each row's k best tokens only (``step_fn(..., top_k=k)`` returns
:class:`TopCandidates` instead of log-probs; the ONNX engine computes them with TopK, engine/top_k.py). The
result is exactly the full-vocabulary search's: a sentence's 2 x beam_size best candidates over all its beams are
among its rows' own 2 x beam_size best (a candidate's rank in its row is at most its rank in the sentence, the
row's score being shared), k also covers the tokens a rule bans (pad; eos before min_length), and ties order by
lower token id in both, including sums that only tie after float32 rounding. Rules that rewrite whole rows
(repetition penalty, no_repeat_ngram, forced prefixes) and sampling need the full log-probs, so the search falls
back to them.

A sentence whose ``is_cancelled(sentence)`` turns true (client gone, deadline passed) leaves the batch at the next
step and gets no hypotheses ([]), so abandoned work stops costing compute.

The step function is ``step(tokens, self_k, self_v, cross_k, cross_v, src_mask) -> (log_probs, self_k, self_v[,
attention])`` where the caches are lists with one array per decoder layer, shapes as in engine/contract.py; tests
drive the search with scripted step functions too.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from engine.rules import Rules, Sampling, apply_rules
from engine.state_ops import NumpyOps

StepFn = Callable[..., tuple[np.ndarray, np.ndarray, np.ndarray]]
CancelFn = Callable[[int], bool]


def never_cancelled(_: int) -> bool:
    """The default is_cancelled: the search skips polling when given this one."""
    return False


@dataclasses.dataclass(frozen=True)
class Hypothesis:
    """One output: token ids (no bos/eos), summed log-prob ``score``, length-normalized ``ranking_score``, and
    with return_attention, per output token the cross-attention over the sentence's source tokens
    (float32 [src_len] each, summing to 1)."""

    tokens: list[int]
    score: float
    ranking_score: float
    attention: list[np.ndarray] | None = None


@dataclasses.dataclass(frozen=True)
class TopCandidates:
    """Each row's k best next tokens, which a decoder step returns instead of log-probs when asked for top_k.

    Attributes:
        log_probs: float32 [rows, k], best first, ties ordered by lower token id (ONNX TopK's rule).
        ids: int64 [rows, k], the tokens.
        vocab: the vocabulary size (a candidate's flat index is beam x vocab + token).
    """

    log_probs: np.ndarray
    ids: np.ndarray
    vocab: int


def top_k_for(rules: Rules, width: int, sampling: Sampling | None = None) -> int | None:
    """The k a top-k step needs so that a search keeping ``width`` candidates per row (1 greedy, 2 x beam_size beam)
    gets exactly the full-vocabulary result under ``rules``; None when the rules or sampling need full log-probs."""
    if (rules.repetition_penalty != 1.0 or rules.no_repeat_ngram_size or (rules.prefixes and any(rules.prefixes))
            or (sampling is not None and not sampling.greedy)):
        return None
    return width + len(rules.banned_ids) + (1 if rules.min_length else 0)


def _banned_values(top: TopCandidates, rules: Rules, step: int, eos_id: int) -> np.ndarray:
    """top.log_probs with the tokens the rules forbid at this step set to -inf (what apply_rules does to full
    log-probs when only bans are active)."""
    banned = list(rules.banned_ids) + ([eos_id] if step < rules.min_length else [])
    if not banned:
        return top.log_probs
    return np.where(np.isin(top.ids, banned), np.float32(-np.inf), top.log_probs)


@dataclasses.dataclass
class StepStats:
    """Work counters of one search call: decoder steps run and decoder rows computed (sum over steps)."""

    steps: int = 0
    rows: int = 0


def gnmt_length_penalty(length: int, alpha: float) -> float:
    """lp(len) = ((5 + len) / 6) ** alpha (Wu et al. 2016, eq. 14)."""
    return ((5.0 + length) / 6.0) ** alpha


class _Rows:
    """Decoder state of the active rows: self-attention cache plus the cross K/V and mask gathered per row.

    The state tensors are whatever the step function takes (numpy arrays or device OrtValues); ``ops`` moves their
    rows. The mask and the bookkeeping stay numpy."""

    def __init__(self, cross_k: list, cross_v: list, src_mask: np.ndarray, ops) -> None:
        self.ops = ops
        self.n_layers = len(cross_k)
        self.cross_k_all, self.cross_v_all, self.src_mask_all = cross_k, cross_v, src_mask
        empty = ops.empty(cross_k[0])
        self.self_k, self.self_v = [empty] * self.n_layers, [empty] * self.n_layers
        self.sentence_of_row = np.arange(src_mask.shape[0])
        self._gather_cross()

    def _gather_cross(self) -> None:
        rows = self.sentence_of_row
        # Keep only the source columns that some active row still needs: padding of finished long sentences.
        src_len = int(self.src_mask_all[rows].sum(axis=1).max()) if len(rows) else 0
        cross = self.ops.take(self.cross_k_all + self.cross_v_all, rows, src_len)
        self.cross_k, self.cross_v = cross[:self.n_layers], cross[self.n_layers:]
        self.src_mask = np.ascontiguousarray(self.src_mask_all[rows, :src_len])

    def step(self, step_fn: StepFn, tokens: np.ndarray, stats: StepStats, top_k: int | None = None):
        """Runs the decoder on the active rows: log-probs [rows, vocab], or TopCandidates with ``top_k``; keeps the
        attention output (if the step gives one) in ``self.attention`` [rows, src_len]."""
        args = (tokens[:, None], self.self_k, self.self_v, self.cross_k, self.cross_v, self.src_mask)
        out = step_fn(*args, top_k=top_k) if top_k else step_fn(*args)
        log_probs, self.self_k, self.self_v = out[:3]
        self.attention = out[3] if len(out) > 3 else None
        stats.steps += 1
        stats.rows += len(tokens)
        return log_probs

    def attention_of(self, row: int, src_len: int) -> np.ndarray:
        return np.array(self.attention[row, :src_len], dtype=np.float32)

    def select(self, parent_rows: np.ndarray) -> None:
        """Keeps/reorders rows: new row i continues old row parent_rows[i] (int64 [new_rows])."""
        if len(parent_rows) == len(self.sentence_of_row) and np.array_equal(parent_rows, np.arange(len(parent_rows))):
            return  # nothing left or moved (most greedy steps): the cache stays as the step returned it
        if not len(parent_rows):  # every sentence finished: nothing left to gather
            self.sentence_of_row = parent_rows
            return
        new_sentences = self.sentence_of_row[parent_rows]
        changed = not np.array_equal(new_sentences, self.sentence_of_row)
        self.sentence_of_row = new_sentences
        state = self.ops.take(self.self_k + self.self_v, parent_rows)
        self.self_k, self.self_v = state[:self.n_layers], state[self.n_layers:]
        if changed:
            self._gather_cross()


def greedy_search(step_fn: StepFn, cross_k: list[np.ndarray], cross_v: list[np.ndarray], src_mask: np.ndarray,
                  length_limits: list[int], bos_id: int, eos_id: int, rules: Rules = Rules(),
                  sampling: Sampling | None = None, stats: StepStats | None = None,
                  is_cancelled: CancelFn = never_cancelled, return_attention: bool = False,
                  ops=NumpyOps(), use_top_k: bool = False) -> list[Hypothesis | None]:
    """Greedy search of a batch, or random sampling when ``sampling`` is given and not greedy.

    Args:
        cross_k, cross_v: per decoder layer, float32 [batch, n_heads, src_len, d_head], from the encoder.
        src_mask: bool [batch, src_len], True for real tokens.
        length_limits: per sentence, the maximum number of decoding steps.
        rules: per-step constraints (engine/rules.py).
        sampling: top-k/top-p/temperature sampling; each sentence draws from its own generator seeded with
            ``sampling.seed``, so its output does not depend on the other sentences of the batch.
        is_cancelled: called with a sentence index before each step; True drops the sentence.
        return_attention: keep each output token's cross-attention (the step function must return it).
        ops: row operations on the state tensors (engine/state_ops.py): NumpyOps for numpy arrays, the model's
            OrtValueOps when the step keeps them on the device.
        use_top_k: the step function can return TopCandidates (module docstring); used when the rules allow.
    Returns: one Hypothesis per sentence, in input order (None for a cancelled sentence).
    """
    stats = stats or StepStats()
    batch = src_mask.shape[0]
    rows = _Rows(cross_k, cross_v, src_mask, ops)
    tokens = np.full(batch, bos_id, dtype=np.int64)
    out_tokens: list[list[int]] = [[] for _ in range(batch)]
    scores = np.zeros(batch, dtype=np.float32)
    results: list[Hypothesis | None] = [None] * batch
    rngs = ([np.random.default_rng(sampling.seed) for _ in range(batch)]
            if sampling is not None and not sampling.greedy else None)
    src_lens = src_mask.sum(axis=1)
    attention: list[list[np.ndarray]] = [[] for _ in range(batch)]
    step = 0
    # The per-row poll is Python work: skip it when nothing can cancel.
    check_cancel = is_cancelled is not never_cancelled
    top_k = top_k_for(rules, 1, sampling) if use_top_k else None
    while len(rows.sentence_of_row):
        alive = (np.asarray([r for r, s in enumerate(rows.sentence_of_row) if not is_cancelled(int(s))],
                            dtype=np.int64) if check_cancel else rows.sentence_of_row)
        if len(alive) < len(rows.sentence_of_row):
            tokens = tokens[alive]
            rows.select(alive)
            if not len(alive):
                break
        log_probs = rows.step(step_fn, tokens, stats, top_k)
        every_row = np.arange(len(tokens))
        if top_k:  # best first with ties by lower id, so argmax picks what argmax over the vocabulary would
            values = _banned_values(log_probs, rules, step, eos_id)
            best = values.argmax(axis=1)
            tokens, token_log_probs = log_probs.ids[every_row, best], values[every_row, best]
        else:
            apply_rules(log_probs, step, [out_tokens[s] for s in rows.sentence_of_row], rows.sentence_of_row,
                        rules, eos_id)
            if rngs is None:
                tokens = log_probs.argmax(axis=1)
            else:
                tokens = np.concatenate([sampling.choose(log_probs[r:r + 1], rngs[s])
                                         for r, s in enumerate(rows.sentence_of_row)])
            token_log_probs = log_probs[every_row, tokens]
        keep = []
        for row, sentence in enumerate(rows.sentence_of_row):
            token = int(tokens[row])
            scores[sentence] += token_log_probs[row]
            if token != eos_id:
                out_tokens[sentence].append(token)
                if return_attention:
                    attention[sentence].append(rows.attention_of(row, src_lens[sentence]))
            if token == eos_id or step + 1 >= length_limits[sentence]:
                score = float(scores[sentence])
                results[sentence] = Hypothesis(out_tokens[sentence], score, score,
                                               attention[sentence] if return_attention else None)
            else:
                keep.append(row)
        keep_rows = np.asarray(keep, dtype=np.int64)
        tokens = tokens[keep_rows]
        rows.select(keep_rows)
        step += 1
    return results


def _top_candidates(cand: np.ndarray, k: int) -> np.ndarray:
    """Flat indices of the k best entries of cand [n], best first, ties broken by lower index."""
    k = min(k, cand.shape[0])
    top = np.argpartition(-cand, k - 1)[:k]
    return top[np.lexsort((top, -cand[top]))]


def _sentence_candidates(active, live_scores, log_probs: np.ndarray, n_lives: list[int], k: int):
    """Per active sentence: (scores, flat indices) of its k best candidates, best first, ties by lower flat index
    (flat = beam x vocab + token; score = beam score + the token's log-prob).

    When every sentence has the same number of live beams (the usual case) one argpartition over
    [sentences, n_live * vocab] replaces one call per sentence (the search's largest Python-side cost).
    """
    vocab = log_probs.shape[1]
    if len(set(n_lives)) == 1 and n_lives[0] * vocab > k:
        n = n_lives[0]
        scores = np.stack([live_scores[sentence] for sentence in active])  # [sentences, n]
        cand = (scores[:, :, None] + log_probs.reshape(len(active), n, vocab)).reshape(len(active), -1)
        tops = np.argpartition(-cand, k - 1, axis=1)[:, :k]
        for row, top in zip(cand, tops):
            top = top[np.lexsort((top, -row[top]))]
            yield row[top], top
        return
    row0 = 0
    for sentence, n in zip(active, n_lives):
        cand = (live_scores[sentence][:, None] + log_probs[row0:row0 + n]).reshape(-1)
        row0 += n
        top = _top_candidates(cand, k)
        yield cand[top], top


def _sentence_candidates_from_top(active, live_scores, values: np.ndarray, top: TopCandidates, n_lives: list[int],
                                  k: int):
    """As :func:`_sentence_candidates`, from each row's top candidates (values [rows, top_k], banned at -inf)."""
    width = values.shape[1]
    groups = ([(active, n_lives[0])] if len(set(n_lives)) == 1 else [([s], n) for s, n in zip(active, n_lives)])
    row0 = 0
    for sentences, n in groups:
        rows = len(sentences) * n
        scores = np.stack([live_scores[sentence] for sentence in sentences])  # [sentences, n]
        cand = (scores[:, :, None] + values[row0:row0 + rows].reshape(len(sentences), n, width))
        flats = np.arange(n)[None, :, None] * top.vocab + top.ids[row0:row0 + rows].reshape(len(sentences), n, width)
        cand, flats = cand.reshape(len(sentences), -1), flats.reshape(len(sentences), -1)
        row0 += rows
        # Lower flat index first among equal scores: sort by flat, then stably by score. (Rows are in beam order
        # and each row's equal log-probs in id order, but a beam score plus two different log-probs can round to
        # the same float32 sum, and those must tie-break by id too.)
        order = np.argsort(flats, axis=1, kind="stable")
        cand, flats = np.take_along_axis(cand, order, 1), np.take_along_axis(flats, order, 1)
        order = np.argsort(-cand, axis=1, kind="stable")[:, :k]
        yield from zip(np.take_along_axis(cand, order, 1), np.take_along_axis(flats, order, 1))


def beam_search(step_fn: StepFn, cross_k: list[np.ndarray], cross_v: list[np.ndarray], src_mask: np.ndarray,
                length_limits: list[int], bos_id: int, eos_id: int, beam_size: int, length_penalty: float,
                n_best: int = 1, rules: Rules = Rules(), stats: StepStats | None = None,
                is_cancelled: CancelFn = never_cancelled, return_attention: bool = False,
                ops=NumpyOps(), use_top_k: bool = False) -> list[list[Hypothesis]]:
    """Beam search of a batch (semantics in the module docstring).

    Args: as :func:`greedy_search` (no sampling), plus beam_size, length_penalty (GNMT alpha) and n_best
        (<= beam_size).
    Returns: per sentence, in input order, its n_best hypotheses best first ([] for a cancelled sentence).
    """
    stats = stats or StepStats()
    batch = src_mask.shape[0]
    rows = _Rows(cross_k, cross_v, src_mask, ops)
    # Per active sentence (in row order), the live beams' tokens and scores; one live beam (bos) to start.
    live_tokens: list[list[list[int]]] = [[[]] for _ in range(batch)]
    live_scores: list[np.ndarray] = [np.zeros(1, dtype=np.float32) for _ in range(batch)]
    live_attention: list[list[list[np.ndarray]]] = [[[]] for _ in range(batch)]
    src_lens = src_mask.sum(axis=1)
    finished: list[list[Hypothesis]] = [[] for _ in range(batch)]
    active = list(range(batch))  # sentence ids, in row-block order
    last = np.full(batch, bos_id, dtype=np.int64)
    top_k = top_k_for(rules, 2 * beam_size) if use_top_k else None
    step = 0
    while active:
        if any(is_cancelled(sentence) for sentence in active):
            active, last = _drop_cancelled(rows, active, live_tokens, last, finished, is_cancelled)
            if not active:
                break
        log_probs = rows.step(step_fn, last, stats, top_k)
        n_lives = [len(live_tokens[sentence]) for sentence in active]
        if top_k:
            vocab = log_probs.vocab
            candidates = _sentence_candidates_from_top(active, live_scores, _banned_values(log_probs, rules, step,
                                                                                          eos_id),
                                                       log_probs, n_lives, 2 * beam_size)
        else:
            if rules.active:
                histories = [t for sentence in active for t in live_tokens[sentence]]
                apply_rules(log_probs, step, histories, rows.sentence_of_row, rules, eos_id)
            vocab = log_probs.shape[1]
            candidates = _sentence_candidates(active, live_scores, log_probs, n_lives, 2 * beam_size)
        parent_rows, next_last, still_active = [], [], []
        row0 = 0
        for sentence, n_live, (cand_scores, flats) in zip(active, n_lives, candidates):
            new_tokens, new_scores, parents, new_attention = [], [], [], []
            for rank, (flat, cand_score) in enumerate(zip(flats, cand_scores)):
                parent, token = divmod(int(flat), vocab)
                score = float(cand_score)
                if score == -np.inf:  # forbidden by a rule: never a hypothesis (fewer live beams instead)
                    break
                attn = live_attention[sentence][parent] if return_attention else None
                if token == eos_id:
                    if rank >= beam_size:
                        continue
                    finished[sentence].append(Hypothesis(
                        live_tokens[sentence][parent], score,
                        score / gnmt_length_penalty(step + 1, length_penalty), attn))
                else:
                    parents.append(parent)
                    new_tokens.append(live_tokens[sentence][parent] + [token])
                    new_scores.append(cand_score)
                    if return_attention:
                        new_attention.append(attn + [rows.attention_of(row0 + parent, src_lens[sentence])])
                if len(parents) == beam_size:
                    break
            if not parents and not finished[sentence]:  # every continuation forbidden: keep what we have
                penalty = gnmt_length_penalty(step, length_penalty)
                finished[sentence].extend(Hypothesis(t, float(s), float(s) / penalty, a) for t, s, a in zip(
                    live_tokens[sentence], live_scores[sentence],
                    live_attention[sentence] if return_attention else [None] * n_live))
            elif len(finished[sentence]) < beam_size and step + 1 >= length_limits[sentence]:
                penalty = gnmt_length_penalty(step + 1, length_penalty)
                finished[sentence].extend(Hypothesis(t, float(s), float(s) / penalty, a)
                                          for t, s, a in zip(new_tokens, new_scores,
                                                             new_attention or [None] * len(new_tokens)))
            elif len(finished[sentence]) < beam_size and parents:
                live_tokens[sentence] = new_tokens
                live_scores[sentence] = np.asarray(new_scores, dtype=np.float32)
                live_attention[sentence] = new_attention
                parent_rows.extend(row0 + p for p in parents)
                next_last.extend(t[-1] for t in new_tokens)
                still_active.append(sentence)
            row0 += n_live
        active = still_active
        rows.select(np.asarray(parent_rows, dtype=np.int64))
        last = np.asarray(next_last, dtype=np.int64)
        step += 1
    return [sorted(f, key=lambda h: -h.ranking_score)[:n_best] for f in finished]


def _drop_cancelled(rows: _Rows, active: list[int], live_tokens, last: np.ndarray, finished, is_cancelled):
    """Removes the row blocks of cancelled sentences; their results become []."""
    keep_rows, keep_sentences, row0 = [], [], 0
    for sentence in active:
        n_live = len(live_tokens[sentence])
        if is_cancelled(sentence):
            finished[sentence] = []
        else:
            keep_rows.extend(range(row0, row0 + n_live))
            keep_sentences.append(sentence)
        row0 += n_live
    index = np.asarray(keep_rows, dtype=np.int64)
    rows.select(index)
    return keep_sentences, last[index]
