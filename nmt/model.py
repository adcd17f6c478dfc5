"""The encoder-decoder Transformer of "Attention Is All You Need" (Vaswani et al. 2017), post-norm.

Same math as Hugging Face's MarianMTModel: post-norm residual blocks, token embeddings scaled by sqrt(d_model),
sinusoidal positions, one embedding matrix shared by source, target and the output projection.

Masks: ``src_mask`` is bool [batch, src_len], True for a real token, False for padding. Attention turns masks into
an additive bias (0 visible, ``MASK_BIAS`` hidden) so that padding never reaches a softmax's mass.

Incremental decoding (:meth:`Transformer.decode_step`) carries one self-attention key/value cache per decoder layer
([rows, n_heads, past_len, d_head]); the cross-attention keys/values are computed once from the encoder output
(:meth:`Transformer.cross_kv`), kept once per sentence however many beams it has, and passed in every step, never
recomputed. For continuous batching a step also takes each row's own position and a mask of which cached positions
are its own, so that rows which joined a running batch at different steps share one padded cache.

:meth:`Transformer.decode_step_cached` is the same step over a preallocated cache [rows, n_heads, capacity, d_head]
in which each row's keys/values start at position 0 and the step writes the next one at the row's own position
(:func:`cached_self_attention`): what the exported decoder step computes (engine/contract.py, format 7: up to
the logits).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from nmt.config import ModelConfig

# Large finite negative rather than -inf: a fully masked row (a pure-padding row) then gives a uniform softmax
# instead of NaN.
MASK_BIAS = -1e9


def sinusoidal_positions(positions: Tensor, d_model: int) -> Tensor:
    """Sinusoidal position encodings (paper section 3.5).

    PE(pos, i) = sin(pos / 10000^(2i/d_model)) for i < d_model/2 and cos(...) for the second half. The paper
    interleaves sin and cos; we concatenate them as Marian does (a fixed permutation of dimensions, same function).

    Args:
        positions: int64 [...], absolute positions starting at 0.
    Returns:
        float32 [..., d_model].
    """
    half = d_model // 2
    inv_freq = torch.exp(torch.arange(half, dtype=torch.float32, device=positions.device)
                         * (-2.0 * math.log(10000.0) / d_model))
    angles = positions.to(torch.float32).unsqueeze(-1) * inv_freq  # [..., half]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)


def padding_bias(mask: Tensor) -> Tensor:
    """bool [batch, k_len] (True = attend) -> float32 additive bias [batch, 1, 1, k_len]."""
    return torch.where(mask, 0.0, MASK_BIAS)[:, None, None, :]


def causal_bias(length: int, device: torch.device | None = None) -> Tensor:
    """Float32 [1, 1, length, length]: position t sees positions <= t only (paper section 3.2.3)."""
    hidden = torch.ones(length, length, dtype=torch.bool, device=device).triu(1)
    return torch.where(hidden, MASK_BIAS, 0.0)[None, None]


class MultiHeadAttention(nn.Module):
    """Multi-head scaled dot-product attention, softmax(Q K^T / sqrt(d_head)) V (paper equation 1, section 3.2.2)."""

    def __init__(self, d_model: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        self.n_heads, self.d_head = n_heads, d_model // n_heads
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model)
        self.v_proj = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)
        self.dropout = nn.Dropout(dropout)

    def split_heads(self, x: Tensor) -> Tensor:
        """[batch, len, d_model] -> [batch, n_heads, len, d_head]."""
        batch, length, _ = x.shape
        return x.view(batch, length, self.n_heads, self.d_head).transpose(1, 2)

    def project_kv(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """[batch, len, d_model] -> keys and values, each [batch, n_heads, len, d_head]."""
        return self.split_heads(self.k_proj(x)), self.split_heads(self.v_proj(x))

    def attend(self, x: Tensor, k: Tensor, v: Tensor, bias: Tensor) -> tuple[Tensor, Tensor]:
        """Queries from x [batch, q_len, d_model] over k, v [batch, n_heads, k_len, d_head].

        bias: float32, broadcastable to [batch, n_heads, q_len, k_len].
        Returns the output [batch, q_len, d_model] and the weights [batch, n_heads, q_len, k_len].
        """
        q = self.split_heads(self.q_proj(x)) * (self.d_head ** -0.5)
        weights = torch.softmax(q @ k.transpose(-1, -2) + bias, dim=-1)  # [batch, n_heads, q_len, k_len]
        context = self.dropout(weights) @ v  # [batch, n_heads, q_len, d_head]
        batch, _, q_len, _ = context.shape
        out = self.out_proj(context.transpose(1, 2).reshape(batch, q_len, self.n_heads * self.d_head))
        return out, weights

    # ---- one decoding step: a single query per row, kept 2-D --------------------------------------------------
    # With one query per row the hidden states stay [rows, d_model]: heads are a reshape, not a transpose, and each
    # projection exports as a 2-D MatMul + Add, which ONNX Runtime fuses into one Gemm (on [rows, 1, d_model] it
    # could not, and every bias was an Add kernel of its own). Same math as attend(); inference only (no dropout).

    def step_qkv(self, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """y [rows, d_model] -> q, k, v, each [rows, n_heads, 1, d_head], through one fused projection (one GEMM
        of [d_model, 3 d_model] instead of three)."""
        return tuple(self._heads(t) for t in self._step_qkv_packed(y).split(self.n_heads * self.d_head, dim=-1))

    def _step_qkv_packed(self, y: Tensor) -> Tensor:
        """y [rows, d_model] -> [rows, 3 d_model]: q, k, v side by side, through one [d_model, 3 d_model] GEMM."""
        weight = torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight])
        bias = torch.cat([self.q_proj.bias, self.k_proj.bias, self.v_proj.bias])
        return y @ weight.t() + bias

    def _rows_heads(self, y: Tensor, batch: int, length: int) -> Tensor:
        """[batch * length, d_model] -> [batch, n_heads, length, d_head]: one copy (the transpose)."""
        return y.view(batch, length, self.n_heads, self.d_head).transpose(1, 2)

    def self_attend_rows(self, x: Tensor, batch: int, length: int, bias: Tensor) -> Tensor:
        """Self-attention of x [batch * length, d_model] (each sentence's positions together): attend(x,
        *project_kv(x), bias) with every projection 2-D, so that ONNX Runtime runs each as one Gemm with its bias.
        q, k and v are three GEMMs, each output transposed into heads once: one packed [d_model, 3 d_model] GEMM
        needed a Split (or Slice and Squeeze) copy of its output on top, 9% of the int8 encoder graph (the encoder
        over the 500 test sentences: int8 -9%, float32 -5%, docs/performance.md). bias broadcastable to [batch,
        n_heads, length, length]. Returns [batch * length, d_model]; inference only (no dropout)."""
        q, k, v = (self._rows_heads(p(x), batch, length) for p in (self.q_proj, self.k_proj, self.v_proj))
        weights = torch.softmax((q * self.d_head ** -0.5) @ k.transpose(-1, -2) + bias, dim=-1)
        context = (weights @ v).transpose(1, 2).reshape(batch * length, self.n_heads * self.d_head)
        return context @ self.out_proj.weight.t() + self.out_proj.bias

    def step_cached(self, y: Tensor, past_k: Tensor, past_v: Tensor, positions: Tensor,
                    custom_op: bool = True) -> tuple[Tensor, Tensor, Tensor]:
        """Self-attention of y [rows, d_model] over a preallocated cache (:func:`cached_self_attention`; the plain
        PyTorch version when ``custom_op`` is False). Returns the output [rows, d_model] and the caches with this
        step's key/value written at ``positions``."""
        attend = cached_self_attention if custom_op else _cached_self_attention
        context, k, v = attend(self._step_qkv_packed(y), past_k, past_v, positions, self.n_heads)
        return context @ self.out_proj.weight.t() + self.out_proj.bias, k, v

    def step_q(self, y: Tensor) -> Tensor:
        """y [rows, d_model] -> projected queries already scaled by 1 / sqrt(d_head), [rows, d_model] (heads side by
        side). The scale is folded into the projection's weight and bias (constants the export folds), so that the
        scores' MatMul carries no alpha: ONNX Runtime's MLAS then takes its one-row kernel, which reads K without
        packing it, for the one query per sentence of a greedy step (1.6x on that op, docs/performance.md). For a
        power-of-two scale (d_head 64: 1/8) the queries are the same floats as scaling after the projection."""
        scale = self.d_head ** -0.5
        return y @ (self.q_proj.weight * scale).t() + self.q_proj.bias * scale

    def step_attend(self, q: Tensor, k: Tensor, v: Tensor, bias: Tensor) -> tuple[Tensor, Tensor]:
        """q [rows, n_heads, 1, d_head] over k, v [rows, n_heads, k_len, d_head]; bias broadcastable to [rows,
        n_heads, 1, k_len]. Returns the output [rows, d_model] and the weights [rows, n_heads, 1, k_len]."""
        weights = torch.softmax((q * self.d_head ** -0.5) @ k.transpose(-1, -2) + bias, dim=-1)
        context = (weights @ v).reshape(q.shape[0], self.n_heads * self.d_head)
        return context @ self.out_proj.weight.t() + self.out_proj.bias, weights

    def step_attend_slots(self, q: Tensor, k: Tensor, v: Tensor, bias: Tensor, slot_rows: Tensor,
                          row_slot: Tensor) -> tuple[Tensor, Tensor]:
        """Encoder-decoder attention with keys/values once per sentence: a sentence's rows (its beams) are one
        query block over its own memory, as CTranslate2 folds beams into the query, so a step reads each
        sentence's cross K/V once instead of once per beam.

        q: [rows, d_model], the projected and scaled queries (:meth:`step_q`); k, v: [sentences, n_heads, src_len,
        d_head]; bias broadcastable to [sentences, n_heads, 1, src_len]; slot_rows int64 [sentences, slots]: the row
        in each sentence's slot (its first rows; unused slots repeat any row, their results are dropped); row_slot
        int64 [rows]: each row's slot in the flattened [sentences * slots] layout (engine.runtime.cross_slots makes
        both).
        Returns the output [rows, d_model] and the weights per slot [sentences, n_heads, slots, src_len] as the
        softmax left them (:func:`slot_attention_rows` gives each row's mean over heads): a step graph that outputs
        this tensor adds no node for it, where a mean and a gather each step cost 1-5% of the int8 step.
        """
        sentences, slots = slot_rows.shape
        # index_select (one Gather in ONNX) and reshapes with -1 keep the step graph's node count down: in a step
        # of 8 rows its small nodes took about as long as its attention kernels (ONNX Runtime's profile, int8).
        grouped = q.index_select(0, slot_rows.reshape(-1)).view(sentences, slots, self.n_heads, self.d_head)
        weights = torch.softmax(grouped.transpose(1, 2) @ k.transpose(-1, -2) + bias, dim=-1)
        context = (weights @ v).transpose(1, 2).reshape(-1, self.n_heads * self.d_head).index_select(0, row_slot)
        return context @ self.out_proj.weight.t() + self.out_proj.bias, weights

    def _heads(self, x: Tensor) -> Tensor:
        """[rows, d_model] -> [rows, n_heads, 1, d_head] (a reshape: one query per row)."""
        return x.view(x.shape[0], self.n_heads, 1, self.d_head)


def slot_attention_rows(weights: Tensor, row_slot: Tensor) -> Tensor:
    """Cross-attention weights per slot [sentences, n_heads, slots, src_len] (:meth:`MultiHeadAttention.
    step_attend_slots`) -> each row's mean over heads [rows, src_len] (row_slot int64 [rows], its slot in the
    flattened [sentences * slots] layout); engine/runtime.py does the same in numpy when a client asks."""
    return weights.mean(dim=1).reshape(-1, weights.shape[-1]).index_select(0, row_slot)


def _cached_self_attention(qkv: Tensor, past_k: Tensor, past_v: Tensor, positions: Tensor,
                           n_heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """Reference of :func:`cached_self_attention` in plain PyTorch ops (also what the graph holds when exported
    without com.microsoft ops)."""
    rows, _, capacity, d_head = past_k.shape
    q, k, v = qkv.view(rows, 3, n_heads, d_head).unbind(1)  # each [rows, n_heads, d_head]
    at = torch.arange(rows, device=qkv.device)
    present_k, present_v = past_k.clone(), past_v.clone()
    present_k[at, :, positions] = k
    present_v[at, :, positions] = v
    visible = torch.arange(capacity, device=qkv.device)[None, :] <= positions[:, None]  # [rows, capacity]
    scores = (q[:, :, None, :] * d_head ** -0.5) @ present_k.transpose(-1, -2) + padding_bias(visible)
    context = torch.softmax(scores, dim=-1) @ present_v  # [rows, n_heads, 1, d_head]
    return context.reshape(rows, n_heads * d_head), present_k, present_v


@torch.library.custom_op("nmt::cached_self_attention", mutates_args=())
def cached_self_attention(qkv: Tensor, past_k: Tensor, past_v: Tensor, positions: Tensor,
                          n_heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """Masked self-attention of one new query per row over a preallocated key/value cache (paper section 3.2.3,
    incrementally), with the new key and value written at each row's own position.

    qkv: [rows, 3 d_model], the row's query, key and value projections side by side; past_k, past_v: [rows,
    n_heads, capacity, d_head], row r's earlier keys/values at positions 0 .. positions[r] - 1 (what lies past
    them is never read); positions: int64 [rows], each row's cached length, < capacity. Returns the attention
    context [rows, d_model] (before the output projection) and present_k, present_v: the caches with this step's
    key/value at positions[r]. A custom op so that the ONNX export emits one com.microsoft.GroupQueryAttention
    node (export/onnx_export.py), whose CPU kernel writes the new key/value in place when past and present are one
    buffer (engine/runtime.py binds them so), instead of a Concat that copies the whole cache every step.
    """
    return _cached_self_attention(qkv, past_k, past_v, positions, n_heads)


@cached_self_attention.register_fake
def _(qkv, past_k, past_v, positions, n_heads):
    return qkv.new_empty(qkv.shape[0], qkv.shape[1] // 3), torch.empty_like(past_k), torch.empty_like(past_v)


# One function per name that nmt/config.py accepts (config.ACTIVATIONS, kept torch-free for the engine); a test
# checks that the two name the same activations.
_ACTIVATIONS = {"relu": torch.relu, "swish": nn.functional.silu, "gelu": nn.functional.gelu}


class FeedForward(nn.Module):
    """Position-wise FFN(x) = act(x W1 + b1) W2 + b2 (paper equation 2, section 3.3: act = ReLU)."""

    def __init__(self, d_model: int, d_ff: int, dropout: float, activation: str = "relu") -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d_model, d_ff), nn.Linear(d_ff, d_model)
        self.dropout = nn.Dropout(dropout)
        self.activation = _ACTIVATIONS[activation]

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.dropout(self.activation(self.fc1(x))))

    def step(self, y: Tensor) -> Tensor:
        """[rows, d_model] -> [rows, d_model], as 2-D MatMul + Add (one Gemm each in ONNX Runtime, the first fused
        with the ReLU); inference only."""
        return self.activation(y @ self.fc1.weight.t() + self.fc1.bias) @ self.fc2.weight.t() + self.fc2.bias


class EncoderLayer(nn.Module):
    """Self-attention then FFN, each as LayerNorm(x + Sublayer(x)) (paper section 3.1)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.self_attn = MultiHeadAttention(cfg.d_model, cfg.n_heads, cfg.dropout)
        self.self_attn_norm = nn.LayerNorm(cfg.d_model)
        self.ffn = FeedForward(cfg.d_model, cfg.d_ff, cfg.dropout, cfg.activation)
        self.ffn_norm = nn.LayerNorm(cfg.d_model)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, bias: Tensor) -> tuple[Tensor, Tensor]:
        """x: [batch, src_len, d_model]; bias: [batch, 1, 1, src_len]. Returns the output [batch, src_len, d_model]
        and the self-attention weights [batch, n_heads, src_len, src_len]."""
        attended, weights = self.self_attn.attend(x, *self.self_attn.project_kv(x), bias)
        x = self.self_attn_norm(x + self.dropout(attended))
        return self.ffn_norm(x + self.dropout(self.ffn(x))), weights

    def forward_rows(self, x: Tensor, batch: int, length: int, bias: Tensor) -> Tensor:
        """forward() on x [batch * length, d_model] with 2-D projections (MultiHeadAttention.self_attend_rows,
        FeedForward.step); returns [batch * length, d_model]; inference only."""
        x = self.self_attn_norm(x + self.self_attn.self_attend_rows(x, batch, length, bias))
        return self.ffn_norm(x + self.ffn.step(x))


class DecoderLayer(nn.Module):
    """Masked self-attention, encoder-decoder attention, FFN; each post-norm (paper section 3.1)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.self_attn = MultiHeadAttention(cfg.d_model, cfg.n_heads, cfg.dropout)
        self.self_attn_norm = nn.LayerNorm(cfg.d_model)
        self.cross_attn = MultiHeadAttention(cfg.d_model, cfg.n_heads, cfg.dropout)
        self.cross_attn_norm = nn.LayerNorm(cfg.d_model)
        self.ffn = FeedForward(cfg.d_model, cfg.d_ff, cfg.dropout, cfg.activation)
        self.ffn_norm = nn.LayerNorm(cfg.d_model)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, y: Tensor, self_k: Tensor, self_v: Tensor, self_bias: Tensor,
                cross_k: Tensor, cross_v: Tensor, cross_bias: Tensor) -> tuple[Tensor, Tensor]:
        """y: [batch, q_len, d_model] queries; self_k/v: [batch, n_heads, k_len, d_head] keys/values of the
        target prefix (y's own projections included); cross_k/v: [batch, n_heads, src_len, d_head].
        Returns the output [batch, q_len, d_model], the self-attention weights [batch, n_heads, q_len, k_len] and
        the cross-attention weights [batch, n_heads, q_len, src_len]."""
        attended, self_weights = self.self_attn.attend(y, self_k, self_v, self_bias)
        y = self.self_attn_norm(y + self.dropout(attended))
        attended, cross_weights = self.cross_attn.attend(y, cross_k, cross_v, cross_bias)
        y = self.cross_attn_norm(y + self.dropout(attended))
        return self.ffn_norm(y + self.dropout(self.ffn(y))), self_weights, cross_weights

    def step(self, y: Tensor, past_k: Tensor, past_v: Tensor, self_bias: Tensor, cross_k: Tensor, cross_v: Tensor,
             cross_bias: Tensor, slot_rows: Tensor, row_slot: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """One incremental step of :meth:`forward` for one query per row, inference only.

        y: [rows, d_model]; past_k/v: [rows, n_heads, past_len, d_head]; self_bias broadcastable to [rows, n_heads,
        1, past_len + 1]; cross_k/v: [sentences, n_heads, src_len, d_head], once per sentence; cross_bias to
        [sentences, n_heads, 1, src_len]; slot_rows, row_slot: which rows are whose
        (:meth:`MultiHeadAttention.step_attend_slots`). Returns the output [rows, d_model], the new keys and values
        [rows, n_heads, past_len + 1, d_head] (this position's appended last) and the cross-attention weights
        per slot [sentences, n_heads, slots, src_len].
        """
        q, k, v = self.self_attn.step_qkv(y)
        k, v = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)
        attended, _ = self.self_attn.step_attend(q, k, v, self_bias)
        y, cross_weights = self._step_after_self_attention(y, attended, cross_k, cross_v, cross_bias, slot_rows,
                                                           row_slot)
        return y, k, v, cross_weights

    def step_cached(self, y: Tensor, past_k: Tensor, past_v: Tensor, positions: Tensor, cross_k: Tensor,
                    cross_v: Tensor, cross_bias: Tensor, slot_rows: Tensor, row_slot: Tensor,
                    custom_op: bool = True) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """:meth:`step` over a preallocated cache: past_k/v [rows, n_heads, capacity, d_head] with each row's keys
        at 0 .. positions[r] - 1; this position's key/value are written at positions[r] instead of appended.
        Returns the output [rows, d_model], the caches (same shape) and the cross-attention weights per slot."""
        attended, k, v = self.self_attn.step_cached(y, past_k, past_v, positions, custom_op)
        y, cross_weights = self._step_after_self_attention(y, attended, cross_k, cross_v, cross_bias, slot_rows,
                                                           row_slot)
        return y, k, v, cross_weights

    def _step_after_self_attention(self, y: Tensor, attended: Tensor, cross_k: Tensor, cross_v: Tensor,
                                   cross_bias: Tensor, slot_rows: Tensor, row_slot: Tensor) -> tuple[Tensor, Tensor]:
        """The rest of a step once self-attention gave ``attended`` [rows, d_model]: its residual and norm, then
        encoder-decoder attention and the FFN. Returns the output [rows, d_model] and the cross-attention weights
        per slot [sentences, n_heads, slots, src_len]."""
        y = self.self_attn_norm(y + attended)
        attended, cross_weights = self.cross_attn.step_attend_slots(self.cross_attn.step_q(y), cross_k, cross_v,
                                                                    cross_bias, slot_rows, row_slot)
        y = self.cross_attn_norm(y + attended)
        return self.ffn_norm(y + self.ffn.step(y)), cross_weights


class Transformer(nn.Module):
    """Encoder-decoder Transformer with tied embeddings and incremental decoding.

    Shapes use batch (sentences), rows (decoder rows: sentences x beams), src_len, tgt_len, past_len, vocab.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model, padding_idx=cfg.pad_id)
        nn.init.normal_(self.embed.weight, std=cfg.d_model ** -0.5)
        with torch.no_grad():
            self.embed.weight[cfg.pad_id].zero_()
        self.encoder_layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.n_encoder_layers))
        self.decoder_layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.n_decoder_layers))
        # Zero for our own models; Marian checkpoints carry a trained one.
        self.register_buffer("final_logits_bias", torch.zeros(cfg.vocab_size))
        # The decoder step looks its positions up (one Gather in ONNX) instead of computing sin and cos (six nodes
        # each step); the same function's values. Not a weight: left out of checkpoints.
        self.register_buffer("position_table", sinusoidal_positions(torch.arange(cfg.max_positions), cfg.d_model),
                             persistent=False)
        self.dropout = nn.Dropout(cfg.dropout)

    def embed_tokens(self, ids: Tensor, positions: Tensor) -> Tensor:
        """ids int64 [batch, len], positions int64 [len] or [batch, len] -> [batch, len, d_model]; or ids and
        positions [rows] -> [rows, d_model] (one token per row: a decoding step). Paper sections 3.4, 3.5."""
        return self.dropout(self._scaled_embedding(ids) + sinusoidal_positions(positions, self.cfg.d_model))

    def embed_step(self, tokens: Tensor, positions: Tensor) -> Tensor:
        """One token per row, a decoding step: tokens, positions int64 [rows] (positions < max_positions) ->
        [rows, d_model], :meth:`embed_tokens` with the positions' encodings read from a table."""
        return self.dropout(self._scaled_embedding(tokens) + self.position_table.index_select(0, positions))

    def _scaled_embedding(self, ids: Tensor) -> Tensor:
        """Token embeddings times sqrt(d_model) when the config scales them (paper section 3.4)."""
        scale = math.sqrt(self.cfg.d_model) if self.cfg.scale_embedding else 1.0
        return self.embed(ids) * scale

    def output_logits(self, y: Tensor) -> Tensor:
        """[..., d_model] -> logits [..., vocab] through the tied embedding (paper section 3.4)."""
        return y @ self.embed.weight.t() + self.final_logits_bias

    def encode(self, src_ids: Tensor, src_mask: Tensor) -> Tensor:
        """src_ids int64 [batch, src_len], src_mask bool [batch, src_len] -> memory [batch, src_len, d_model]."""
        positions = torch.arange(src_ids.shape[1], device=src_ids.device)
        x, bias = self.embed_tokens(src_ids, positions), padding_bias(src_mask)
        for layer in self.encoder_layers:
            x, _ = layer(x, bias)
        return x

    def encode_cross_kv(self, src_ids: Tensor, src_mask: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """cross_kv(encode(src_ids, src_mask)) for inference, the form the ONNX encoder graph is exported from:
        hidden states kept 2-D [batch * src_len, d_model], so that every projection is one Gemm with its bias (the
        FFN's first fused with its ReLU), and each cross K and V its own GEMM whose output is transposed into heads
        once, the graph's output (packed into one GEMM they were copied three or four times more: permute, slices,
        split, squeeze; self_attend_rows). Returns per decoder layer K and V, each [batch, n_heads, src_len,
        d_head]; no dropout."""
        batch, length = src_ids.shape
        positions = torch.arange(length, device=src_ids.device)
        x = self.embed_tokens(src_ids, positions).reshape(batch * length, self.cfg.d_model)
        bias = padding_bias(src_mask)
        for layer in self.encoder_layers:
            x = layer.forward_rows(x, batch, length, bias)
        projections = [p for layer in self.decoder_layers for p in (layer.cross_attn.k_proj, layer.cross_attn.v_proj)]
        kv = [p(x).view(batch, length, self.cfg.n_heads, self.cfg.d_head).transpose(1, 2) for p in projections]
        return kv[0::2], kv[1::2]

    def cross_kv(self, memory: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """memory [batch, src_len, d_model] -> cross K and V per decoder layer, each [batch, n_heads, src_len,
        d_head]: computed once per sentence, reused by every decoding step. Per-layer lists rather than one
        stacked tensor: a stacked cache makes the ONNX graph split and re-stack it every step (44% of a step's
        time in ONNX Runtime's profile)."""
        pairs = [layer.cross_attn.project_kv(memory) for layer in self.decoder_layers]
        return [k for k, _ in pairs], [v for _, v in pairs]

    def decode(self, tgt_in: Tensor, memory: Tensor, src_mask: Tensor) -> Tensor:
        """Teacher-forced decoder over a whole target prefix.

        tgt_in int64 [batch, tgt_len] (bos first); memory [batch, src_len, d_model]; src_mask bool [batch, src_len].
        Returns logits float32 [batch, tgt_len, vocab].
        """
        positions = torch.arange(tgt_in.shape[1], device=tgt_in.device)
        y = self.embed_tokens(tgt_in, positions)
        self_bias, cross_bias = causal_bias(tgt_in.shape[1], tgt_in.device), padding_bias(src_mask)
        cross_k, cross_v = self.cross_kv(memory)
        for i, layer in enumerate(self.decoder_layers):
            k, v = layer.self_attn.project_kv(y)
            y, _, _ = layer(y, k, v, self_bias, cross_k[i], cross_v[i], cross_bias)
        return self.output_logits(y)

    def forward(self, src_ids: Tensor, src_mask: Tensor, tgt_in: Tensor) -> Tensor:
        """Training forward: returns logits float32 [batch, tgt_len, vocab]."""
        return self.decode(tgt_in, self.encode(src_ids, src_mask), src_mask)

    def attention_maps(self, src_ids: Tensor, src_mask: Tensor, tgt_in: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Every layer's and head's attention weights over a whole (teacher-forced) target, for the explain view.

        src_ids int64 [batch, src_len], src_mask bool [batch, src_len], tgt_in int64 [batch, tgt_len] (bos first).
        Returns float32 encoder self-attention [batch, n_encoder_layers, n_heads, src_len, src_len], decoder
        (masked) self-attention [batch, n_decoder_layers, n_heads, tgt_len, tgt_len] and encoder-decoder attention
        [batch, n_decoder_layers, n_heads, tgt_len, src_len]; each row sums to 1 (paper section 3.2.3: the three
        uses of attention).
        """
        positions = torch.arange(src_ids.shape[1], device=src_ids.device)
        x, src_bias = self.embed_tokens(src_ids, positions), padding_bias(src_mask)
        encoder = []
        for layer in self.encoder_layers:
            x, weights = layer(x, src_bias)
            encoder.append(weights)
        y = self.embed_tokens(tgt_in, torch.arange(tgt_in.shape[1], device=tgt_in.device))
        self_bias = causal_bias(tgt_in.shape[1], tgt_in.device)
        cross_k, cross_v = self.cross_kv(x)
        decoder, cross = [], []
        for i, layer in enumerate(self.decoder_layers):
            k, v = layer.self_attn.project_kv(y)
            y, self_weights, cross_weights = layer(y, k, v, self_bias, cross_k[i], cross_v[i], src_bias)
            decoder.append(self_weights)
            cross.append(cross_weights)
        return torch.stack(encoder, 1), torch.stack(decoder, 1), torch.stack(cross, 1)

    def decode_step(self, tokens: Tensor, self_k: list[Tensor], self_v: list[Tensor], cross_k: list[Tensor],
                    cross_v: list[Tensor], src_mask: Tensor, positions: Tensor | None = None,
                    past_mask: Tensor | None = None, slot_rows: Tensor | None = None,
                    row_slot: Tensor | None = None) -> tuple[Tensor, list[Tensor], list[Tensor], Tensor]:
        """One incremental decoding step with a key/value cache.

        Args:
            tokens: int64 [rows, 1], the last token of each row (bos at the first step).
            self_k, self_v: per decoder layer, float32 [rows, n_heads, past_len, d_head], the cache; past_len may
                be 0.
            cross_k, cross_v: per decoder layer, float32 [sentences, n_heads, src_len, d_head], from
                :meth:`cross_kv`: once per sentence, however many rows (beams) it has.
            src_mask: bool [sentences, src_len].
            positions: int64 [rows], each row's position (its number of earlier target tokens, bos included);
                None = past_len for every row.
            past_mask: bool [rows, past_len], True where a cached position belongs to the row (rows that joined a
                running batch later have padding there); None = all True. The new token always sees itself.
            slot_rows: int64 [sentences, slots] and row_slot int64 [rows], which rows belong to which sentence
                (:meth:`MultiHeadAttention.step_attend_slots`; engine.runtime.cross_slots makes them); None = one
                row per sentence, in order.
        Returns:
            log_probs float32 [rows, vocab]; new self_k and self_v per layer [rows, n_heads, past_len + 1, d_head]
            (the new token's keys/values appended last); attention float32 [rows, src_len], the last decoder
            layer's cross-attention weights averaged over heads (the alignment of this target token to the source
            tokens; rows sum to 1).
        """
        rows, past_len = tokens.shape[0], self_k[0].shape[2]
        if positions is None:
            positions = torch.full((rows,), past_len, dtype=torch.int64, device=tokens.device)
        y = self.embed_step(tokens[:, 0], positions)  # [rows, d_model]: one query per row, kept 2-D
        cross_bias = padding_bias(src_mask)
        if slot_rows is None:  # one row per sentence
            row_slot = torch.arange(rows, device=tokens.device)
            slot_rows = row_slot[:, None]
        if past_mask is None:  # the single query sees every cached position and itself
            self_bias = torch.zeros(1, device=tokens.device)
        else:
            self_bias = padding_bias(torch.cat([past_mask, torch.ones_like(tokens, dtype=torch.bool)], dim=1))
        new_k, new_v = [], []
        for i, layer in enumerate(self.decoder_layers):
            y, k, v, cross_weights = layer.step(y, self_k[i], self_v[i], self_bias, cross_k[i], cross_v[i],
                                                cross_bias, slot_rows, row_slot)
            new_k.append(k)
            new_v.append(v)
        log_probs = torch.log_softmax(self.output_logits(y), dim=-1)
        return log_probs, new_k, new_v, slot_attention_rows(cross_weights, row_slot)

    def decode_step_cached(self, tokens: Tensor, positions: Tensor, self_k: list[Tensor], self_v: list[Tensor],
                           cross_k: list[Tensor], cross_v: list[Tensor], src_mask: Tensor, slot_rows: Tensor,
                           row_slot: Tensor, custom_op: bool = True, attention_per_slot: bool = False,
                           log_softmax: bool = True) -> tuple[Tensor, list[Tensor], list[Tensor], Tensor]:
        """:meth:`decode_step` over a preallocated cache, what the exported decoder step computes (engine/contract.py,
        format 7: with ``log_softmax`` False).

        Args:
            tokens: int64 [rows, 1]; positions: int64 [rows], each row's position = its cached length.
            self_k, self_v: per decoder layer, float32 [rows, n_heads, capacity, d_head], capacity > every position;
                row r's own keys/values at 0 .. positions[r] - 1, whatever follows them unread.
            cross_k, cross_v, src_mask, slot_rows, row_slot: as :meth:`decode_step`.
            custom_op: self-attention through :func:`cached_self_attention` (exports as GroupQueryAttention), else
                plain PyTorch ops (exports as ScatterND + MatMul, for providers without that kernel).
            attention_per_slot: return the last layer's cross-attention weights as the softmax left them, [sentences,
                n_heads, slots, src_len] (what the exported step outputs, engine/contract.py format 6), instead of
                each row's mean over heads.
            log_softmax: False returns the output layer's logits instead of log-probs (what the exported step
                outputs: the engine applies the log-softmax only where a search reads log-probs).
        Returns:
            log_probs (or logits) float32 [rows, vocab]; the caches, same shapes, with this step's keys/values at
            positions; attention float32 [rows, src_len] as :meth:`decode_step` (or per slot, above).
        """
        y = self.embed_step(tokens[:, 0], positions)
        cross_bias = padding_bias(src_mask)
        new_k, new_v = [], []
        for i, layer in enumerate(self.decoder_layers):
            y, k, v, cross_weights = layer.step_cached(y, self_k[i], self_v[i], positions, cross_k[i], cross_v[i],
                                                       cross_bias, slot_rows, row_slot, custom_op)
            new_k.append(k)
            new_v.append(v)
        logits = self.output_logits(y)
        log_probs = torch.log_softmax(logits, dim=-1) if log_softmax else logits
        return log_probs, new_k, new_v, (cross_weights if attention_per_slot
                                         else slot_attention_rows(cross_weights, row_slot))

    def empty_cache(self, rows: int) -> tuple[list[Tensor], list[Tensor]]:
        """Zero-length self-attention cache: per decoder layer, float32 [rows, n_heads, 0, d_head] keys and values."""
        shape = (rows, self.cfg.n_heads, 0, self.cfg.d_head)
        device = self.embed.weight.device
        n = self.cfg.n_decoder_layers
        return [torch.zeros(shape, device=device) for _ in range(n)], [torch.zeros(shape, device=device)
                                                                        for _ in range(n)]

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
