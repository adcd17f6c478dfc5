"""Reference greedy and beam search in PyTorch, one sentence at a time: the oracle for the ONNX engine.

Deliberately simple and unbatched, so that the batched engine can be checked against it for parity and for batch
invariance. Semantics shared with the engine (engine/search.py):

- Decoding starts from bos; the returned tokens exclude bos and eos.
- ``max_length``: at most this many decoding steps (generated tokens, eos included).
- ``min_length``: eos is forbidden at the first ``min_length`` steps.
- Scores are summed natural-log probabilities of the generated tokens, eos included.
- Beam hypotheses are ranked by score / lp(len) with the GNMT length penalty lp(len) = ((5 + len) / 6) ** alpha
  (Wu et al. 2016, eq. 14), len = generated tokens including eos, alpha = ``length_penalty`` (0 disables).
- pad is never generated (Marian and Hugging Face ban it too); a candidate scored -inf (forbidden) is never kept.
- Each step takes the best 2 * beam_size candidates in score order (ties: lower flat index first); eos candidates
  ranked among the best beam_size become finished hypotheses (lower-ranked ones are dropped), the others fill the
  beam_size live beams. A sentence stops when it has beam_size finished hypotheses (fairseq's and Hugging Face's
  early-stopping rule) or at max_length, where the live beams are finalized as they are. (The engine stops a
  sentence sooner when this rule can no longer change its result, engine/search.py; this oracle runs the full rule,
  so the parity tests check that the two agree.)
"""

from __future__ import annotations

import dataclasses

import torch

from nmt.model import Transformer


@dataclasses.dataclass(frozen=True)
class Hypothesis:
    """One output: token ids (no bos/eos), summed log-prob ``score`` and the length-normalized ``ranking_score``."""

    tokens: list[int]
    score: float
    ranking_score: float


def gnmt_length_penalty(length: int, alpha: float) -> float:
    """lp(len) = ((5 + len) / 6) ** alpha (Wu et al. 2016, eq. 14)."""
    return ((5.0 + length) / 6.0) ** alpha


class _Encoded:
    """Encoder output for one sentence, expanded to ``rows`` decoder rows on demand."""

    def __init__(self, model: Transformer, src_ids: list[int]) -> None:
        src = torch.tensor([src_ids], dtype=torch.long)
        self.mask = torch.ones_like(src, dtype=torch.bool)
        self.cross_k, self.cross_v = model.cross_kv(model.encode(src, self.mask))  # L x [1, H, S, d_head]

    def rows(self, n: int):
        return ([k.expand(n, -1, -1, -1) for k in self.cross_k], [v.expand(n, -1, -1, -1) for v in self.cross_v],
                self.mask.expand(n, -1))


@torch.no_grad()
def greedy_search(model: Transformer, src_ids: list[int], max_length: int, min_length: int = 0) -> Hypothesis:
    """Greedy decoding of one sentence. src_ids: source token ids ending in eos. Returns the hypothesis."""
    cfg = model.cfg
    enc = _Encoded(model, src_ids)
    k, v = model.empty_cache(1)
    token, tokens, score = cfg.bos_id, [], torch.zeros((), dtype=torch.float32)
    for step in range(max_length):
        log_probs, k, v, _ = model.decode_step(torch.tensor([[token]]), k, v, *enc.rows(1))
        log_probs[:, cfg.pad_id] = -float("inf")
        if step < min_length:
            log_probs[:, cfg.eos_id] = -float("inf")
        token = int(log_probs[0].argmax())
        score = score + log_probs[0, token]
        if token == cfg.eos_id:
            return Hypothesis(tokens, float(score), float(score))
        tokens.append(token)
    return Hypothesis(tokens, float(score), float(score))


@torch.no_grad()
def beam_search(model: Transformer, src_ids: list[int], beam_size: int, max_length: int,
                length_penalty: float = 0.6, min_length: int = 0, n_best: int = 1) -> list[Hypothesis]:
    """Beam search for one sentence (semantics in the module docstring). Returns n_best hypotheses, best first."""
    cfg = model.cfg
    enc = _Encoded(model, src_ids)
    k, v = model.empty_cache(1)
    live_tokens: list[list[int]] = [[]]
    live_scores = torch.zeros(1)
    finished: list[Hypothesis] = []

    def finish(tokens: list[int], score: float, length: int) -> None:
        finished.append(Hypothesis(tokens, score, score / gnmt_length_penalty(length, length_penalty)))

    for step in range(max_length):
        rows = len(live_tokens)
        last = torch.tensor([[t[-1] if t else cfg.bos_id] for t in live_tokens])
        log_probs, k, v, _ = model.decode_step(last, k, v, *enc.rows(rows))
        log_probs[:, cfg.pad_id] = -float("inf")
        if step < min_length:
            log_probs[:, cfg.eos_id] = -float("inf")
        cand = (live_scores[:, None] + log_probs).flatten()  # [rows * vocab]
        order = torch.sort(cand, descending=True, stable=True).indices[: 2 * beam_size]
        parents, new_tokens, new_scores = [], [], []
        for rank, flat in enumerate(order.tolist()):
            parent, token = divmod(flat, cfg.vocab_size)
            if float(cand[flat]) == -float("inf"):  # forbidden: never a hypothesis
                break
            if token == cfg.eos_id:
                if rank < beam_size:
                    finish(live_tokens[parent], float(cand[flat]), step + 1)
            elif len(parents) < beam_size:
                parents.append(parent)
                new_tokens.append(live_tokens[parent] + [token])
                new_scores.append(cand[flat])
            if len(parents) == beam_size:
                break
        if len(finished) >= beam_size:
            break
        live_tokens, live_scores = new_tokens, torch.stack(new_scores)
        index = torch.tensor(parents)
        k, v = [x[index] for x in k], [x[index] for x in v]
    else:
        for tokens, score in zip(live_tokens, live_scores.tolist()):
            finish(tokens, score, max_length)
    finished.sort(key=lambda h: -h.ranking_score)  # stable: earlier-finished first among ties
    return finished[:n_best]
