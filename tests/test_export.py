"""ONNX export: parity with PyTorch (figures in the manifest), dynamic shapes, loud failure."""

import collections
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from engine import contract
from export.onnx_export import ParityError, export_checkpoint

from conftest import CHECKPOINT, PARITY_SENTENCES

LOG_PROB_ATOL = 1e-3


def test_manifest_records_parity_within_tolerance(exported):
    artifact, manifest = exported
    parity = manifest["parity"]
    assert parity["sentences"] == len(PARITY_SENTENCES) >= 20
    assert parity["max_abs_log_prob_diff"] <= LOG_PROB_ATOL
    assert parity["greedy_mismatches"] == 0 and parity["beam_mismatches"] == 0
    on_disk = json.loads((artifact / contract.MANIFEST).read_text())
    assert on_disk["files"].keys() >= {contract.ENCODER_FILE, contract.DECODER_STEP_FILE, "spm.model"}
    assert on_disk["opset"] == contract.OPSET


@pytest.mark.parametrize("src_len,past_len,beams", [(1, 0, [1]), (41, 0, [1, 4, 1, 2, 3]), (13, 17, [4, 4]),
                                                     (3, 1, [1] * 7)])
@torch.no_grad()
def test_graphs_run_at_other_shapes_and_match_pytorch(torch_model, translator, src_len, past_len, beams):
    # The ONNX step gets each sentence's cross K/V once (format 4); PyTorch gets them repeated per row (beam).
    cfg = torch_model.cfg
    batch = len(beams)
    gen = torch.Generator().manual_seed(batch * 100 + src_len)
    src = torch.randint(4, cfg.vocab_size, (batch, src_len), generator=gen)
    mask = torch.ones(batch, src_len, dtype=torch.bool)
    mask[0, src_len // 2 + 1:] = False  # a padded row
    ck, cv = torch_model.cross_kv(torch_model.encode(src, mask))
    ort_ck, ort_cv = map(translator.ops.to_numpy, translator.model.encode(src.numpy(), mask.numpy()))
    for ort_x, x in zip(ort_ck + ort_cv, ck + cv):
        np.testing.assert_allclose(ort_x, x.numpy(), atol=1e-4)
    row_sentence = np.repeat(np.arange(batch), beams)
    rows = len(row_sentence)
    shape = (rows, cfg.n_heads, past_len, cfg.d_head)
    k = [torch.randn(shape, generator=gen) for _ in range(cfg.n_decoder_layers)]
    v = [torch.randn(shape, generator=gen) for _ in range(cfg.n_decoder_layers)]
    tokens = torch.randint(4, cfg.vocab_size, (rows, 1), generator=gen)
    per_row = torch.from_numpy(row_sentence)
    lp, nk, nv, attention = torch_model.decode_step(tokens, k, v, [x[per_row] for x in ck],
                                                    [x[per_row] for x in cv], mask[per_row])
    numpy = lambda xs: [x.numpy() for x in xs]  # noqa: E731
    ort_lp, ort_nk, ort_nv, ort_attention = translator.model.step(tokens.numpy(), numpy(k), numpy(v), ort_ck,
                                                                  ort_cv, mask.numpy(), row_sentence=row_sentence)
    ort_nk, ort_nv = translator.ops.to_numpy(ort_nk), translator.ops.to_numpy(ort_nv)
    np.testing.assert_allclose(ort_attention, attention.numpy(), atol=1e-5)
    assert len(ort_nk) == cfg.n_decoder_layers
    assert all(x.shape == (rows, cfg.n_heads, past_len + 1, cfg.d_head) for x in ort_nk + ort_nv)
    np.testing.assert_allclose(ort_lp, lp.numpy(), atol=LOG_PROB_ATOL)
    for ort_x, x in zip(ort_nk + ort_nv, nk + nv):
        np.testing.assert_allclose(ort_x, x.numpy(), atol=1e-4)


def test_decoder_step_linear_layers_run_as_one_gemm_each_with_q_k_v_fused(artifact, torch_model, tmp_path):
    # The step keeps its one query per row 2-D, so ONNX Runtime fuses each projection's MatMul and bias Add into a
    # Gemm (the FFN's first with its ReLU); on [rows, 1, d_model] it could not, and every bias was a kernel of its
    # own. Per decoder layer: q|k|v (one [d_model, 3 d_model] weight), the self-attention output, the cross-attention
    # query and output, the FFN's two; then the output projection. Any MatMul left with a weight would be a
    # projection that regressed to the unfused path.
    cfg = torch_model.cfg
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(artifact / contract.DECODER_STEP_FILE), options, providers=["CPUExecutionProvider"])
    graph = onnx.load(options.optimized_model_filepath).graph
    weights = {w.name: tuple(w.dims) for w in graph.initializer}
    with_weight = [(node.op_type, weights[node.input[1]]) for node in graph.node if node.input[1:2]
                   and node.input[1] in weights and node.op_type in ("Gemm", "FusedGemm", "MatMul", "FusedMatMul")]
    d, n = cfg.d_model, cfg.n_decoder_layers
    assert collections.Counter(with_weight) == collections.Counter(
        {("Gemm", (d, 3 * d)): n, ("Gemm", (d, d)): 3 * n, ("FusedGemm", (d, cfg.d_ff)): n,
         ("Gemm", (cfg.d_ff, d)): n, ("Gemm", (d, cfg.vocab_size)): 1})


def test_export_fails_loudly_when_parity_fails(tmp_path):
    # A tolerance no float32 export can meet: the check must refuse and leave no artifact behind.
    with pytest.raises(ParityError, match="max abs log-prob difference"):
        export_checkpoint(CHECKPOINT, tmp_path / "out", PARITY_SENTENCES[:2], atol=1e-12)
    assert not (tmp_path / "out").exists()
