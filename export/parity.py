"""Parity of an exported artifact with the PyTorch model: log-probs step by step, greedy and beam outputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from engine.explain import Explainer
from engine.options import DecodingOptions
from engine.runtime import EngineConfig
from engine.translator import Translator
from nmt import search
from nmt.model import Transformer


TIE_TOLERANCE = 1e-4


def _compare_beams(ref, ort) -> str:
    """"same", "tie" (differences only between float-tied hypotheses) or "mismatch"."""
    if [h.tokens for h in ref] == [h.tokens for h in ort]:
        return "same"
    if len(ref) != len(ort):
        return "mismatch"
    for r, o in zip(ref, ort):
        if r.tokens != o.tokens and abs(r.ranking_score - o.ranking_score) > TIE_TOLERANCE:
            return "mismatch"
    return "tie"


@torch.no_grad()
def _max_step_diff(model: Transformer, translator: Translator, src_ids: list[int], max_length: int) -> float:
    """Max abs log-prob difference over the greedy path of one sentence, ONNX Runtime vs PyTorch."""
    src = torch.tensor([src_ids])
    mask = torch.ones_like(src, dtype=torch.bool)
    ck, cv = model.cross_kv(model.encode(src, mask))
    ort_ck, ort_cv = map(translator.ops.to_numpy, translator.model.encode(src.numpy(), mask.numpy()))
    diff = max(float(np.abs(o - t.numpy()).max()) for o, t in zip(ort_ck + ort_cv, ck + cv))
    k, v = model.empty_cache(1)
    ort_k, ort_v = translator.model.empty_cache(ort_ck[0], 1, max_length)
    token = model.cfg.bos_id
    for t in range(max_length):
        tokens = torch.tensor([[token]])
        log_probs, k, v, _ = model.decode_step(tokens, k, v, ck, cv, mask)
        ort_lp, ort_k, ort_v, _ = translator.model.step(tokens.numpy(), ort_k, ort_v, ort_ck, ort_cv, mask.numpy(),
                                                        positions=np.asarray([t]))
        diff = max(diff, float(np.abs(ort_lp - log_probs.numpy()).max()))
        token = int(log_probs[0].argmax())
        if token == model.cfg.eos_id:
            break
    return diff


def measure_parity(model: Transformer, artifact_dir: Path, sentences: list[str], beam_size: int = 4,
                   max_length: int = 64) -> dict:
    """Compares the artifact in ``artifact_dir`` (run on the CPU provider) with ``model`` on ``sentences``.

    Greedy and beam outputs are compared token for token; the engine decodes all sentences as one batch of mixed
    lengths while PyTorch decodes them one at a time, so this also checks batch invariance. Two n-best lists that
    differ only where hypotheses' ranking scores agree within TIE_TOLERANCE (a float tie, whose order float32
    noise decides) count as ``beam_float_ties``, not mismatches.
    The explain graph's weights (every layer and head) are compared with ``Transformer.attention_maps`` over each
    sentence and its greedy output.
    Returns a dict of figures: sentences, max_abs_log_prob_diff, max_abs_score_diff, greedy_mismatches,
    beam_mismatches, beam_float_ties, beam_size, explain_max_abs_diff.
    """
    translator = Translator(artifact_dir, EngineConfig(device="cpu"))
    src = [translator.tokenize(s) for s in sentences]
    greedy_opts = DecodingOptions(beam_size=1, max_length=max_length)
    beam_opts = DecodingOptions(beam_size=beam_size, max_length=max_length, n_best=beam_size)
    ort_greedy = translator.translate_ids(src, greedy_opts)
    ort_beam = translator.translate_ids(src, beam_opts)
    figures = dict(sentences=len(src), beam_size=beam_size, max_abs_log_prob_diff=0.0, max_abs_score_diff=0.0,
                   greedy_mismatches=0, beam_mismatches=0, beam_float_ties=0, explain_max_abs_diff=0.0)
    explainer = Explainer(artifact_dir, translator.bos_id)
    for ids, g, b in zip(src, ort_greedy, ort_beam):
        limit = greedy_opts.length_limit(len(ids), translator.max_positions)
        ref_g = search.greedy_search(model, ids, limit)
        ref_b = search.beam_search(model, ids, beam_size, limit, beam_opts.length_penalty, n_best=beam_size)
        figures["max_abs_log_prob_diff"] = max(figures["max_abs_log_prob_diff"],
                                               _max_step_diff(model, translator, ids, limit))
        figures["greedy_mismatches"] += int(ref_g.tokens != g[0].tokens)
        verdict = _compare_beams(ref_b, b)
        figures["beam_mismatches"] += verdict == "mismatch"
        figures["beam_float_ties"] += verdict == "tie"
        scores = [(ref_g.score, g[0].score)] + [(r.score, o.score) for r, o in zip(ref_b, b)
                                                if r.tokens == o.tokens]
        figures["max_abs_score_diff"] = max([figures["max_abs_score_diff"]] + [abs(r - o) for r, o in scores])
        figures["explain_max_abs_diff"] = max(figures["explain_max_abs_diff"],
                                              explain_diff(model, explainer, ids, g[0].tokens))
    return figures


@torch.no_grad()
def explain_diff(model: Transformer, explainer: Explainer, src_ids: list[int], tgt_ids: list[int]) -> float:
    """Max abs difference of every attention weight, explain.onnx vs Transformer.attention_maps (PyTorch)."""
    maps = explainer.explain(src_ids, tgt_ids)
    src = torch.tensor([src_ids])
    reference = model.attention_maps(src, torch.ones_like(src, dtype=torch.bool),
                                     torch.tensor([[model.cfg.bos_id] + list(tgt_ids)]))
    return max(float(np.abs(o - r[0].numpy()).max()) for o, r in zip((maps.encoder, maps.decoder, maps.cross),
                                                                       reference))
