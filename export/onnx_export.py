"""Exports a trained checkpoint to the ONNX artifact the engine serves, and verifies it against PyTorch.

    python -m export.onnx_export --checkpoint models/en-de --out artifacts/en-de

The checkpoint folder holds model.safetensors, config.json and spm.model (what nmt.train writes). The artifact
folder gets encoder.onnx, decoder_step.onnx, explain.onnx (contract in engine/contract.py), spm.model, config.json and
manifest.json with the opset, graph I/O names, file hashes and the parity figures measured here. Export fails
(ParityError, exit code 1) when ONNX Runtime and PyTorch disagree beyond ``--atol`` or on any greedy/beam output.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import torch
from safetensors.torch import load_file

from engine import contract
from engine.runtime import cross_slots
from engine.tokenizer import TOKENIZER_FILES
from export.publish import publish
from nmt.config import ModelConfig
from nmt.model import Transformer

log = logging.getLogger(__name__)


class ParityError(RuntimeError):
    """ONNX Runtime output differs from PyTorch beyond tolerance, or a decoded output differs."""


def load_checkpoint(folder: str | Path) -> Transformer:
    """Loads model.safetensors + config.json from ``folder`` into an eval-mode Transformer.

    Raises:
        FileNotFoundError: a file is missing. RuntimeError: weights do not match the config.
    """
    folder = Path(folder)
    model = Transformer(ModelConfig.from_json(folder / contract.CONFIG_FILE))
    model.load_state_dict(load_file(folder / "model.safetensors"))
    return model.eval()


class _EncoderGraph(torch.nn.Module):
    """src_ids, src_mask -> cross_k_0 .. cross_k_{L-1}, cross_v_0 .. cross_v_{L-1} (engine/contract.py)."""

    def __init__(self, model: Transformer) -> None:
        super().__init__()
        self.model = model

    def forward(self, src_ids, src_mask):
        cross_k, cross_v = self.model.encode_cross_kv(src_ids, src_mask)  # 2-D projections, fused GEMMs
        return (*cross_k, *cross_v)


class _DecoderStepGraph(torch.nn.Module):
    """Flat per-layer inputs and outputs in contract.decoder_inputs / decoder_outputs order (format 7: logits)."""

    def __init__(self, model: Transformer, self_attention: str = "gqa") -> None:
        super().__init__()
        self.model = model
        self.n_layers = model.cfg.n_decoder_layers
        self.custom_op = self_attention == "gqa"

    def forward(self, tokens, positions, src_mask, slot_rows, row_slot, *caches):
        n = self.n_layers
        self_k, self_v, cross_k, cross_v = (list(caches[i * n:(i + 1) * n]) for i in range(4))
        logits, new_k, new_v, attention = self.model.decode_step_cached(
            tokens, positions, self_k, self_v, cross_k, cross_v, src_mask, slot_rows, row_slot, self.custom_op,
            attention_per_slot=True, log_softmax=False)
        return (logits, attention, *new_k, *new_v)


def _register_gqa_schema() -> None:
    """Declares com.microsoft GroupQueryAttention (ONNX Runtime's contrib op, not in the onnx package) so that
    onnxscript can emit it; only the inputs and attributes the decoder step uses."""
    if onnx.defs.has("GroupQueryAttention", "com.microsoft"):
        return
    param, optional = onnx.defs.OpSchema.FormalParameter, onnx.defs.OpSchema.FormalParameterOption.Optional
    onnx.defs.register_schema(onnx.defs.OpSchema(
        "GroupQueryAttention", "com.microsoft", 1,
        inputs=[param("query", "T"), param("key", "T", param_option=optional),
                param("value", "T", param_option=optional), param("past_key", "T"), param("past_value", "T"),
                param("seqlens_k", "M"), param("total_sequence_length", "M")],
        outputs=[param("output", "T"), param("present_key", "T"), param("present_value", "T")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)"], ""), ("M", ["tensor(int32)"], "")],
        attributes=[onnx.defs.OpSchema.Attribute("num_heads", onnx.defs.OpSchema.AttrType.INT, ""),
                    onnx.defs.OpSchema.Attribute("kv_num_heads", onnx.defs.OpSchema.AttrType.INT, "")]))


def _gqa_translation():
    """nmt::cached_self_attention -> one GroupQueryAttention node: packed QKV [rows, 1, 3 d_model], per-row
    seqlens_k = positions (the cached length before this step), total_sequence_length = max + 1."""
    import onnxscript
    from onnxscript import opset18 as op

    _register_gqa_schema()
    msft = onnxscript.values.Opset("com.microsoft", 1)

    def cached_self_attention(qkv, past_k, past_v, positions, n_heads: int):
        seqlens = op.Cast(positions, to=onnx.TensorProto.INT32)
        total = op.Add(op.ReduceMax(seqlens, keepdims=0), op.Constant(value=onnx.helper.make_tensor(
            "one", onnx.TensorProto.INT32, [], [1])))
        context, present_k, present_v = msft.GroupQueryAttention(
            op.Unsqueeze(qkv, op.Constant(value_ints=[1])), None, None, past_k, past_v, seqlens, total,
            num_heads=n_heads, kv_num_heads=n_heads)
        return op.Squeeze(context, op.Constant(value_ints=[1])), present_k, present_v

    return {torch.ops.nmt.cached_self_attention.default: cached_self_attention}


class _ExplainGraph(torch.nn.Module):
    """src_ids, src_mask, tgt_in -> every layer's and head's attention weights (contract.EXPLAIN_OUTPUTS)."""

    def __init__(self, model: Transformer) -> None:
        super().__init__()
        self.model = model

    def forward(self, src_ids, src_mask, tgt_in):
        return self.model.attention_maps(src_ids, src_mask, tgt_in)


def _export(module, args: tuple, names_in, names_out, path: Path, n_named_args: int,
            translations: dict | None = None) -> None:
    """torch.export-based ONNX export with every axis in contract.dynamic_axes kept dynamic.

    The module's forward takes ``n_named_args`` tensors, then the rest as *args (the per-layer caches); torch.export
    wants dynamic_shapes in that structure.
    """
    dims: dict[str, torch.export.Dim] = {}
    # max bounds only torch.export's reasoning while it traces; the ONNX graph's axes are named and unbounded
    # (dim_param), so neither max_positions nor a batch's rows are limited by it at run time.
    shapes = [{axis: dims.setdefault(dim, torch.export.Dim(dim, min=0, max=4096))
               for axis, dim in contract.dynamic_axes(name).items()} or None for name in names_in]
    dynamic_shapes = tuple(shapes[:n_named_args])
    if len(shapes) > n_named_args:
        dynamic_shapes += (tuple(shapes[n_named_args:]),)
    program = torch.onnx.export(module, args, dynamo=True, input_names=list(names_in),
                                output_names=list(names_out), dynamic_shapes=dynamic_shapes,
                                opset_version=contract.OPSET, optimize=True, verbose=False,
                                custom_translation_table=translations)
    program.save(str(path))


def sample_inputs(model: Transformer, src_len: int = 7, capacity: int = 9):
    """Example tensors for tracing: 3 sentences with 2, 1 and 2 decoder rows at positions 6, 6, 5, 1, 1 (rows that
    joined a running batch later have fewer cached keys); sizes > 1 and distinct (from each other and from the
    model's fixed sizes) so that no axis is specialized."""
    cfg = model.cfg
    row_sentence = np.array([0, 0, 1, 2, 2])
    sentences, rows = 3, len(row_sentence)
    src_ids = torch.randint(4, cfg.vocab_size, (sentences, src_len))
    src_mask = torch.ones(sentences, src_len, dtype=torch.bool)
    src_mask[0, -2:] = False
    with torch.no_grad():
        cross_k, cross_v = model.cross_kv(model.encode(src_ids, src_mask))
    shape = (rows, cfg.n_heads, capacity, cfg.d_head)
    self_k = [torch.randn(shape) for _ in range(cfg.n_decoder_layers)]
    self_v = [torch.randn(shape) for _ in range(cfg.n_decoder_layers)]
    positions = torch.tensor([6, 6, 5, 1, 1])
    slot_rows, row_slot = map(torch.from_numpy, cross_slots(row_sentence))
    step = (torch.randint(4, cfg.vocab_size, (rows, 1)), positions, src_mask, slot_rows, row_slot,
            *self_k, *self_v, *cross_k, *cross_v)
    return (src_ids, src_mask), step


def export_graphs(model: Transformer, out: Path, self_attention: str = "gqa") -> None:
    """Writes encoder.onnx, decoder_step.onnx and explain.onnx into ``out``; ``self_attention`` is one of
    contract.SELF_ATTENTION (the decoder step's kernel; engine/contract.py, format 5).

    Raises:
        ValueError: an unknown ``self_attention``.
    """
    if self_attention not in contract.SELF_ATTENTION:
        raise ValueError(f"self_attention must be one of {contract.SELF_ATTENTION}, got {self_attention!r}")
    enc_args, step_args = sample_inputs(model)
    tgt_in = torch.randint(4, model.cfg.vocab_size, (enc_args[0].shape[0], 5))
    _export(_ExplainGraph(model).eval(), (*enc_args, tgt_in), contract.EXPLAIN_INPUTS, contract.EXPLAIN_OUTPUTS,
            out / contract.EXPLAIN_FILE, n_named_args=3)
    n = model.cfg.n_decoder_layers
    _export(_EncoderGraph(model).eval(), enc_args, contract.ENCODER_INPUTS, contract.encoder_outputs(n),
            out / contract.ENCODER_FILE, n_named_args=2)
    _export(_DecoderStepGraph(model, self_attention).eval(), step_args, contract.decoder_inputs(n),
            contract.decoder_outputs(n), out / contract.DECODER_STEP_FILE,
            n_named_args=len(contract.DECODER_STEP_INPUTS),
            translations=_gqa_translation() if self_attention == "gqa" else None)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def export_checkpoint(checkpoint: str | Path, out: str | Path, parity_sentences: list[str], atol: float = 1e-3,
                      beam_size: int = 4, max_length: int = 64, languages: tuple[str, str] = ("en", "de"),
                      self_attention: str = "gqa") -> dict:
    """Exports, verifies parity and writes the manifest; returns the manifest dict. ``self_attention``: "gqa"
    (ONNX Runtime's GroupQueryAttention: its CPU kernel, and its CUDA one in float16) or "standard" (plain ONNX
    ops, for float32 on CUDA); engine/contract.py, format 5.

    Raises:
        ParityError: max abs log-prob difference > atol, or a greedy/beam output differs from PyTorch.
        ValueError: an unknown ``self_attention``.
    """
    from export.parity import measure_parity  # local: pulls in the engine, only needed here

    checkpoint, out = Path(checkpoint), Path(out)
    model = load_checkpoint(checkpoint)
    with tempfile.TemporaryDirectory(dir=out.parent if out.parent.exists() else None) as tmp_name:
        tmp = Path(tmp_name)
        export_graphs(model, tmp, self_attention)
        for name in TOKENIZER_FILES[model.cfg.tokenizer]:
            shutil.copy(checkpoint / name, tmp / name)
        shutil.copy(checkpoint / contract.CONFIG_FILE, tmp / contract.CONFIG_FILE)
        parity = measure_parity(model, tmp, parity_sentences, beam_size=beam_size, max_length=max_length)
        manifest = dict(
            format_version=contract.FORMAT_VERSION, model_config=json.loads((tmp / contract.CONFIG_FILE).read_text()),
            languages={"source": languages[0], "target": languages[1]}, precision="float32",
            self_attention=self_attention, opset=contract.OPSET, torch_version=torch.__version__,
            graphs={contract.ENCODER_FILE: dict(inputs=contract.ENCODER_INPUTS,
                                                outputs=contract.encoder_outputs(model.cfg.n_decoder_layers)),
                    contract.DECODER_STEP_FILE: dict(inputs=contract.decoder_inputs(model.cfg.n_decoder_layers),
                                                     outputs=contract.decoder_outputs(model.cfg.n_decoder_layers)),
                    contract.EXPLAIN_FILE: dict(inputs=contract.EXPLAIN_INPUTS, outputs=contract.EXPLAIN_OUTPUTS)},
            files={f.name: sha256(f) for f in sorted(tmp.iterdir())},
            parity=dict(parity, atol=atol))
        (tmp / contract.MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        failures = []
        if parity["max_abs_log_prob_diff"] > atol:
            failures.append(f"max abs log-prob difference {parity['max_abs_log_prob_diff']:.3g} > atol {atol}")
        if parity["greedy_mismatches"] or parity["beam_mismatches"]:
            failures.append(f"{parity['greedy_mismatches']} greedy and {parity['beam_mismatches']} beam outputs "
                            f"differ from PyTorch over {parity['sentences']} sentences")
        if failures:
            raise ParityError("export parity failed: " + "; ".join(failures))
        publish(tmp, out)
    return manifest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="models/en-de")
    p.add_argument("--out", default="artifacts/en-de")
    p.add_argument("--parity-sentences", default=str(Path(__file__).with_name("parity_sentences.txt")),
                   help="real sentences, one a line, decoded by both PyTorch and ONNX Runtime")
    p.add_argument("--atol", type=float, default=1e-3, help="max abs log-prob difference allowed")
    p.add_argument("--beam-size", type=int, default=4)
    p.add_argument("--self-attention", choices=contract.SELF_ATTENTION, default="gqa",
                   help="the decoder step's self-attention: ONNX Runtime's GroupQueryAttention (CPU; float16 on "
                        "CUDA) or standard ONNX ops (float32 on CUDA, whose GroupQueryAttention takes float16 only)")
    p.add_argument("--source-language", default="en")
    p.add_argument("--target-language", default="de")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    sentences = [s for s in Path(args.parity_sentences).read_text().splitlines() if s.strip()]
    try:
        manifest = export_checkpoint(args.checkpoint, args.out, sentences, atol=args.atol, beam_size=args.beam_size,
                                     languages=(args.source_language, args.target_language),
                                     self_attention=args.self_attention)
    except ParityError as e:
        print(f"ERROR: {e}", file=sys.stderr)
        return 1
    print(json.dumps(manifest["parity"], indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
