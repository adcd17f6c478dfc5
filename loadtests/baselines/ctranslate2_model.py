"""CTranslate2 baseline built from the project's own weights through CTranslate2's model-spec API.

    .venv/bin/python -m loadtests.baselines.ctranslate2_model --checkpoint models/en-de --out artifacts/ct2-en-de

The spec mirrors nmt/model.py exactly: post-norm layers (paper section 3.1), sinusoidal positions laid out as
[sin | cos] (our table is copied, not recomputed), embeddings scaled by sqrt(d_model), tied embedding/projection,
LayerNorm epsilon 1e-5 (torch's default). pad can never be generated (a -1e9 bias on its logit), as in our engine.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import ctranslate2
import numpy as np
import sentencepiece as spm
import torch
from ctranslate2.specs import common_spec, transformer_spec

from export.onnx_export import load_checkpoint
from nmt.model import Transformer, sinusoidal_positions

QUANTIZATIONS = ("float32", "int8", "int8_float32", "float16", "int8_float16")


def _linear(spec, linear: torch.nn.Linear) -> None:
    spec.weight = linear.weight.detach().numpy()
    spec.bias = linear.bias.detach().numpy()


def _norm(spec, norm: torch.nn.LayerNorm) -> None:
    spec.gamma = norm.weight.detach().numpy()
    spec.beta = norm.bias.detach().numpy()


def _attention(spec, attn, self_attention: bool) -> None:
    """CTranslate2 fuses Q/K/V (self-attention) or K/V (cross-attention) into one linear layer."""
    q, k, v = (attn.q_proj, attn.k_proj, attn.v_proj)
    weights = [m.weight.detach().numpy() for m in (q, k, v)]
    biases = [m.bias.detach().numpy() for m in (q, k, v)]
    if self_attention:
        spec.linear[0].weight, spec.linear[0].bias = np.concatenate(weights), np.concatenate(biases)
    else:
        spec.linear[0].weight, spec.linear[0].bias = weights[0], biases[0]
        spec.linear[1].weight, spec.linear[1].bias = np.concatenate(weights[1:]), np.concatenate(biases[1:])
    _linear(spec.linear[-1], attn.out_proj)


def build_spec(model: Transformer, pieces: list[str]) -> transformer_spec.TransformerSpec:
    """Translates our Transformer into a CTranslate2 TransformerSpec (weights float32, not yet quantized).

    Raises:
        ValueError: an activation CTranslate2 has no equivalent for.
    """
    cfg = model.cfg
    activation = {"relu": common_spec.Activation.RELU, "swish": common_spec.Activation.SWISH,
                  "gelu": common_spec.Activation.GELU}[cfg.activation]
    spec = transformer_spec.TransformerSpec.from_config(
        (cfg.n_encoder_layers, cfg.n_decoder_layers), cfg.n_heads, pre_norm=False, activation=activation)
    embed = model.embed.weight.detach().numpy()
    positions = sinusoidal_positions(torch.arange(cfg.max_positions), cfg.d_model).numpy()
    scale = math.sqrt(cfg.d_model) if cfg.scale_embedding else 1.0
    for side in (spec.encoder, spec.decoder):
        side.scale_embeddings = scale
        side.position_encodings.encodings = positions
        (side.embeddings[0] if isinstance(side.embeddings, list) else side.embeddings).weight = embed
    for layer_spec, layer in zip(spec.encoder.layer, model.encoder_layers):
        _attention(layer_spec.self_attention, layer.self_attn, self_attention=True)
        _norm(layer_spec.self_attention.layer_norm, layer.self_attn_norm)
        _linear(layer_spec.ffn.linear_0, layer.ffn.fc1)
        _linear(layer_spec.ffn.linear_1, layer.ffn.fc2)
        _norm(layer_spec.ffn.layer_norm, layer.ffn_norm)
    for layer_spec, layer in zip(spec.decoder.layer, model.decoder_layers):
        _attention(layer_spec.self_attention, layer.self_attn, self_attention=True)
        _norm(layer_spec.self_attention.layer_norm, layer.self_attn_norm)
        _attention(layer_spec.attention, layer.cross_attn, self_attention=False)
        _norm(layer_spec.attention.layer_norm, layer.cross_attn_norm)
        _linear(layer_spec.ffn.linear_0, layer.ffn.fc1)
        _linear(layer_spec.ffn.linear_1, layer.ffn.fc2)
        _norm(layer_spec.ffn.layer_norm, layer.ffn_norm)
    bias = model.final_logits_bias.detach().numpy().copy()
    bias[cfg.pad_id] = -1e9  # our engine bans pad; so must the baseline
    spec.decoder.projection.weight = embed
    spec.decoder.projection.bias = bias
    spec.register_source_vocabulary(pieces)
    spec.register_target_vocabulary(pieces)
    spec.config.layer_norm_epsilon = 1e-5
    spec.config.unk_token = pieces[cfg.unk_id]
    spec.config.bos_token = pieces[cfg.bos_id]
    spec.config.eos_token = pieces[cfg.eos_id]
    spec.config.decoder_start_token = pieces[cfg.bos_id]
    return spec


def convert(checkpoint: str | Path, out: str | Path, quantization: str = "float32") -> Path:
    """Writes a CTranslate2 model folder for ``checkpoint`` (model.safetensors, config.json, spm.model).

    Returns the output folder. Raises FileNotFoundError for a missing checkpoint file.
    """
    checkpoint, out = Path(checkpoint), Path(out)
    model = load_checkpoint(checkpoint)
    sp = spm.SentencePieceProcessor(model_file=str(checkpoint / "spm.model"))
    pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    spec = build_spec(model, pieces)
    spec.validate()
    spec.optimize(quantization=quantization)
    out.mkdir(parents=True, exist_ok=True)
    spec.save(str(out))
    return out


class CT2Translator:
    """Translates sentences with a CTranslate2 model folder and the checkpoint's sentencepiece model.

    Sources are given as pieces with eos appended, exactly as our engine feeds its encoder.
    """

    def __init__(self, model_dir: str | Path, spm_model: str | Path, threads: int, compute_type: str = "default",
                 device: str = "cpu") -> None:
        self.translator = ctranslate2.Translator(str(model_dir), device=device, compute_type=compute_type,
                                                 intra_threads=threads, inter_threads=1)
        self.sp = spm.SentencePieceProcessor(model_file=str(spm_model))

    def translate_pieces(self, sources: list[list[str]], beam_size: int, max_length: int, min_length: int = 0,
                         max_batch_size: int = 64) -> list[list[str]]:
        """Target pieces per source (eos excluded)."""
        results = self.translator.translate_batch(
            sources, beam_size=beam_size, max_decoding_length=max_length, min_decoding_length=min_length,
            max_batch_size=max_batch_size, batch_type="examples", length_penalty=1.0)
        return [r.hypotheses[0] for r in results]

    def source_pieces(self, text: str) -> list[str]:
        return self.sp.encode(text, out_type=str) + ["</s>"]

    def translate(self, texts: list[str], beam_size: int, max_length: int = 256) -> list[str]:
        pieces = self.translate_pieces([self.source_pieces(t) for t in texts], beam_size, max_length)
        return [self.sp.decode_pieces(p) for p in pieces]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="models/en-de")
    p.add_argument("--out", required=True)
    p.add_argument("--quantization", choices=QUANTIZATIONS, default="float32")
    args = p.parse_args(argv)
    print(convert(args.checkpoint, args.out, args.quantization))


if __name__ == "__main__":
    main()
