"""The ONNX contract: graph file names, input/output names and dynamic axes, shared by export and engine.

Two graphs for translation, an encoder and a decoder step, and no If-merged decoder (an If node around the
decoder costs several times its speed); a third, explain.onnx, serves /v1/explain only. The key/value cache is one
tensor per decoder layer (i = 0 .. n_decoder_layers - 1), never one stacked tensor: a stacked cache costs a Split of
every input and a Concat of every output each step, which ONNX Runtime's profile showed as 44% of the step
(format_version 1).

encoder.onnx
    src_ids  int64 [sentences, src_len], src_mask bool [sentences, src_len] (True = real token)
    -> cross_k_i, cross_v_i float32 [sentences, n_heads, src_len, d_head]
decoder_step.onnx
    tokens int64 [rows, 1]; positions int64 [rows] (each row's own position = the number of keys/values it has
    cached, < the config's max_positions: the step reads its sinusoid from a table of that many rows); src_mask
    bool [sentences, src_len]; slot_rows int64 [sentences, slots] and row_slot int64 [rows] (which rows are each
    sentence's: engine.runtime.cross_slots); self_k_i, self_v_i float32 [rows, n_heads, capacity,
    d_head] (capacity > every position; row r's keys/values at 0 .. positions[r] - 1, what follows them unread);
    cross_k_i, cross_v_i as the encoder's, once per sentence
    -> logits float32 [rows, vocab] (the output layer's, before the log-softmax); attention [sentences, n_heads,
    slots, src_len] (the last decoder layer's cross-attention weights per slot, as its softmax left them, float32
    (a float16 copy casts them); row r's alignment is the mean over heads of slot row_slot[r] of the flattened
    [sentences * slots], which the engine computes only when a client asks); new_self_k_i, new_self_v_i [rows,
    n_heads, capacity, d_head]: the caches with this step's key/value at positions[r]. Bound to the same buffers as
    self_k_i, self_v_i (I/O binding), the step writes one position per row in place (engine/runtime.py does so).
Cross K/V are inputs of the step, never outputs: re-emitting them every step is a known slowdown.
explain.onnx (optional: serving never runs it; engine/explain.py does, when a client asks)
    src_ids, src_mask as above; tgt_in int64 [batch, tgt_len] (bos, then the target tokens)
    -> encoder_self_attention float32 [batch, n_encoder_layers, n_heads, src_len, src_len],
    decoder_self_attention [batch, n_decoder_layers, n_heads, tgt_len, tgt_len],
    cross_attention [batch, n_decoder_layers, n_heads, tgt_len, src_len]: every layer's and head's weights
    (nmt.model.Transformer.attention_maps), kept out of the serving graphs so that they cost serving nothing.

Format 3 added positions and a mask of each row's cached positions, so that rows which joined a running batch at
different steps (continuous batching, engine/core.py) share one cache. Format 4 keeps the cross K/V once per
sentence instead of once per row (beam): a sentence's beams attend to its memory as one block of queries
(slot_rows, row_slot), so a beam-4 step reads a quarter of the cross K/V, and beams that reorder or sentences that
leave move a quarter as much of it. Format 5 preallocates the self-attention cache: each row's keys/values start at
position 0 of its own row (no mask: a row's length is its position) and the step writes the new ones in place,
through com.microsoft.GroupQueryAttention (``self_attention`` "gqa" in the manifest; its CPU kernel takes per-row
lengths) or, for providers without that kernel in float32 (ONNX Runtime's CUDA one takes float16 only), the same
math in standard ONNX ops (``self_attention`` "standard"); the engine runs both alike. Format 4 and earlier
concatenated the cache every step, a copy of all of it. Format 6 outputs the cross-attention weights per slot
instead of each row's mean over heads: the mean and the row gather were nodes that ran every step for the few
requests that ask for alignments (1-5% of an int8 step), and on CUDA their result was copied to the host every step.
Format 7 outputs logits instead of log-probs: the engine applies the log-softmax itself (engine/runtime.py), and
skips it for steps whose rows all make a greedy choice without scores, which the argmax of the logits gives (7-9% of
an int8 step of 8-40 rows; CTranslate2's greedy search computes log-probs only when scores are asked for too).
"""

FORMAT_VERSION = 7
SELF_ATTENTION = ("gqa", "standard")  # how a decoder step computes its self-attention (format 5)
OPSET = 18
MANIFEST = "manifest.json"
ENCODER_FILE = "encoder.onnx"
DECODER_STEP_FILE = "decoder_step.onnx"
CONFIG_FILE = "config.json"
EXPLAIN_FILE = "explain.onnx"
EXPLAIN_INPUTS = ("src_ids", "src_mask", "tgt_in")
EXPLAIN_OUTPUTS = ("encoder_self_attention", "decoder_self_attention", "cross_attention")

ENCODER_INPUTS = ("src_ids", "src_mask")
DECODER_STEP_INPUTS = ("tokens", "positions", "src_mask", "slot_rows", "row_slot")


def check_format(manifest: dict, folder: object) -> None:
    """Raises ValueError when an artifact's manifest (a dict; {} = not yet written) is of another format version."""
    version = manifest.get("format_version", FORMAT_VERSION)
    if version != FORMAT_VERSION:
        raise ValueError(f"{folder} has artifact format {version}, this engine reads {FORMAT_VERSION}: re-export it "
                         f"with `python -m export.onnx_export`")


def check_provider(manifest: dict, provider: str, float16: bool, folder: object) -> str | None:
    """What is known of a decoder step (its manifest's ``self_attention``) on ``provider`` ("CUDAExecutionProvider",
    ...): raises ValueError for a step the provider runs wrongly, returns a warning for one it runs slowly, else None.

    Both concern com.microsoft.GroupQueryAttention (``self_attention`` "gqa") on CUDA. In float16 it is wrong: on an
    H200 with onnxruntime-gpu 1.31.1 it agreed with float32 on 0 of 24 parity sentences (test-split BLEU 5.0 instead
    of 27.3) with each of the kernels ONNX Runtime picks from (flash attention with and without its decode path,
    memory-efficient attention), while the same copy of the standard-ops step agreed on 24 of 24
    (scripts/gpu/fp16_paths.py, 2026-12-04). In float32 it is right but slow: ONNX Runtime has no float32 CUDA kernel
    for it, so the node runs on the CPU and the cache crosses to it every step. ``float16``: the step's state is
    float16 (OnnxModel.float16; the manifest of a copy being converted still says float32).
    """
    if provider != "CUDAExecutionProvider" or manifest.get("self_attention") != "gqa":
        return None
    if float16:
        raise ValueError(f"{folder}: a float16 decoder step with GroupQueryAttention translates wrongly on ONNX "
                         f"Runtime's CUDA provider: make the float16 copy from an artifact exported with "
                         f"`python -m export.onnx_export --self-attention standard`")
    return (f"{folder}: the decoder step's GroupQueryAttention runs on the CPU under CUDA, the cache crossing to it "
            f"every step: export with --self-attention standard for CUDA")


def _per_layer(prefix: str, n_layers: int) -> tuple[str, ...]:
    return tuple(f"{prefix}_{i}" for i in range(n_layers))


def encoder_outputs(n_layers: int) -> tuple[str, ...]:
    """cross_k_0 .. cross_k_{n-1}, then cross_v_0 .. cross_v_{n-1}."""
    return _per_layer("cross_k", n_layers) + _per_layer("cross_v", n_layers)


def decoder_inputs(n_layers: int) -> tuple[str, ...]:
    """tokens, positions, src_mask, slot_rows, row_slot, then self_k_*, self_v_*, cross_k_*,
    cross_v_* (each n_layers names)."""
    return (DECODER_STEP_INPUTS + _per_layer("self_k", n_layers) + _per_layer("self_v", n_layers)
            + encoder_outputs(n_layers))


def decoder_outputs(n_layers: int) -> tuple[str, ...]:
    """logits, attention, then new_self_k_*, new_self_v_*."""
    return ("logits", "attention") + _per_layer("new_self_k", n_layers) + _per_layer("new_self_v", n_layers)


def dynamic_axes(name: str) -> dict[int, str]:
    """Named dynamic axes of an input; axes not named are fixed by the model config. Sentences and decoder rows
    are separate axes (a sentence has beam_size rows)."""
    if name in ("src_ids", "src_mask"):
        return {0: "sentences", 1: "src_len"}
    if name == "tgt_in":
        return {0: "sentences", 1: "tgt_len"}
    if name in ("tokens", "positions", "row_slot"):
        return {0: "rows"}
    if name == "slot_rows":
        return {0: "sentences", 1: "slots"}
    if name.startswith("self_"):
        return {0: "rows", 2: "capacity"}
    if name.startswith("cross_"):
        return {0: "sentences", 2: "src_len"}
    return {}
