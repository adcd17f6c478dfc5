"""ONNX export: parity with PyTorch (figures in the manifest), dynamic shapes, loud failure."""

import collections
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from engine import contract
from engine.runtime import cross_slots
from export.onnx_export import ParityError, export_checkpoint, export_graphs, sample_inputs

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
    # Format 5: rows at their own positions (every other row one shorter, as rows that joined later) in a cache
    # with spare capacity; what lies past a row's position is junk that must not matter.
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
    positions = torch.tensor([max(past_len - r % 2, 0) for r in range(rows)])
    shape = (rows, cfg.n_heads, past_len + 3, cfg.d_head)
    k = [torch.randn(shape, generator=gen) for _ in range(cfg.n_decoder_layers)]
    v = [torch.randn(shape, generator=gen) for _ in range(cfg.n_decoder_layers)]
    tokens = torch.randint(4, cfg.vocab_size, (rows, 1), generator=gen)
    per_row = torch.from_numpy(row_sentence)
    slot_rows, row_slot = map(torch.from_numpy, cross_slots(np.arange(rows)))
    lp, nk, nv, attention = torch_model.decode_step_cached(tokens, positions, k, v, [x[per_row] for x in ck],
                                                           [x[per_row] for x in cv], mask[per_row], slot_rows,
                                                           row_slot, custom_op=False)
    ort_k, ort_v = [x.numpy().copy() for x in k], [x.numpy().copy() for x in v]
    ort_lp, ort_nk, ort_nv, ort_attention = translator.model.step(tokens.numpy(), ort_k, ort_v, ort_ck, ort_cv,
                                                                  mask.numpy(), positions=positions.numpy(),
                                                                  row_sentence=row_sentence)
    np.testing.assert_allclose(ort_attention, attention.numpy(), atol=1e-5)
    assert len(ort_nk) == cfg.n_decoder_layers
    np.testing.assert_allclose(ort_lp, lp.numpy(), atol=LOG_PROB_ATOL)
    # Written in place: the arrays passed in (not only what step returns) now hold this step's key/value at each
    # row's position, where they held junk before, and the row's earlier ones unchanged.
    for given, x, old in zip(ort_k + ort_v, nk + nv, k + v):
        for r, p in enumerate(positions.tolist()):
            np.testing.assert_allclose(given[r, :, :p + 1], x[r, :, :p + 1].numpy(), atol=1e-4)
            np.testing.assert_array_equal(given[r, :, :p], old[r, :, :p].numpy())
            assert not np.allclose(given[r, :, p], old[r, :, p].numpy(), atol=1e-3)


def test_a_position_past_the_capacity_is_refused(translator):
    src = np.asarray([[5, 6, 3]])
    mask = np.ones_like(src, dtype=bool)
    ck, cv = translator.model.encode(src, mask)
    k, v = translator.model.empty_cache(ck[0], 1, 4)
    with pytest.raises(ValueError, match="capacity 4"):
        translator.model.step(np.asarray([[2]]), k, v, ck, cv, mask, positions=np.asarray([4]))
    with pytest.raises(ValueError, match="C-contiguous"):
        translator.model.step(np.asarray([[2]]), [x[:, :, ::2] for x in k], v, ck, cv, mask,
                              positions=np.asarray([1]))


@pytest.mark.parametrize("kept_output_bytes", [None, 0], ids=["outputs-kept", "outputs-fresh"])
def test_a_kept_binding_follows_every_change_of_the_buffers_it_was_given(artifact, kept_output_bytes, monkeypatch):
    """OnnxModel.step keeps its IOBinding between steps and binds again only what changed (the same array objects
    as the last step, else by address, shape and dtype; its attention output while the shape is the same): each step
    here changes something (new content only; another cache or cross K/V buffer at the same
    shape; a view of fewer rows of the same buffers; two rows of one sentence; cross K/V not C-contiguous) and
    must match a model that binds everything anew at each step, in log-probs and in the caches it writes."""
    from engine import kept_binding
    from engine.runtime import EngineConfig
    from engine.translator import Translator

    if kept_output_bytes is not None:  # outputs too large to keep: a new one each step, bound each step
        monkeypatch.setattr(kept_binding, "KEPT_OUTPUT_BYTES", kept_output_bytes)
    kept = Translator(artifact, EngineConfig(device="cpu", intra_op_threads=1)).model
    fresh = Translator(artifact, EngineConfig(device="cpu", intra_op_threads=1)).model
    fresh._kept_binding = lambda self_k: None  # the path that binds everything at every step
    rng = np.random.default_rng(7)
    src = np.asarray([[12, 40, 7, 3], [25, 9, 3, 0], [31, 3, 0, 0]])
    mask = src != 0
    ck, cv = map(list, kept.encode(src, mask))
    k, v = kept.empty_cache(ck[0], 3, 8)
    for x in k + v:
        x[:] = rng.standard_normal(x.shape, dtype=np.float32)
    n = len(k)

    def both(k, v, ck, cv, mask, positions, row_sentence=None):
        ref_k, ref_v = [x.copy() for x in k], [x.copy() for x in v]
        tokens = rng.integers(4, kept.vocab_size, (len(positions), 1))
        lp, _, _, attention = kept.step(tokens, k, v, ck, cv, mask, positions=np.asarray(positions),
                                        row_sentence=row_sentence)
        ref_lp, _, _, ref_attention = fresh.step(tokens, ref_k, ref_v, ck, cv, mask, positions=np.asarray(positions),
                                                 row_sentence=row_sentence)
        np.testing.assert_allclose(lp, ref_lp, atol=1e-6)
        np.testing.assert_allclose(np.asarray(attention), np.asarray(ref_attention), atol=1e-6)  # a kept output
        for x, ref in zip(k + v, ref_k + ref_v):
            np.testing.assert_allclose(x, ref, atol=1e-6)

    both(k, v, ck, cv, mask, [0, 2, 5])
    both(k, v, ck, cv, mask, [1, 3, 6])  # the same buffers, written by the step before
    k[1], v[0] = k[1].copy() * 0.5, v[0].copy() + 1.0  # other buffers of the same shape; k[0] (the key) stays
    both(k, v, ck, cv, mask, [2, 4, 7])
    ck[0], cv[n - 1] = ck[0] * 2.0, cv[n - 1] - 0.5  # other cross K/V
    both(k, v, ck, cv, mask, [3, 5, 7])
    both([x[:2] for x in k], [x[:2] for x in v], [x[:2] for x in ck], [x[:2] for x in cv], mask[:2], [4, 6])
    # 3 rows of 2 sentences (beams): 2 slots of the cross K/V's first 2 sentences
    both(k, v, [x[:2] for x in ck], [x[:2] for x in cv], mask[:2], [5, 6, 7], row_sentence=np.asarray([0, 1, 0]))
    # Cross K/V that are not C-contiguous: the step binds contiguous copies, each alive until the run
    both(k, v, [np.asfortranarray(x) for x in ck], [np.asfortranarray(x) for x in cv], mask, [6, 7, 7])
    # Two steps of one shape: the same logits buffer when kept, a new one each step when too large to keep.
    first, second = (kept.step(np.full((3, 1), 5), k, v, ck, cv, mask, positions=np.asarray([0, 1, 2]))[0]
                     for _ in range(2))
    assert (first is second) == (kept_output_bytes is None)


def test_the_decoder_step_writes_its_cache_through_group_query_attention(exported, torch_model):
    artifact, manifest = exported
    graph = onnx.load(str(artifact / contract.DECODER_STEP_FILE)).graph
    assert [n.op_type for n in graph.node].count("GroupQueryAttention") == torch_model.cfg.n_decoder_layers
    assert manifest["self_attention"] == "gqa" and manifest["format_version"] == contract.FORMAT_VERSION == 7


def test_the_decoder_step_outputs_cross_attention_per_slot_as_its_softmax_left_it(exported):
    """Format 6: the alignments cost the step no node of their own (the engine averages them when asked)."""
    graph = onnx.load(str(exported[0] / contract.DECODER_STEP_FILE)).graph
    attention = next(o for o in graph.output if o.name == "attention")
    dims = [d.dim_param or d.dim_value for d in attention.type.tensor_type.shape.dim]
    assert dims[1] == json.loads((exported[0] / contract.CONFIG_FILE).read_text())["n_heads"] and len(dims) == 4
    producer = next(n for n in graph.node if "attention" in n.output)
    assert producer.op_type == "Softmax"
    assert not any(n.op_type == "ReduceMean" for n in graph.node)


@torch.no_grad()
def test_the_decoder_step_outputs_logits_whose_log_softmax_is_the_models_log_probs(exported, torch_model):
    """Format 7: no LogSoftmax in the graph (greedy steps without scores skip it, engine/core.py); the engine's
    own log-softmax of the logits gives the PyTorch model's log-probs, and an argmax over either is the same."""
    from engine.runtime import EngineConfig, OnnxModel

    artifact, _ = exported
    graph = onnx.load(str(artifact / contract.DECODER_STEP_FILE)).graph
    assert graph.output[0].name == "logits" and not any(n.op_type == "LogSoftmax" for n in graph.node)
    _, step = sample_inputs(torch_model)
    n = torch_model.cfg.n_decoder_layers
    feeds = dict(zip(contract.decoder_inputs(n), (x.numpy().copy() for x in step)))
    tokens, positions, src_mask, slot_rows, row_slot = step[:5]
    self_k, self_v, cross_k, cross_v = ([x.clone() for x in step[5 + i * n:5 + (i + 1) * n]] for i in range(4))
    want = torch_model.decode_step_cached(tokens, positions, self_k, self_v, cross_k, cross_v, src_mask, slot_rows,
                                          row_slot)[0].numpy()
    logits = ort.InferenceSession(str(artifact / contract.DECODER_STEP_FILE),
                                  providers=["CPUExecutionProvider"]).run(["logits"], feeds)[0]
    model = OnnxModel(artifact, EngineConfig(device="cpu"), n)
    log_probs = model.log_softmax(logits.copy())
    np.testing.assert_allclose(log_probs, want, atol=1e-4)
    assert (log_probs.argmax(axis=1) == logits.argmax(axis=1)).all()
    with pytest.raises(ValueError, match="in place"):
        model.log_softmax(np.asfortranarray(logits))


@torch.no_grad()
def test_the_standard_ops_step_computes_what_the_group_query_attention_one_does(torch_model, artifact, tmp_path):
    # For providers without GroupQueryAttention in float32 (CUDA): same inputs, same outputs, no contrib op.
    export_graphs(torch_model, tmp_path, "standard")
    graph = onnx.load(str(tmp_path / contract.DECODER_STEP_FILE)).graph
    assert all(n.domain in ("", "ai.onnx") for n in graph.node)
    _, step = sample_inputs(torch_model)
    feeds = dict(zip(contract.decoder_inputs(torch_model.cfg.n_decoder_layers), (x.numpy() for x in step)))
    got, want = (ort.InferenceSession(str(folder / contract.DECODER_STEP_FILE), providers=["CPUExecutionProvider"])
                 .run(None, feeds) for folder in (tmp_path, artifact))
    positions = feeds["positions"]
    np.testing.assert_allclose(got[0], want[0], atol=1e-4)
    np.testing.assert_allclose(got[1], want[1], atol=1e-5)
    for g, w in zip(got[2:], want[2:]):
        for r, p in enumerate(positions):
            np.testing.assert_allclose(g[r, :, :p + 1], w[r, :, :p + 1], atol=1e-5)
    with pytest.raises(ValueError, match="self_attention"):
        export_graphs(torch_model, tmp_path, "flash")


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


def test_cross_attention_scores_run_without_a_scale_so_one_query_takes_mlas_one_row_kernel(artifact, torch_model,
                                                                                             tmp_path):
    # The queries arrive scaled (nmt/model.py, step_q): a scale on the scores' product (FusedMatMul's alpha, what
    # ONNX Runtime fuses a Mul by 1/sqrt(d_head) into) sends MLAS's product for one query per sentence (a greedy
    # step) from its one-row kernel to the general one, which packs K first: 1.6x slower (docs/performance.md).
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(artifact / contract.DECODER_STEP_FILE), options, providers=["CPUExecutionProvider"])
    scores = [node for node in onnx.load(options.optimized_model_filepath).graph.node
              if node.op_type in ("MatMul", "FusedMatMul") and node.input[1].startswith("cross_k_")]
    assert len(scores) == torch_model.cfg.n_decoder_layers
    for node in scores:
        alpha = next((onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == "alpha"), 1.0)
        assert alpha == 1.0, node.name


def test_export_fails_loudly_when_parity_fails(tmp_path):
    # A tolerance no float32 export can meet: the check must refuse and leave no artifact behind.
    with pytest.raises(ParityError, match="max abs log-prob difference"):
        export_checkpoint(CHECKPOINT, tmp_path / "out", PARITY_SENTENCES[:2], atol=1e-12)
    assert not (tmp_path / "out").exists()


def _folder(path, files: dict) -> dict:
    path.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (path / name).write_text(text)
    return files


def _contents(path) -> dict:
    return {f.name: f.read_text() for f in path.iterdir()}


def test_publish_replaces_an_artifact_whole_and_leaves_nothing_beside_it(tmp_path):
    from export.publish import publish

    _folder(tmp_path / "art", {"encoder.onnx": "old", "stale.onnx": "old"})
    new = _folder(tmp_path / "built", {"encoder.onnx": "new", "manifest.json": "{}"})
    publish(tmp_path / "built", tmp_path / "art")
    assert _contents(tmp_path / "art") == new  # the old folder's other files are gone too
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art", "built"]  # no staging or old folder left
    publish(tmp_path / "built", tmp_path / "fresh" / "art")  # a new path, parents made
    assert _contents(tmp_path / "fresh" / "art") == new


def test_publish_that_fails_while_copying_leaves_the_old_artifact_as_it_was(tmp_path, monkeypatch):
    """A full disk halfway through the copy: the artifact a replica would load is still the old one, whole."""
    import shutil

    from export.publish import publish

    old = _folder(tmp_path / "art", {"encoder.onnx": "old", "decoder_step.onnx": "old"})
    _folder(tmp_path / "built", {"encoder.onnx": "new", "decoder_step.onnx": "new", "manifest.json": "{}"})
    copied, real_copyfile = [], shutil.copyfile

    def copy_then_fail(src, dst, **kwargs):
        if copied:
            raise OSError(28, "No space left on device")
        copied.append(src)
        return real_copyfile(src, dst, **kwargs)

    monkeypatch.setattr(shutil, "copyfile", copy_then_fail)  # what copytree's copy2 calls for each file
    with pytest.raises(OSError):  # shutil.Error, which copytree raises, is an OSError
        publish(tmp_path / "built", tmp_path / "art")
    assert copied  # it did fail halfway, not before the copy
    assert _contents(tmp_path / "art") == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art", "built"]
