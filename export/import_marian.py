"""Imports a Hugging Face MarianMTModel folder (Marian / OPUS-MT) into this project's checkpoint format.

    python -m export.import_marian --hf-dir opus-mt-en-de/ --out models/opus-mt-en-de
    python -m export.onnx_export --checkpoint models/opus-mt-en-de --out artifacts/opus-mt-en-de \\
        --parity-sentences my_sentences.txt

The folder must hold config.json, model.safetensors (or pytorch_model.bin), source.spm, target.spm and vocab.json,
as the Hugging Face hub serves them; nothing is downloaded. Marian's math is the seed Transformer's (post-norm,
sinusoidal positions with sin/cos halves, scaled embeddings, tied output projection), so the import renames
weights; the variants Marian uses become config flags: the FFN activation (OPUS-MT: swish), scale_embedding, the
final logits bias, separate source/target sentencepiece models over one shared vocabulary, and pad as the decoder
start token. Generation defaults (num_beams, max_length) become the model's decoding defaults.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from nmt.config import ModelConfig
from nmt.model import Transformer, sinusoidal_positions

_ACTIVATION = {"relu": "relu", "swish": "swish", "silu": "swish", "gelu": "gelu"}
_LAYER = {  # Hugging Face name inside a layer -> ours
    "self_attn.": "self_attn.", "self_attn_layer_norm.": "self_attn_norm.", "encoder_attn.": "cross_attn.",
    "encoder_attn_layer_norm.": "cross_attn_norm.", "fc1.": "ffn.fc1.", "fc2.": "ffn.fc2.",
    "final_layer_norm.": "ffn_norm.",
}


class UnsupportedCheckpointError(ValueError):
    """The folder is not a MarianMTModel this importer supports; the message says which setting."""


def marian_config(hf: dict, generation: dict) -> ModelConfig:
    """Maps Hugging Face's MarianConfig (as a dict) to ModelConfig.

    Raises:
        UnsupportedCheckpointError: a setting this model cannot express (the message names it).
    """
    def need(ok: bool, message: str) -> None:
        if not ok:
            raise UnsupportedCheckpointError(message)

    need(hf.get("model_type") == "marian", f"model_type {hf.get('model_type')!r} is not 'marian'")
    need(not hf.get("normalize_before", False), "pre-norm (normalize_before) Marian models are not supported")
    need(hf["encoder_attention_heads"] == hf["decoder_attention_heads"], "encoder and decoder head counts differ")
    need(hf["encoder_ffn_dim"] == hf["decoder_ffn_dim"], "encoder and decoder FFN sizes differ")
    need(hf.get("share_encoder_decoder_embeddings", True), "separate source/target embeddings are not supported")
    need(hf.get("activation_function", "swish") in _ACTIVATION,
         f"activation {hf.get('activation_function')!r} not in {sorted(_ACTIVATION)}")
    defaults = {}
    if generation.get("num_beams"):
        defaults["beam_size"] = int(generation["num_beams"])
    if generation.get("max_length"):
        defaults["max_length"] = int(generation["max_length"])
    return ModelConfig(
        vocab_size=hf["vocab_size"], d_model=hf["d_model"], n_heads=hf["encoder_attention_heads"],
        d_ff=hf["encoder_ffn_dim"], n_encoder_layers=hf["encoder_layers"], n_decoder_layers=hf["decoder_layers"],
        dropout=0.0, max_positions=hf["max_position_embeddings"], pad_id=hf["pad_token_id"],
        unk_id=_unk_id(hf), bos_id=hf.get("decoder_start_token_id", hf["pad_token_id"]), eos_id=hf["eos_token_id"],
        activation=_ACTIVATION[hf.get("activation_function", "swish")],
        scale_embedding=bool(hf.get("scale_embedding", True)), tokenizer="marian", decoding_defaults=defaults)


def _unk_id(hf: dict) -> int:
    return hf.get("unk_token_id", 1) if hf.get("unk_token_id") is not None else 1


def rename_weights(hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hugging Face MarianMTModel state dict -> ours. Unused entries (positions, tied copies) are dropped."""
    out = {}
    for name, tensor in hf_state.items():
        name = name.removeprefix("model.")
        if name in ("shared.weight", "encoder.embed_tokens.weight") and "embed.weight" not in out:
            out["embed.weight"] = tensor
        elif name == "final_logits_bias":
            out["final_logits_bias"] = tensor.reshape(-1)
        elif m := re.match(r"(encoder|decoder)\.layers\.(\d+)\.(.*)", name):
            stack, index, rest = m.groups()
            for theirs, ours in _LAYER.items():
                if rest.startswith(theirs):
                    out[f"{stack}_layers.{index}.{ours}{rest[len(theirs):]}"] = tensor
                    break
            else:
                raise UnsupportedCheckpointError(f"unexpected weight {name}")
    return out


def import_marian(hf_dir: str | Path, out: str | Path) -> ModelConfig:
    """Writes model.safetensors, config.json and the tokenizer files into ``out``; returns the config.

    Raises:
        UnsupportedCheckpointError: an unsupported setting or weight. FileNotFoundError: a file is missing.
        RuntimeError: the renamed weights do not fit the model.
    """
    hf_dir, out = Path(hf_dir), Path(out)
    hf = json.loads((hf_dir / "config.json").read_text())
    gen_path = hf_dir / "generation_config.json"
    cfg = marian_config(hf, json.loads(gen_path.read_text()) if gen_path.exists() else hf)
    if (hf_dir / "model.safetensors").exists():
        hf_state = load_file(hf_dir / "model.safetensors")
    else:
        hf_state = torch.load(hf_dir / "pytorch_model.bin", map_location="cpu", weights_only=True)
    positions = hf_state.get("model.encoder.embed_positions.weight")
    if positions is not None:  # Marian's positions are the fixed sinusoids our model computes: check, not copy
        ours = sinusoidal_positions(torch.arange(positions.shape[0]), cfg.d_model)
        if float((positions - ours).abs().max()) > 1e-3:
            raise UnsupportedCheckpointError("embed_positions differ from the sinusoidal encoding (learned positions?)")
    lm_head, shared = hf_state.get("lm_head.weight"), hf_state.get("model.shared.weight")
    if lm_head is not None and shared is not None and not torch.equal(lm_head, shared):
        raise UnsupportedCheckpointError("lm_head is not tied to the shared embeddings")
    model = Transformer(cfg)
    state = rename_weights(hf_state)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"weights do not fit: missing {missing}, unexpected {unexpected}")
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out / "model.safetensors")
    cfg.to_json(out / "config.json")
    for name in ("source.spm", "target.spm", "vocab.json"):
        shutil.copy(hf_dir / name, out / name)
    return cfg


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf-dir", required=True, help="Hugging Face MarianMTModel folder")
    p.add_argument("--out", required=True, help="checkpoint folder to write")
    args = p.parse_args(argv)
    try:
        cfg = import_marian(args.hf_dir, args.out)
    except (UnsupportedCheckpointError, FileNotFoundError) as e:
        print(f"ERROR: {e}", file=sys.stderr)
        return 1
    print(f"imported {args.hf_dir} -> {args.out}: {cfg}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
