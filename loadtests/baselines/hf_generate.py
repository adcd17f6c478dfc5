"""Hugging Face transformers baseline: our weights as a MarianMTModel, decoded by ``generate()``.

    .venv/bin/python -m loadtests.baselines.hf_generate --checkpoint models/en-de --out artifacts/hf-en-de

This is what a user of transformers (or optimum's PyTorch path) runs today. Marian's architecture is the seed
Transformer's (post-norm, sinusoidal positions in [sin | cos] halves, embeddings scaled by sqrt(d_model), tied
output projection, a final logits bias), so our checkpoint becomes a MarianMTModel by renaming weights: the inverse
of export/import_marian.py. Marian bans pad from generation as our engine does, and the decoder starts from our bos.
Token ids cross as they are: the engine's sentencepiece tokenizer makes the source ids and reads the output ids.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from export.import_marian import _LAYER
from export.onnx_export import load_checkpoint
from nmt.model import Transformer

_OURS_TO_HF = {ours: theirs for theirs, ours in _LAYER.items()}


def marian_model(model: Transformer):
    """Our Transformer -> an eval-mode transformers.MarianMTModel with the same weights (float32).

    Raises:
        ValueError: an activation Marian has no name for.
        RuntimeError: the renamed weights do not fit the Marian model.
    """
    from transformers import MarianConfig, MarianMTModel

    cfg = model.cfg
    activation = {"relu": "relu", "swish": "swish", "gelu": "gelu"}.get(cfg.activation)
    if activation is None:
        raise ValueError(f"activation {cfg.activation!r} has no Marian equivalent")
    config = MarianConfig(
        vocab_size=cfg.vocab_size, decoder_vocab_size=cfg.vocab_size, d_model=cfg.d_model,
        encoder_layers=cfg.n_encoder_layers, decoder_layers=cfg.n_decoder_layers,
        encoder_attention_heads=cfg.n_heads, decoder_attention_heads=cfg.n_heads, encoder_ffn_dim=cfg.d_ff,
        decoder_ffn_dim=cfg.d_ff, max_position_embeddings=cfg.max_positions, activation_function=activation,
        scale_embedding=cfg.scale_embedding, pad_token_id=cfg.pad_id, eos_token_id=cfg.eos_id,
        bos_token_id=cfg.bos_id, decoder_start_token_id=cfg.bos_id, forced_eos_token_id=None, dropout=0.0,
        attention_dropout=0.0, activation_dropout=0.0, share_encoder_decoder_embeddings=True,
        tie_word_embeddings=True)
    hf = MarianMTModel(config).eval()
    state = {}
    for name, tensor in model.state_dict().items():
        if name == "embed.weight":
            for key in ("model.shared.weight", "model.encoder.embed_tokens.weight",
                        "model.decoder.embed_tokens.weight", "lm_head.weight"):
                state[key] = tensor
        elif name == "final_logits_bias":
            state["final_logits_bias"] = tensor.reshape(1, -1)
        else:
            stack, rest = name.split("_layers.", 1)
            index, rest = rest.split(".", 1)
            for ours, theirs in _OURS_TO_HF.items():
                if rest.startswith(ours):
                    state[f"model.{stack}.layers.{index}.{theirs}{rest[len(ours):]}"] = tensor
                    break
            else:
                raise RuntimeError(f"no Marian name for {name}")
    missing, unexpected = hf.load_state_dict(state, strict=False)
    # Marian's sinusoidal position tables are computed at construction, not loaded.
    missing = [m for m in missing if not m.endswith("embed_positions.weight")]
    if missing or unexpected:
        raise RuntimeError(f"weights do not fit MarianMTModel: missing {missing}, unexpected {unexpected}")
    return hf


class HFGenerate:
    """Batches of token ids through ``MarianMTModel.generate()`` on the CPU with ``threads`` torch threads.

    Batching as the other systems of loadtests/benchmark.py: sentences sorted by length, batches of at most
    ``max_batch_tokens`` padded source tokens. Search: ``num_beams`` = beam_size, ``length_penalty`` 0 (summed
    log-probs, as the engine and CTranslate2 are run there), greedy when beam_size is 1, no sampling.
    """

    def __init__(self, checkpoint: str | Path, threads: int, max_batch_tokens: int) -> None:
        torch.set_num_threads(threads)
        self.model = marian_model(load_checkpoint(checkpoint))
        self.cfg = self.model.config
        self.max_batch_tokens = max_batch_tokens

    def _batches(self, sources: list[list[int]]):
        order = sorted(range(len(sources)), key=lambda i: len(sources[i]))
        batch: list[int] = []
        for i in order:
            if batch and (len(batch) + 1) * len(sources[i]) > self.max_batch_tokens:
                yield batch
                batch = []
            batch.append(i)
        if batch:
            yield batch

    @torch.inference_mode()
    def generate(self, sources: list[list[int]], beam_size: int, min_length: int = 0,
                 max_length: int = 256) -> list[list[int]]:
        """sources: token ids ending in eos -> each best hypothesis's target ids (bos and eos removed).
        min_length / max_length count generated target tokens (max_new_tokens)."""
        out: list[list[int]] = [[] for _ in sources]
        pad = self.cfg.pad_token_id
        for batch in self._batches(sources):
            width = max(len(sources[i]) for i in batch)
            ids = torch.full((len(batch), width), pad, dtype=torch.int64)
            mask = torch.zeros((len(batch), width), dtype=torch.int64)
            for row, i in enumerate(batch):
                ids[row, :len(sources[i])] = torch.tensor(sources[i])
                mask[row, :len(sources[i])] = 1
            beam = dict(num_beams=beam_size, length_penalty=0.0, early_stopping=True) if beam_size > 1 else {}
            generated = self.model.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                                            min_new_tokens=min_length, max_new_tokens=max_length, **beam)
            for row, i in enumerate(batch):
                tokens = generated[row, 1:].tolist()  # drop the decoder start (bos)
                if self.cfg.eos_token_id in tokens:
                    tokens = tokens[:tokens.index(self.cfg.eos_token_id)]
                out[i] = [t for t in tokens if t != pad]
        return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="models/en-de")
    p.add_argument("--out", required=True, help="folder for the MarianMTModel (save_pretrained)")
    args = p.parse_args(argv)
    marian_model(load_checkpoint(args.checkpoint)).save_pretrained(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
