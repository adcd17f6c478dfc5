"""The PyTorch model: incremental decoding with the KV cache equals the teacher-forced forward pass."""

import math

import pytest
import torch

from nmt import model as nmt_model
from nmt.config import ACTIVATIONS, ModelConfig
from nmt.model import Transformer, sinusoidal_positions

from conftest import SENTENCES


@pytest.fixture(scope="module")
def batch(torch_model):
    import sentencepiece as spm
    from conftest import CHECKPOINT

    sp = spm.SentencePieceProcessor(model_file=str(CHECKPOINT / "spm.model"))
    cfg = torch_model.cfg
    ids = [sp.encode(s) + [cfg.eos_id] for s in SENTENCES[:4]]
    src = torch.full((len(ids), max(map(len, ids))), cfg.pad_id)
    for i, row in enumerate(ids):
        src[i, : len(row)] = torch.tensor(row)
    # A target prefix: the source ids shifted into bos + tokens (any ids do for an equality check).
    tgt = torch.cat([torch.full((len(ids), 1), cfg.bos_id), src[:, :9].clamp(min=4)], dim=1)
    return src, src != cfg.pad_id, tgt


@torch.no_grad()
def test_incremental_decoding_equals_full_forward(torch_model, batch):
    src, mask, tgt = batch
    full = torch.log_softmax(torch_model(src, mask, tgt), dim=-1)  # [batch, tgt_len, vocab]
    ck, cv = torch_model.cross_kv(torch_model.encode(src, mask))
    k, v = torch_model.empty_cache(src.shape[0])
    for t in range(tgt.shape[1]):
        step, k, v, attention = torch_model.decode_step(tgt[:, t : t + 1], k, v, ck, cv, mask)
        torch.testing.assert_close(step, full[:, t], atol=1e-4, rtol=1e-4)
        # Cross-attention: a distribution over the real source tokens, none of it on padding.
        torch.testing.assert_close(attention.sum(dim=1), torch.ones(src.shape[0]))
        assert float(attention[~mask].abs().max()) < 1e-6
    assert len(k) == torch_model.cfg.n_decoder_layers and all(x.shape[2] == tgt.shape[1] for x in k)


@torch.no_grad()
def test_a_row_that_joined_later_decodes_as_alone_over_a_padded_cache(torch_model, batch):
    """Continuous batching: row 1 starts 3 steps after row 0; its cache positions before it joined hold junk that
    past_mask hides, and its own position restarts at 0. Its log-probs equal those of decoding it alone."""
    src, mask, tgt = batch
    ck, cv = torch_model.cross_kv(torch_model.encode(src[:2], mask[:2]))
    k, v = torch_model.empty_cache(2)
    past_mask = torch.zeros(2, 0, dtype=torch.bool)
    ak, av = torch_model.empty_cache(1)
    alone_ck, alone_cv = [x[1:2] for x in ck], [x[1:2] for x in cv]
    for t in range(8):
        joined = t >= 3
        tokens = torch.stack([tgt[0, t], tgt[1, t - 3] if joined else torch.tensor(4)])[:, None]
        positions = torch.tensor([t, t - 3 if joined else 0])
        junk = [torch.randn_like(x) for x in k]  # what the row's cache holds before it joined must not matter
        k = [torch.where(past_mask[:, None, :, None], x, j) for x, j in zip(k, junk)]
        step, k, v, _ = torch_model.decode_step(tokens, k, v, ck, cv, mask[:2], positions, past_mask)
        if joined:
            want, ak, av, _ = torch_model.decode_step(tgt[1:2, t - 3:t - 2], ak, av, alone_ck, alone_cv, mask[1:2])
            torch.testing.assert_close(step[1], want[0], atol=1e-5, rtol=1e-5)
        own = torch.tensor([True, joined])
        past_mask = torch.cat([past_mask, own[:, None]], dim=1)


@pytest.mark.parametrize("custom_op", [True, False])
@torch.no_grad()
def test_a_row_that_joined_later_decodes_as_alone_in_a_preallocated_cache(torch_model, batch, custom_op):
    """Format 5 (what the exported step computes): row 1 joins 3 steps after row 0 at position 0 of its own row of
    the buffer; whatever lies past a row's position is junk that must not matter. Both rows' log-probs equal
    those of :meth:`decode_step` decoding each alone, with the custom op and with plain PyTorch ops."""
    src, mask, tgt = batch
    ck, cv = torch_model.cross_kv(torch_model.encode(src[:2], mask[:2]))
    shape = (2, torch_model.cfg.n_heads, 12, torch_model.cfg.d_head)
    k = [torch.randn(shape) for _ in range(torch_model.cfg.n_decoder_layers)]
    v = [torch.randn(shape) for _ in range(torch_model.cfg.n_decoder_layers)]
    alone = [torch_model.empty_cache(1) for _ in range(2)]
    slot_rows, row_slot = torch.tensor([[0], [1]]), torch.tensor([0, 1])
    for t in range(8):
        joined = t >= 3
        tokens = torch.stack([tgt[0, t], tgt[1, t - 3] if joined else torch.tensor(4)])[:, None]
        positions = torch.tensor([t, t - 3 if joined else 0])
        step, k, v, _ = torch_model.decode_step_cached(tokens, positions, k, v, ck, cv, mask[:2], slot_rows,
                                                       row_slot, custom_op)
        for row in (0, 1) if joined else (0,):
            ak, av = alone[row]
            want, ak, av, _ = torch_model.decode_step(tokens[row:row + 1], ak, av, [x[row:row + 1] for x in ck],
                                                      [x[row:row + 1] for x in cv], mask[row:row + 1])
            alone[row] = (ak, av)
            torch.testing.assert_close(step[row], want[0], atol=1e-5, rtol=1e-5)
        if not joined:  # the row that has not joined yet: its junk is not kept
            k = [torch.cat([x[:1], torch.randn_like(x[1:])]) for x in k]
            v = [torch.cat([x[:1], torch.randn_like(x[1:])]) for x in v]


@torch.no_grad()
def test_cross_attention_once_per_sentence_equals_once_per_row(torch_model, batch):
    """Format 4: sentences with 1, 4 and 2 rows (beams) attend to one copy of their memory each; every row's
    log-probs, cache and alignment equal those of the same step with the memory repeated per row (format 3)."""
    from engine.runtime import cross_slots

    src, mask, tgt = batch
    beams = torch.tensor([1, 4, 2])
    row_sentence = torch.repeat_interleave(torch.arange(3), beams)
    rows = len(row_sentence)
    ck, cv = torch_model.cross_kv(torch_model.encode(src[:3], mask[:3]))
    shape = (rows, torch_model.cfg.n_heads, 5, torch_model.cfg.d_head)
    gen = torch.Generator().manual_seed(0)
    k = [torch.randn(shape, generator=gen) for _ in ck]
    v = [torch.randn(shape, generator=gen) for _ in ck]
    tokens = tgt[row_sentence, 4:5] + torch.arange(rows)[:, None]  # beams of one sentence hold other tokens
    slot_rows, row_slot = map(torch.from_numpy, cross_slots(row_sentence.numpy()))
    got = torch_model.decode_step(tokens, k, v, ck, cv, mask[:3], slot_rows=slot_rows, row_slot=row_slot)
    want = torch_model.decode_step(tokens, k, v, [x[row_sentence] for x in ck], [x[row_sentence] for x in cv],
                                   mask[row_sentence])
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[3], want[3], atol=1e-6, rtol=1e-5)
    for a, b in zip(got[1] + got[2], want[1] + want[2]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_a_steps_cross_attention_queries_carry_the_scale_bit_for_bit(torch_model):
    """step_q folds 1/sqrt(d_head) into the query projection (so that the exported scores' MatMul has no alpha);
    with d_head a power of two (64: 1/8) that is the same floats as scaling the projected queries."""
    attn = torch_model.decoder_layers[0].cross_attn
    assert attn.d_head & (attn.d_head - 1) == 0
    y = torch.randn(7, torch_model.cfg.d_model, generator=torch.Generator().manual_seed(0))
    unscaled = y @ attn.q_proj.weight.t() + attn.q_proj.bias
    assert torch.equal(attn.step_q(y), unscaled * attn.d_head ** -0.5)


@torch.no_grad()
def test_the_exported_encoders_2d_form_equals_encode_then_cross_kv(torch_model, batch):
    """encode_cross_kv (what encoder.onnx is exported from: 2-D projections, q/k/v one GEMM, every decoder layer's
    cross K/V one GEMM) gives the cross K/V of encode() then cross_kv(), padded sentences included, in their layout."""
    src, mask, _ = batch
    assert not bool(mask.all())  # the batch has padding
    want_k, want_v = torch_model.cross_kv(torch_model.encode(src, mask))
    got_k, got_v = torch_model.encode_cross_kv(src, mask)
    assert len(got_k) == len(got_v) == torch_model.cfg.n_decoder_layers
    for got, want in zip(got_k + got_v, want_k + want_v):
        assert got.shape == want.shape == (src.shape[0], torch_model.cfg.n_heads, src.shape[1], torch_model.cfg.d_head)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_padding_does_not_change_encoder_output(torch_model, batch):
    src, mask, _ = batch
    alone = torch_model.encode(src[2:3, : int(mask[2].sum())], mask[2:3, : int(mask[2].sum())])
    padded = torch_model.encode(src, mask)[2:3, : int(mask[2].sum())]
    torch.testing.assert_close(padded, alone, atol=1e-5, rtol=1e-5)


def test_sinusoidal_positions_match_the_paper_up_to_dimension_order():
    d_model, pos = 8, torch.arange(5)
    pe = sinusoidal_positions(pos, d_model)
    for p in range(5):
        for i in range(d_model // 2):
            angle = p / 10000 ** (2 * i / d_model)
            assert math.isclose(pe[p, i].item(), math.sin(angle), abs_tol=1e-6)
            assert math.isclose(pe[p, d_model // 2 + i].item(), math.cos(angle), abs_tol=1e-6)


@torch.no_grad()
def test_a_step_reads_the_positions_that_the_full_model_computes_and_checkpoints_do_not_carry_them(torch_model):
    cfg = torch_model.cfg
    positions = torch.arange(cfg.max_positions)
    tokens = (positions % (cfg.vocab_size - 4)) + 4
    stepped = torch_model.embed_step(tokens, positions)  # [rows, d_model], from the table
    computed = torch_model.embed_tokens(tokens[None], positions)[0]  # sin/cos of each position
    torch.testing.assert_close(stepped, computed, atol=1e-6, rtol=0)
    # The table is derived, not trained: a checkpoint saved without it (every earlier one) loads strictly.
    state = torch_model.state_dict()
    assert not any("position_table" in name for name in state)
    fresh = Transformer(cfg)
    fresh.load_state_dict(state, strict=True)
    torch.testing.assert_close(fresh.embed_step(tokens, positions), stepped)


def test_output_projection_is_tied_to_embeddings():
    model = Transformer(ModelConfig(vocab_size=50, d_model=16, n_heads=2, d_ff=32, n_encoder_layers=1,
                                    n_decoder_layers=1))
    y = torch.randn(2, 16)
    torch.testing.assert_close(model.output_logits(y), y @ model.embed.weight.t())


@pytest.mark.parametrize("kwargs", [dict(d_model=10, n_heads=3), dict(dropout=1.5), dict(pad_id=1)])
def test_config_rejects_bad_values(kwargs):
    with pytest.raises(ValueError):
        ModelConfig(**kwargs)


def test_the_config_and_the_model_name_the_same_activations():
    # config.ACTIVATIONS (names, torch-free) and the model's functions are two tables: a name added to one only
    # would pass the config's check and fail at model build (or the reverse: a function no config can choose).
    assert set(nmt_model._ACTIVATIONS) == set(ACTIVATIONS)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_every_activation_the_config_accepts_builds_a_model(activation):
    cfg = ModelConfig(vocab_size=50, d_model=16, n_heads=2, d_ff=32, n_encoder_layers=1, n_decoder_layers=1,
                      activation=activation)
    model = Transformer(cfg).eval()
    src = torch.randint(4, 50, (2, 5))
    with torch.no_grad():
        out = model(src, src != 0, torch.randint(4, 50, (2, 3)))
    assert torch.isfinite(out).all()
